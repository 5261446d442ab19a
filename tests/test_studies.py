import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

import storage
from studies import agc_lambda, analysis, batch_scaling, hpo, search
from studies.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TINY_FLAGS = ["--model-overrides", '{"width": 8, "depth": 1}', "--dataset-params", '{"n_train": 512, "n_val": 128}']


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


# ---- pure pieces, no Ray ----

def test_stability_map_from_table():
    rows = []
    def add(b, lam, status, acc, lr, seed=0):
        rows.append({"trial_id": f"t{len(rows)}", "sci_batch_size": b, "sci_lambda": lam, "status": status,
                     "best_val_acc": acc, "nui_base_lr": lr, "seed": seed})
    add(64, "0.01", "completed", 0.50, 0.1)
    add(64, "0.01", "completed", 0.60, 0.2)
    add(64, "none", "completed", 0.70, 0.1)
    add(1024, "0.01", "completed", 0.40, 0.1)
    add(1024, "0.16", "diverged", None, 0.1)
    add(1024, "0.16", "completed", 0.45, 0.2)
    add(1024, "none", "diverged", None, 0.1)
    add(1024, "none", "diverged", None, 0.2)
    smap = analysis.stability_map(pa.Table.from_pylist(rows))
    assert smap.batch_sizes == [64, 1024] and smap.lambdas == ["0.01", "0.16", "none"]
    assert smap.cell(64, "0.01").best_acc == pytest.approx(0.60)
    assert smap.cell(64, "0.01").best_nuisance == {"nui_base_lr": 0.2}
    assert smap.cell(1024, "0.16").frac_diverged == 0.5 and smap.cell(1024, "0.16").stable
    assert not smap.cell(1024, "none").stable
    assert smap.best_lambda() == {64: "none", 1024: "0.16"}
    assert smap.largest_stable_batch(agc=True) == 1024 and smap.largest_stable_batch(agc=False) == 64
    text = smap.summary()
    assert "DIVERGED 2/2" in text and "1024: 0.16" in text
    fig = analysis.plot_stability_map(smap)
    assert len(fig.axes[0].texts) == 6  # one label per cell
    analysis.close(fig)


def test_top_k_mean_is_the_papers_best_4_of_5():
    assert analysis.top_k_mean([0.1, 0.5, 0.4, 0.3, 0.2], 4) == pytest.approx((0.5 + 0.4 + 0.3 + 0.2) / 4)
    assert analysis.top_k_mean([float("nan"), 0.3], None) == pytest.approx(0.3)


def test_apply_cell_maps_scientific_and_nuisance():
    fixed = TrainConfig(model_overrides={"width": 8, "depth": 1})
    cfg = search.apply_cell(fixed, {"batch_size": 512, "lambda": None}, {"base_lr": 0.3}, seed=7)
    assert (cfg.batch_size, cfg.clipping, cfg.base_lr, cfg.seed) == (512, "none", 0.3, 7)
    cfg = search.apply_cell(fixed, {"lambda": 0.02, "variant": "bn_resnet"}, {}, seed=0)
    assert cfg.clipping == "none" and cfg.model == "bn_resnet_cifar"  # the variant's own clipping wins
    cfg = search.apply_cell(fixed, {"lambda": 0.02}, {}, seed=0)
    assert cfg.clipping == "agc" and cfg.clip_threshold == 0.02


def test_cell_searcher_covers_every_cell_with_seeds_then_finishes():
    from ray.tune.search import Searcher

    cells = [{"batch_size": 64}, {"batch_size": 256}]
    s = search._make_searcher_class()(cells, {"base_lr": (0.05, 1.0, True)}, trials_per_cell=2, seeds=2, seed=0,
                                      centre={"base_lr": 0.1})
    seen = []
    for i in range(8):
        cfg = s.suggest(f"t{i}")
        assert cfg is not None
        seen.append((cfg["cell_index"], cfg["nuisance"]["base_lr"], cfg["seed_index"]))
        s.on_trial_complete(f"t{i}", {"objective": 0.5})
    assert s.suggest("t9") == Searcher.FINISHED
    per_cell = {c: [x for x in seen if x[0] == c] for c in (0, 1)}
    assert all(len(v) == 4 for v in per_cell.values())
    assert per_cell[0][0][1] == pytest.approx(0.1)  # the linear-scaling centre goes first in every cell
    assert per_cell[1][0][1] == pytest.approx(0.1)
    assert sorted(x[2] for x in per_cell[0]) == [0, 0, 1, 1]  # each setting runs with both seeds
    assert all(0.05 <= x[1] <= 1.0 for x in seen)


@pytest.mark.parametrize("flags, msg", [
    (["--batch-sizes", "100000"], "larger than the training split"),
    (["--lambdas", "-0.1"], "λ must be > 0"),
    (["--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
    (["--dataset", "cifar10", "--dataset-params", '{"path": "/no/such/dir"}'], "/no/such/dir"),
    (["--use-gpu", "true"], "GPU"),
])
def test_bad_study_input_fails_before_any_trial(tmp_path, flags, msg, ray_cluster, capsys):
    base = ["--smoke-test", *common_flags(tmp_path)]
    with pytest.raises((SystemExit, ValueError, ConnectionError, RuntimeError, OSError)) as e:
        agc_lambda.main(base + flags)
    assert msg in str(e.value) + capsys.readouterr().err
    assert not (tmp_path / "out" / "s" / "results").exists()


# ---- end to end through Ray Tune ----

@pytest.mark.ray
def test_two_by_two_map_end_to_end(tmp_path, ray_cluster):
    out = agc_lambda.main(["--smoke-test", *common_flags(tmp_path, "grid"), *TINY_FLAGS, "--batch-sizes", "32", "64",
                           "--lambdas", "0.04", "none", "--max-steps", "6"])
    res = out["results"]
    assert res.num_rows == 4 and len(set(res.column("trial_id").to_pylist())) == 4
    assert set(res.column("status").to_pylist()) <= {"completed", "diverged"}
    cells = {(r["sci_batch_size"], r["sci_lambda"]) for r in res.to_pylist()}
    assert cells == {(32, "0.04"), (32, "none"), (64, "0.04"), (64, "none")}
    smap = out["map"]
    assert all(smap.cell(b, lam).trials == 1 for b, lam in cells)

    _, parents, children = mlflow_runs(tmp_path, "grid")
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    by_id = {c.info.run_id: c for c in children}
    for r in res.to_pylist():
        params = by_id[r["mlflow_run_id"]].data.params
        assert int(params["batch_size"]) == r["sci_batch_size"]
        assert params["clipping"] == ("none" if r["sci_lambda"] == "none" else "agc")
        assert float(params["base_lr"]) == pytest.approx(r["nui_base_lr"])
    png = tmp_path / "out" / "grid" / "stability_map.png"
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(png).convert("L"))
    assert img.shape[1] > 400 and len(np.unique(img)) > 20  # a real picture, not a blank canvas
    epochs = storage.ResultsTable(str(tmp_path / "out" / "grid" / "results")).read_epochs()
    assert set(epochs.column("trial_id").to_pylist()) == set(res.column("trial_id").to_pylist())


@pytest.mark.ray
def test_failed_trial_is_recorded_and_study_goes_on(tmp_path, ray_cluster):
    # One cell asks for a model width the builder rejects: that trial fails, the other completes.
    study = search.Study(
        name="fails", scientific={"model_overrides": [{"width": 8, "depth": 1}, {"width": -4, "depth": 1}]},
        nuisance={"base_lr": (0.05, 0.2, True)},
        fixed=TrainConfig(max_steps=4, batch_size=32, dataset_params={"n_train": 256, "n_val": 64},
                          data_root=str(tmp_path / "data")),
        trials_per_cell=1, output=str(tmp_path / "out"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        max_concurrent=2, analyze=lambda *a: ({}, "", {}))
    out = search.run_study(study)
    rows = {r["sci_model_overrides"]: r for r in out["results"].to_pylist()}
    assert rows[json.dumps({"width": -4, "depth": 1})]["status"] == "failed"
    assert "width" in rows[json.dumps({"width": -4, "depth": 1})]["error"]
    assert rows[json.dumps({"width": 8, "depth": 1})]["status"] == "completed"


@pytest.mark.ray
@pytest.mark.parametrize("module", [batch_scaling, hpo])
def test_every_study_smoke_test(tmp_path, ray_cluster, module):
    out = module.main(["--smoke-test", *common_flags(tmp_path, module.__name__.split(".")[-1])])
    assert out["results"].num_rows >= 1
    assert set(out["results"].column("status").to_pylist()) <= {"completed", "diverged"}
    figs = [n for n in out["files"] if n.endswith(".png")]
    assert figs and all(Path(out["files"][n]).stat().st_size > 5000 for n in figs)
    if module is hpo:
        assert set(out["best_params"]) == {"base_lr", "clip_threshold", "augment_strength"}


@pytest.mark.ray
@pytest.mark.slow
def test_resume_after_killing_the_driver(tmp_path):
    flags = ["--smoke-test", *common_flags(tmp_path, "resume"), *TINY_FLAGS, "--batch-sizes", "32", "64",
             "--lambdas", "0.04", "none", "--max-steps", "24", "--max-concurrent", "1"]
    cmd = [sys.executable, str(ROOT / "studies" / "agc_lambda.py"), *flags]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    results = storage.ResultsTable(str(tmp_path / "out" / "resume" / "results"))
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail("the study finished before it could be interrupted")
            try:
                if results.read().num_rows >= 1:
                    break
            except Exception:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("no trial finished in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started (same process group)
        proc.wait()
    done_before = set(results.read().column("trial_id").to_pylist())
    assert 1 <= len(done_before) < 4

    subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=400)
    res = results.read()
    ids = res.column("trial_id").to_pylist()
    assert len(ids) == 4 and len(set(ids)) == 4  # nothing lost, nothing duplicated
    assert done_before <= set(ids)
    _, parents, children = mlflow_runs(tmp_path, "resume")
    assert len(parents) == 1
    assert len(children) == 4 and len({c.data.tags["trial_id"] for c in children}) == 4


def test_local_paths_refused_on_a_multi_node_cluster(tmp_path):
    study = search.Study(name="x", scientific={"batch_size": [32]}, nuisance={"base_lr": (0.05, 0.2, True)},
                         fixed=TrainConfig(data_root="s3://bucket/data"), output="relative/results",
                         tracking_uri="sqlite:////abs/mlflow.db")
    search.check_cluster_paths(study, nodes=1)  # a laptop: fine
    with pytest.raises(ValueError, match="--output relative/results.*--tracking-uri") as e:
        search.check_cluster_paths(study, nodes=3)
    assert "--data-root s3://" not in str(e.value)  # remote data is fine


@pytest.mark.ray
def test_asha_early_stopping_rows_and_runs_are_closed(tmp_path, ray_cluster):
    study = search.Study(
        name="asha", scientific={"batch_size": [32, 64]}, nuisance={"base_lr": (0.05, 3.2, True)},
        fixed=TrainConfig(model_overrides={"width": 8, "depth": 1}, epochs=3, dataset_params={"n_train": 256,
                          "n_val": 64}, data_root=str(tmp_path / "data"), gns_every_steps=0),
        trials_per_cell=3, output=str(tmp_path / "out"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        max_concurrent=2, asha=True, analyze=lambda *a: ({}, "", {}))
    out = search.run_study(study)
    rows = out["results"].to_pylist()
    assert len(rows) == 6 and {r["status"] for r in rows} <= {"completed", "diverged", "stopped"}
    stopped = [r for r in rows if r["status"] == "stopped"]
    epochs = out["epochs"].to_pylist()
    for r in stopped:  # an early-stopped trial keeps the epochs it ran, fewer than the budget
        assert 1 <= len([e for e in epochs if e["trial_id"] == r["trial_id"]]) < 3
    _, _, children = mlflow_runs(tmp_path, "asha")
    assert len(children) == 6 and all(c.info.status != "RUNNING" for c in children)


@pytest.mark.ray
def test_multi_worker_trial_runs_as_torch_trainer_inside_tune(tmp_path, ray_cluster):
    # The cluster path: the Tune trial holds no CPU and builds a 2-worker DDP TorchTrainer.
    out = agc_lambda.main(["--smoke-test", *common_flags(tmp_path, "ddp"), "--num-workers", "2"])
    (row,) = out["results"].to_pylist()
    assert row["status"] == "completed" and row["steps"] == 6
    c, _, (child,) = mlflow_runs(tmp_path, "ddp")
    assert child.data.params["num_workers"] == "2" and "train_loss" in child.data.metrics


@pytest.mark.ray
def test_same_seed_same_study_when_trials_run_one_at_a_time(tmp_path, ray_cluster):
    def run(name):
        out = agc_lambda.main(["--smoke-test", *common_flags(tmp_path, name), "--batch-sizes", "32", "64",
                               "--trials-per-cell", "3", "--max-concurrent", "1", "--seed", "3"])
        return sorted((r["cell"], r["nui_base_lr"], r["seed"], r["best_val_acc"], r["final_train_loss"])
                      for r in out["results"].to_pylist())

    first, second = run("a"), run("b")
    assert len(first) == 6 and first == second
    assert len({r[1] for r in first}) > 2  # TPE explored beyond each cell's centre point
