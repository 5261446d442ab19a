"""What the runs show, decided apart from its words: the paper's effects read along a map's rows as typed records
(shown, or NOT SHOWN and why; the ratio, its bound, the seeds that agree and the cells it rests on). Without
clipping the frontier (and the accuracy) falls as the row grows (batch, augmentation), and AGC holds it up at the
last row; the third claim (λ) is lambdas.py's. An effect is called only when the majority frontiers show it AND
the two cells' seed ranges do not overlap. Pure functions of the cells' rows: effects_of takes any map, the
deciding functions under it a typed one (typed(g): its cells as CellRows); findings.py words the records."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from studies.sweep.lambdas import lambda_gain
from studies.sweep.layout import NO_CLIPPING, Grid
from studies.sweep.support import (
    Bound,
    CellRow,
    Effect,
    Ratio,
    Support,
    Why,
    apart,
    as_row,
    frontier_lr,
    support,
)

NO_CLIP_COL = NO_CLIPPING  # the map's no-clipping column
ACC_MARGIN = 0.02  # top-1 differences below this are within a few seeds' noise on the laptop data: not a finding


@dataclass(frozen=True)
class FrontierFall(Effect):
    """Without clipping the largest lr that trains falls from the first row to the last."""

    first: Any  # the two rows compared
    last: Any
    low: CellRow | None  # no clipping's cell at the first row, and at the last
    high: CellRow | None
    ratio: Ratio | None  # the first frontier ÷ the last (inf: no lr trains at the last); None where it does not fall
    support: Support | None


@dataclass(frozen=True)
class AccuracyFall(Effect):
    """Without clipping the best val top-1 of the full runs falls from the first row to the last by ACC_MARGIN."""

    first: Any
    last: Any
    low: CellRow
    high: CellRow
    support: Support  # seeds (paired by seed) in which it falls by ACC_MARGIN


@dataclass(frozen=True)
class AgcAccuracy(Effect):
    """At the last row AGC's best setting beats no clipping's top-1 by ACC_MARGIN."""

    last: Any
    column: str  # the AGC setting with the best top-1
    best: CellRow
    control: CellRow  # no clipping's cell at the last row
    gain: float  # best's top-1 − control's
    support: Support


@dataclass(frozen=True)
class AgcFrontier(Effect):
    """At the last row AGC's best frontier is ≥ 2× no clipping's."""

    last: Any
    control: CellRow | None
    settings: tuple[tuple[str, CellRow], ...]  # every AGC setting's cell at the last row
    column: str | None = None  # the best AGC setting (the largest frontier, then the flattest); None: none found
    best: CellRow | None = None
    ratio: Ratio | None = None  # best ÷ control (inf: no lr trains without clipping); None: control not comparable
    support: Support | None = None
    control_fails_full: bool = False  # the control's frontier lr did not even train over the full budget


@dataclass(frozen=True)
class FullBudget:
    """Over the maps: in how many of the cells with a full run at their frontier lr it trained."""

    trained: int
    cells: int


@dataclass(frozen=True)
class EdgeKinds:
    """Over the maps: why the first lr above each frontier fails. An instability (collapsed or diverged: the lr is
    too large) or a budget limit (stalled: too slow for the scan, or held at chance)."""

    cells: int  # cells with a failing lr above their frontier
    instability: int
    collapsed: int  # of the instabilities
    diverged: int
    budget: tuple[tuple[str, str, Any, str], ...]  # (facet, row name, row, column) of each cell that stalled there


def typed(g: Grid) -> Grid:
    """The map with its cells as CellRows (read once; the words and the decisions use their attributes)."""
    return dataclasses.replace(g, at={k: as_row(c) for k, c in g.at.items()})


def effects_of(g: Grid) -> list[Effect]:
    """Every effect of a map, in the order the findings print them; the frontier's and accuracy's along the rows
    only where the map has a 'no clipping' column and two rows, the λ claim where it has two λs."""
    g = typed(g)
    out: list[Effect] = []
    if NO_CLIP_COL in g.cols and len(g.rows) >= 2:
        out += [frontier_fall(g), *accuracy_effects(g), agc_frontier(g)]
    gain = lambda_gain(g)
    return out + ([gain] if gain else [])


def frontier_fall(g: Grid) -> FrontierFall:
    """No clipping's frontier from the first row to the last: called where it falls outside the seeds' spread."""
    lo, hi = g.rows[0], g.rows[-1]
    c_lo, c_hi = g.at.get((lo, NO_CLIP_COL)), g.at.get((hi, NO_CLIP_COL))
    small, large = frontier_lr(c_lo), frontier_lr(c_hi)
    if small is None or large is None:
        return FrontierFall(Why.NOT_COMPARABLE, lo, hi, c_lo, c_hi, None, None)
    if not large < small:
        return FrontierFall(Why.NO_EFFECT, lo, hi, c_lo, c_hi, None, None)
    ratio = Ratio(small / large if large else math.inf, Bound.lower_if(c_lo.max_stable_lr_at_edge))
    sup = support([c_lo, c_hi], lambda x, y: y < x)
    return FrontierFall(None if apart(c_hi, c_lo) else Why.WITHIN_SPREAD, lo, hi, c_lo, c_hi, ratio, sup)


def _acc_apart(low: CellRow, high: CellRow) -> bool:
    """`high`'s seeds all score above `low`'s (a point where a cell has one seed)."""
    return high.best_val_acc_min > low.best_val_acc_max if high.best_val_acc_min is not None and \
        low.best_val_acc_max is not None else True


def _acc_support(low: CellRow, high: CellRow) -> Support:
    """In how many seeds (paired by seed) `high` beats `low` by ACC_MARGIN."""
    a, b = dict(zip(low.acc_seed_list, low.best_val_acc_by_seed)), dict(zip(high.acc_seed_list,
                                                                              high.best_val_acc_by_seed))
    seeds = sorted(set(a) & set(b))
    broke = tuple(s for s in seeds if b[s] - a[s] < ACC_MARGIN)
    return Support(len(seeds) - len(broke), len(seeds), broke)


def _acc_why(gain: float, low: CellRow, high: CellRow) -> Why | None:
    if gain < ACC_MARGIN:
        return Why.NO_EFFECT
    return None if _acc_apart(low, high) else Why.WITHIN_SPREAD


def accuracy_effects(g: Grid) -> list[AccuracyFall | AgcAccuracy]:
    """Best val top-1 of the full runs along the rows without clipping, and AGC's best against it at the last
    row; a difference under ACC_MARGIN, or inside the seeds' range, is not called one. Nothing when the full runs
    have no accuracy."""
    lo, hi = g.rows[0], g.rows[-1]
    c_lo, c_hi = g.at.get((lo, NO_CLIP_COL)), g.at.get((hi, NO_CLIP_COL))
    if c_lo is None or c_hi is None or c_lo.best_val_acc is None or c_hi.best_val_acc is None:
        return []
    out = [AccuracyFall(_acc_why(c_lo.best_val_acc - c_hi.best_val_acc, c_hi, c_lo), lo, hi, c_lo, c_hi,
                        _acc_support(c_hi, c_lo))]
    agc = [(col, g.at[hi, col]) for col in g.cols if col != NO_CLIP_COL and (hi, col) in g.at
           and g.at[hi, col].best_val_acc is not None]
    if not agc:
        return out
    name, best = max(agc, key=lambda x: x[1].best_val_acc)
    gain = best.best_val_acc - c_hi.best_val_acc
    return out + [AgcAccuracy(_acc_why(gain, c_hi, best), hi, name, best, c_hi, gain, _acc_support(c_hi, best))]


def agc_frontier(g: Grid) -> AgcFrontier:
    """AGC's best frontier against no clipping's at the last row: called at ≥ 2× and outside the seeds' spread."""
    hi = g.rows[-1]
    c_hi = g.at.get((hi, NO_CLIP_COL))
    agc = tuple((col, g.at[hi, col]) for col in g.cols if col != NO_CLIP_COL and (hi, col) in g.at)
    found = [(col, c) for col, c in agc if c.found]
    if not found:
        return AgcFrontier(Why.NO_AGC_FRONTIER, hi, c_hi, agc)
    name, best = max(found, key=lambda x: (x[1].max_stable_lr, -x[1].lr_sensitivity if
                                           x[1].lr_sensitivity is not None else 0))
    large = frontier_lr(c_hi)
    if large is None:
        return AgcFrontier(Why.NOT_COMPARABLE, hi, c_hi, agc, name, best)
    ratio = Ratio(best.max_stable_lr / large if large else math.inf, Bound.lower_if(best.max_stable_lr_at_edge))
    if not (large == 0 or best.max_stable_lr / large >= 2):
        return AgcFrontier(Why.NO_EFFECT, hi, c_hi, agc, name, best, ratio)
    sup = support([best, c_hi], lambda x, y: x > 0 and (y == 0 or x / y >= 2))
    return AgcFrontier(None if apart(c_hi, best) else Why.WITHIN_SPREAD, hi, c_hi, agc, name, best, ratio, sup,
                       c_hi.frontier_holds is False)


def full_budget(grids: list[Grid]) -> FullBudget | None:
    """None where no cell had a full run at its frontier lr."""
    held = [c.frontier_holds for g in grids for c in map(as_row, g.at.values()) if c.frontier_holds is not None]
    return FullBudget(sum(held), len(held)) if held else None


def edge_kinds_of(grids: list[Grid]) -> EdgeKinds | None:
    """None where no cell has a failing lr above its frontier."""
    named = [((g.facet, g.layout.row_name, r, col), c) for g in grids for (r, col), c in
             ((k, as_row(c)) for k, c in g.at.items()) if c.first_unstable_kind]
    if not named:
        return None
    unstable = [c for _, c in named if c.first_unstable_kind == "instability"]
    kinds = [sum(c.first_unstable_verdict == v for c in unstable) for v in ("collapsed", "diverged")]
    return EdgeKinds(len(named), len(unstable), *kinds,
                     tuple(name for name, c in named if c.first_unstable_kind == "budget"))
