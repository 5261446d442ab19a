"""The driver side of one training run: prepare data, start the MLflow run, then run the worker loop either
through Ray Train's TorchTrainer (DDP over gloo/NCCL) or, for a single worker (CPU or one GPU, or a share of one)
inside a Tune trial, in-process (identical numbers; see tests/test_training_runner.py): no worker group to start
per run, and the Tune actor, reused from trial to trial, keeps the dataset resident on its device all study long.
Which errors are the machines' (retried) and which the run's own (recorded `failed`): faults.is_infrastructure;
a run that makes no progress ends its own process (watchdog.py)."""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

import storage
from studies.training import loop, run_note
from studies.training.config import PROJECT_DIR, TrainConfig
from studies.training.faults import is_infrastructure, root_cause
from studies.training.mlflow_ui import log_curves, log_dataset, source_tags, start_system_metrics
from studies.training.summary import OBJECTIVE, RunSummary
from studies.training.tracking import MetricLogger, Tracker, hardware
from studies.training.watchdog import Watch, Watchdog, end_hung_process


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
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=shown, logging_level=level)


def _set_threads(cfg: TrainConfig) -> None:
    # Same thread count in-process and in a Ray worker, so both give the same numbers.
    if not cfg.use_gpu:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))


def _mlflow_logger(tracking: dict[str, Any] | None, rank: int) -> MetricLogger | None:
    """Metrics into the run's MLflow run on rank 0 (buffered: an outage never stops training); None elsewhere."""
    if not tracking or rank != 0:
        return None
    return MetricLogger(tracking["uri"], tracking["run_id"])


def _system_metrics(tracking: dict[str, Any] | None, rank: int):
    """MLflow's system metrics of the process that trains (rank 0), for the runs that ask for them."""
    if not tracking or rank != 0 or not tracking.get("system_metrics"):
        return None
    try:
        return start_system_metrics(tracking["uri"], tracking["run_id"])
    except Exception:  # a monitor is a nicety: it never stops a run
        return None


def _stop(monitor) -> None:
    if monitor is not None:
        try:
            monitor.finish()
        except Exception:
            pass


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


def _reporter(log: MetricLogger | None, report_fn, checkpoint_cls):
    def report(metrics, ckpt_dir):
        if log:
            log(metrics, metrics["step"])
        ckpt = checkpoint_cls.from_directory(ckpt_dir) if ckpt_dir and checkpoint_cls else None
        if report_fn:
            report_fn(_scalars(metrics), checkpoint=ckpt)
        if ckpt_dir:
            shutil.rmtree(ckpt_dir, ignore_errors=True)

    return report


def _restored(checkpoint) -> str | None:
    return checkpoint.to_directory(tempfile.mkdtemp(prefix="nfnet-resume-")) if checkpoint is not None else None


def _worker_fn(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    import ray.train.torch

    cfg: TrainConfig = config["cfg"]  # built once, on the driver
    _set_threads(cfg)
    tc = ray.train.get_context()
    rank, world = tc.get_world_rank(), tc.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    log = _mlflow_logger(config.get("tracking"), rank)
    monitor = _system_metrics(config.get("tracking"), rank)
    resume = _restored(ray.train.get_checkpoint())
    relay = config.get("progress")  # a queue the driver prints from (its console does not show workers' output)

    def say(line: str) -> None:
        if rank:
            return
        try:
            relay.put(line, timeout=5) if relay is not None else print(line, flush=True)
        except Exception:  # a progress line is never worth a training failure
            print(line, flush=True)
    dog = watchdog(cfg, config.get("watch"), rank)
    ctx = loop.WorkerContext(rank=rank, world_size=world, device=device,
                             report=_reporter(log, ray.train.report, ray.train.Checkpoint),
                             log_step=log or (lambda m, s: None), resume_from=resume,
                             print=say, on_step=_fault_once(config.get("test_crash"), rank), beat=dog.beat)
    try:
        with dog:
            summary = loop.train(cfg, config["dataset_uri"], ctx)
    finally:
        _stop(monitor)
        if resume:
            shutil.rmtree(resume, ignore_errors=True)
        if log:
            log.flush()
    summary.node_id = ray.get_runtime_context().get_node_id()
    return dataclasses.asdict(summary)


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


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}
    out[OBJECTIVE] = RunSummary(status=metrics.get("status", "running"),
                                best_val_acc=metrics.get("best_val_acc")).objective()
    return out


def run_in_process(cfg: TrainConfig, dataset_uri: str, tracking: dict[str, Any] | None = None,
                   in_tune: bool = False, quiet: bool = False, watch: Watch | None = None) -> RunSummary:
    """The same loop as a one-worker TorchTrainer, in this process (no worker group to start)."""
    if cfg.num_workers != 1:
        raise ValueError("in-process runs are for one worker; use TorchTrainer for more")
    if cfg.use_gpu and not torch.cuda.is_available():
        raise RuntimeError("use_gpu is set but this process sees no CUDA device (a Tune trial must ask for a GPU)")
    threads = torch.get_num_threads()
    _set_threads(cfg)
    log = _mlflow_logger(tracking, 0)
    monitor = _system_metrics(tracking, 0)
    resume, report_fn, ckpt_cls = None, None, None
    if in_tune:
        import ray.tune

        resume, report_fn, ckpt_cls = _restored(ray.tune.get_checkpoint()), ray.tune.report, ray.tune.Checkpoint
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.use_gpu else torch.device("cpu")
    dog = watchdog(cfg, watch)
    ctx = loop.WorkerContext(device=device, report=_reporter(log, report_fn, ckpt_cls),
                             log_step=log or (lambda m, s: None), resume_from=resume,
                             print=(lambda s: None) if quiet else (lambda s: print(s, flush=True)), beat=dog.beat)
    try:
        with dog:
            return loop.train(cfg, dataset_uri, ctx)
    finally:
        _stop(monitor)
        torch.set_num_threads(threads)
        if resume:
            shutil.rmtree(resume, ignore_errors=True)
        if log:
            log.flush()


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
                      tracking: dict[str, Any] | None = None, in_tune: bool = False,
                      test_crash: tuple | None = None, progress: bool = False,
                      watch: Watch | None = None) -> RunSummary:
    """Ray Train V2 hands a run the latest checkpoint of an earlier run with the same name and storage path:
    callers name runs by their config's fingerprint, and the loop refuses a checkpoint of another config.
    `progress`: rank 0's epoch lines on this console (train.py; a study prints a line per trial instead)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    callbacks = []
    if in_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
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
        train_loop_config={"cfg": cfg, "dataset_uri": dataset_uri, "tracking": tracking,
                           "test_crash": test_crash, "progress": relay and relay.queue, "watch": watch},
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


def train_and_track(cfg: TrainConfig, *, tracking_uri: str, experiment: str, run_name: str,
                    storage_path: str, tags: dict[str, str] | None = None, parent_run_id: str | None = None,
                    reuse_key: str | None = None, in_process: bool | None = None, in_tune: bool = False,
                    dataset_uri: str | None = None, quiet: bool = False, system_metrics: bool = False,
                    source: dict[str, str] | None = None, watch: Watch | None = None) -> RunSummary:
    """One run end to end: MLflow run opened first, so failures and divergences are recorded too. A bad config or
    bad data is a result (status failed); an infrastructure fault is raised, so Tune retries the trial. The run
    is named `run_name` while it runs and gets its verdict's mark in front when it ends. `source`: MLflow's source
    tags (mlflow_ui.source_tags) from the driver; `system_metrics`: sample CPU/GPU/memory into the run;
    `watch`: where a hung run's stall is kept and its progress published, for the study (watchdog.Watch)."""
    dataset_uri = dataset_uri or prepare_data(cfg)
    tracker = Tracker.create(
        tracking_uri, experiment, run_name,
        tags={**(source or source_tags()), "hardware": hardware(), "model": cfg.model, **(tags or {}),
              **run_note.trial_tags(cfg, tags)},
        parent_run_id=parent_run_id, reuse_tag=("run_key", reuse_key) if reuse_key else None,
    )
    tracker.log_params(run_note.effective_params(cfg))
    log_dataset(tracker.client, tracker.run_id, dataset_uri)
    tracking = {"uri": tracking_uri, "run_id": tracker.run_id, "system_metrics": system_metrics}
    if in_process is None:
        in_process = runs_in_process(cfg)
    try:
        if in_process:
            summary = run_in_process(cfg, dataset_uri, tracking, in_tune=in_tune, quiet=quiet, watch=watch)
            if in_tune:
                import ray

                summary.node_id = ray.get_runtime_context().get_node_id()
        else:
            summary = run_torch_trainer(cfg, dataset_uri, name=ray_run_name(run_name, cfg),
                                        storage_path=storage_path, tracking=tracking, in_tune=in_tune,
                                        progress=not (quiet or in_tune), watch=watch)
    except Exception as e:
        if is_infrastructure(e, cfg):
            raise  # Tune retries the trial (its last checkpoint, if any); --resume reruns it if retries run out
        summary = RunSummary(status="failed", error=f"{type(e).__name__}: {e}")  # would fail again: recorded
        tracker.log_text(traceback.format_exc()[-4000:], "traceback.txt")
    summary.mlflow_run_id = tracker.run_id
    tracker.log_dict(cfg.to_dict(), "config.json")
    tracker.log_dict(summary.scalars(), "final_metrics.json")
    log_curves(tracker, summary.history, title=run_name)
    run_note.describe(tracker, cfg, summary, tags)  # before `tags` below: the run's own, given by its caller
    tags = {"diverged_step": summary.diverged_step} if summary.status == "diverged" else {}
    if summary.error:
        tags["error"] = summary.error[:500]
    tracker.set_tags(tags)
    tracker.end(summary.status, summary.verdict, name=run_name)
    return summary


def default_storage_path() -> str:
    return str(Path(os.environ.get("NFNET_LAB_RESULTS", PROJECT_DIR / "results")))
