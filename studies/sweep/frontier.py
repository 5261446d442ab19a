"""The stable region as pure functions over the results table (rows as dicts or a pyarrow Table): no Ray, no plots.

Per cell (one scientific setting, e.g. batch size × λ) and per tried learning rate, every run has a verdict
(studies/training/verdict.py: trained, stalled, collapsed, diverged). An lr *trains* when a strict majority of its
decided seeds trained (1 of 2 is not a majority; failed and stopped runs decide nothing); else its verdict is its
seeds' commonest failure (a tie goes to the more severe: diverged, then collapsed, then stalled).

  best lr     the lr that trains with the lowest final loss (a run's loss counted as min(final, start), a
              diverged run at its start: Wortsman et al. 2023's reading of an LR-vs-loss curve)
  frontier    the largest lr such that every lr from the best one up to it trains. Lrs below the best that
              learn too slowly for the scan are not instability and do not cut it. The first lr above it that
              fails names the edge's kind: an `instability` (it collapsed or diverged) or a `budget` limit (it
              stalled: too slow for the scan, or held at chance by clipping).
  edges       `≥` a frontier at the largest lr tried (a lower bound); `≤` a best lr at the smallest (the optimum
              may lie lower). A frontier at the smallest is still bracketed (the next lr fails): not a bound.
  none        no lr of the cell trains and the smallest lr tried already fails by an instability (a strict
              majority of its seeds collapsed or diverged): the frontier lies below the grid, and that smallest lr
              is the cell's first failing lr (replicated like any deciding lr). Every lr diverging is one case.
  undecided   no lr of the cell trains, and the smallest lr tried did not fail by an instability in a majority of
              its seeds (it stalled, or its seeds split): the scan was too short to tell (never a number).
  LR sensitivity  mean over the lr grid of min(final loss, start loss) − the best of them (Wortsman et al.
              2023): what is lost by not tuning the lr; one number, no threshold, 0 = a flat curve.

Replication where it decides: the lrs that decide a cell (its best lr, its frontier and the first lr that fails
above it) are rerun at more seeds until each has `replicates` runs; when the majority moves the frontier, the new
deciding lrs are replicated too (a fixed point, a pure function of the rows). Every other lr keeps one run. A
seed's own frontier reads that seed's run wherever it has one and the lone run elsewhere: the spread of the
frontier over seeds is the range of those, and an effect "holds in k of n seeds" when it holds in k of them."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from studies.sweep.layout import Layout, rows_of
from studies.training.verdict import DIVERGED, FAILURES, INSTABILITIES, TRAINED, VERDICTS, judge

SCAN_PHASES = ("scan", "refine", "replicate")  # the short runs that decide stability; `full` measures accuracy
FOUND, UNDECIDED, NONE = "found", "undecided", "none"


def num(v) -> float:
    return float(v) if v is not None and not (isinstance(v, float) and math.isnan(v)) else float("nan")


def top_k_mean(values: list[float], k: int | None) -> float:
    vals = sorted((v for v in values if not math.isnan(v)), reverse=True)
    if not vals:
        return float("nan")
    return sum(vals[: k or len(vals)]) / len(vals[: k or len(vals)])


def run_verdict(r: dict[str, Any]) -> str | None:
    """A row's verdict: its own column, or (rows written before it existed) judged from its losses."""
    return r.get("verdict") or judge(r["status"], r.get("initial_train_loss"), r.get("final_train_loss"),
                                     r.get("final_train_loss_se"), r.get("lowest_train_loss"),
                                     r.get("highest_train_loss"))


def by_cell(rows: list[dict], phases: tuple[str, ...] | None = None) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        if phases is None or r.get("phase") in phases:
            out.setdefault(r["cell"], []).append(r)
    return out


def stability_rows(rows: list[dict]) -> list[dict]:
    """The rows a cell's stability is judged from: its scan runs, or its full runs in a study without a scan."""
    return [r for r in rows if r.get("phase") in SCAN_PHASES] or rows


def start_loss(rows: list[dict]) -> float:
    """The cell's loss at initialisation: the mean of its runs' first-step losses (the same init and first batch
    for every lr of a seed, so in practice one number per seed)."""
    return _mean([v for v in (num(r.get("initial_train_loss")) for r in rows) if math.isfinite(v)])


@dataclass(frozen=True)
class LrResult:
    lr: float
    counts: dict[str, int]  # verdict -> decided seeds
    loss: float  # mean over decided seeds of min(final, start); a diverged run at start
    final: float  # mean final loss of the seeds that did not diverge (nan if all did)

    @property
    def decided(self) -> int:
        return sum(self.counts.values())

    @property
    def trains(self) -> bool:
        return 2 * self.counts[TRAINED] > self.decided

    @property
    def unstable(self) -> bool:
        """A strict majority of its decided seeds collapsed or diverged: the lr is too large (not merely slow)."""
        return 2 * sum(self.counts[v] for v in INSTABILITIES) > self.decided

    @property
    def verdict(self) -> str:
        """The lr's verdict: trained (a majority), else the commonest failure (a tie: the more severe)."""
        if self.trains:
            return TRAINED
        return max(FAILURES, key=lambda v: (self.counts[v], FAILURES.index(v)))


def lr_results(rows: list[dict]) -> list[LrResult]:
    """Per tried lr (ascending), what its decided seeds did."""
    start = start_loss(rows)
    by_lr: dict[float, list[dict]] = {}
    for r in rows:
        if run_verdict(r) is not None:
            by_lr.setdefault(float(r["base_lr"]), []).append(r)
    out = []
    for lr in sorted(by_lr):
        rs = by_lr[lr]
        counts = {v: sum(run_verdict(r) == v for r in rs) for v in VERDICTS}
        losses = [start if run_verdict(r) == DIVERGED else min(num(r.get("final_train_loss")), start) for r in rs]
        finals = [num(r.get("final_train_loss")) for r in rs if run_verdict(r) != DIVERGED]
        out.append(LrResult(lr, counts, _mean(losses), _mean(finals)))
    return out


def _mean(vals: list[float]) -> float:
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


@dataclass(frozen=True)
class Frontier:
    state: str  # found | undecided | none
    lrs: list[LrResult] = field(default_factory=list)
    best: LrResult | None = None  # the best lr that trains
    max_stable: LrResult | None = None  # the frontier (max_stable_lr): the largest lr up to which all from `best` train
    first_unstable: LrResult | None = None  # the next lr above it (first_unstable_lr; None: the largest lr tried;
    #                                         in a `none` cell the smallest lr tried, which already fails)
    start: float = float("nan")

    @property
    def at_grid_top(self) -> bool:
        return self.max_stable is not None and self.first_unstable is None

    def at_floor(self, x: LrResult | None) -> bool:
        """`x` (the best lr, the frontier) is the smallest lr tried: the grid says nothing below it."""
        return x is not None and bool(self.lrs) and x.lr == self.lrs[0].lr


def frontier_of(rows: list[dict]) -> Frontier:
    lrs = lr_results(rows)
    start = start_loss(rows)
    training = [x for x in lrs if x.trains]
    if not training:
        if lrs and lrs[0].unstable:  # even the smallest lr is too large: the frontier lies below the grid
            return Frontier(NONE, lrs, first_unstable=lrs[0], start=start)
        return Frontier(UNDECIDED, lrs, start=start)
    best = min(training, key=lambda x: (x.loss, x.lr))
    i = lrs.index(best)
    while i + 1 < len(lrs) and lrs[i + 1].trains:
        i += 1
    return Frontier(FOUND, lrs, best, lrs[i], lrs[i + 1] if i + 1 < len(lrs) else None, start)


def lr_sensitivity(rows: list[dict]) -> float | None:
    """Mean over the tried lrs of min(final loss, start loss) − the best of them; None with nothing decided."""
    losses = [x.loss for x in lr_results(rows) if not math.isnan(x.loss)]
    return sum(losses) / len(losses) - min(losses) if losses else None


def refine_lrs(scan: pa.Table | list[dict]) -> dict[str, float]:
    """Per cell whose frontier lies inside the grid: the geometric midpoint between the frontier and the first lr
    that fails (a factor-2 grid refined to √2 there); per `none` cell, whose smallest lr already fails by an
    instability, the lr √2 below it, where its frontier may lie. A pure function of the scan's rows: the same at
    any concurrency."""
    out = {}
    for cell, rows in by_cell(rows_of(scan), ("scan",)).items():
        f = frontier_of(rows)
        if f.state == FOUND and f.first_unstable is not None:
            out[cell] = float(f"{math.sqrt(f.max_stable.lr * f.first_unstable.lr):.4g}")
        elif f.state == NONE:
            out[cell] = float(f"{f.first_unstable.lr / math.sqrt(2):.4g}")
    return out


def deciding_lrs(f: Frontier) -> list[float]:
    """The lrs a cell's frontier rests on: its best lr, the frontier, the first lr that fails above it (in a
    `none` cell: the smallest lr tried, whose instability puts the frontier below the grid)."""
    return sorted({x.lr for x in (f.best, f.max_stable, f.first_unstable) if x is not None})


def replication_needed(rows: pa.Table | list[dict], replicates: int) -> dict[str, dict[float, set[int]]]:
    """Per cell: each deciding lr of its majority frontier (over every stability run so far) that has fewer than
    `replicates` runs, with the seeds it has. Empty once every deciding lr rests on `replicates` runs: the fixed
    point a study replicates towards. A pure function of the rows, the same at any concurrency."""
    out: dict[str, dict[float, set[int]]] = {}
    if replicates <= 1:
        return out
    for cell, rs in by_cell(rows_of(rows), SCAN_PHASES).items():
        f = frontier_of(rs)
        seeds: dict[float, set[int]] = {}
        for r in rs:
            seeds.setdefault(float(r["base_lr"]), set()).add(int(r["seed"]))
        short = {lr: seeds.get(lr, set()) for lr in deciding_lrs(f) if len(seeds.get(lr, ())) < replicates}
        if short:
            out[cell] = short
    return out


def seeds_of(rows: list[dict]) -> list[int]:
    return sorted({int(r["seed"]) for r in rows if r.get("seed") is not None})


def seed_view(rows: list[dict], seed: int) -> list[dict]:
    """What one seed says of a cell: its own run at every lr that has one, the lone (unreplicated) run elsewhere."""
    by_lr: dict[float, list[dict]] = {}
    for r in rows:
        by_lr.setdefault(float(r["base_lr"]), []).append(r)
    out = []
    for rs in by_lr.values():
        own = [r for r in rs if r.get("seed") is not None and int(r["seed"]) == seed]
        out += own or rs
    return out


def frontier_value(f: Frontier) -> float | None:
    """A frontier as a number: its lr, 0 when it lies below the grid (`none`), None when undecided."""
    return f.max_stable.lr if f.state == FOUND else 0.0 if f.state == NONE else None


def seed_frontiers(rows: list[dict]) -> dict[int, float | None]:
    """Per seed of the cell's stability runs: the frontier that seed's own view gives (frontier_value)."""
    return {s: frontier_value(frontier_of(seed_view(rows, s))) for s in seeds_of(rows)}


def agreement(x: LrResult | None, trains: bool) -> str:
    """'3/3': of an lr's decided seeds, how many trained (trains) or failed (not trains)."""
    if x is None:
        return ""
    n = x.counts[TRAINED] if trains else x.decided - x.counts[TRAINED]
    return f"{n}/{x.decided}"


def full_phase_lrs(scan: pa.Table | list[dict], top: int) -> dict[str, list[float]]:
    """Per cell: the `top` lrs at or below the frontier that train with the lowest scan loss (ties: the smaller
    lr), and the frontier itself, so the study checks that the frontier still trains over the full budget.
    Cells without a frontier get no full run."""
    out = {}
    for cell, rows in by_cell(rows_of(scan), SCAN_PHASES).items():
        f = frontier_of(rows)
        if f.state != FOUND:
            out[cell] = []
            continue
        inside = [x for x in f.lrs if x.trains and x.lr <= f.max_stable.lr]
        chosen = {x.lr for x in sorted(inside, key=lambda x: (x.loss, x.lr))[:top]} | {f.max_stable.lr}
        out[cell] = sorted(chosen)
    return out


def best_accuracy(rows: list[dict], best_k: int | None) -> tuple[float, float | None]:
    """(score, base lr) of the best lr among completed full runs; a setting's score is the mean of its best k
    seeds. Ties go to the smaller lr."""
    best, best_lr = float("nan"), None
    for lr, accs in sorted(_accuracies(rows).items()):
        score = top_k_mean(list(accs.values()), best_k)
        if not math.isnan(score) and (math.isnan(best) or score > best):
            best, best_lr = score, lr
    return best, best_lr


def _accuracies(rows: list[dict]) -> dict[float, dict[int, float]]:
    """lr -> seed -> best val top-1, over completed full runs."""
    by_lr: dict[float, dict[int, float]] = {}
    for r in rows:
        if r["status"] == "completed" and r.get("best_val_acc") is not None and not math.isnan(num(r["best_val_acc"])):
            by_lr.setdefault(float(r["base_lr"]), {})[int(r.get("seed") or 0)] = num(r["best_val_acc"])
    return by_lr


def _sd(vals: list[float]) -> float | None:
    """Sample standard deviation; None under 2 values."""
    if len(vals) < 2:
        return None
    m = sum(vals) / len(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def frontier_holds(full: list[dict], lr: float | None) -> bool | None:
    """Did the full runs at the frontier lr train (a majority of their decided seeds)? None: none ran."""
    trained, decided = holds_count(full, lr)
    return 2 * trained > decided if decided else None


def holds_count(full: list[dict], lr: float | None) -> tuple[int, int]:
    """(trained, decided) of the full runs at `lr`."""
    vs = [run_verdict(r) for r in full if lr is not None and float(r["base_lr"]) == lr and run_verdict(r) is not None]
    return vs.count(TRAINED), len(vs)


def edge_kind(verdict: str) -> str:
    """What the first failure above a frontier says of the edge: `instability` (collapsed or diverged: the lr is
    too large) or `budget` (stalled: too slow for the scan's budget, or held at chance by clipping)."""
    return "instability" if verdict in INSTABILITIES else "budget"


# ---- cells.parquet: one row per cell ----

CELL_COLUMNS = {
    "cell": pa.string(), "axes": pa.string(), "batch_size": pa.int64(), "model": pa.string(), "clipping": pa.string(),
    "lambda": pa.float64(), "augment_strength": pa.float64(), "lrs_tried": pa.int64(),
    "frontier": pa.string(), "max_stable_lr": pa.float64(), "max_stable_lr_at_edge": pa.bool_(),
    "first_unstable_lr": pa.float64(), "first_unstable_verdict": pa.string(), "first_unstable_kind": pa.string(),
    "max_stable_lr_at_low_edge": pa.bool_(), "best_scan_lr": pa.float64(), "best_scan_lr_at_low_edge": pa.bool_(),
    "lowest_lr_tried": pa.float64(), "highest_lr_tried": pa.float64(),
    "start_loss": pa.float64(), "best_scan_loss": pa.float64(), "frontier_loss": pa.float64(),
    "first_unstable_loss": pa.float64(), "lr_sensitivity": pa.float64(), "stable_fraction": pa.float64(),
    "scan_trials": pa.int64(), **{f"scan_{v}": pa.int64() for v in VERDICTS},
    "full_trials": pa.int64(), **{f"full_{v}": pa.int64() for v in VERDICTS},
    "failed_trials": pa.int64(), "frontier_holds": pa.bool_(), "best_val_acc": pa.float64(),
    "best_base_lr": pa.float64(),
    # replication: the agreement each number rests on, and its spread over seeds
    "seeds": pa.int64(), "max_stable_lr_trained": pa.int64(), "max_stable_lr_decided": pa.int64(),
    "first_unstable_failed": pa.int64(), "first_unstable_decided": pa.int64(),
    "max_stable_lr_min": pa.float64(), "max_stable_lr_max": pa.float64(),
    "seed_list": pa.list_(pa.int64()), "max_stable_lr_by_seed": pa.list_(pa.float64()),
    "frontier_holds_trained": pa.int64(), "frontier_holds_decided": pa.int64(),
    "best_val_acc_sd": pa.float64(), "best_val_acc_min": pa.float64(), "best_val_acc_max": pa.float64(),
    "best_val_acc_seeds": pa.int64(), "acc_seed_list": pa.list_(pa.int64()),
    "best_val_acc_by_seed": pa.list_(pa.float64()),
}


def _finite_or_none(v: float) -> float | None:
    return None if v is None or math.isnan(v) else v


def cell_row(cell: str, rows: list[dict], best_k: int | None) -> dict[str, Any]:
    scan = [r for r in rows if r.get("phase") in SCAN_PHASES]
    full = [r for r in rows if r.get("phase") not in SCAN_PHASES]
    basis = scan or full
    f = frontier_of(basis)
    design = {float(r["base_lr"]) for r in basis if r.get("phase") in ("scan", "full")}
    grid = [r for r in basis if float(r["base_lr"]) in design]  # sensitivity over the design's own lr grid
    acc, acc_lr = best_accuracy(full, best_k)
    first = rows[0]
    count = {(ph, v): sum(run_verdict(r) == v for r in rs) for ph, rs in (("scan", scan), ("full", full))
             for v in VERDICTS}
    stable, fail = f.max_stable, f.first_unstable
    by_seed = seed_frontiers(basis) if f.state != UNDECIDED else {}
    spread = [v for v in by_seed.values() if v is not None]
    held = holds_count(full, stable.lr) if scan and stable else (0, 0)
    accs = _accuracies(full).get(acc_lr, {}) if acc_lr is not None else {}
    return {
        "cell": cell, "axes": first.get("axes"), "batch_size": first["batch_size"], "model": first["model"],
        "clipping": first["clipping"], "lambda": first["lambda"], "augment_strength": first.get("augment_strength"),
        "lrs_tried": len(f.lrs),
        "frontier": f.state, "max_stable_lr": stable and stable.lr, "max_stable_lr_at_edge": f.at_grid_top,
        "first_unstable_lr": fail and fail.lr, "first_unstable_verdict": fail and fail.verdict,
        "first_unstable_kind": fail and edge_kind(fail.verdict), "max_stable_lr_at_low_edge": f.at_floor(stable),
        "best_scan_lr": f.best and f.best.lr, "best_scan_lr_at_low_edge": f.at_floor(f.best),
        "lowest_lr_tried": f.lrs[0].lr if f.lrs else None, "highest_lr_tried": f.lrs[-1].lr if f.lrs else None,
        "start_loss": _finite_or_none(f.start),
        "best_scan_loss": f.best and _finite_or_none(f.best.loss),
        "frontier_loss": stable and _finite_or_none(stable.loss),
        "first_unstable_loss": fail and _finite_or_none(fail.loss),
        "lr_sensitivity": lr_sensitivity(grid),
        "stable_fraction": sum(x.trains for x in f.lrs) / len(f.lrs) if f.lrs else None,
        "scan_trials": len(scan), **{f"{ph}_{v}": n for (ph, v), n in count.items()}, "full_trials": len(full),
        "failed_trials": sum(r["status"] == "failed" for r in rows),
        "frontier_holds": frontier_holds(full, stable.lr) if scan and stable else None,
        "best_val_acc": _finite_or_none(acc), "best_base_lr": acc_lr,
        "seeds": len(seeds_of(basis)), "max_stable_lr_trained": stable and stable.counts[TRAINED],
        "max_stable_lr_decided": stable and stable.decided,
        "first_unstable_failed": fail and fail.decided - fail.counts[TRAINED],
        "first_unstable_decided": fail and fail.decided,
        "max_stable_lr_min": min(spread) if spread else None, "max_stable_lr_max": max(spread) if spread else None,
        "seed_list": list(by_seed), "max_stable_lr_by_seed": list(by_seed.values()),
        "frontier_holds_trained": held[0] if held[1] else None, "frontier_holds_decided": held[1] or None,
        "best_val_acc_sd": _sd(list(accs.values())), "best_val_acc_min": min(accs.values(), default=None),
        "best_val_acc_max": max(accs.values(), default=None), "best_val_acc_seeds": len(accs) or None,
        "acc_seed_list": sorted(accs), "best_val_acc_by_seed": [accs[k] for k in sorted(accs)],
    }


def frontier_table(results: pa.Table | list[dict], best_k: int | None = None) -> pa.Table:
    """cells.parquet: stability from the scan (and its refinement), or from the full runs in a study without a
    scan; accuracy from the full runs. Rows in map order: facet, row, column."""
    out = [cell_row(cell, rows, best_k) for cell, rows in by_cell(rows_of(results)).items()]
    lay = Layout.of(out)
    out.sort(key=lay.order)
    return pa.Table.from_pylist(out, schema=pa.schema(CELL_COLUMNS))
