"""The study's watch (studies/sweep/watch.py): the waiting line, when a study is stuck, and a hung run's row."""
from studies.sweep import watch
from studies.sweep.cells import Cell
from studies.sweep.design import Preset, Spec, Study
from studies.sweep.tune import TrialEnv
from studies.training.config import TrainConfig
from studies.training.watchdog import Stall, record_stall
from tests.helpers import tiny_cfg


def test_the_waiting_line_says_which_run_and_how_long_since_its_last_step():
    beats = {"b1024 λ0.01 lr0.4 scan s0": {"step": 37, "where": "data read", "idle_s": 230.0, "limit_s": 600.0,
                                           "time": 1000.0}}
    line = watch.waiting_line(300.0, ["b1024 λ0.01 lr0.4 scan s0"], beats, now=1010.0)
    assert line == ("waiting 5 min for 1 trial: b1024 λ0.01 lr0.4 scan s0 — no step for 4 min at step 37 (data read; "
                    "stall limit 10 min)")
    two = watch.waiting_line(45.0, ["a", "b"], {"a": {**beats["b1024 λ0.01 lr0.4 scan s0"], "idle_s": 0.2}},
                             now=1000.0)
    assert two == "waiting 45 s for 2 trials: a — at step 37; b"  # a run that just stepped; one not heard from
    assert watch.waiting_line(400.0, [], {}, now=0.0, pending=1) == (
        "waiting 7 min for 0 trials: none is running (1 more waiting to start: a trial process starting, or "
        "resources)")


def test_a_study_is_stuck_only_when_nothing_runs_and_nothing_could_be_placed_for_long():
    gpu = {"CPU": 1.0, "GPU": 1.0}
    cpus = {"CPU": 2.0, "memory": 1e10}
    assert watch.stuck_reason(1, [gpu], 9999.0, cpus, 600.0) is None  # something runs
    assert watch.stuck_reason(0, [], 9999.0, cpus, 600.0) is None  # nothing waits
    assert watch.stuck_reason(0, [gpu], 599.0, cpus, 600.0) is None  # not long enough
    why = watch.stuck_reason(0, [gpu, gpu], 700.0, cpus, 600.0)
    assert why == ("no trial could start for 12 min and none is running: 2 trial(s) wait, each asks for 1 CPU, 1 GPU "
                   "and the cluster has 0 GPU; add nodes that have it, or lower --cpus-per-worker / "
                   "--gpus-per-worker. The rows so far are kept: continue with --resume")
    held = watch.stuck_reason(0, [{"CPU": 1.0}], 700.0, cpus, 600.0)
    assert "which the cluster has, but nothing was placed" in held and "ray status" in held


def test_a_run_that_hung_on_every_try_gets_a_failed_row_and_its_mlflow_run_ends_failed(tmp_path):
    from mlflow.tracking import MlflowClient

    from studies.training.tracking import Tracker

    study = Study("w", Preset(grid={"batch_size": [64]}, fixed={}), TrainConfig(), output=str(tmp_path / "out"))
    table = study.table()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = Tracker.create(uri, "w", "w")
    env = TrialEnv("w", "sid", "w", "unused", uri, parent.run_id, table.uri, str(tmp_path / "train"),
                   incidents_uri=str(tmp_path / "incidents"))
    hung, lost = (Spec("scan", Cell((("batch_size", 64),)), tiny_cfg(base_lr=lr)) for lr in (0.1, 0.2))
    left_running = Tracker.create(uri, "w", hung.label, parent_run_id=parent.run_id,
                                  reuse_tag=("run_key", f"sid:{hung.key}"))
    for idle in (31.0, 30.6, 30.2):
        record_stall(watch.incidents_of(env.incidents_uri, hung), Stall(0, "set-up and data read", idle, 30.0))
    lines = watch.record_hung([hung, lost], env, table)
    assert lines == [f"{hung.label}: hung: no step for 30 s at step 0 (scan, set-up and data read; stall limit 30 s); "
                     "ended 3 time(s)"]
    rows = table.read().to_pylist()
    assert [(r["trial_key"], r["status"]) for r in rows] == [(hung.key, "failed")]  # the lost run: no row
    assert rows[0]["error"].startswith("hung: no step for 30 s")
    run = MlflowClient(uri).get_run(left_running.run_id)  # the same run, not a second one
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("hung: no step for 30 s")
    assert watch.record_hung([hung], env, table) == []  # it has its row now: never a second
    assert len(table.read().to_pylist()) == 1


class _Trial:
    def __init__(self, trial_id, status, bundles):
        self.trial_id, self.status = trial_id, status
        self.placement_group_factory = type("PGF", (), {"bundles": bundles})()
        self.config = {}


def test_the_watch_ends_tune_when_nothing_can_run_and_says_what_it_waits_for(monkeypatch, capsys):
    """Nothing running and a trial asking for a GPU the cluster lacks: the study's stopper ends Tune and the
    driver has its one line; while something runs, only the waiting line is said."""
    from studies.sweep.tune import LeaseStopper

    monkeypatch.setattr(watch, "_cluster", lambda: {"CPU": 2.0})
    w = watch.StudyWatch(env=None, table=None, quiet_s=0.0, stuck_s=0.0)
    stopper = LeaseStopper(None, w)
    w.on_step_end(0, [_Trial("a", "RUNNING", [{"CPU": 1.0}]), _Trial("b", "PENDING", [{"CPU": 1.0, "GPU": 1.0}])])
    assert w.waits.stuck is None and not stopper.stop_all()
    assert capsys.readouterr().out.startswith("waiting ")
    w.waits.last_said = 0.0
    w.on_step_end(1, [_Trial("b", "PENDING", [{"CPU": 1.0, "GPU": 1.0}])])
    assert stopper.stop_all()
    assert "1 trial(s) wait, each asks for 1 CPU, 1 GPU and the cluster has 0 GPU" in w.waits.stuck
