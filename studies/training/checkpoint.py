"""Checkpoints of one worker's run: at epoch ends (model, optimizer, monitors, history) and mid-epoch on a
clock (plus where in the epoch, its partial sums and the random streams), so a resumed run continues exactly as
the uninterrupted one. A checkpoint belongs to one config (its fingerprint) and is refused by any other."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from studies.training.state import EpochTally, Training

CHECKPOINT_FILE = "state.pt"


def checkpoint_due(tr: Training) -> bool:
    """Rank 0's clock decides, so every rank checkpoints at the same step."""
    minutes = tr.cfg.checkpoint_every_minutes
    if not minutes:
        return False
    due = torch.tensor(float(time.monotonic() - tr.last_checkpoint >= 60 * minutes), device=tr.ctx.device)
    if tr.ctx.world_size > 1:
        dist.broadcast(due, 0)
    return bool(due.item())


def save_mid_epoch(tr: Training, epoch: int, epoch_step: int, step: int, tally: EpochTally, gen) -> None:
    """A checkpoint inside an epoch: where in it, its partial sums and the random streams, so a resumed run
    continues exactly."""
    rng = {"torch": torch.get_rng_state(), "augment": gen.get_state()}
    if tr.ctx.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(tr.ctx.device)
    tr.state.update(epoch=epoch, step=step, mid_epoch={
        "epoch_step": epoch_step, "loss": tally.loss.item(), "correct": tally.correct.item(), "seen": tally.seen,
        "last": {k: float(v) for k, v in tally.last.items()}, "rng": rng})
    ckpt = save_checkpoint(tr) if tr.ctx.rank == 0 else None
    tr.state.pop("mid_epoch")
    tr.ctx.report({"step": step, "epoch": epoch + 1, "status": "running", "mid_epoch_checkpoint": 1.0}, ckpt)


def resume_mid_epoch(tr: Training, tally: EpochTally, gen) -> int:
    """Batches of this epoch to skip (already trained), with the sums and random streams restored."""
    mid = tr.state.pop("mid_epoch", None)
    if not mid:
        return 0
    tally.loss += mid["loss"]
    tally.correct += mid["correct"]
    tally.seen = mid["seen"]
    tally.last.update(mid["last"])
    torch.set_rng_state(mid["rng"]["torch"])
    gen.set_state(mid["rng"]["augment"])
    if "cuda" in mid["rng"]:
        torch.cuda.set_rng_state(mid["rng"]["cuda"], tr.ctx.device)
    return mid["epoch_step"]


def save_checkpoint(tr: Training) -> str:
    tr.last_checkpoint = time.monotonic()
    d = tempfile.mkdtemp(prefix="nfnet-ckpt-")
    torch.save({"config_hash": tr.cfg.fingerprint(), "model": tr.model.state_dict(),
                "optimizer": tr.opt.state_dict(), "gns": tr.gns.state_dict(), "monitor": tr.monitor.state_dict(),
                "state": tr.state}, Path(d) / CHECKPOINT_FILE)
    return d


def restore_checkpoint(path: str, tr: Training) -> None:
    # weights_only: a checkpoint from shared storage holds tensors and plain data, never code to tr.
    ck = torch.load(Path(path) / CHECKPOINT_FILE, map_location=tr.ctx.device, weights_only=True)
    if ck.get("config_hash") != tr.cfg.fingerprint():
        raise ValueError(f"checkpoint {path} was written by a run with another config (hash "
                         f"{ck.get('config_hash')} ≠ {tr.cfg.fingerprint()}); refusing to continue it under this one")
    tr.model.load_state_dict(ck["model"])
    tr.opt.load_state_dict(ck["optimizer"])
    tr.gns.load_state_dict(ck["gns"])
    tr.monitor.load_state_dict(ck["monitor"])
    tr.state.update(ck["state"])
