"""The learning-rate schedule of one run, in optimizer steps: its length from epochs or steps, a linear warmup,
then cosine decay to 0 (training) or the peak held (stability scans). The study's scans and budget notes read the
same formulas (one source for run length and warmup)."""
from __future__ import annotations

import math

from studies.training.config import TrainConfig


def lr_at(step: int, total: int, warmup: int, peak: float, schedule: str = "cosine") -> float:
    """Linear warmup, then cosine decay to 0 at `total` (or, `constant`, the peak held)."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, t)))


def run_length(cfg: TrainConfig, steps_per_epoch: int) -> tuple[int, int, int]:
    """(steps to run, lr schedule length, warmup steps)."""
    total = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))
    schedule = max(total, cfg.schedule_steps or 0)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * steps_per_epoch)
    return total, schedule, min(schedule, warmup)
