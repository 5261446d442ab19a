"""What the MLflow UI shows beyond metrics (studies/training/mlflow_ui.py): the dataset input of a run, its curves."""
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from studies.training import mlflow_ui


class LosesTheRace:
    """A client whose first log_inputs is refused as the SQLite store refuses the second of two trials inserting
    the same dataset row at once; the row is there afterwards (the winner's)."""

    def __init__(self, client):
        self.client, self.calls = client, 0

    def log_inputs(self, run_id, inputs):
        self.calls += 1
        if self.calls == 1:
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                                  "datasets.name, datasets.digest")
        return self.client.log_inputs(run_id, inputs)


def test_a_dataset_insert_lost_to_a_concurrent_trial_is_retried_and_linked_once(tmp_path, tiny_data):
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    run = client.create_run(client.create_experiment("e"))
    racer = LosesTheRace(client)
    mlflow_ui.log_dataset(racer, run.info.run_id, tiny_data)
    inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert racer.calls == 2 and len(inputs) == 1
    assert inputs[0].dataset.name == tiny_data.rstrip("/").rsplit("/", 1)[-1]


def test_curves_png_is_drawn_for_a_run_evaluated_twice_and_not_for_a_scan(tmp_path):
    import numpy as np
    from PIL import Image

    from studies.training.tracking import Tracker

    def artifacts(history):
        tracker = Tracker.create(f"sqlite:///{tmp_path}/m.db", "curves", "run")
        mlflow_ui.log_curves(tracker, history, title="run")
        names = {a.path for a in tracker.client.list_artifacts(tracker.run_id)}
        if "curves.png" in names:
            path = tracker.client.download_artifacts(tracker.run_id, "curves.png", str(tmp_path))
            img = np.asarray(Image.open(path).convert("L"))
            assert img.shape[1] > 400 and len(np.unique(img)) > 20  # a drawn figure, not a blank canvas
        return names

    train = [{"step": 16 * (i + 1), "train_loss": 2.3 - 0.1 * i, "train_acc": 0.1 + 0.05 * i} for i in range(6)]
    val = [{**h, "val_loss": h["train_loss"] + 0.05, "val_acc": h["train_acc"] - 0.02} for h in train]
    assert "curves.png" not in artifacts(train)  # a scan: six epochs, never evaluated
    assert "curves.png" not in artifacts([*train[:5], val[5]])  # evaluated once, at its end: no val curve
    assert "curves.png" in artifacts([train[0], val[1], train[2], val[3]])  # evaluated every other epoch
    assert "curves.png" in artifacts(val)


def test_a_dataset_that_cannot_be_linked_after_its_retries_is_raised(tmp_path, tiny_data):
    class Refuses:
        calls = 0

        def log_inputs(self, run_id, inputs):
            Refuses.calls += 1
            raise MlflowException("store down")

    try:
        mlflow_ui.log_dataset(Refuses(), "r", tiny_data, tries=2)
    except MlflowException:
        assert Refuses.calls == 2
    else:
        raise AssertionError("a store that keeps refusing must be raised (the trial is retried as infrastructure)")


# ---- every trial explains itself (studies/training/run_note.py) ----

def _cfg(**kw):
    from studies.training.config import TrainConfig

    return TrainConfig(**{"model": "nf_resnet_cifar", "batch_size": 1024, "base_lr": 0.1, "clip_threshold": 0.01,
                          "max_steps": 96, "warmup_steps": 0, "lr_schedule": "constant", **kw})


def test_a_trials_description_opens_with_its_verdict_and_the_numbers_that_decided_it():
    from studies.training import run_note
    from studies.training.summary import RunSummary

    trained = RunSummary(status="completed", steps=96, epochs=6, initial_train_loss=2.303, final_train_loss=2.181,
                         final_train_loss_se=0.004)
    first = run_note.note(_cfg(), trained, {"phase": "scan", "cell": "batch_size=1024 lambda=0.01"}).splitlines()[0]
    assert first.startswith("**✓ trained**: training loss 2.303 at the start") and "→ 2.181 ± 0.004" in first
    assert "it fell 0.122, more than the 0.1152 that counts as learning (5% of the start)" in first
    assert run_note.reason(trained) == "2.303→2.181 fell 0.122 > 0.1152"

    stalled = RunSummary(status="completed", steps=96, initial_train_loss=2.303, final_train_loss=2.295,
                         final_train_loss_se=0.05)  # a noisy tail: 3 standard errors (0.15) set the bar
    first = run_note.note(_cfg(), stalled).splitlines()[0]
    assert first.startswith("**≈ stalled**") and "it fell only 0.008, not more than the 0.15" in first
    assert "3 standard errors of the final loss, larger than 5% of the start (0.1152)" in first

    diverged = RunSummary(status="diverged", steps=40, diverged_step=37, diverged_reason="loss 181 > 5.0x initial "
                          "2.3", initial_train_loss=2.3)
    note = run_note.note(_cfg(), diverged, {"phase": "scan"})
    assert note.startswith("**✗ diverged** at step 37 of 96: loss 181 > 5.0x initial 2.3")
    assert "MLflow shows the run Finished" in note and run_note.reason(diverged) == "step 37: loss 181 > 5.0x " \
        "initial 2.3"
    # the peak lr and the base lr named as such; the phase said in words
    assert "**base lr 0.1** per 256 examples" in note and "**peak lr 0.4** (param `peak_lr`)" in note
    assert "Phase `scan`: a short run at a constant lr" in note
    failed = RunSummary(status="failed", error="ConfigError: bad")
    assert run_note.note(_cfg(), failed).startswith("**! failed**: ConfigError: bad")


def test_params_are_the_settings_that_took_effect():
    from studies.training import run_note

    p = run_note.effective_params(_cfg())
    assert p["warmup_steps"] == "0" and "warmup_epochs" not in p  # warmup_steps overrides it
    assert p["max_steps"] == "96" and "epochs" not in p and "gpus_per_worker" not in p
    assert p["base_lr"] == "0.1" and p["peak_lr"] == "0.4"
    p = run_note.effective_params(_cfg(max_steps=None, warmup_steps=None))
    assert p["warmup_epochs"] == "1.0" and p["epochs"] == "5.0"


# ---- the training view, whatever link a user follows (studies/training/mlflow_app.py) ----

def test_the_server_app_stores_the_training_view_before_mlflows_ui_starts():
    from studies.training import mlflow_app

    page = '<!doctype html><html><head><meta charset="utf-8"/><script defer="defer" src="main.js"></script></head>'
    out = mlflow_app.with_training_view(page)
    assert out.index("localStorage.setItem") < out.index("main.js")
    assert 'getItem("mlflow.workflowType_v1")===null' in out  # a choice the user made is kept
    assert 'setItem("mlflow.workflowType_v1","\\"machine_learning\\"")' in out  # stored as JSON, as MLflow does


def test_an_experiment_naming_a_default_view_opens_in_it_and_no_tag_can_close_the_script():
    import json
    from types import SimpleNamespace

    from studies.training import mlflow_app

    state = {"orderByKey": "tags.`order`", "selectedColumns": ["tags.`verdict`"]}
    view = json.dumps({"name": "study", "state": json.dumps(state)})
    exps = [SimpleNamespace(experiment_id="7", tags={"nfnet_lab.default_view": "study",
                                                    "mlflow.sharedViewState.study": view}),
            SimpleNamespace(experiment_id="8", tags={"nfnet_lab.default_view": "gone"}),  # no such view: none
            SimpleNamespace(experiment_id="9", tags={})]
    views = mlflow_app.default_views(exps)
    assert views == {'MLflowLocalStorage-1.1-ExperimentPage-["7"]-ReactComponentState': state}
    script = mlflow_app._preset_script({"k": "</script><script>alert(1)</script>"})
    assert script.count("</script>") == 1 and script.endswith("</script>") and "\\u003c/script>" in script
