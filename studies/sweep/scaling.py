"""How the frontier scales with the batch: per column of the map (a λ, or no clipping), the exponent α of
peak lr ∝ B^α, fitted to the cells' frontiers in peak-lr terms (peak lr = base lr × B/256, the lr the run used
after warmup), by least squares on log peak lr against log batch. α = 1 is the linear-scaling rule (Goyal et al.
2017); α = 0 a frontier fixed in peak-lr terms: a curvature limit the batch does not move. McCandlish et al.
(2018) predict ε_opt(B) = ε_max / (1 + B_noise/B): α near 1 below the gradient noise scale B_noise, near 0 above
it. What a team needs to extrapolate to a batch it has not run.

Only measured frontiers enter the fit. Left out, and marked wherever the points are written: `≥` a frontier at
the largest lr tried (a lower bound), `<` a `none` cell (its smallest lr tried already fails: the frontier lies
below it, an upper bound), `?` an undecided cell. A frontier AT the smallest lr tried stays in: it trained there and
failed at the next lr, so it is bracketed like any other (only its best lr, not the frontier, may lie lower).
The uncertainty, where the deciding lrs were replicated: α fitted to each seed's own frontiers (a cell that lacks
the seed reads its majority), given as the range over seeds. Pure functions of cells.parquet; the figure is
curves.py's. At the end, the batch-scaling study's accuracy and steps to a target per batch size (Fig. 2a;
Shallue et al. 2018), from the results and epochs tables."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import pyarrow as pa

from studies.sweep.frontier import NONE, SCAN_PHASES, num
from studies.sweep.layout import NO_CLIPPING, Layout, grids_of, rows_of
from studies.sweep.support import CellRow, Effect, Why, as_row, seed_values

REFERENCE_BATCH = 256  # base lrs are per 256 examples
MEASURED, LOWER, BELOW, UNKNOWN = "", "≥", "<", "?"


@dataclass(frozen=True)
class Point:
    batch: int
    peak: float | None  # the frontier's peak lr (for `<`: the smallest lr tried; None: undecided)
    mark: str = MEASURED  # MEASURED, LOWER, BELOW or UNKNOWN

    @property
    def text(self) -> str:
        return UNKNOWN if self.peak is None else f"{self.mark}{self.peak:.4g}"


@dataclass(frozen=True)
class Law:
    """One column's scaling: its points (one per batch size, in the map's order), α over the measured ones, and
    per seed the α of that seed's own frontiers (None: fewer than two measured batch sizes for that seed)."""
    facet: str
    column: str
    points: list[Point]
    alpha: float | None
    seed_alphas: dict[int, float | None] = field(default_factory=dict)

    @property
    def used(self) -> list[Point]:
        return [p for p in self.points if p.mark == MEASURED]

    @property
    def left_out(self) -> list[Point]:
        return [p for p in self.points if p.mark != MEASURED]

    @property
    def alpha_range(self) -> tuple[float, float] | None:
        vals = [a for a in self.seed_alphas.values() if a is not None]
        return (min(vals), max(vals)) if len(self.seed_alphas) > 1 and vals else None


def peak_lr(base_lr: float, batch: int) -> float:
    return base_lr * batch / REFERENCE_BATCH


def fit_alpha(points: list[Point]) -> tuple[float, float] | None:
    """(α, ln c) of peak = c · B^α, least squares in log-log over the measured points; None under two distinct
    batch sizes."""
    pts = [(math.log(p.batch), math.log(p.peak)) for p in points if p.mark == MEASURED and p.peak and p.peak > 0]
    xs = {x for x, _ in pts}
    if len(xs) < 2:
        return None
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return slope, my - slope * mx


def noise_scale(results: pa.Table | list[dict] | None) -> float | None:
    """The gradient noise scale B_noise the study measured (the median of its runs' `gns`, B_simple), or None
    where no run measured it (the laptop preset does not: gns_every_steps=0)."""
    vals = sorted(v for r in (rows_of(results) if results is not None else [])
                  if (v := r.get("gns")) is not None and math.isfinite(v) and v > 0)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def mccandlish_eps_max(points: list[Point], b_noise: float) -> float | None:
    """ε_max of McCandlish et al. (2018)'s ε_opt(B) = ε_max / (1 + B_noise/B), fitted to the measured frontiers
    (least squares in log: the geometric mean of peak × (1 + B_noise/B)); None without a measured frontier."""
    pts = [p for p in points if p.mark == MEASURED and p.peak and p.peak > 0]
    if not pts:
        return None
    return math.exp(sum(math.log(p.peak * (1 + b_noise / p.batch)) for p in pts) / len(pts))


def _mark(value: float | None, c: CellRow) -> str:
    """How a frontier value of cell `c` enters the fit: measured, or which bound it is."""
    if value is None:
        return UNKNOWN
    if value == 0:
        return BELOW
    return LOWER if value == c.highest_lr_tried else MEASURED


def cell_point(c: CellRow | dict, value: float | None = None, own: bool = False) -> Point:
    """A cell's frontier as a point: its majority frontier, or (own) a seed's `value` (0: `none`, below the grid)."""
    c = as_row(c)
    b = int(c.batch_size)
    if not own:
        value = c.max_stable_lr if c.found else 0.0 if c.frontier == NONE else None
    mark = _mark(value, c)
    if mark == BELOW:
        low = c.lowest_lr_tried
        return Point(b, peak_lr(low, b) if low else None, BELOW)
    return Point(b, None if value is None else peak_lr(value, b), mark)


def _seed_alphas(cells: list[CellRow]) -> dict[int, float | None]:
    seeds = sorted({s for c in cells for s in c.seed_list})
    out = {}
    for s in seeds:
        pts = []
        for c in cells:
            own = seed_values(c)
            pts.append(cell_point(c, own[s], own=True) if s in own else cell_point(c))
        f = fit_alpha(pts)
        out[s] = f and f[0]
    return out


def laws(cells: pa.Table | list[dict]) -> list[Law]:
    """Per map (facet) whose rows are batch sizes, per column: the frontier's points and α. Empty when the rows
    are not batch sizes or there is only one."""
    out = []
    for g in grids_of(cells):
        if g.layout.row_axis != "batch_size" or len(g.rows) < 2:
            continue
        for col in g.cols:
            mine = [as_row(g.at[r, col]) for r in g.rows if (r, col) in g.at]
            pts = [cell_point(c) for c in mine]
            f = fit_alpha(pts)
            out.append(Law(g.facet, col, pts, f and f[0], _seed_alphas(mine)))
    return out


def alpha_text(law: Law) -> str:
    """'α = 0.50 (seeds 0.41–0.62)', 'α = 0.50 (one seed)', 'α: too few measured frontiers'."""
    if law.alpha is None:
        return "α: fewer than two measured frontiers"
    return f"α = {num2(law.alpha)}{seeds_text(law)}"


def seeds_text(law: Law) -> str:
    """' (seeds 0.41 to 0.62, 3 seeds)', ' (3 seeds agree)', ' (one seed)'."""
    rng, n = law.alpha_range, len(law.seed_alphas)
    if rng is None:
        return " (one seed)" if n < 2 else ""
    lo, hi = num2(rng[0]), num2(rng[1])
    return f" ({n} seeds agree)" if lo == hi else f" (seeds {lo} to {hi}, {n} seeds)"


def num2(x: float) -> str:
    """Two decimals, never '-0.00'."""
    return f"{round(x, 2) + 0.0:.2f}"


def _left_out_text(law: Law) -> str:
    out = [f"batch {p.batch} {p.text}" for p in law.left_out]
    return f"; left out of the fit: {', '.join(out)}" if out else ""


def scaling_markdown(cells: pa.Table | list[dict]) -> str:
    """frontier.md's scaling table: per column, the frontier's peak lr at each batch size (bounds marked), α and
    its range over seeds."""
    ls = laws(cells)
    if not ls:
        return ""
    batches = sorted({p.batch for law in ls for p in law.points})
    lines = ["**How the frontier scales with the batch** (peak lr = base lr × B/256 ∝ B^α, least squares in "
             "log-log over the measured frontiers; α = 1: linear scaling; ≥ a lower bound (the largest lr tried), "
             "< no lr trains (below the smallest lr tried): marked and left out of the fit; α's range: fitted to "
             "each seed's own frontiers)", "",
             "| column | " + " | ".join(f"B={b}" for b in batches) + " | α | α over seeds |",
             "|---|" + "---:|" * (len(batches) + 2)]
    for law in ls:
        at = {p.batch: p.text for p in law.points}
        rng = law.alpha_range
        name = f"{law.facet} {law.column}".strip()
        lines.append(f"| {name} | " + " | ".join(at.get(b, "-") for b in batches)
                     + f" | {'-' if law.alpha is None else num2(law.alpha)} | "
                     + (f"{num2(rng[0])} to {num2(rng[1])}" if rng else "-") + " |")
    return "\n".join(lines + [""])


def _resolution(law: Law) -> float:
    """How far α moves when one end's frontier moves by one factor-2 step of the lr grid."""
    bs = [p.batch for p in law.used]
    return math.log(2) / math.log(max(bs) / min(bs))


class Trend(enum.Enum):
    """Where the frontier's peak lr goes as the batch grows, called beyond one lr step of the grid (or, FLAT,
    within it) in the majority's α and every seed's."""

    GROWS = enum.auto()
    FALLS = enum.auto()
    FLAT = enum.auto()


@dataclass(frozen=True)
class ScalingCall(Effect):
    """One column's scaling as decided: its trend where shown; NOT SHOWN with TOO_FEW_FRONTIERS (no fit),
    WITHIN_SPREAD (the seeds' α lie on both sides, a lr step apart or more) or WITHIN_STEP (about one lr step)."""

    law: Law
    trend: Trend | None = None
    resolution: float | None = None  # how far α moves when one end's frontier moves one factor-2 lr step


def scaling_call(law: Law) -> ScalingCall:
    if law.alpha is None:
        return ScalingCall(Why.TOO_FEW_FRONTIERS, law)
    res, rng = _resolution(law), law.alpha_range
    lo, hi = min([law.alpha, *(rng or ())]), max([law.alpha, *(rng or ())])  # the majority's α and the seeds'
    res_in, res_out = res * (1 - 1e-6), res * (1 + 1e-6)  # α exactly one lr step: neither side
    if lo > res_out:
        return ScalingCall(None, law, Trend.GROWS, res)
    if hi < -res_out:
        return ScalingCall(None, law, Trend.FALLS, res)
    if max(abs(lo), abs(hi)) < res_in:
        return ScalingCall(None, law, Trend.FLAT, res)
    # about one lr step either way, or seeds on both sides: too little, or too split, to call
    return ScalingCall(Why.WITHIN_SPREAD if hi - lo >= res else Why.WITHIN_STEP, law, None, res)


VERBS = {Trend.GROWS: "grows with the batch", Trend.FALLS: "falls as the batch grows",
         Trend.FLAT: "does not grow with the batch",
         Why.WITHIN_SPREAD: "moves with the batch differently in different seeds",
         Why.WITHIN_STEP: "moves with the batch by about one lr step of the grid, too little to call"}


def scaling_text(call: ScalingCall, no_clip: str = NO_CLIPPING) -> str:
    law = call.law
    head = f"[{law.facet}] " if law.facet else ""
    who = ("without clipping" if law.column == no_clip else f"with AGC {law.column}"
           if law.column.startswith("λ=") else f"for {law.column}")
    if call.why is Why.TOO_FEW_FRONTIERS:
        return (f"{head}NOT SHOWN: {who} the frontier's scaling with the batch cannot be fitted (fewer than "
                f"two measured frontiers: {', '.join(f'batch {p.batch} {p.text}' for p in law.points)}).")
    head += "" if call.shown else "NOT SHOWN: "
    used = ", ".join(f"{p.batch}" for p in law.used)
    return (f"{head}{who} the frontier's peak lr {VERBS[call.trend or call.why]} ({alpha_text(law)}; a factor-2 lr "
            f"step at one end moves α by about {call.resolution:.2f}; fitted to batch {used}{_left_out_text(law)}).")


def scaling_lines(cells: pa.Table | list[dict], no_clip: str = NO_CLIPPING) -> list[str]:
    """The finding: 'without clipping the frontier's peak lr does not grow with the batch (α = …); with AGC
    λ=0.01 α = …', each with its range over seeds and what was left out of the fit."""
    return [scaling_text(scaling_call(law), no_clip) for law in laws(cells)]


# ---- batch scaling (Fig. 2a; Shallue et al. 2018): accuracy and steps to a target over batch sizes ----

def steps_to_target(epochs: pa.Table | list[dict], target: float, metric: str = "val_acc") -> dict[str, int]:
    """First step at which each trial's `metric` reached `target` (Shallue et al. 2018); trials that never
    did are absent."""
    out: dict[str, int] = {}
    for r in sorted(rows_of(epochs), key=lambda r: (r["trial_key"], r["step"])):
        v = r.get(metric)
        if r["trial_key"] not in out and v is not None and not math.isnan(v) and v >= target:
            out[r["trial_key"]] = int(r["step"])
    return out


def batch_scaling(results: pa.Table | list[dict], epochs: pa.Table | list[dict], target: float,
                  metric: str = "best_val_acc") -> dict[str, list[dict]]:
    """Per column of the map (a model variant) and batch size, over the full runs: best accuracy, fewest steps
    to `target`, the gradient noise scale measured (NF models only: BN's batch statistics forbid the split)."""
    reach = steps_to_target(epochs, target)
    out: dict[str, dict[int, dict]] = {}
    rows = rows_of(results)
    lay = Layout.of(rows)
    for r in sorted(rows, key=lay.order):
        if r.get("phase") in SCAN_PHASES:
            continue
        v, b = " ".join(filter(None, (lay.facet(r), lay.col(r)))), int(r["batch_size"])
        d = out.setdefault(v, {}).setdefault(b, {"batch_size": b, "acc": math.nan, "steps": None,
                                                 "trials": 0, "diverged": 0, "gns": []})
        d["trials"] += 1
        d["diverged"] += r["status"] == "diverged"
        acc = num(r.get(metric))
        if r["status"] == "completed" and not math.isnan(acc) and (math.isnan(d["acc"]) or acc > d["acc"]):
            d["acc"] = acc
        s = reach.get(r["trial_key"])
        if s is not None and (d["steps"] is None or s < d["steps"]):
            d["steps"] = s
        if not math.isnan(num(r.get("gns"))):
            d["gns"].append(num(r["gns"]))
    for by_b in out.values():
        for d in by_b.values():
            d["gns"] = sum(d["gns"]) / len(d["gns"]) if d["gns"] else math.nan
    return {v: [by_b[b] for b in sorted(by_b)] for v, by_b in out.items()}
