"""The paper's third claim as a finding: "smaller (stronger) clipping thresholds are necessary for stability at
higher batch sizes" (Brock et al. 2021; for batch 1024–4096 they set λ = 0.01). Read along a map whose columns
are λs: the smallest λ's frontier gains on (pulls ahead of) the largest λ's as the rows grow: the ratio of their
frontiers grows from the first row to the last. Called only when both ratios can be read as such (no lower bound
where it would fake the growth), the majority frontiers show it AND the seeds' spread keeps it (the smallest
ratio the last row's seed ranges allow lies above the largest the first row's allow); it says in how many seeds
it holds. Otherwise NOT SHOWN, with its numbers. Decided (lambda_gain, a LambdaGain) apart from its words
(lambda_text); pure functions of the cells."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from studies.sweep.layout import Grid, value_text
from studies.sweep.support import (
    BOUND_MARK,
    Bound,
    CellRow,
    Effect,
    Ratio,
    Support,
    Why,
    as_row,
    frontier_lr,
    frontier_text,
    support,
    support_text,
)


def lambda_value(col: str) -> float | None:
    """The λ of a map column ('λ=0.01' -> 0.01); None for 'no clipping' or another axis."""
    if not col.startswith("λ="):
        return None
    try:
        return float(col[2:])
    except ValueError:
        return None


def ratio(small: float | None, large: float | None) -> float | None:
    """small's frontier ÷ large's: inf where only the smaller λ trains at some lr, None where neither does (or a
    frontier is undecided)."""
    if small is None or large is None or (small == 0 and large == 0):
        return None
    return math.inf if large == 0 else small / large


def grows(first: float | None, last: float | None) -> bool:
    return first is not None and last is not None and last > first


@dataclass(frozen=True)
class LambdaGain(Effect):
    """The smallest λ's frontier gains on the largest λ's from the first row to the last."""

    small: str  # the two λ columns
    large: str
    first: Any  # the two rows
    last: Any
    cells: tuple[CellRow, CellRow, CellRow, CellRow]  # small's and large's at the first row, then at the last
    ratios: tuple[Ratio, Ratio]  # small ÷ large at the first row and at the last
    bounds: tuple[tuple[Any, str], ...] = ()  # (row, column): the lower bounds a growth rests on
    support: Support | None = None


def _seed_ratios(s: CellRow, g: CellRow) -> tuple[float | None, float | None]:
    """(the smallest, the largest) ratio the seeds' frontier ranges of small λ's `s` and large λ's `g` allow."""
    return ratio(s.max_stable_lr_min, g.max_stable_lr_max), ratio(s.max_stable_lr_max, g.max_stable_lr_min)


def lambda_gain(g: Grid) -> LambdaGain | None:
    """Does the smallest λ pull ahead of the largest as the rows (batch) grow? None when the map has fewer than two
    λs or rows, or lacks one of the four cells."""
    lams = sorted((lambda_value(col), col) for col in g.cols if lambda_value(col) is not None)
    if len(lams) < 2 or len(g.rows) < 2:
        return None
    (_, small), (_, large) = lams[0], lams[-1]
    lo, hi = g.rows[0], g.rows[-1]
    cs = tuple(as_row(g.at.get((r, col))) for r in (lo, hi) for col in (small, large))
    if any(c is None for c in cs):
        return None
    s0, g0, s1, g1 = cs
    ratios = tuple(Ratio(ratio(frontier_lr(s), frontier_lr(b)), Bound.of(s, b)) for s, b in ((s0, g0), (s1, g1)))
    r_first, r_last = (q.value for q in ratios)

    def gain(why: Why | None, *rest) -> LambdaGain:
        return LambdaGain(why, small, large, lo, hi, cs, ratios, *rest)

    if r_first is None or r_last is None:
        return gain(Why.NOT_COMPARABLE)
    if not grows(r_first, r_last):
        return gain(Why.NO_EFFECT)
    bounds = tuple((r, col) for r, col, c in ((lo, small, s0), (hi, large, g1)) if c.max_stable_lr_at_edge)
    sup = support(list(cs), lambda a, b, c, d: grows(ratio(a, b), ratio(c, d)))
    if bounds:  # a lower bound where it sets the ratio's growth: the true growth may be none
        return gain(Why.LOWER_BOUND, bounds, sup)
    if not grows(_seed_ratios(s0, g0)[1], _seed_ratios(s1, g1)[0]):
        return gain(Why.WITHIN_SPREAD, bounds, sup)
    return gain(None, bounds, sup)


def _ratio_text(r: Ratio, large: str) -> str:
    if r.value is None:
        return "?"
    return f"where {large} trains at no lr" if r.infinite else f"{BOUND_MARK[r.bound]}{r.value:.3g}×"


def lambda_text(e: LambdaGain, g: Grid) -> str:
    """The claim in words, with the two rows' frontiers and ratios: shown, or NOT SHOWN and why."""
    rn, (s0, g0, s1, g1) = g.layout.row_name, e.cells
    nums = "; ".join(f"{frontier_text(s)} vs {frontier_text(b)} at {rn} {value_text(r)} ({_ratio_text(q, e.large)})"
                     for r, s, b, q in ((e.first, s0, g0, e.ratios[0]), (e.last, s1, g1, e.ratios[1])))
    claim = f"{e.small}'s frontier gains on {e.large}'s {g.layout.grows}"
    if e.why is Why.NOT_COMPARABLE:
        return f"NOT SHOWN: {claim}: a frontier cannot be compared ({nums})."
    if e.why is Why.NO_EFFECT:
        return f"NOT SHOWN: {claim}: their ratio does not grow ({nums})."
    sup = support_text(e.support)
    if e.why is Why.LOWER_BOUND:
        bound = [f"{col} at {rn} {value_text(r)}" for r, col in e.bounds]
        return (f"NOT SHOWN: {claim} in the majority ({nums}), but {' and '.join(bound)} trains up to the largest "
                f"lr tried, so the growth rests on a lower bound{sup}.")
    if e.why is Why.WITHIN_SPREAD:
        return f"NOT SHOWN: {claim} in the majority ({nums}), but within the seeds' spread{sup}."
    return f"{claim}: {nums}{sup}."


def lambda_effect(g: Grid) -> list[str]:
    """Does the smallest λ pull ahead of the largest as the rows (batch) grow? Shown or NOT SHOWN, with the two
    rows' frontiers and ratios; nothing when the map has fewer than two λs or rows."""
    e = lambda_gain(g)
    return [] if e is None else [lambda_text(e, g)]
