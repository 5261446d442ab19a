"""One run's session in the process that trains it, written once for both ways a run is launched (runner.py): in
this process (one worker: train.py --in-process, a Tune trial's actor) and on every worker of a Ray Train
TorchTrainer. Set-up: the thread count, rank 0's MLflow metric logger and system-metrics monitor, the checkpoint a
restarted run resumes from, the progress watchdog, the loop's WorkerContext; teardown: the monitor stopped, the
thread count restored, the resumed checkpoint's copy removed, the metrics flushed.

Where the epoch reports and checkpoints go beyond MLflow (Ray Train's session on a worker, Tune's when the run
trains inside a Tune trial) comes in as callables, a `Reports` value, never as a flag."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from studies.training import loop
from studies.training.config import TrainConfig
from studies.training.mlflow_ui import start_system_metrics
from studies.training.summary import OBJECTIVE, RunSummary
from studies.training.tracking import MetricLogger, Tracking
from studies.training.watchdog import Watch, Watchdog, end_hung_process


@dataclass(frozen=True)
class Reports:
    """The Ray session a run reports its epochs to and resumes from: Ray Train's on a TorchTrainer's worker
    (train_reports), Tune's when the run trains inside a Tune trial (tune_reports, given by the study's trainable).
    A run outside both (train.py, tests) has none: MLflow alone."""

    report: Callable[..., None]  # report(scalars, checkpoint=Checkpoint or None), on every rank
    checkpoint: Callable[[str], Any]  # a checkpoint directory -> the session's Checkpoint
    latest: Callable[[], Any]  # the checkpoint a restarted run resumes from, or None
    node_id: Callable[[], str]  # the node the run trained on (its results row's node_id)
    forward: Callable[[], list] = list  # a TorchTrainer's callbacks that pass its workers' reports on to this session


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _tune_callbacks() -> list:
    from ray.tune.integration.ray_train import TuneReportCallback

    return [TuneReportCallback()]


def tune_reports() -> Reports:
    """Tune's session, for a run trained inside a Tune trial (its reports, checkpoints and retries are Tune's)."""
    from ray import tune

    return Reports(tune.report, tune.Checkpoint.from_directory, tune.get_checkpoint, _node_id, _tune_callbacks)


def train_reports() -> Reports:
    """Ray Train's session, on a worker of a TorchTrainer."""
    import ray.train

    return Reports(ray.train.report, ray.train.Checkpoint.from_directory, ray.train.get_checkpoint, _node_id)


def say(line: str) -> None:
    print(line, flush=True)


def silent(line: str) -> None:
    pass


@dataclass(frozen=True)
class Session:
    """One run in the process that trains it: what the loop is given, set up and torn down the same way in-process
    and on each Ray Train worker (a TorchTrainer's driver makes one and each worker fills in its rank and device)."""

    cfg: TrainConfig  # built once, on the driver
    tracking: Tracking | None = None  # the run's MLflow run: rank 0 logs into it
    reports: Reports | None = None  # Ray's session beyond MLflow (Train's, Tune's), if any
    watch: Watch | None = None  # where a hung run's stall is kept and rank 0's beats published
    print: Callable[[str], None] = say  # rank 0's progress lines
    test_crash: tuple | None = None  # test hook (never a config field): see _fault_once
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def train(self, dataset_uri: str) -> RunSummary:
        cfg, rank = self.cfg, self.rank
        threads = torch.get_num_threads()
        _set_threads(cfg)
        log = self.tracking.logger() if self.tracking and rank == 0 else None
        monitor = _system_metrics(self.tracking, rank)
        resume = _restored(self.reports.latest()) if self.reports else None
        dog = watchdog(cfg, self.watch, rank)
        ctx = loop.WorkerContext(rank=rank, world_size=self.world_size, device=self.device,
                                 report=_reporter(log, self.reports), log_step=log or (lambda m, s: None),
                                 resume_from=resume, print=self.print, on_step=_fault_once(self.test_crash, rank),
                                 beat=dog.beat)
        try:
            with dog:
                summary = loop.train(cfg, dataset_uri, ctx)
        finally:
            _stop(monitor)
            torch.set_num_threads(threads)
            if resume:
                shutil.rmtree(resume, ignore_errors=True)
            if log:
                log.flush()
        if self.reports:
            summary.node_id = self.reports.node_id()
        return summary


def _set_threads(cfg: TrainConfig) -> None:
    # Same thread count in-process and in a Ray worker, so both give the same numbers.
    if not cfg.use_gpu:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))


def _system_metrics(tracking: Tracking | None, rank: int):
    """MLflow's system metrics of the process that trains (rank 0), for the runs that ask for them."""
    if not tracking or rank != 0 or not tracking.system_metrics:
        return None
    try:
        return start_system_metrics(tracking.uri, tracking.run_id)
    except Exception:  # a monitor is a nicety: it never stops a run
        return None


def _stop(monitor) -> None:
    if monitor is not None:
        try:
            monitor.finish()
        except Exception:
            pass


def _restored(checkpoint) -> str | None:
    return checkpoint.to_directory(tempfile.mkdtemp(prefix="nfnet-resume-")) if checkpoint is not None else None


def _fault_once(test_crash: tuple[int, str] | None, rank: int = 0):
    """Test hook (never a config field): kill this worker once at a step, (step, marker); or, with a third item
    (step, marker, rank), make that rank's step never return (a rank stuck while its peers wait in the gradient
    all-reduce). A marker file keeps it to once."""
    if not test_crash or (len(test_crash) > 2 and test_crash[2] != rank):
        return None
    at, marker = test_crash[:2]

    def on_step(step: int) -> None:
        if step == at and not os.path.exists(marker):
            Path(marker).write_text(str(step))
            if len(test_crash) > 2:
                time.sleep(3600)
            os._exit(1)  # a killed worker, as far as Ray can tell

    return on_step


def watchdog(cfg: TrainConfig, watch: Watch | None, rank: int = 0) -> Watchdog:
    """The run's progress watchdog in the process that trains: a run with no step for its stall limit ends this
    process (a lost worker to Ray, retried), its stall kept where `watch` says, rank 0's beats published there."""
    watch = watch or Watch()
    return Watchdog(lambda stall: end_hung_process(stall, watch.incidents), cfg.stall_timeout, rank=rank,
                    publish=watch.publish if rank == 0 else None)


def _reporter(log: MetricLogger | None, reports: Reports | None):
    def report(metrics, ckpt_dir):
        if log:
            log(metrics, metrics["step"])
        if reports:
            reports.report(_scalars(metrics), checkpoint=reports.checkpoint(ckpt_dir) if ckpt_dir else None)
        if ckpt_dir:
            shutil.rmtree(ckpt_dir, ignore_errors=True)

    return report


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}
    out[OBJECTIVE] = RunSummary(status=metrics.get("status", "running"),
                                best_val_acc=metrics.get("best_val_acc")).objective()
    return out
