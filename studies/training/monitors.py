"""What the loop watches while it trains: divergence (and the losses the verdict reads) and the gradient noise
scale. Losses stay on the device between checks; every rank reaches the same decision (all-reduced)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from studies.training.verdict import curve_range, tail_stats


def all_reduce_mean(t: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(t)
        t = t / world_size
    return t


class GradNoiseScale:
    """B_simple = tr(Σ)/|G|² (McCandlish et al. 2018, App. A) from gradients at two batch sizes.

    |G|² ≈ (B_big|G_big|² − B_small|G_small|²)/(B_big − B_small),
    tr(Σ) ≈ (|G_small|² − |G_big|²)/(1/B_small − 1/B_big); both EMA-smoothed before dividing.
    """

    def __init__(self, decay: float = 0.9):
        self.decay, self.g2, self.s, self.n = decay, 0.0, 0.0, 0

    def update(self, g_small_sq: float, b_small: int, g_big_sq: float, b_big: int) -> None:
        g2 = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
        s = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
        self.g2 = self.decay * self.g2 + (1 - self.decay) * g2
        self.s = self.decay * self.s + (1 - self.decay) * s
        self.n += 1

    @property
    def value(self) -> float:
        # Bias corrections of the two EMAs cancel in the ratio.
        return self.s / self.g2 if self.n and self.g2 > 0 else float("nan")

    def state_dict(self):
        return {"g2": self.g2, "s": self.s, "n": self.n}

    def load_state_dict(self, d):
        self.g2, self.s, self.n = d["g2"], d["s"], d["n"]


class DivergenceMonitor:
    """Diverged = a non-finite loss, or one above divergence_factor × the first step's loss. Losses stay on the
    device and are checked once per log window (one host sync), all-reduced so every rank stops together."""

    def __init__(self, factor: float, world_size: int):
        self.factor, self.world_size = factor, world_size
        self.pending: list[torch.Tensor] = []
        self.losses: list[float] = []  # every step's loss, for final_train_loss
        self.initial: float | None = None
        self.step: int | None = None
        self.reason: str | None = None

    def add(self, loss: torch.Tensor) -> None:
        self.pending.append(loss)

    def check(self, next_step: int) -> bool:
        if not self.pending:
            return self.step is not None
        losses = all_reduce_mean(torch.stack(self.pending).float(), self.world_size).tolist()
        self.pending = []
        first = next_step - len(losses)
        if self.initial is None:
            self.initial = losses[0]
        for i, lv in enumerate(losses):
            self.losses.append(lv)
            if not math.isfinite(lv):
                self.step, self.reason = first + i, "non-finite loss"
            elif lv > self.factor * self.initial:
                self.step, self.reason = first + i, f"loss {lv:.3g} > {self.factor}x initial {self.initial:.3g}"
            if self.step is not None:
                return True
        return False

    @property
    def diverged(self) -> bool:
        return self.step is not None

    def final_train_loss(self) -> tuple[float | None, float | None]:
        """(mean, standard error) of the last tenth of the steps' losses."""
        return tail_stats(self.losses)

    def loss_range(self) -> tuple[float | None, float | None]:
        """(lowest, highest) mean over any tenth of the steps: whether the curve left its start (a collapse)."""
        return curve_range(self.losses)

    def state_dict(self):
        return {"initial": self.initial, "losses": self.losses}

    def load_state_dict(self, d):
        self.initial, self.losses = d["initial"], list(d["losses"])


def update_gns(gns: GradNoiseScale, noise, b_local: int, batch: int, world_size: int) -> None:
    if not noise:
        return
    small = all_reduce_mean(torch.stack([n[0] for n in noise]), world_size).tolist()
    big = torch.stack([n[1] for n in noise]).tolist()
    for gs, gb in zip(small, big):
        gns.update(gs, b_local // 2, gb, batch)
