"""Small shared pieces of the training and study tests: a tiny config, a study's common flags, its MLflow runs."""
from pathlib import Path

from studies.training.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(model="nf_resnet_cifar", model_overrides={"width": 8, "depth": 1}, batch_size=64, max_steps=16,
            log_every_steps=4, gns_every_steps=4, warmup_epochs=0.2, base_lr=0.2, checkpoint_every_epochs=0)
TINY_FLAGS = ["--model-overrides", '{"width": 8, "depth": 1}', "--dataset-params", '{"n_train": 512, "n_val": 128}']
FIGURES = ("stable_region.png", "stability_map.png", "lr_loss.png", "lr_accuracy.png")


def tiny_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


def common_flags(tmp_path, name="s"):
    return ["--output", str(tmp_path / "out"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
            "--data-root", str(tmp_path / "data"), "--name", name]


def mlflow_runs(tmp_path, experiment):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("role") == "study"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return c, parents, children
