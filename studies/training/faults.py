"""Which errors of a run are the machines' (raised, so Ray Tune retries the trial) and which the run's own (a bad
config or bad data: recorded as a `failed` row, since it would fail the same way again)."""
from __future__ import annotations

import torch

import storage
from studies.training.config import TrainConfig

__all__ = ["is_infrastructure", "root_cause"]


def root_cause(e: BaseException) -> BaseException:
    """The exception under Ray's wrappers: a task's error (RayTaskError.cause, also Ray Data's reads), a worker
    group's failure (its first worker's cause), an explicit `raise … from`."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        failures = getattr(e, "worker_failures", None)
        nxt = getattr(e, "cause", None) or (next(iter(failures.values()), None) if failures else None)
        if nxt is None and type(e).__module__.split(".")[0] == "ray":
            nxt = e.__cause__
        if not isinstance(nxt, BaseException):
            return e
        e = nxt
    return e


def is_infrastructure(e: BaseException, cfg: TrainConfig | None = None) -> bool:
    """A fault of the machines, not of the config or the data, judged by its cause under Ray's wrappers: a lost
    worker or node, an unreachable tracking server or object store, out of memory on a GPU this run shares with
    other trials. Retried; anything else (a bad config, corrupt data naming its shard, a shape error, out of memory
    on a GPU of its own) would fail the same way again and is recorded as `failed`."""
    e = root_cause(e)
    if isinstance(e, storage.StorageUnavailable):
        return True
    if isinstance(e, storage.StorageError):  # bad data or a refused location: the message names it
        return False
    if isinstance(e, torch.OutOfMemoryError):  # another trial's memory on the same GPU may be gone next time
        return cfg is not None and cfg.use_gpu and cfg.gpus_per_worker < 1
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    if type(e).__module__.split(".")[0] in ("ray", "requests", "urllib3", "botocore", "grpc"):
        return True  # Ray's own (a dead actor, worker or node) with no user error under it, or a transport's
    text = str(e)
    return type(e).__name__ == "MlflowException" and any(
        s in text for s in ("Max retries exceeded", "Connection refused", "timed out", "502", "503", "504"))
