"""The stable region in words: the frontier table, the verdict counts, LR sensitivity, the best accuracy and the
findings, each with its numbers, read from cells.parquet (pure functions). What the findings show is decided in
effects.py, lambdas.py and scaling.py as typed records over typed rows (CellRow); this module only words them. A
finding the runs do not show is printed as NOT SHOWN, never softened."""
from __future__ import annotations

import math

import pyarrow as pa

from studies.sweep.effects import (
    ACC_MARGIN,
    NO_CLIP_COL,
    AccuracyFall,
    AgcAccuracy,
    AgcFrontier,
    FrontierFall,
    FullBudget,
    edge_kinds_of,
    effects_of,
    full_budget,
    typed,
)
from studies.sweep.frontier import NONE, UNDECIDED
from studies.sweep.lambdas import LambdaGain, lambda_text
from studies.sweep.layout import Grid, grids_of, value_text
from studies.sweep.scaling import scaling_lines, scaling_markdown
from studies.sweep.support import (
    BOUND_MARK,
    CellRow,
    Effect,
    Why,
    as_row,
    best_lr_text,
    frontier_text,
    lr_range,
)
from studies.sweep.support import support_text as _support_text


def support_text(c: CellRow | dict | None) -> str:
    """A cell's frontier with the agreement it rests on: '0.4 (3/3; 0.5657 fails 3/3)', '≥3.2 (2/3)', 'none
    (0.025 fails 3/3)' (the smallest lr tried fails: below the grid); the bare frontier where no deciding lr was
    replicated (one seed each)."""
    c = as_row(c)
    text = frontier_text(c)
    if c is not None and c.frontier == NONE and (c.first_unstable_decided or 0) > 1:
        return f"{text} ({c.first_unstable_lr:g} fails {c.first_unstable_failed}/{c.first_unstable_decided})"
    if c is None or not c.found or not (c.max_stable_lr_decided or 0) > 1:
        return text
    out = f"{text} ({c.max_stable_lr_trained}/{c.max_stable_lr_decided}"
    if c.first_unstable_lr is not None:
        out += f"; {c.first_unstable_lr:g} fails {c.first_unstable_failed}/{c.first_unstable_decided}"
    return out + ")"


def spread_text(c: CellRow | dict | None) -> str:
    """The range of the seeds' own frontiers: '0.2828–0.4 (3 seeds)', '0.4 (3 seeds)'; '-' with one seed."""
    c = as_row(c)
    if c is None or c.max_stable_lr_min is None or len(c.seed_list) < 2:
        return "-"
    lo, hi, n = c.max_stable_lr_min, c.max_stable_lr_max, len(c.seed_list)
    undecided = sum(v is None for v in c.max_stable_lr_by_seed)
    tail = f" ({n} seeds" + (f", {undecided} undecided" if undecided else "") + ")"
    return (f"{lo:g}" if lo == hi else f"{lo:g}–{hi:g}") + tail


FAILS = {"stalled": "stalls", "collapsed": "collapses", "diverged": "diverges"}
KIND = {"instability": "the edge is an instability", "budget": "the edge is a budget limit"}


def _edge_text(c: CellRow) -> str:
    """Where a found frontier ends: ', the largest lr tried', or '; lr 0.8 stalls (loss 2.30): the edge is …'."""
    if c.first_unstable_lr is None:
        return ", the largest lr tried"
    s = f"; lr {c.first_unstable_lr:g} {FAILS.get(c.first_unstable_verdict, 'diverges')}"
    s += _seeds(c.first_unstable_failed, c.first_unstable_decided)
    if c.first_unstable_verdict != "diverged":
        s += f" (loss {_f(c.first_unstable_loss)})"
    if c.first_unstable_kind in KIND:
        s += f": {KIND[c.first_unstable_kind]}"
    return s


def cell_sentence(row, col: str, c: CellRow | dict, row_name: str = "batch", facet: str = "") -> str:
    """'batch 1024, λ=0.01 trains up to lr 0.4 (loss 2.18, start 2.30); lr 0.8 stalls (loss 2.30): the edge is a
    budget limit' (collapses / diverges: an instability), '…; its best lr is the smallest tried (≤0.025: …)'; a
    facet (a third axis's value) goes first: 'augment_strength=0.5, batch 1024, λ=0.01 …'."""
    c = as_row(c)
    head, start = f"{facet + ', ' if facet else ''}{row_name} {value_text(row)}, {col}", c.start_loss
    if c.frontier == NONE:
        counts = c.scan_counts if c.scan_trials else (c.full_trained, c.full_stalled, c.full_collapsed,
                                                      c.full_diverged)
        if c.first_unstable_lr is None or not any(counts[:3]):  # (rows written before first_unstable was set)
            return f"{head}: no lr trains — every lr tried diverged"
        return (f"{head}: no lr trains — the smallest lr tried, {c.first_unstable_lr:g}, already "
                f"{FAILS.get(c.first_unstable_verdict, 'diverges')}"
                f"{_seeds(c.first_unstable_failed, c.first_unstable_decided)}: the frontier lies below the grid "
                "(smaller lrs: --lr-range)")
    if not c.found:
        return (f"{head}: undecided — no lr trained in the scan ({c.scan_stalled} stalled, "
                f"{c.scan_collapsed or 0} collapsed, {c.scan_diverged} diverged; start loss {_f(start)}): "
                "too short for it, raise --scan-steps / --scan-examples")
    s = f"{head} trains up to lr {c.max_stable_lr:g}{_seeds(c.max_stable_lr_trained, c.max_stable_lr_decided)}"
    s += f" (loss {_f(c.frontier_loss)}, start {_f(start)})" + _edge_text(c)
    if c.best_scan_lr_at_low_edge:
        s += f"; its best lr is the smallest tried ({best_lr_text(c.best_scan_lr, c)}: the optimum may lie below)"
    held = _seeds(c.frontier_holds_trained, c.frontier_holds_decided, "trained")
    if c.frontier_holds is False:
        s += f" — NOT held over the full budget (the full run at lr {c.max_stable_lr:g} did not train{held})"
    if spread_text(c) != "-":
        s += f"; the seeds' own frontiers: {spread_text(c)}"
    return s


def _seeds(k: int | None, n: int | None, what: str = "") -> str:
    """' in 3/3 seeds' where an lr was replicated; nothing for a lone run."""
    return f" ({(what + ' ') if what else ''}in {k}/{n} seeds)" if n and n > 1 and k is not None else ""


def _f(v) -> str:
    return "?" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _mean_sd(c: CellRow) -> str:
    """'0.538 ± 0.012' (mean ± sample sd over seeds), '0.538' with one seed."""
    sd = c.best_val_acc_sd
    return f"{c.best_val_acc:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")


def _acc(c: CellRow | None, sep: str = "@") -> str:
    """Best val top-1: '0.538 ± 0.012 @0.5657' (mean ± sample sd over seeds), '0.538 @0.5657' with one seed."""
    if c is None or c.best_val_acc is None:
        return "-"
    return f"{_mean_sd(c)} {sep}{best_lr_text(c.best_base_lr, c)}"


def _counts(c: CellRow | None, sep: str) -> str:
    return "-" if c is None else sep.join(map(str, c.scan_counts))


def _table(title: str, grids: list[Grid], text) -> list[str]:
    """A text table per map (a facet's heading above each when a third axis varies): rows × columns."""
    lines = [title]
    for g in grids:
        cells = {(r, c): text(g.at.get((r, c))) for r in g.rows for c in g.cols}
        w = max(12, *(len(c) + 2 for c in g.cols), *(len(t) + 2 for t in cells.values()))
        rw = max(7, len(g.layout.row_name) + 2)
        if g.facet:
            lines.append(f"  {g.facet}:")
        lines.append(g.layout.row_name.rjust(rw) + "".join(c.rjust(w) for c in g.cols))
        lines += [value_text(r).rjust(rw) + "".join(cells[r, c].rjust(w) for c in g.cols) for r in g.rows]
    return lines


def frontier_summary(cells: pa.Table) -> str:
    """The frontier table, verdict counts, LR sensitivity, best accuracy and the findings, with their numbers."""
    grids = [typed(g) for g in grids_of(cells)]
    lines = _table("largest base lr that trains (per 256 examples; ≥ = up to the largest lr tried; undecided = "
                   "no lr trained in the scan; (k/n) = seeds that trained there, and that failed at the next lr):",
                   grids, support_text)
    if any(spread_text(c) != "-" for g in grids for c in g.at.values()):
        lines += _table("the seeds' own frontiers (min–max over seeds):", grids, spread_text)
    lines += _table("scan runs trained / stalled / collapsed / diverged:", grids, lambda c: _counts(c, "/"))
    lines += _table("LR sensitivity (mean over the lr grid of min(loss, start) − best loss; 0 = flat):", grids,
                    lambda c: "-" if c is None or c.lr_sensitivity is None else f"{c.lr_sensitivity:.3f}")
    lines += _table("best val top-1 (mean ± sd over seeds, at base lr):", grids, _acc)
    lines += findings(cells)
    return "\n".join(lines)


def _md_table(title: str, grids: list[Grid], text) -> list[str]:
    lines = []
    for g in grids:
        lines += [f"**{title}**" + (f" — {g.facet}" if g.facet else ""), "",
                  f"| {g.layout.row_name} | " + " | ".join(g.cols) + " |", "|---:|" + "---:|" * len(g.cols)]
        lines += [f"| {value_text(r)} | " + " | ".join(text(g.at.get((r, c))) for c in g.cols) + " |" for r in g.rows]
        lines.append("")
    return lines


def frontier_markdown(cells: pa.Table) -> str:
    """The frontier and the best accuracy per cell as Markdown tables (`frontier.md`, and the study run's MLflow
    description), one per facet: ≥ marks a frontier at the largest lr tried, a lower bound."""
    grids = [typed(g) for g in grids_of(cells)]
    if not grids:
        return ""
    lines = _md_table("Largest base lr that trains (per 256 examples; ≥ = up to the largest lr tried, a lower "
                      "bound; undecided = no lr trained in the scan; none = the smallest lr tried already fails; "
                      "(k/n) = seeds that trained there; then the next lr and the seeds that failed at it)", grids,
                      support_text)
    if any(spread_text(c) != "-" for g in grids for c in g.at.values()):
        lines += _md_table("The seeds' own frontiers (min–max over seeds)", grids, spread_text)
    lines += _md_table("Scan runs trained / stalled / collapsed / diverged", grids, lambda c: _counts(c, " / "))
    lines += _md_table("Best val top-1 of the full runs (mean ± sd over seeds, at base lr)", grids,
                       lambda c: _acc(c, "@ "))
    return "\n".join(lines + [scaling_markdown(cells)])


def findings(cells: pa.Table) -> list[str]:
    out = ["findings:"]
    grids = [typed(g) for g in grids_of(cells)]
    for g in grids:
        out += ["  " + cell_sentence(r, col, g.at[r, col], g.layout.row_name, g.facet)
                for r in g.rows for col in g.cols if (r, col) in g.at]
    out += _held_text(full_budget(grids))
    return out + edge_kinds(grids) + effect_lines(grids) + scaling_lines(cells, NO_CLIP_COL)


def _held_text(h: FullBudget | None) -> list[str]:
    if h is None:
        return []
    return [f"the frontier lr trained over the full budget in {h.trained} of {h.cells} cells"
            + ("" if h.trained == h.cells else " — NOT everywhere: see the cells above")]


def edge_kinds(grids: list[Grid]) -> list[str]:
    """Why the cells' edges fail, over the map: the first lr above each frontier collapsed or diverged (an
    instability: the lr is too large) or stalled (a budget limit: too slow for the scan, or held at chance)."""
    e = edge_kinds_of(grids)
    if e is None:
        return []
    budget = [f"{(facet + ', ') if facet else ''}{row_name} {value_text(r)} {col}" for facet, row_name, r, col in
              e.budget]
    return [f"the first lr that fails above the frontier: an instability in {e.instability} of {e.cells} cells "
            f"({e.collapsed} collapsed, {e.diverged} diverged), a budget limit in {len(budget)}"
            + (f" (stalled: {', '.join(budget)})" if budget else "")]


def effect_lines(grids: list[Grid]) -> list[str]:
    """The paper's effects read along each map (a facet's heading first), shown or NOT SHOWN: decided by
    effects.py (and lambdas.py), worded here."""
    typed_grids = [typed(g) for g in grids]
    return [f"[{g.facet}] {effect_text(e, g)}" if g.facet else effect_text(e, g) for g in typed_grids
            for e in effects_of(g)]


def effect_text(e: Effect, g: Grid) -> str:
    """An effect's record in words: its numbers, and for NOT SHOWN the reason the record gives."""
    words = {FrontierFall: _fall_text, AccuracyFall: _acc_fall_text, AgcAccuracy: _agc_acc_text,
             AgcFrontier: _agc_text, LambdaGain: lambda_text}
    return words[type(e)](e, g)


def _row(g: Grid, r) -> str:
    return f"{g.layout.row_name} {value_text(r)}"  # 'batch 64', 'augmentation 1'


def _fall_text(e: FrontierFall, g: Grid) -> str:
    a, z, first = frontier_text(e.low), frontier_text(e.high), _row(g, e.first)
    if e.why in (Why.NO_EFFECT, Why.NOT_COMPARABLE):
        return (f"NOT SHOWN: without clipping the largest lr that trains does not fall from {first} to "
                f"{value_text(e.last)} ({a} → {z}).")
    ratio = f" (no lr tried trains at the largest {g.layout.row_name}, down to {e.high.lowest_lr_tried:g})" \
        if e.ratio.infinite else \
        f" (÷{BOUND_MARK[e.ratio.bound]}{e.ratio.value:.3g})"
    sup = _support_text(e.support)
    if e.shown:
        return (f"without clipping the largest lr that trains falls {g.layout.grows}: {a} at {first} → "
                f"{z} at {_row(g, e.last)}{ratio}{sup}.")
    return (f"NOT SHOWN: without clipping the largest lr that trains falls from {first} to {value_text(e.last)} in "
            f"the majority ({a} → {z}) but within the seeds' spread ({lr_range(e.low)} vs {lr_range(e.high)}){sup}.")


def _acc_fall_text(e: AccuracyFall, g: Grid) -> str:
    first, last = _row(g, e.first), _row(g, e.last)
    shown, sup = f"{_mean_sd(e.low)} at {first} → {_mean_sd(e.high)} at {last}", _support_text(e.support)
    if e.shown:
        return f"without clipping the best val top-1 falls {g.layout.grows}: {shown}{sup}."
    if e.why is Why.WITHIN_SPREAD:
        return (f"NOT SHOWN: without clipping the best val top-1 falls in the mean ({shown}) but within the seeds' "
                f"range{sup}.")
    return (f"NOT SHOWN: without clipping the best val top-1 does not fall (by ≥ {ACC_MARGIN}) from {first} "
            f"to {value_text(e.last)} ({e.low.best_val_acc:.3f} → {e.high.best_val_acc:.3f}).")


def _agc_acc_text(e: AgcAccuracy, g: Grid) -> str:
    last, best, control = _row(g, e.last), _mean_sd(e.best), _mean_sd(e.control)
    if e.shown:
        return (f"at {last} AGC {e.column} reaches top-1 {best}, {e.gain:+.3f} over the {control} without clipping"
                f"{_support_text(e.support)}.")
    if e.why is Why.WITHIN_SPREAD:
        return (f"NOT SHOWN: at {last} AGC {e.column} reaches top-1 {best}, {e.gain:+.3f} over the {control} "
                f"without clipping in the mean, but within the seeds' range{_support_text(e.support)}.")
    return (f"NOT SHOWN: at {last} AGC's best top-1 ({e.column}, {e.best.best_val_acc:.3f}) is not ≥ "
            f"{ACC_MARGIN} above no clipping's {e.control.best_val_acc:.3f}.")


def _agc_text(e: AgcFrontier, g: Grid) -> str:
    last, z = _row(g, e.last), frontier_text(e.control)
    if e.why is Why.NO_AGC_FRONTIER:
        return (f"NOT SHOWN: at {last} no AGC setting has a frontier ("
                + ", ".join(f"{col} {frontier_text(c)}" for col, c in e.settings) + ").")
    best = frontier_text(e.best)
    if e.why is Why.NOT_COMPARABLE:
        seen = ""
        if z == UNDECIDED:  # say what the same budget did with AGC: the reader weighs it, the finding does not
            seen = (f" (no lr trained in its scan, where AGC {e.column} trained up to lr {best} in the "
                    "same budget; a longer scan may find one)")
        return f"NOT SHOWN: at {last} the frontier without clipping is {z}{seen}, so AGC cannot be compared."
    if e.why is Why.NO_EFFECT:
        return f"NOT SHOWN: at {last} the best AGC setting ({e.column}, lr {best}) is not ≥ 2× no clipping's {z}."
    times = f"where no lr tried trains without clipping (down to {e.control.lowest_lr_tried:g})" \
        if e.ratio.infinite else \
        f"{BOUND_MARK[e.ratio.bound]}{e.ratio.value:.3g}× the {z} without clipping"
    sup = _support_text(e.support)
    if e.why is Why.WITHIN_SPREAD:
        return (f"NOT SHOWN: at {last} AGC {e.column} trains up to lr {best}, {times} in the majority, "
                f"but within the seeds' spread ({lr_range(e.best)} vs {lr_range(e.control)}){sup}.")
    return (f"at {last} AGC {e.column} trains up to lr {best}, {times}"
            + (f" (and without clipping lr {z} did not even train over the full budget)" if e.control_fails_full
               else "") + f"{sup}.")
