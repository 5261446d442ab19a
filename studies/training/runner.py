"""The driver side of one training run: prepare data, start the MLflow run, then run the worker loop either
through Ray Train's TorchTrainer (DDP over gloo/NCCL) or, for a single worker (CPU or one GPU, or a share of one)
inside a Tune trial, in-process (identical numbers; see tests/test_training_runner.py): no worker group to start
per run, and the Tune actor, reused from trial to trial, keeps the dataset resident on its device all study long.
train_and_track(cfg, RunRecord, Launch): where the run is recorded, and how and where it trains. Both ways to train
run the same Session (session.py: the set-up and teardown in the process that trains). Which errors are the
machines' (retried) and which the run's own (recorded `failed`): faults.is_infrastructure; a run that makes no
progress ends its own process (watchdog.py)."""
from __future__ import annotations

import dataclasses
import os
import re
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import storage
from studies.training import run_note
from studies.training.config import PROJECT_DIR, TrainConfig
from studies.training.faults import is_infrastructure, root_cause
from studies.training.mlflow_ui import log_curves, log_dataset, source_tags
from studies.training.session import (
    Reports,
    Session,
    say,
    silent,
    train_reports,
    tune_reports,  # noqa: F401  (a Tune trainable's Launch: runner.tune_reports())
)
from studies.training.summary import RunSummary
from studies.training.tracking import Tracker, Tracking, hardware
from studies.training.watchdog import Watch


def prepare_data(cfg: TrainConfig) -> str:
    """Dataset URI for the run; built-in sources are prepared (or reused) once, on the driver."""
    if cfg.dataset in storage.datasets.SOURCES:
        params = dict(cfg.dataset_params)
        seed = params.pop("seed", 0)
        return storage.prepare_dataset(cfg.dataset, cfg.data_root, seed=seed, **params).uri
    storage.open_dataset(cfg.dataset)  # validates the manifest, with storage's clear errors
    return cfg.dataset


def ray_logs() -> bool:
    """Ray's own console output (its workers', controllers' and actors' output, its INFO logs) is off unless
    NFNET_LAB_RAY_LOGS=1: a run that succeeded printed ~30 lines of it (placement-group cleaner tracebacks,
    TrainingReport reprs, core_worker notes), which buried the few lines a user needs. Set it to debug Ray."""
    return os.environ.get("NFNET_LAB_RAY_LOGS") == "1"


TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def init_ray(num_cpus: int | None = None) -> None:
    """Local Ray, or the cluster at RAY_ADDRESS. Workers' output reaches this console only with NFNET_LAB_RAY_LOGS=1
    (ray_logs): a study prints a line per finished trial, train.py relays rank 0's progress lines itself."""
    import logging

    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's legacy reporter honours verbose=0: no tables
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    shown = ray_logs()
    level = logging.INFO if shown else logging.WARNING
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=shown, logging_level=level)
    else:
        # A new local cluster gets Ray's default (token auth) without Ray's WARNING saying so on every start
        logging.getLogger(TOKEN_AUTH_LOGGER).setLevel(logging.ERROR)
        start_local_ray(num_cpus=num_cpus, include_dashboard=False, log_to_driver=shown, logging_level=level)


LOCAL_RAY_STARTS = 2


def start_local_ray(**init_kwargs) -> None:
    """ray.init of a new local cluster, started once more if the first start fails. Ray's raylet exits when its
    dashboard agent has not written its port file within a fixed 15 s (ray-project/ray#65983). On 2 busy cores
    (make test) the agent came up once 16.7 s after the raylet, 0.8 s after the raylet had exited, and ray.init
    raised 'The current node timed out during startup' at the end of its own wait. The failed start's processes
    (its GCS, agent, log monitor: children of this process) are ended before the next start; a second failure is
    raised."""
    import sys

    import psutil
    import ray

    for attempt in range(1, LOCAL_RAY_STARTS + 1):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            ray.init(**init_kwargs)
            return
        except (TypeError, ValueError):  # bad arguments: starting again cannot help
            raise
        except Exception as e:
            if attempt == LOCAL_RAY_STARTS or ray.is_initialized():
                raise
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            for p in psutil.Process().children(recursive=True):
                if p.pid not in before:
                    try:
                        p.kill()
                    except psutil.Error:  # already gone
                        pass
            print(f"local Ray did not start ({why}); starting it again ({attempt + 1} of {LOCAL_RAY_STARTS})",
                  file=sys.stderr, flush=True)


def _relay(queue, rank: int):
    """Rank 0's progress lines onto the driver's queue (its console does not show workers' output), or printed."""

    def say(line: str) -> None:
        if rank:
            return
        try:
            queue.put(line, timeout=5) if queue is not None else print(line, flush=True)
        except Exception:  # a progress line is never worth a training failure
            print(line, flush=True)

    return say


def _worker_fn(config: dict[str, Any]) -> dict[str, Any]:
    """A TorchTrainer worker: the driver's Session with this worker's rank and device and Ray Train's session."""
    import ray.train
    import ray.train.torch

    template: Session = config["session"]
    tc = ray.train.get_context()
    rank = tc.get_world_rank()
    device = ray.train.torch.get_device() if template.cfg.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    session = dataclasses.replace(template, rank=rank, world_size=tc.get_world_size(), device=device,
                                  reports=train_reports(), print=_relay(config.get("progress"), rank))
    return dataclasses.asdict(session.train(config["dataset_uri"]))


def runs_in_process(cfg: TrainConfig) -> bool:
    """One worker with no failure recovery needs no worker group: the loop runs in the caller's process (a Tune
    trial's actor, holding the trial's CPU and GPU share)."""
    return cfg.num_workers == 1 and cfg.max_failures == 0


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    """What one worker of the run holds: its CPUs and, on GPUs, its share of one."""
    return {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})}


def trial_resources(cfg: TrainConfig) -> dict[str, float]:
    """What a Tune trial of this run holds. In-process runs train in the trial's actor, so it holds the worker's
    resources; a TorchTrainer trial only waits on its worker group and holds no CPU (a bundle cannot be empty)."""
    return worker_resources(cfg) if runs_in_process(cfg) else {"CPU": 0, "memory": 64 << 20}


def run_in_process(cfg: TrainConfig, dataset_uri: str, tracking: Tracking | None = None,
                   reports: Reports | None = None, quiet: bool = False, watch: Watch | None = None) -> RunSummary:
    """The same loop as a one-worker TorchTrainer, in this process (no worker group to start). `reports`: Tune's
    session when this process is a Tune trial's actor (session.tune_reports)."""
    if cfg.num_workers != 1:
        raise ValueError("in-process runs are for one worker; use TorchTrainer for more")
    if cfg.use_gpu and not torch.cuda.is_available():
        raise RuntimeError("use_gpu is set but this process sees no CUDA device (a Tune trial must ask for a GPU)")
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.use_gpu else torch.device("cpu")
    return Session(cfg, tracking, reports, watch, print=silent if quiet else say, device=device).train(dataset_uri)


class ProgressRelay:
    """Rank 0's progress lines (epochs, a resume) printed on this console while a worker group trains: a Ray queue
    the worker puts them on and a thread here that prints them, since workers' own output reaches the driver
    only with NFNET_LAB_RAY_LOGS=1 (then they print themselves and no relay is made)."""

    def __init__(self):
        import threading

        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's own node (a lost worker node must not take it along), holding no CPU.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._print, daemon=True)
        self.thread.start()

    def _print(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                print(self.queue.get(timeout=0.5), flush=True)
            except Empty:
                if self.done.is_set():
                    return

    def close(self) -> None:
        self.done.set()
        self.thread.join(timeout=10)
        import ray

        ray.kill(self.queue.actor)


def run_torch_trainer(cfg: TrainConfig, dataset_uri: str, *, name: str, storage_path: str,
                      tracking: Tracking | None = None, reports: Reports | None = None,
                      test_crash: tuple | None = None, progress: bool = False,
                      watch: Watch | None = None) -> RunSummary:
    """Ray Train V2 hands a run the latest checkpoint of an earlier run with the same name and storage path:
    callers name runs by their config's fingerprint, and the loop refuses a checkpoint of another config.
    `reports`: a session the workers' reports are passed on to (Tune's, when this is a Tune trial);
    `progress`: rank 0's epoch lines on this console (train.py; a study prints a line per trial instead)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    callbacks = reports.forward() if reports else []
    streaming = storage.loaders.loader_mode(dataset_uri, "train", cfg.loader, cfg.image_size) == "streaming"
    if streaming:
        free = ray.cluster_resources().get("CPU", 0) - cfg.num_workers * cfg.cpus_per_worker
        if free < 0.5:  # Ray Data's decode tasks would never be scheduled: the run would hang, not fail
            raise RuntimeError(
                f"streaming needs spare CPUs for Ray Data's decode tasks, but {cfg.num_workers} workers × "
                f"{cfg.cpus_per_worker:g} CPUs take the whole cluster ({ray.cluster_resources().get('CPU', 0):g}); "
                "lower --cpus-per-worker, add CPU nodes, or use --loader resident")
    relay = ProgressRelay() if progress and not ray_logs() else None
    trainer = TorchTrainer(
        _worker_fn,
        train_loop_config={"session": Session(cfg, tracking, watch=watch, test_crash=test_crash),
                           "dataset_uri": dataset_uri, "progress": relay and relay.queue},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker=worker_resources(cfg),
        ),
        run_config=ray.train.RunConfig(
            name=name, **storage.uri.ray_storage(storage_path), callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    finally:
        if relay:
            relay.close()
    if result.error is not None or result.return_value is None:
        err = result.error
        # A worker's own deterministic error (bad config or data) is re-raised as itself: no retry.
        for e in getattr(err, "worker_failures", {}).values():
            if not is_infrastructure(e, cfg):
                raise root_cause(e)
        raise err
    return RunSummary(**result.return_value)


def ray_run_name(run_name: str, cfg: TrainConfig) -> str:
    """The Ray Train run's name: the MLflow name in ASCII (λ spelled out, anything but [A-Za-z0-9._=-] as '_'),
    then the config's fingerprint. Ray Train turns it into storage paths and logs it where a node's locale may be
    ASCII (a C-locale Ray job failed on 'λ' in its controller); the fingerprint keeps checkpoints per config."""
    slug = re.sub(r"[^A-Za-z0-9._=-]+", "_", run_name.replace("λ", "lambda")).strip("_") or "run"
    return f"{slug}-{cfg.fingerprint()}"


@dataclass(frozen=True)
class RunRecord:
    """Where and how a run is recorded in MLflow: its store, experiment and name (the verdict's mark goes in front
    when it ends), its caller's tags, its parent (a study's run), the key a retried or resumed run continues its
    MLflow run by, MLflow's source tags (mlflow_ui.source_tags, from the driver; default: this process's), and
    whether MLflow's system metrics (CPU/GPU/memory) are sampled into it."""

    tracking_uri: str
    experiment: str
    run_name: str
    tags: dict[str, str] | None = None
    parent_run_id: str | None = None
    reuse_key: str | None = None
    source: dict[str, str] | None = None
    system_metrics: bool = False

    def open(self, cfg: TrainConfig, dataset_uri: str) -> Tracker:
        """The run's MLflow run (a new one, or the one its reuse key names), with its params and dataset."""
        tracker = Tracker.create(
            self.tracking_uri, self.experiment, self.run_name,
            tags={**(self.source or source_tags()), "hardware": hardware(), "model": cfg.model, **(self.tags or {})},
            parent_run_id=self.parent_run_id, reuse_tag=("run_key", self.reuse_key) if self.reuse_key else None,
        )
        tracker.log_params(run_note.effective_params(cfg))
        log_dataset(tracker.client, tracker.run_id, dataset_uri)
        return tracker

    def close(self, tracker: Tracker, cfg: TrainConfig, summary: RunSummary) -> None:
        """The outcome into the run: config, final metrics, curves, its description and tags; ended, renamed."""
        tracker.log_dict(cfg.to_dict(), "config.json")
        tracker.log_dict(summary.scalars(), "final_metrics.json")
        log_curves(tracker, summary.history, title=self.run_name)
        run_note.describe(tracker, cfg, summary, self.tags)  # before `tags` below: the run's own, given by its caller
        tags = {"diverged_step": summary.diverged_step} if summary.status == "diverged" else {}
        if summary.error:
            tags["error"] = summary.error[:500]
        tracker.set_tags(tags)
        tracker.end(summary.status, summary.verdict, name=self.run_name)


@dataclass(frozen=True)
class Launch:
    """How and where a run trains."""

    dataset_uri: str | None = None  # the prepared dataset (default: prepare_data(cfg))
    storage_path: str | None = None  # Ray Train's storage for a worker group's checkpoints (default_storage_path)
    in_process: bool | None = None  # None: runs_in_process(cfg)
    reports: Reports | None = None  # Tune's session when the run is a Tune trial (session.tune_reports)
    quiet: bool = False  # no progress lines (a study prints a line per trial instead)
    watch: Watch | None = None  # where a hung run's stall is kept and its progress published (watchdog.Watch)


def train_and_track(cfg: TrainConfig, record: RunRecord, launch: Launch = Launch()) -> RunSummary:
    """One run end to end: MLflow run opened first, so failures and divergences are recorded too. A bad config or
    bad data is a result (status failed); an infrastructure fault is raised, so Tune retries the trial."""
    dataset_uri = launch.dataset_uri or prepare_data(cfg)
    tracker = record.open(cfg, dataset_uri)
    tracking = Tracking(record.tracking_uri, tracker.run_id, record.system_metrics)
    in_process = runs_in_process(cfg) if launch.in_process is None else launch.in_process
    try:
        if in_process:
            summary = run_in_process(cfg, dataset_uri, tracking, launch.reports, quiet=launch.quiet,
                                     watch=launch.watch)
        else:
            summary = run_torch_trainer(cfg, dataset_uri, name=ray_run_name(record.run_name, cfg),
                                        storage_path=launch.storage_path or default_storage_path(),
                                        tracking=tracking, reports=launch.reports, progress=not launch.quiet,
                                        watch=launch.watch)
    except Exception as e:
        if is_infrastructure(e, cfg):
            raise  # Tune retries the trial (its last checkpoint, if any); --resume reruns it if retries run out
        summary = RunSummary(status="failed", error=f"{type(e).__name__}: {e}")  # would fail again: recorded
        tracker.log_text(traceback.format_exc()[-4000:], "traceback.txt")
    summary.mlflow_run_id = tracker.run_id
    record.close(tracker, cfg, summary)
    return summary


def default_storage_path() -> str:
    return str(Path(os.environ.get("NFNET_LAB_RESULTS", PROJECT_DIR / "results")))
