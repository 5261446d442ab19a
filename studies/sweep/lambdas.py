"""The paper's third claim as a finding: "smaller (stronger) clipping thresholds are necessary for stability at
higher batch sizes" (Brock et al. 2021; for batch 1024–4096 they set λ = 0.01). Read along a map whose columns
are λs: the smallest λ's frontier gains on (pulls ahead of) the largest λ's as the rows grow: the ratio of their
frontiers grows from the first row to the last. Called only when both ratios can be read as such (no lower bound
where it would fake the growth), the majority frontiers show it AND the seeds' spread keeps it (the smallest
ratio the last row's seed ranges allow lies above the largest the first row's allow); it says in how many seeds
it holds. Otherwise NOT SHOWN, with its numbers. Pure functions of the cells."""
from __future__ import annotations

import math

from studies.sweep.layout import Grid, value_text
from studies.sweep.support import frontier_lr, frontier_text, support, support_text


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


def _ratio_text(r: float | None, large: str, mark: str = "") -> str:
    if r is None:
        return "?"
    return f"where {large} trains at no lr" if math.isinf(r) else f"{mark}{r:.3g}×"


def _bound(s: dict, g: dict) -> str:
    """A ratio's mark: ≥ where the smaller λ's frontier is a lower bound, ≤ where the larger's is, ? where both."""
    lo, up = bool(s["max_stable_lr_at_edge"]), bool(g["max_stable_lr_at_edge"])
    return "?" if lo and up else "≥" if lo else "≤" if up else ""


def _seed_ratios(cs: dict, small: str, large: str, row) -> tuple[float | None, float | None]:
    """(the smallest, the largest) ratio the seeds' frontier ranges at `row` allow."""
    s, g = cs[row, small], cs[row, large]
    lo = ratio(s.get("max_stable_lr_min"), g.get("max_stable_lr_max"))
    hi = ratio(s.get("max_stable_lr_max"), g.get("max_stable_lr_min"))
    return lo, hi


def lambda_effect(g: Grid) -> list[str]:
    """Does the smallest λ pull ahead of the largest as the rows (batch) grow? Shown or NOT SHOWN, with the two
    rows' frontiers and ratios; nothing when the map has fewer than two λs or rows."""
    lams = sorted((lambda_value(col), col) for col in g.cols if lambda_value(col) is not None)
    if len(lams) < 2 or len(g.rows) < 2:
        return []
    (_, small), (_, large) = lams[0], lams[-1]
    lo, hi, rn = g.rows[0], g.rows[-1], g.layout.row_name
    cs = {(r, col): g.at.get((r, col)) for r in (lo, hi) for col in (small, large)}
    if any(c is None for c in cs.values()):
        return []
    r_first, r_last = (ratio(frontier_lr(cs[r, small]), frontier_lr(cs[r, large])) for r in (lo, hi))
    nums = "; ".join(f"{frontier_text(cs[r, small])} vs {frontier_text(cs[r, large])} at {rn} {value_text(r)}"
                     f" ({_ratio_text(q, large, _bound(cs[r, small], cs[r, large]))})"
                     for r, q in ((lo, r_first), (hi, r_last)))
    claim = f"{small}'s frontier gains on {large}'s {g.layout.grows}"
    if r_first is None or r_last is None:
        return [f"NOT SHOWN: {claim}: a frontier cannot be compared ({nums})."]
    if not grows(r_first, r_last):
        return [f"NOT SHOWN: {claim}: their ratio does not grow ({nums})."]
    bound = [f"{col} at {rn} {value_text(r)}" for r, col in ((lo, small), (hi, large))
             if cs[r, col]["max_stable_lr_at_edge"]]
    sup = support_text(*support([cs[lo, small], cs[lo, large], cs[hi, small], cs[hi, large]],
                                lambda a, b, c, d: grows(ratio(a, b), ratio(c, d))))
    if bound:  # a lower bound where it sets the ratio's growth: the true growth may be none
        return [f"NOT SHOWN: {claim} in the majority ({nums}), but {' and '.join(bound)} trains up to the largest "
                f"lr tried, so the growth rests on a lower bound{sup}."]
    if not grows(_seed_ratios(cs, small, large, lo)[1], _seed_ratios(cs, small, large, hi)[0]):
        return [f"NOT SHOWN: {claim} in the majority ({nums}), but within the seeds' spread{sup}."]
    return [f"{claim}: {nums}{sup}."]
