"""What a finding rests on, shared by the findings' modules (effects.py, lambdas.py, scaling.py, findings.py): a
cells.parquet row as a typed record (CellRow), a cell's frontier as text (with its edge marks) and as a number,
each seed's own frontier, and in how many seeds an effect holds (Support). Pure functions of the cells' rows."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, fields
from typing import Any

from studies.sweep.frontier import FOUND, NONE


@dataclass(frozen=True)
class CellRow:
    """One row of cells.parquet (frontier.CELL_COLUMNS, the table's columns unchanged), read once: attributes in
    place of the row's string keys (`lam` is the `lambda` column); a key a row lacks reads None."""

    cell: str = ""
    axes: str | None = None  # the cell's axes, typed (JSON: cells.axes_of reads it)
    batch_size: int | None = None
    model: str | None = None
    clipping: str | None = None
    lam: float | None = None
    augment_strength: float | None = None
    lrs_tried: int | None = None
    frontier: str | None = None  # FOUND, UNDECIDED or NONE
    max_stable_lr: float | None = None
    max_stable_lr_at_edge: bool | None = None
    first_unstable_lr: float | None = None
    first_unstable_verdict: str | None = None
    first_unstable_kind: str | None = None  # 'instability' or 'budget'
    max_stable_lr_at_low_edge: bool | None = None
    best_scan_lr: float | None = None
    best_scan_lr_at_low_edge: bool | None = None
    lowest_lr_tried: float | None = None
    highest_lr_tried: float | None = None
    start_loss: float | None = None
    best_scan_loss: float | None = None
    frontier_loss: float | None = None
    first_unstable_loss: float | None = None
    lr_sensitivity: float | None = None
    stable_fraction: float | None = None
    scan_trials: int | None = None
    scan_trained: int | None = None
    scan_stalled: int | None = None
    scan_collapsed: int | None = None
    scan_diverged: int | None = None
    full_trials: int | None = None
    full_trained: int | None = None
    full_stalled: int | None = None
    full_collapsed: int | None = None
    full_diverged: int | None = None
    failed_trials: int | None = None
    frontier_holds: bool | None = None
    best_val_acc: float | None = None
    best_base_lr: float | None = None
    seeds: int | None = None
    max_stable_lr_trained: int | None = None
    max_stable_lr_decided: int | None = None
    first_unstable_failed: int | None = None
    first_unstable_decided: int | None = None
    max_stable_lr_min: float | None = None
    max_stable_lr_max: float | None = None
    seed_list: tuple[int, ...] = ()
    max_stable_lr_by_seed: tuple[float | None, ...] = ()
    frontier_holds_trained: int | None = None
    frontier_holds_decided: int | None = None
    best_val_acc_sd: float | None = None
    best_val_acc_min: float | None = None
    best_val_acc_max: float | None = None
    best_val_acc_seeds: int | None = None
    acc_seed_list: tuple[int, ...] = ()
    best_val_acc_by_seed: tuple[float, ...] = ()

    @staticmethod
    def of(row: dict[str, Any]) -> CellRow:
        """A cells table's row (a dict, as pyarrow's to_pylist gives it) as a CellRow."""
        out = {}
        for f in fields(CellRow):
            v = row.get("lambda" if f.name == "lam" else f.name)
            out[f.name] = tuple(v or ()) if f.name in _LISTS else v
        return CellRow(**out)

    @property
    def found(self) -> bool:
        return self.frontier == FOUND

    @property
    def scan_counts(self) -> tuple[int, ...]:
        """The scan runs trained / stalled / collapsed / diverged (the tables' order; a missing count is 0)."""
        return tuple(c or 0 for c in (self.scan_trained, self.scan_stalled, self.scan_collapsed, self.scan_diverged))


_LISTS = {"seed_list", "max_stable_lr_by_seed", "acc_seed_list", "best_val_acc_by_seed"}


def as_row(c: CellRow | dict | None) -> CellRow | None:
    """A cell as a CellRow, whether given as one or as a cells table's dict (the words' public functions take
    both: report.py, figures.py and compare.py pass dicts)."""
    return c if c is None or isinstance(c, CellRow) else CellRow.of(c)


@dataclass(frozen=True)
class Support:
    """In how many seeds an effect holds: `held` of `seeds`, and the seeds that broke it."""

    held: int
    seeds: int
    broke: tuple[int, ...] = ()


class Why(enum.Enum):
    """Why a finding is NOT SHOWN (its words are the findings' modules' to choose)."""

    NO_EFFECT = enum.auto()  # the majority frontiers (or mean accuracies) do not show it
    WITHIN_SPREAD = enum.auto()  # the majority shows it, but the seeds' ranges overlap (or the seeds split)
    NOT_COMPARABLE = enum.auto()  # a frontier it compares is undecided or missing
    NO_AGC_FRONTIER = enum.auto()  # no AGC setting at the row has a frontier
    LOWER_BOUND = enum.auto()  # it rests on a frontier at the largest lr tried: a lower bound
    TOO_FEW_FRONTIERS = enum.auto()  # fewer than two measured frontiers to fit
    WITHIN_STEP = enum.auto()  # it moves by about one lr step of the grid: too little to call


class Bound(enum.Enum):
    """What a ratio of two frontiers is: exact, a lower bound (its numerator is one: trains up to the largest lr
    tried), an upper bound (its denominator is), or unknown (both)."""

    EXACT = enum.auto()
    LOWER = enum.auto()
    UPPER = enum.auto()
    UNKNOWN = enum.auto()

    @staticmethod
    def lower_if(at_edge: bool | None) -> Bound:
        """A ratio whose numerator alone may be a lower bound (its frontier at the largest lr tried)."""
        return Bound.LOWER if at_edge else Bound.EXACT

    @staticmethod
    def of(top: CellRow, bottom: CellRow) -> Bound:
        lo, up = bool(top.max_stable_lr_at_edge), bool(bottom.max_stable_lr_at_edge)
        return Bound.UNKNOWN if lo and up else Bound.LOWER if lo else Bound.UPPER if up else Bound.EXACT


BOUND_MARK = {Bound.EXACT: "", Bound.LOWER: "≥", Bound.UPPER: "≤", Bound.UNKNOWN: "?"}  # a ratio's mark in words


@dataclass(frozen=True)
class Effect:
    """A finding as decided: shown where `why` is None, else NOT SHOWN for that reason."""

    why: Why | None

    @property
    def shown(self) -> bool:
        return self.why is None


@dataclass(frozen=True)
class Ratio:
    """One frontier ÷ another: inf where only the top one trains at some lr, None where it cannot be read."""

    value: float | None
    bound: Bound = Bound.EXACT

    @property
    def infinite(self) -> bool:
        return self.value is not None and math.isinf(self.value)


def frontier_text(c: CellRow | dict | None) -> str:
    """A cell's frontier in the map: '0.4', '≥12.8' (trains up to the largest lr tried: a lower bound),
    'undecided', 'none'. A frontier at the smallest lr tried is a number like any other: it trains there and the
    lr above it fails, so it is bracketed; what the grid cannot say there is whether a smaller lr would do better,
    which is the best lr's mark (best_lr_text)."""
    c = as_row(c)
    if c is None:
        return "-"
    if not c.found:
        return c.frontier
    return edge_mark(c) + f"{c.max_stable_lr:g}"


def edge_mark(c: CellRow) -> str:
    """'≥' for a frontier at the largest lr tried (a lower bound), '' inside the grid."""
    return "≥" if c.max_stable_lr_at_edge else ""


def best_lr_text(lr: float | None, c: CellRow | dict) -> str:
    """A best lr as words and tables write it: '0.1', '≤0.025' where it is the smallest lr tried (nothing below
    it was tried: the optimum may lie lower, an upper bound on it), '-' where there is none."""
    if lr is None:
        return "-"
    return ("≤" if lr == as_row(c).lowest_lr_tried else "") + f"{lr:g}"


def frontier_lr(c: CellRow | dict | None) -> float | None:
    """A cell's frontier as a number for comparisons: 0 when it lies below the grid (`none`), None when
    undecided or missing."""
    c = as_row(c)
    if c is None or c.frontier not in (FOUND, NONE):
        return None
    return c.max_stable_lr if c.found else 0.0


def seed_values(c: CellRow) -> dict[int, float | None]:
    """seed -> that seed's own frontier (0: below the grid, `none`; None: undecided)."""
    return dict(zip(c.seed_list, c.max_stable_lr_by_seed))


def support(cells: list[CellRow], holds) -> Support:
    """In how many seeds `holds(*frontiers)` is true: each seed's own frontier per cell; a cell that lacks the
    seed (nothing of it was replicated) reads its majority frontier."""
    seeds = sorted({s for c in cells for s in c.seed_list})
    broke = []
    for s in seeds:
        vals = [seed_values(c).get(s, frontier_lr(c)) for c in cells]
        if any(v is None for v in vals) or not holds(*vals):
            broke.append(s)
    return Support(len(seeds) - len(broke), len(seeds), tuple(broke))


def support_text(s: Support) -> str:
    if s.seeds < 2:
        return "; one seed, no spread to weigh it against"
    return f"; holds in {s.held} of {s.seeds} seeds" + (f" (seed {', '.join(map(str, s.broke))} broke it)"
                                                         if s.broke else "")


def lr_range(c: CellRow) -> str:
    lo, hi = c.max_stable_lr_min, c.max_stable_lr_max
    return "?" if lo is None else f"{lo:g}" if lo == hi else f"{lo:g}–{hi:g}"


def apart(low: CellRow, high: CellRow) -> bool:
    """The seeds' frontiers of `high` all lie above those of `low`: a difference outside the spread."""
    a, b = low.max_stable_lr_max, high.max_stable_lr_min
    return a is not None and b is not None and b > a
