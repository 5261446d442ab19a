"""MLflow tracking: buffered metrics survive an outage; credentials never printed, never taken from a flag."""
import pytest

from studies.training.tracking import Tracker, check_tracking_uri, resolve_tracking_uri


def test_metric_logging_survives_a_tracking_outage(tmp_path):
    from studies.training.tracking import MetricLogger

    uri = f"sqlite:///{tmp_path}/m.db"
    t = Tracker.create(uri, "outage", "r")
    log = MetricLogger(uri, t.run_id, every_s=0)
    real = log.tracker.client.log_batch
    log.tracker.client.log_batch = lambda *a, **k: (_ for _ in ()).throw(ConnectionError("server down"))
    log({"train_loss": 1.0}, 1)  # the outage: buffered, no exception
    log({"train_loss": 0.5}, 2)
    assert len(log.pending) == 2 and log.failures >= 1
    log.tracker.client.log_batch = real  # the server is back
    log({"train_loss": 0.25}, 3)
    hist = t.client.get_metric_history(t.run_id, "loss/train")
    assert sorted((m.step, m.value) for m in hist) == [(1, 1.0), (2, 0.5), (3, 0.25)] and not log.pending


def test_loop_metrics_reach_mlflow_in_sections_without_step_epoch_or_nan():
    from studies.training.tracking import SECTIONS, mlflow_metrics

    m = mlflow_metrics({"epoch": 2, "step": 40, "status": "running", "diverged_step": None, "train_loss": 2.1,
                        "val_acc": 0.3, "lr": 0.4, "gns": float("nan"), "agc_clipped_frac": 0.5,
                        "agc_clipped_frac.stage1": 0.25, "grad_norm_before": 3.0, "images_per_sec": 900.0})
    assert m == {"loss/train": 2.1, "top1/val": 0.3, "opt/lr": 0.4, "stability/agc_clipped_frac": 0.5,
                 "stability/agc_clipped_frac/stage1": 0.25, "stability/grad_norm_before_clip": 3.0,
                 "throughput/images_per_sec": 900.0}
    # MLflow sorts a run's chart sections by name: the loss section comes first.
    assert sorted({k.split("/")[0] for k in SECTIONS.values()})[0] == "loss"


def test_credentials_in_a_tracking_uri_are_never_printed():
    from studies.training.tracking import redact

    assert redact("http://ml:s3cret@mlflow.example:5000/") == "http://ml:***@mlflow.example:5000/"
    assert redact("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    assert redact("https://ghp_T0KEN@MLflow.Example/x") == "https://***@MLflow.Example/x"  # a user part alone
    assert redact("http://u:p@[::1]:5000") == "http://u:***@[::1]:5000"
    assert redact("htps://alice:s3cret@host") == "htps://alice:***@host"
    assert redact("alice:s3cret@mlflow:5000") == "alice:***@mlflow:5000"
    assert redact("http://[broken") == "http://[broken"  # never raises


def test_an_unknown_scheme_is_refused_without_its_password():
    with pytest.raises(ValueError) as e:
        check_tracking_uri("htps://alice:s3cret@host")
    assert str(e.value) == "unsupported MLflow tracking URI 'htps://alice:***@host'; use http(s)://, " \
        "sqlite:///ABS/PATH or a path"


CREDENTIALS = "credentials in a URI end up in logs, the process list and Ray job entrypoints; remove them and use " \
    "the environment"


@pytest.mark.parametrize("uri, line", [
    ("http://alice:s3cret@mlflow.example:5000/", "--tracking-uri http://***@mlflow.example:5000/: "
     f"{CREDENTIALS} (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN)"),
    ("https://s3cret@mlflow.example", "--tracking-uri https://***@mlflow.example: "
     f"{CREDENTIALS} (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN)"),
    ("alice:s3cret@mlflow.example:5000", "--tracking-uri ***@mlflow.example:5000: "
     f"{CREDENTIALS} (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN)"),
    ("postgresql://mlflow:s3cret@db/mlflow", "--tracking-uri postgresql://***@db/mlflow: "
     f"{CREDENTIALS} (PGPASSWORD or ~/.pgpass for PostgreSQL)"),
    ("mlflow.internal:5000", "--tracking-uri 'mlflow.internal:5000' is a server without its scheme (MLflow would "
     "make a local folder of it); use http://mlflow.internal:5000"),
    ("localhost:5000/", "--tracking-uri 'localhost:5000/' is a server without its scheme (MLflow would make a "
     "local folder of it); use http://localhost:5000/"),
])
def test_a_tracking_uri_flag_with_credentials_or_without_its_scheme_is_refused(uri, line):
    with pytest.raises(ValueError) as e:
        resolve_tracking_uri(uri)
    assert str(e.value) == line and "s3cret" not in line


def test_tracking_uris_that_hold_no_secret_pass(tmp_path, monkeypatch):
    assert resolve_tracking_uri("http://mlflow.example:5000") == "http://mlflow.example:5000"
    assert resolve_tracking_uri("postgresql://mlflow@db/mlflow") == "postgresql://mlflow@db/mlflow"  # PGPASSWORD
    assert resolve_tracking_uri(str(tmp_path / "runs@2024")) == f"file://{tmp_path}/runs@2024"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:p@mlflow.example")  # the environment is not printed
    assert resolve_tracking_uri(None) == "http://u:p@mlflow.example"


def test_an_ended_run_is_never_appended_to(tmp_path):
    # issue 21, item 4: a driver that died between ending a trial's MLflow run and writing its row; the rerun must
    # not log its steps again into the finished run
    from studies.training.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = Tracker.create(uri, "e", "trial", reuse_tag=("run_key", "id:scan-1"))
    first.log_metrics({"train/loss": 2.3}, step=1)
    again = Tracker.create(uri, "e", "trial", reuse_tag=("run_key", "id:scan-1"))
    assert again.run_id == first.run_id  # still running (a retried trial): continued
    first.end("completed")
    fresh = Tracker.create(uri, "e", "trial", reuse_tag=("run_key", "id:scan-1"))
    assert fresh.run_id != first.run_id
    c = fresh.client
    assert c.get_run(first.run_id).info.lifecycle_stage == "deleted"  # one live run per key
    assert c.get_metric_history(fresh.run_id, "train/loss") == []
    fresh.end("completed")
    # a study's own run (the parent of its trials) is reopened instead: its children keep their parent
    parent = Tracker.create(uri, "e", "study", reuse_tag=("study_id", "it's"))
    parent.end("completed")
    back = Tracker.create(uri, "e", "study", reuse_tag=("study_id", "it's"), reopen=True)
    assert back.run_id == parent.run_id and c.get_run(back.run_id).info.status == "RUNNING"


def test_one_status_a_reader_can_trust_and_no_mlflow_info_lines(tmp_path, capfd):
    # a judged run carries its verdict only (its `status` would repeat it less precisely); a run without one its
    # status; creating the store prints none of MLflow's INFO lines
    uri = f"sqlite:///{tmp_path}/m.db"
    t = Tracker.create(uri, "e", "r")
    t.end("diverged", "diverged", name="b64 λ0.01 lr25.6 scan s0")
    run = t.client.get_run(t.run_id)
    assert run.data.tags["verdict"] == "diverged" and "status" not in run.data.tags
    assert run.info.run_name == "✗ b64 λ0.01 lr25.6 scan s0" and run.info.status == "FINISHED"
    failed = Tracker.create(uri, "e", "f")
    failed.end("failed")
    assert failed.client.get_run(failed.run_id).data.tags["status"] == "failed"
    out = capfd.readouterr()
    assert "Creating initial MLflow database tables" not in out.out + out.err


def test_the_epoch_a_run_diverged_in_keeps_its_loss():
    import math

    from studies.training.loop import diverging_epoch_loss

    # the steps after the divergence, up to the check, went non-finite: the epoch's mean is its finite steps'
    assert diverging_epoch_loss([2.3, 2.2, 181.0]) == (2.3 + 2.2 + 181.0) / 3
    assert diverging_epoch_loss([2.3, math.inf, math.nan]) == 2.3 and math.isnan(diverging_epoch_loss([]))
