"""Two maps of the same design side by side (pure functions over two cells tables): how far apart each cell's
majority frontier lies, in √2 steps of the refined lr grid, and whether the findings say the same.

Made for reproducibility checks: the same study under two kernel paths that round differently (channels_last on
and off, 1 vs 2 threads) or two disjoint seed sets (`--seed 0`, `--seed 10`) should agree within one √2 step in
almost every cell and reach the same findings; a cell further apart is one the map cannot pin down."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa

from studies.sweep.effects import effects_of
from studies.sweep.findings import frontier_text
from studies.sweep.frontier import FOUND, NONE
from studies.sweep.layout import grids_of, rows_of

STEP = math.log(math.sqrt(2))  # one step of the refined grid


@dataclass(frozen=True)
class CellPair:
    cell: str
    a: str  # the frontier as the map writes it ('0.4', '≥3.2', 'undecided', 'none')
    b: str
    steps: float | None  # |log(a/b)| in √2 steps; None when one is a number and the other is not

    @property
    def agree(self) -> bool:
        """Within one √2 step; two undecided (or two 'none') cells agree; a lower bound '≥x' agrees with any
        frontier at or above one step below x; 'none' (below the smallest lr tried, L) with any frontier up to one
        step above L."""
        return self.steps is not None and self.steps <= 1 + 0.01  # the refined lrs are stored to 4 digits


def _steps(a: dict, b: dict) -> float | None:
    states = {a["frontier"], b["frontier"]}
    if states == {FOUND, NONE}:  # 'none' lies below its smallest lr tried: a found frontier there or below agrees
        found, below = (a, b) if a["frontier"] == FOUND else (b, a)
        lowest = below["lowest_lr_tried"]
        return max(0.0, math.log(found["max_stable_lr"] / lowest) / STEP) if lowest else None
    if a["frontier"] != FOUND or b["frontier"] != FOUND:
        return 0.0 if a["frontier"] == b["frontier"] else None
    x, y = a["max_stable_lr"], b["max_stable_lr"]
    lo, hi = (a, b) if x <= y else (b, a)
    if lo["max_stable_lr_at_edge"]:  # the smaller is a lower bound: the larger does not contradict it
        return 0.0
    return abs(math.log(y / x)) / STEP


def pair_cells(a: pa.Table | list[dict], b: pa.Table | list[dict]) -> list[CellPair]:
    """Every cell of `a` that `b` has too, in `a`'s order."""
    other = {c["cell"]: c for c in rows_of(b)}
    return [CellPair(c["cell"], frontier_text(c), frontier_text(other[c["cell"]]), _steps(c, other[c["cell"]]))
            for c in rows_of(a) if c["cell"] in other]


def verdicts_of_findings(cells: pa.Table | list[dict]) -> list[str]:
    """The findings' effects reduced to what they decide: 'shown' or 'NOT SHOWN' per effect line, in order (the
    numbers in them may differ between two maps that agree)."""
    return ["shown" if e.shown else "NOT SHOWN" for g in grids_of(cells) for e in effects_of(g)]


def comparison_text(a: pa.Table, b: pa.Table, names: tuple[str, str] = ("a", "b")) -> str:
    """A line per cell (both frontiers, the steps between them) and the verdict: cells within one √2 step, and
    whether the findings are the same."""
    pairs = pair_cells(a, b)
    w = max([len(p.cell) for p in pairs] + [4])
    lines = [f"{'cell'.ljust(w)}  {names[0]:>12}  {names[1]:>12}  √2 steps"]
    for p in pairs:
        steps = "-" if p.steps is None else f"{p.steps:.1f}"
        lines.append(f"{p.cell.ljust(w)}  {p.a:>12}  {p.b:>12}  {steps:>8}{'' if p.agree else '  ← apart'}")
    agree = sum(p.agree for p in pairs)
    fa, fb = verdicts_of_findings(a), verdicts_of_findings(b)
    lines.append(f"{agree} of {len(pairs)} cells within one √2 step; findings "
                 + ("the same" if fa == fb else f"differ: {names[0]} {fa} vs {names[1]} {fb}"))
    return "\n".join(lines)
