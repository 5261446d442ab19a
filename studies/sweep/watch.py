"""The study's side of "nothing waits forever" (issue 31): every run's progress on one board the driver can read,
a line when no trial has started or ended for a while saying what the study waits for, a `failed` row for a run
that hung on every try, and an end (exit 2, rows kept) for a study that can make no more progress.

The runs themselves are ended by their own watchdog (studies/training/watchdog.py): a hung run's process ends
itself, Ray retries the trial as it would a lost worker, and once Tune has spent the trial's retries this module
turns the stalls the run left behind into its row."""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray import tune

import storage
from studies.sweep import tables
from studies.sweep.design import Spec
from studies.training.summary import RunSummary
from studies.training.tracking import Tracker, git_commit, hardware
from studies.training.watchdog import Stall, read_stalls

QUIET_S = 300.0  # no trial started or ended for this long: say what the study waits for (then every QUIET_S)
STUCK_S = 600.0  # nothing running and nothing placed for this long: the study can make no more progress
AUTOSCALING_STUCK_S = 1800.0  # the same where an autoscaler may still be starting nodes (a GPU node: 10+ minutes)


class StudyStuck(RuntimeError):
    """No trial can run: raised by the driver after Tune has stopped (the rows so far are kept)."""


@ray.remote(num_cpus=0)
class BeatBoard:
    """The last beat of every run of the study (its label → step, where, idle and limit seconds, time), written
    by the runs' watchdogs (fire-and-forget), read by the driver for its waiting lines."""

    def __init__(self):
        self.beats: dict[str, dict] = {}

    def put(self, label: str, beat: dict) -> None:
        self.beats[label] = beat

    def snapshot(self) -> dict[str, dict]:
        return dict(self.beats)


def publisher(board, label: str) -> Callable[[dict], None] | None:
    """A watchdog's publish callable for one run: never blocks the watchdog (a remote call returns at once)."""
    if board is None:
        return None
    return lambda beat: board.put.remote(label, beat)


def incidents_of(root: str | None, spec: Spec) -> str | None:
    return storage.uri.join(root, spec.key) if root else None


def record_hung(specs: list[Spec], env, table: storage.ResultsTable) -> list[str]:
    """After a trial's retries are spent: each of its runs with no row that hung gets a `failed` row saying so (its
    last stall: 'hung: no step for 31 s at step 0 (scan, set-up and data read; stall limit 30 s)'), and its MLflow
    run ends FAILED with that error; runs lost otherwise stay without a row (--resume reruns them). -> the lines."""
    done = set(table.read().column("trial_key").to_pylist())
    lines = []
    for spec in specs:
        stalls = read_stalls(incidents_of(env.incidents_uri, spec)) if spec.key not in done else []
        if not stalls:
            continue
        last = Stall(**{k: stalls[-1][k] for k in ("step", "where", "idle_s", "limit_s", "rank")})
        error = f"{last.text(spec.phase)}; ended {len(stalls)} time(s)"
        summary = RunSummary(status="failed", error=error)
        try:  # the run's MLflow run (left RUNNING by the ended process) says it too
            tracker = Tracker.create(env.tracking_uri, env.experiment, spec.label, tags={"study": env.study},
                                     parent_run_id=env.parent_run_id,
                                     reuse_tag=("run_key", f"{env.study_id}:{spec.key}"))
            tracker.set_tags({"error": error[:500]})
            tracker.end(summary.status, summary.verdict, name=spec.label)
            summary.mlflow_run_id = tracker.run_id
        except Exception as e:  # the row matters more than the run's status
            print(f"warning: MLflow run of {spec.label} not marked failed ({storage.uri.one_line(e)})", flush=True)
        table.append([tables.results_row(spec.identity(env.study), spec.config, summary, hardware(), git_commit())])
        lines.append(f"{spec.label}: {error}")
    return lines


def _minutes(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min"


def waiting_line(quiet_s: float, running: list[str], beats: dict[str, dict], now: float, pending: int = 0) -> str:
    """'waiting 5 min for 1 trial: b1024 λ0.01 lr0.4 scan s0 — no step for 4 min (stall limit 10 min)'. `running`:
    the labels of the running trials' current runs where known, else the trials' names; `beats`: the board's;
    `pending`: trials waiting for a process or resources."""
    parts = []
    for label in running:
        beat = beats.get(label)
        if beat is None:
            parts.append(label)
            continue
        idle = beat["idle_s"] + max(0.0, now - beat["time"])
        parts.append(f"{label} — no step for {_minutes(idle)} at step {beat['step']} ({beat['where']}; stall limit "
                     f"{_minutes(beat['limit_s'])})" if idle >= 1 else f"{label} — at step {beat['step']}")
    n = len(running)
    what = "; ".join(parts) if parts else "none is running"
    waits = f" ({pending} more waiting to start: a trial process starting, or resources)" if pending else ""
    return f"waiting {_minutes(quiet_s)} for {n} trial{'s' if n != 1 else ''}: {what}{waits}"


def stuck_reason(running: int, pending: list[dict[str, float]], idle_s: float, cluster: dict[str, float],
                 stuck_s: float) -> str | None:
    """Why the study can make no more progress, or None: nothing running and trials pending for stuck_s, because
    no node could ever hold what a pending trial asks for (a lost node, a GPU trial on CPUs) or the cluster never
    frees it."""
    if running or not pending or idle_s < stuck_s:
        return None
    need = pending[0]
    short = {k: v for k, v in need.items() if v > cluster.get(k, 0.0)}
    asks = ", ".join(f"{v:g} {k}" for k, v in need.items() if v)
    if short:
        has = ", ".join(f"{cluster.get(k, 0.0):g} {k}" for k in short)
        why = f"each asks for {asks} and the cluster has {has}"
        fix = "add nodes that have it, or lower --cpus-per-worker / --gpus-per-worker"
    else:
        why = f"each asks for {asks}, which the cluster has, but nothing was placed"
        fix = "check `ray status` for nodes that are down or resources held by other jobs"
    return (f"no trial could start for {_minutes(idle_s)} and none is running: {len(pending)} trial(s) wait, {why}; "
            f"{fix}. The rows so far are kept: continue with --resume")


@dataclass
class Waits:
    last_event: float
    last_said: float = 0.0
    stuck: str | None = None


class StudyWatch(tune.Callback):
    """Tune callback on the driver: the hung runs' rows (record_hung) when a trial's retries are spent, a waiting
    line after quiet_s without a trial starting or ending, and `stuck` set (the study's stopper then ends Tune)
    when nothing can run for stuck_s."""

    def __init__(self, env, table: storage.ResultsTable, board=None, quiet_s: float | None = None,
                 stuck_s: float | None = None, autoscaling: bool = False):
        self.env, self.table, self.board = env, table, board
        self.quiet_s = quiet_s if quiet_s is not None else float(os.environ.get("NFNET_LAB_QUIET_S", QUIET_S))
        default = AUTOSCALING_STUCK_S if autoscaling else STUCK_S
        self.stuck_s = stuck_s if stuck_s is not None else float(os.environ.get("NFNET_LAB_STUCK_S", default))
        self.waits = Waits(time.monotonic())
        self.current: dict[str, str] = {}  # trial id -> the label of its current run

    def __getstate__(self):  # Tune saves its run config; the board and table stay with the driver
        return {}

    def _event(self) -> None:
        self.waits.last_event = time.monotonic()

    def on_trial_start(self, iteration, trials, trial, **info):
        specs = trial.config.get("specs") or []
        self.current[trial.trial_id] = specs[0].label if specs else str(trial)
        self._event()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        specs = trial.config.get("specs") or []
        keys = [s.key for s in specs]
        if result.get("trial_key") in keys and keys.index(result["trial_key"]) + 1 < len(specs):
            self.current[trial.trial_id] = specs[keys.index(result["trial_key"]) + 1].label
        self._event()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.current.pop(trial.trial_id, None)
        self._event()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.current.pop(trial.trial_id, None)
        for line in record_hung(trial.config.get("specs") or [], self.env, self.table):
            print(f"failed (hung, retries spent): {line}", flush=True)
        self._event()

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        idle = now - self.waits.last_event
        if idle < self.quiet_s or now - self.waits.last_said < self.quiet_s:
            return
        self.waits.last_said = now
        running = [t for t in trials if t.status == "RUNNING"]
        pending = [_asks(t) for t in trials if t.status == "PENDING"]
        self.waits.stuck = stuck_reason(len(running), pending, idle, _cluster(), self.stuck_s)
        if self.waits.stuck is None:
            print(waiting_line(idle, [self.current.get(t.trial_id, str(t)) for t in running], self._beats(),
                               time.time(), len(pending)), flush=True)

    def _beats(self) -> dict[str, dict]:
        if self.board is None:
            return {}
        try:
            return ray.get(self.board.snapshot.remote(), timeout=5)
        except Exception:  # the waiting line is said without the runs' steps
            return {}


def _asks(trial) -> dict[str, float]:
    try:
        bundles = trial.placement_group_factory.bundles
    except Exception:
        return {}
    total: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            total[k] = total.get(k, 0.0) + float(v)
    return total


def _cluster() -> dict[str, Any]:
    try:
        return {k: float(v) for k, v in ray.cluster_resources().items()}
    except Exception:
        return {}
