"""MLflow tracking: buffered metrics survive an outage; credentials never printed."""


from studies.training.tracking import Tracker


def test_metric_logging_survives_a_tracking_outage(tmp_path):
    from studies.training.tracking import MetricLogger

    uri = f"sqlite:///{tmp_path}/m.db"
    t = Tracker.create(uri, "outage", "r")
    log = MetricLogger(uri, t.run_id, every_s=0)
    real = log.tracker.client.log_batch
    log.tracker.client.log_batch = lambda *a, **k: (_ for _ in ()).throw(ConnectionError("server down"))
    log({"loss": 1.0}, 1)  # the outage: buffered, no exception
    log({"loss": 0.5}, 2)
    assert len(log.pending) == 2 and log.failures >= 1
    log.tracker.client.log_batch = real  # the server is back
    log({"loss": 0.25}, 3)
    hist = t.client.get_metric_history(t.run_id, "loss")
    assert sorted((m.step, m.value) for m in hist) == [(1, 1.0), (2, 0.5), (3, 0.25)] and not log.pending


def test_credentials_in_a_tracking_uri_are_never_printed():
    from studies.training.tracking import redact

    assert redact("http://ml:s3cret@mlflow.example:5000/") == "http://ml:***@mlflow.example:5000/"
    assert redact("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
