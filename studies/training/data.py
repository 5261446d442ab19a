"""A worker's data: the training split as a resident tensor (whole split on the device, cached per process) or a
Ray Data stream of this rank's rows, and the validation split in this rank's share."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

import storage
from studies.training.config import TrainConfig
from studies.training.schedule import run_length
from studies.training.state import WorkerContext

# The decoded splits this process holds, on their device: a Tune trial actor is reused for trial after trial
# (reuse_actors), so a CIFAR-size study copies its data to the GPU once per actor, not once per run.
_RESIDENT: dict[str, tuple[tuple, tuple[torch.Tensor, torch.Tensor]]] = {}


def resident_split(data, split: str, image_size: int | None, device: torch.device,
                   rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of a split (every world-th row from rank), decoded and on `device`; cached per split,
    one dataset at a time, so a process never holds two copies."""
    key = (data.uri, image_size, str(device), rank, world)
    hit = _RESIDENT.get(split)
    if hit is None or hit[0] != key:
        _RESIDENT.pop(split, None)  # free the old copy before making the new one
        x, y = data.load_split(split, image_size=image_size)
        if world > 1:
            x, y = x[rank::world].contiguous(), y[rank::world].contiguous()
        _RESIDENT[split] = key, (x.to(device), y.to(device, torch.int64))
    return _RESIDENT[split][1]


def stream_loader(cfg: TrainConfig, data, n_rows: int, ctx: WorkerContext) -> storage.EpochStream:
    """This worker's own rows of a streamed split, in one Ray Data execution over all the run's epochs (CPU nodes
    decode, GPUs train); every rank gets the same number of rows, so runs the same number of steps."""
    steps = max(1, (n_rows // ctx.world_size) // cfg.local_batch_size)  # 0 is refused by EpochStream, with why
    total = run_length(cfg, steps)[0]
    return storage.EpochStream(data, "train", batch_size=cfg.local_batch_size, seed=cfg.seed,
                               epochs=-(-total // steps), rank=ctx.rank, world_size=ctx.world_size,
                               device=ctx.device, image_size=cfg.image_size)


def val_chunks(data, cfg: TrainConfig, ctx: WorkerContext) -> Callable[[], Iterable]:
    """Each rank evaluates its own 1/world of the validation split: every world-th image held on the device when
    the split fits (as the train split), else every world-th shard streamed, one decoded shard at a time."""
    if storage.loaders.loader_mode(data, "val", cfg.loader, cfg.image_size) == "resident":
        held = resident_split(data, "val", cfg.image_size, ctx.device, ctx.rank, ctx.world_size)
        return lambda: [held]

    def stream():
        for i in range(ctx.rank, len(data.shard_paths("val")), ctx.world_size):
            x, y = data.load_shard("val", i, image_size=cfg.image_size)
            yield x.to(ctx.device, non_blocking=True), y.to(ctx.device)

    return stream
