"""Did a run learn? The verdict of one training run, from its own losses: `trained`, `stalled` or `diverged`.

"Did not blow up" is not "trains": under heavy AGC clipping every update is capped, so a run can stay finite at
an lr where it never learns (measured on this project's laptop preset: batch 1024, λ = 0.01, lr 0.8–1.6 ended
at 2.302–2.303, chance being ln 10 = 2.303). So a run is judged against its own start:

  diverged  the divergence monitor fired (non-finite loss, or > divergence_factor × the first step's loss)
  trained   it completed and its final training loss (mean of the last tenth of the steps) is below the loss at
            initialisation (the first step's loss, computed before any update) by more than the margin
  stalled   it completed, but did not get that far below its start

The margin is the larger of a relative drop (5 % of the start: 0.115 for 10 classes, where a run at chance
moves by a few thousandths) and 3 standard errors of the final loss (the spread of the tail's step losses
÷ √steps), so that neither a noisy batch at the start nor a noisy tail can turn chance into "trained". A loss
that spikes and recovers is judged by where it ends. Failed and stopped runs get no verdict: they say nothing
about stability. Pure functions, no torch: the loop, the tables and the analysis share them."""
from __future__ import annotations

import math

TRAINED, STALLED, DIVERGED = "trained", "stalled", "diverged"
VERDICTS = (TRAINED, STALLED, DIVERGED)
RELATIVE_MARGIN = 0.05  # of the loss at initialisation
NOISE_Z = 3.0  # standard errors of the final loss


def margin(initial: float, noise: float | None) -> float:
    """How far below its start a run's final loss must be to count as trained."""
    se = noise if noise is not None and math.isfinite(noise) else 0.0
    return max(RELATIVE_MARGIN * abs(initial), NOISE_Z * se)


def judge(status: str, initial: float | None, final: float | None, noise: float | None = None) -> str | None:
    """The verdict of a run from its status, its loss at initialisation, its final loss and that loss's
    standard error. None for runs that failed or were stopped (and for a completed run without losses)."""
    if status == "diverged":
        return DIVERGED
    if status != "completed" or not _finite(initial) or not _finite(final):
        return None
    return TRAINED if initial - final > margin(initial, noise) else STALLED


def tail_stats(losses: list[float]) -> tuple[float | None, float | None]:
    """(mean, standard error) of the last tenth of a run's step losses (at least one step)."""
    if not losses:
        return None, None
    tail = losses[-max(1, len(losses) // 10):]
    mean = sum(tail) / len(tail)
    if len(tail) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in tail) / (len(tail) - 1)
    return mean, math.sqrt(var / len(tail))


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)
