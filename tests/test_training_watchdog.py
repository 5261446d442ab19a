"""The progress watchdog (studies/training/watchdog.py): the stall limit from the run's own pace, a stall seen once
and only past the limit, stalls kept and read back, the loop's beats, and a hung process that ends itself."""
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from studies.training import watchdog as wd

ROOT = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_the_limit_comes_from_the_runs_own_pace():
    assert wd.stall_limit([], None) == wd.FIRST_STEPS_S  # set-up, first read, compile: the generous allowance
    assert wd.stall_limit([0.01, 0.01], None) == wd.FIRST_STEPS_S  # too few steps to know the pace
    assert wd.stall_limit([0.01] * 5, None) == wd.FLOOR_S  # fast steps: never below the floor
    assert wd.stall_limit([4.0, 5.0, 60.0], None) == pytest.approx(wd.STEP_MULTIPLE * 5.0)  # median, not one slow
    assert wd.stall_limit([4.0] * 10, 7.0) == 7.0  # --stall-timeout replaces all of it


def test_a_stall_is_seen_once_and_only_past_the_limit():
    clock, seen = Clock(), []
    dog = wd.Watchdog(seen.append, fixed_limit_s=30.0, clock=clock)
    for step in range(5):
        dog.beat(step, "step")
        clock.t += 1.0
        dog.beat(step + 1, "data read")
    assert dog.step_times and all(t == pytest.approx(1.0) for t in dog.step_times)
    clock.t += 29.9
    assert dog.check() is None  # at the limit, not past it
    clock.t += 0.2
    stall = dog.check()
    assert stall is not None and (stall.step, stall.where) == (5, "data read") and stall.idle_s == pytest.approx(30.1)
    assert dog.check() is None  # reported once
    assert stall.text("scan") == "hung: no step for 30 s at step 5 (scan, data read; stall limit 30 s)"
    assert wd.Stall(3, "step or its gradient all-reduce", 12.4, 10.0, rank=1).text() == (
        "hung: no step for 12 s at step 3 (step or its gradient all-reduce, rank 1; stall limit 10 s)")


def test_a_beating_run_is_never_stalled_and_the_thread_fires_on_a_silent_one():
    seen, beats = [], []
    with wd.Watchdog(seen.append, fixed_limit_s=0.5, poll_s=0.05, publish=beats.append) as dog:
        for step in range(20):  # 1 s of work, beating every 50 ms: no stall
            dog.beat(step, "step")
            time.sleep(0.05)
        assert not seen
        time.sleep(1.0)  # silent for twice the limit
    assert len(seen) == 1 and seen[0].step == 19 and seen[0].idle_s > 0.5
    assert beats and {"step", "where", "idle_s", "limit_s", "time"} <= set(beats[0])


def test_stalls_are_kept_per_run_and_read_back_in_order(tmp_path):
    where = str(tmp_path / "incidents" / "run-a")
    assert wd.read_stalls(where) == []
    wd.record_stall(where, wd.Stall(0, "set-up and data read", 31.0, 30.0))
    time.sleep(0.01)
    wd.record_stall(where, wd.Stall(7, "step", 12.0, 10.0, rank=1))
    got = wd.read_stalls(where)
    assert [(g["step"], g["where"], g["rank"]) for g in got] == [(0, "set-up and data read", 0), (7, "step", 1)]
    assert got[1]["text"].startswith("hung: no step for 12 s at step 7")
    (tmp_path / "incidents" / "run-a" / "junk.json").write_text("{not json")
    assert len(wd.read_stalls(where)) == 2  # an unreadable record does not hide the others


def test_the_loop_beats_where_it_is(tiny_data):
    from studies.training import loop
    from studies.training.config import TrainConfig

    beats = []
    cfg = TrainConfig(model="nf_resnet_cifar", model_overrides={"width": 4, "depth": 1}, batch_size=32, max_steps=6,
                      log_every_steps=2, checkpoint_every_epochs=0, warmup_steps=0)
    loop.train(cfg, tiny_data, loop.WorkerContext(print=lambda s: None,
                                                           beat=lambda step, where: beats.append((step, where))))
    assert beats[0] == (0, "set-up and data read")
    steps = [s for s, w in beats if w == "step"]
    assert steps == list(range(6))  # one beat as each step starts
    wheres = {w for _, w in beats}
    assert {"data read", "eval (a validation shard)", "epoch metrics", "report"} <= wheres


HANGS = textwrap.dedent('''
    import sys, time
    from studies.training import loop, runner
    from studies.training.config import TrainConfig
    from studies.training.watchdog import Watch

    real = loop.train_step
    def sleepy(*a, **k):  # the fourth step never returns, as a step stuck in a kernel or a read
        sleepy.n = getattr(sleepy, "n", 0) + 1
        if sleepy.n == 4:
            time.sleep(3600)
        return real(*a, **k)
    loop.train_step = sleepy
    cfg = TrainConfig(model="nf_resnet_cifar", model_overrides={"width": 4, "depth": 1}, batch_size=32,
                      max_steps=50, checkpoint_every_epochs=0, stall_timeout=5.0)
    print("training", flush=True)
    runner.run_in_process(cfg, sys.argv[2], quiet=True, watch=Watch(incidents=sys.argv[1]))
    print("finished", flush=True)
''')


def test_a_step_that_sleeps_past_the_limit_ends_its_process_and_is_recorded(tmp_path, tiny_data):
    where = tmp_path / "incidents"
    t0 = time.time()
    done = subprocess.run([sys.executable, "-c", HANGS, str(where), tiny_data], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    took = time.time() - t0
    assert done.returncode == wd.HUNG_EXIT_CODE, done.stderr[-2000:]
    assert "training" in done.stdout and "finished" not in done.stdout
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("hung: no step for 5 s at step 3 (step; stall limit 5 s): ending this process"), line
    (stall,) = wd.read_stalls(str(where))
    assert (stall["step"], stall["where"], stall["limit_s"]) == (3, "step", 5.0)
    print(f"ended {took:.1f} s after it started (limit 5 s)")
    assert took < 60
