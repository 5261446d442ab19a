"""Did a run learn, and if not, why? The verdict of one training run, from its own losses: `trained`, `stalled`,
`collapsed` or `diverged`.

"Did not blow up" is not "trains": under heavy AGC clipping every update is capped, so a run can stay finite at
an lr where it never learns (measured on this project's laptop preset: batch 1024, λ = 0.01, lr 0.8–1.6 ended
at 2.302–2.303, chance being ln 10 = 2.303). So a run is judged against its own start:

  diverged   the divergence monitor fired (non-finite loss, or > divergence_factor × the first step's loss)
  trained    it completed and its final training loss (mean of the last tenth of the steps) is below the loss at
             initialisation (the first step's loss, computed before any update) by more than the margin
  collapsed  it completed, did not train, but its loss curve LEFT its start: somewhere a tenth of its steps
             averaged more than the margin above the start (it rose clearly), or more than the margin below the
             start and the run then ended more than the margin above that low (it learned, then fell back to
             chance). An instability that stayed finite: the lr is too large, not too small
  stalled    it completed and its loss never left its start by the margin: too slow for the budget (e.g. 2.308 →
             2.295 at a small lr), or held at chance by heavy clipping

Why split the failures: above a frontier a run blows up and falls back to chance without ever reaching 5× its
start (measured: batch 256 without clipping, lr 0.2 ended at 2.302 between diverged neighbours), while below it a
run just moves too slowly. Both fail (the frontier reads them alike), but only the first says the edge is an
instability (the paper's claim) rather than a budget limit.

The margin is the larger of a relative distance (5 % of the start: 0.115 for 10 classes, where a run at chance
moves by a few thousandths) and 3 standard errors of the final loss (the spread of the tail's step losses
÷ √steps: the run's own noise, which the curve's other tenths share), so that neither a noisy batch at the start
nor a noisy tail can turn chance into "trained", and no noise at chance level into "collapsed". The curve is read
as the means of sliding windows of a tenth of the steps (the tail's length), so one noisy step moves it by a tenth
of its size. A loss that spikes and recovers is judged by where it ends: trained if it ends clearly below its
start, collapsed if it ends back at it. Failed and stopped runs get no verdict: they say nothing about stability.
Pure functions, no torch: the loop, the tables and the analysis share them."""
from __future__ import annotations

import math

TRAINED, STALLED, COLLAPSED, DIVERGED = "trained", "stalled", "collapsed", "diverged"
VERDICTS = (TRAINED, STALLED, COLLAPSED, DIVERGED)
FAILURES = (STALLED, COLLAPSED, DIVERGED)  # in order of severity: a tie between seeds goes to the later one
INSTABILITIES = (COLLAPSED, DIVERGED)  # the lr is too large; `stalled`: too small for the budget
RELATIVE_MARGIN = 0.05  # of the loss at initialisation
NOISE_Z = 3.0  # standard errors of the final loss


def margin(initial: float, noise: float | None) -> float:
    """How far from its start (or its low) a run's loss must move to count: trained, or left its start."""
    se = noise if noise is not None and math.isfinite(noise) else 0.0
    return max(RELATIVE_MARGIN * abs(initial), NOISE_Z * se)


def judge(status: str, initial: float | None, final: float | None, noise: float | None = None,
          low: float | None = None, high: float | None = None) -> str | None:
    """The verdict of a run from its status, its loss at initialisation, its final loss and that loss's
    standard error, and the lowest and highest tenth of its loss curve (curve_range; without them, rows written
    before they existed, a run that did not train is `stalled`). None for runs that failed or were stopped (and
    for a completed run without losses)."""
    if status == "diverged":
        return DIVERGED
    if status != "completed" or not _finite(initial) or not _finite(final):
        return None
    m = margin(initial, noise)
    if initial - final > m:
        return TRAINED
    rose = _finite(high) and high - initial > m
    fell_back = _finite(low) and initial - low > m and final - low > m
    return COLLAPSED if rose or fell_back else STALLED


def tail_stats(losses: list[float]) -> tuple[float | None, float | None]:
    """(mean, standard error) of the last tenth of a run's step losses (at least one step)."""
    if not losses:
        return None, None
    tail = losses[-_window(losses):]
    mean = sum(tail) / len(tail)
    if len(tail) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in tail) / (len(tail) - 1)
    return mean, math.sqrt(var / len(tail))


def curve_range(losses: list[float]) -> tuple[float | None, float | None]:
    """(lowest, highest) mean of a run's step losses over any window of a tenth of its steps (the tail's length):
    how far its curve went from its start, either way. Non-finite losses are left out (a run with one is
    diverged anyway)."""
    xs = [v for v in losses if math.isfinite(v)]
    if not xs:
        return None, None
    w = _window(xs)
    total = sum(xs[:w])
    lo = hi = total
    for i in range(w, len(xs)):
        total += xs[i] - xs[i - w]
        lo, hi = min(lo, total), max(hi, total)
    return lo / w, hi / w


def _window(losses: list[float]) -> int:
    return max(1, len(losses) // 10)


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)
