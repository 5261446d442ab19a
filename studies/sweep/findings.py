"""The stable region in words: the frontier table, the verdict counts, LR sensitivity, the best accuracy and the
findings, each with its numbers, read from cells.parquet (pure functions). A finding the runs do not show is
printed as NOT SHOWN, never softened."""
from __future__ import annotations

import math

import pyarrow as pa

from studies.sweep.frontier import FOUND, NONE
from studies.sweep.lambdas import lambda_effect
from studies.sweep.layout import Grid, grids_of, value_text
from studies.sweep.scaling import scaling_lines, scaling_markdown
from studies.sweep.support import apart as _apart
from studies.sweep.support import best_lr_text, frontier_text
from studies.sweep.support import frontier_lr as _frontier_lr
from studies.sweep.support import lr_range as _range
from studies.sweep.support import support as _support
from studies.sweep.support import support_text as _support_text

NO_CLIP_COL = "no clipping"
COUNTED = ("trained", "stalled", "collapsed", "diverged")  # the verdict counts' order in the tables


def support_text(c: dict | None) -> str:
    """A cell's frontier with the agreement it rests on: '0.4 (3/3; 0.5657 fails 3/3)', '≥3.2 (2/3)'; the bare
    frontier where no deciding lr was replicated (one seed each)."""
    text = frontier_text(c)
    if c is None or c["frontier"] != FOUND or not (c.get("max_stable_lr_decided") or 0) > 1:
        return text
    out = f"{text} ({c['max_stable_lr_trained']}/{c['max_stable_lr_decided']}"
    if c["first_unstable_lr"] is not None:
        out += f"; {c['first_unstable_lr']:g} fails {c['first_unstable_failed']}/{c['first_unstable_decided']}"
    return out + ")"


def spread_text(c: dict | None) -> str:
    """The range of the seeds' own frontiers: '0.2828–0.4 (3 seeds)', '0.4 (3 seeds)'; '-' with one seed."""
    if c is None or c.get("max_stable_lr_min") is None or len(c.get("seed_list") or []) < 2:
        return "-"
    lo, hi, n = c["max_stable_lr_min"], c["max_stable_lr_max"], len(c["seed_list"])
    undecided = sum(v is None for v in c["max_stable_lr_by_seed"])
    tail = f" ({n} seeds" + (f", {undecided} undecided" if undecided else "") + ")"
    return (f"{lo:g}" if lo == hi else f"{lo:g}–{hi:g}") + tail


FAILS = {"stalled": "stalls", "collapsed": "collapses", "diverged": "diverges"}
KIND = {"instability": "the edge is an instability", "budget": "the edge is a budget limit"}


def _fails(c: dict) -> str:
    return FAILS.get(c["first_unstable_verdict"], "diverges")


def cell_sentence(row, col: str, c: dict, row_name: str = "batch", facet: str = "") -> str:
    """'batch 1024, λ=0.01 trains up to lr 0.4 (loss 2.18, start 2.30); lr 0.8 stalls (loss 2.30): the edge is a
    budget limit' (collapses / diverges: an instability), '…; its best lr is the smallest tried (≤0.025: …)'; a
    facet (a third axis's value) goes first: 'augment_strength=0.5, batch 1024, λ=0.01 …'."""
    head, start = f"{facet + ', ' if facet else ''}{row_name} {value_text(row)}, {col}", c["start_loss"]
    if c["frontier"] == NONE:
        return f"{head}: no lr trains — every lr tried diverged"
    if c["frontier"] != FOUND:
        return (f"{head}: undecided — no lr trained in the scan ({c['scan_stalled']} stalled, "
                f"{c.get('scan_collapsed') or 0} collapsed, {c['scan_diverged']} diverged; start loss {_f(start)}): "
                "too short for it, raise --scan-steps / --scan-examples")
    s = f"{head} trains up to lr {c['max_stable_lr']:g}{_seeds(c['max_stable_lr_trained'], c['max_stable_lr_decided'])}"
    s += f" (loss {_f(c['frontier_loss'])}, start {_f(start)})"
    if c["first_unstable_lr"] is None:
        s += ", the largest lr tried"
    else:
        s += f"; lr {c['first_unstable_lr']:g} {_fails(c)}"
        s += _seeds(c["first_unstable_failed"], c["first_unstable_decided"])
        if c["first_unstable_verdict"] != "diverged":
            s += f" (loss {_f(c['first_unstable_loss'])})"
        if c.get("first_unstable_kind") in KIND:
            s += f": {KIND[c['first_unstable_kind']]}"
    if c.get("best_scan_lr_at_low_edge"):
        s += f"; its best lr is the smallest tried ({best_lr_text(c['best_scan_lr'], c)}: the optimum may lie below)"
    held = _seeds(c.get("frontier_holds_trained"), c.get("frontier_holds_decided"), "trained")
    if c["frontier_holds"] is False:
        s += f" — NOT held over the full budget (the full run at lr {c['max_stable_lr']:g} did not train{held})"
    if spread_text(c) != "-":
        s += f"; the seeds' own frontiers: {spread_text(c)}"
    return s


def _seeds(k: int | None, n: int | None, what: str = "") -> str:
    """' in 3/3 seeds' where an lr was replicated; nothing for a lone run."""
    return f" ({(what + ' ') if what else ''}in {k}/{n} seeds)" if n and n > 1 and k is not None else ""


def _f(v) -> str:
    return "?" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _mean_sd(c: dict) -> str:
    """'0.538 ± 0.012' (mean ± sample sd over seeds), '0.538' with one seed."""
    sd = c.get("best_val_acc_sd")
    return f"{c['best_val_acc']:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")


def _acc(c: dict | None, sep: str = "@") -> str:
    """Best val top-1: '0.538 ± 0.012 @0.5657' (mean ± sample sd over seeds), '0.538 @0.5657' with one seed."""
    if not c or c["best_val_acc"] is None:
        return "-"
    return f"{_mean_sd(c)} {sep}{best_lr_text(c['best_base_lr'], c)}"


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
    grids = grids_of(cells)
    lines = _table("largest base lr that trains (per 256 examples; ≥ = up to the largest lr tried; undecided = "
                   "no lr trained in the scan; (k/n) = seeds that trained there, and that failed at the next lr):",
                   grids, support_text)
    if any(spread_text(c) != "-" for g in grids for c in g.at.values()):
        lines += _table("the seeds' own frontiers (min–max over seeds):", grids, spread_text)
    lines += _table("scan runs trained / stalled / collapsed / diverged:", grids, lambda c: "-" if c is None else
                    "/".join(str(c.get(f"scan_{v}") or 0) for v in COUNTED))
    lines += _table("LR sensitivity (mean over the lr grid of min(loss, start) − best loss; 0 = flat):", grids,
                    lambda c: "-" if c is None or c["lr_sensitivity"] is None else f"{c['lr_sensitivity']:.3f}")
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
    grids = grids_of(cells)
    if not grids:
        return ""
    lines = _md_table("Largest base lr that trains (per 256 examples; ≥ = up to the largest lr tried, a lower "
                      "bound; undecided = no lr trained in the scan; none = every lr diverged; (k/n) = seeds that "
                      "trained there; then the next lr and the seeds that failed at it)", grids, support_text)
    if any(spread_text(c) != "-" for g in grids for c in g.at.values()):
        lines += _md_table("The seeds' own frontiers (min–max over seeds)", grids, spread_text)
    lines += _md_table("Scan runs trained / stalled / collapsed / diverged", grids, lambda c: "-" if c is None else
                       " / ".join(str(c.get(f"scan_{v}") or 0) for v in COUNTED))
    lines += _md_table("Best val top-1 of the full runs (mean ± sd over seeds, at base lr)", grids,
                       lambda c: _acc(c, "@ "))
    return "\n".join(lines + [scaling_markdown(cells)])


ACC_MARGIN = 0.02  # top-1 differences below this are within a few seeds' noise on the laptop data: not a finding


def findings(cells: pa.Table) -> list[str]:
    out = ["findings:"]
    grids = grids_of(cells)
    for g in grids:
        out += ["  " + cell_sentence(r, col, g.at[r, col], g.layout.row_name, g.facet)
                for r in g.rows for col in g.cols if (r, col) in g.at]
    held = [c for g in grids for c in g.at.values() if c["frontier_holds"] is not None]
    if held:
        ok = sum(c["frontier_holds"] for c in held)
        out.append(f"the frontier lr trained over the full budget in {ok} of {len(held)} cells"
                   + ("" if ok == len(held) else " — NOT everywhere: see the cells above"))
    return out + edge_kinds(grids) + effect_lines(grids) + scaling_lines(cells, NO_CLIP_COL)


def edge_kinds(grids: list[Grid]) -> list[str]:
    """Why the cells' edges fail, over the map: the first lr above each frontier collapsed or diverged (an
    instability: the lr is too large) or stalled (a budget limit: too slow for the scan, or held at chance)."""
    named = [(f"{(g.facet + ', ') if g.facet else ''}{g.layout.row_name} {value_text(r)} {col}", c)
             for g in grids for (r, col), c in g.at.items() if c.get("first_unstable_kind")]
    if not named:
        return []
    unstable = [c for _, c in named if c["first_unstable_kind"] == "instability"]
    budget = [name for name, c in named if c["first_unstable_kind"] == "budget"]
    kinds = [sum(c["first_unstable_verdict"] == v for c in unstable) for v in ("collapsed", "diverged")]
    return [f"the first lr that fails above the frontier: an instability in {len(unstable)} of {len(named)} cells "
            f"({kinds[0]} collapsed, {kinds[1]} diverged), a budget limit in {len(budget)}"
            + (f" (stalled: {', '.join(budget)})" if budget else "")]


def effect_lines(grids: list[Grid]) -> list[str]:
    """The paper's effects read along each map (a facet's heading first), shown or NOT SHOWN."""
    return [f"[{g.facet}] {line}" if g.facet else line for g in grids
            for line in _effects(g) + lambda_effect(g)]


def _effects(g: Grid) -> list[str]:
    """The two effects of the paper along the map's rows, or NOT SHOWN: without clipping the frontier (and the
    accuracy) falls as the row grows (batch, augmentation), and AGC holds it up at the last row. An effect is
    called only when the majority frontiers show it AND the two cells' seed ranges do not overlap; each says in
    how many seeds it holds."""
    rows, at, rn = g.rows, g.at, g.layout.row_name
    if NO_CLIP_COL not in g.cols or len(rows) < 2:
        return []
    out = []
    lo, hi = rows[0], rows[-1]
    first, last = f"{rn} {value_text(lo)}", f"{rn} {value_text(hi)}"  # 'batch 64', 'augmentation 1'
    c_lo, c_hi = at.get((lo, NO_CLIP_COL)), at.get((hi, NO_CLIP_COL))
    small, large = _frontier_lr(c_lo), _frontier_lr(c_hi)
    a, z = frontier_text(c_lo), frontier_text(c_hi)
    if small is not None and large is not None and large < small:
        at_edge = c_lo["max_stable_lr_at_edge"]  # a lower bound at the first row: so is the fall
        ratio = f" (÷{'≥' if at_edge else ''}{small / large:.3g})" if large else \
            f" (no lr trains at the largest {rn})"
        sup = _support_text(*_support([c_lo, c_hi], lambda x, y: y < x))
        if _apart(c_hi, c_lo):
            out.append(f"without clipping the largest lr that trains falls {g.layout.grows}: {a} at {first} → "
                       f"{z} at {last}{ratio}{sup}.")
        else:
            out.append(f"NOT SHOWN: without clipping the largest lr that trains falls from {first} to "
                       f"{value_text(hi)} in the majority ({a} → {z}) but within the seeds' spread ({_range(c_lo)} "
                       f"vs {_range(c_hi)}){sup}.")
    else:
        out.append(f"NOT SHOWN: without clipping the largest lr that trains does not fall from {first} to "
                   f"{value_text(hi)} ({a} → {z}).")
    return out + _accuracy_effect(g) + _agc_effect(g, c_hi, large, z, last)


def _agc_effect(g: Grid, c_hi: dict | None, large: float | None, z: str, last: str) -> list[str]:
    """AGC's best frontier against no clipping's at the last row: called at ≥ 2× and outside the seeds' spread."""
    hi = g.rows[-1]
    agc = [(col, g.at[hi, col]) for col in g.cols if col != NO_CLIP_COL and (hi, col) in g.at]
    found = [(col, c) for col, c in agc if c["frontier"] == FOUND]
    if not found:
        return [f"NOT SHOWN: at {last} no AGC setting has a frontier ("
                + ", ".join(f"{col} {frontier_text(c)}" for col, c in agc) + ")."]
    name, best = max(found, key=lambda x: (x[1]["max_stable_lr"], -x[1]["lr_sensitivity"] if
                                           x[1]["lr_sensitivity"] is not None else 0))
    if large is None:
        seen = ""
        if z == "undecided":  # say what the same budget did with AGC: the reader weighs it, the finding does not
            seen = (f" (no lr trained in its scan, where AGC {name} trained up to lr {frontier_text(best)} in the "
                    "same budget; a longer scan may find one)")
        return [f"NOT SHOWN: at {last} the frontier without clipping is {z}{seen}, so AGC cannot be compared."]
    if not (large == 0 or best["max_stable_lr"] / large >= 2):
        return [f"NOT SHOWN: at {last} the best AGC setting ({name}, lr {frontier_text(best)}) is not ≥ 2× "
                f"no clipping's {z}."]
    times = "where no lr trains without clipping" if large == 0 else \
        f"{'≥' if best['max_stable_lr_at_edge'] else ''}{best['max_stable_lr'] / large:.3g}× the {z} without clipping"
    sup = _support_text(*_support([best, c_hi], lambda x, y: x > 0 and (y == 0 or x / y >= 2)))
    if not _apart(c_hi, best):
        return [f"NOT SHOWN: at {last} AGC {name} trains up to lr {frontier_text(best)}, {times} in the majority, "
                f"but within the seeds' spread ({_range(best)} vs {_range(c_hi)}){sup}."]
    weak = c_hi["frontier_holds"] is False  # the control is worse still over the full run
    return [f"at {last} AGC {name} trains up to lr {frontier_text(best)}, {times}"
            + (f" (and without clipping lr {z} did not even train over the full budget)" if weak else "") + f"{sup}."]


def _acc_by_seed(c: dict) -> dict[int, float]:
    return dict(zip(c.get("acc_seed_list") or [], c.get("best_val_acc_by_seed") or []))


def _acc_apart(low: dict, high: dict) -> bool:
    """`high`'s seeds all score above `low`'s (a point where a cell has one seed)."""
    return high["best_val_acc_min"] > low["best_val_acc_max"] if high.get("best_val_acc_min") is not None and \
        low.get("best_val_acc_max") is not None else True


def _acc_support(low: dict, high: dict) -> str:
    """In how many seeds (paired by seed) `high` beats `low` by ACC_MARGIN."""
    a, b = _acc_by_seed(low), _acc_by_seed(high)
    seeds = sorted(set(a) & set(b))
    broke = [s for s in seeds if b[s] - a[s] < ACC_MARGIN]
    return _support_text(len(seeds) - len(broke), len(seeds), broke)


def _accuracy_effect(g: Grid) -> list[str]:
    """Best val top-1 of the full runs along the rows without clipping, and AGC's best against it at the last
    row; a difference under ACC_MARGIN, or inside the seeds' range, is not called one. Nothing when the full runs
    have no accuracy."""
    rows, at, rn = g.rows, g.at, g.layout.row_name
    lo, hi = rows[0], rows[-1]
    first, last = f"{rn} {value_text(lo)}", f"{rn} {value_text(hi)}"
    cells = {r: at.get((r, NO_CLIP_COL)) or {} for r in (lo, hi)}
    acc = {r: cells[r].get("best_val_acc") for r in (lo, hi)}
    if acc[lo] is None or acc[hi] is None:
        return []
    shown = f"{_mean_sd(cells[lo])} at {first} → {_mean_sd(cells[hi])} at {last}"
    if acc[lo] - acc[hi] >= ACC_MARGIN and _acc_apart(cells[hi], cells[lo]):
        out = [f"without clipping the best val top-1 falls {g.layout.grows}: {shown}"
               f"{_acc_support(cells[hi], cells[lo])}."]
    elif acc[lo] - acc[hi] >= ACC_MARGIN:
        out = [f"NOT SHOWN: without clipping the best val top-1 falls in the mean ({shown}) but within the seeds' "
               f"range{_acc_support(cells[hi], cells[lo])}."]
    else:
        out = [f"NOT SHOWN: without clipping the best val top-1 does not fall (by ≥ {ACC_MARGIN}) from {first} "
               f"to {value_text(hi)} ({acc[lo]:.3f} → {acc[hi]:.3f})."]
    agc = [(col, at[hi, col]) for col in g.cols if col != NO_CLIP_COL and (hi, col) in at
           and at[hi, col]["best_val_acc"] is not None]
    if not agc:
        return out
    name, best = max(agc, key=lambda x: x[1]["best_val_acc"])
    gain = best["best_val_acc"] - acc[hi]
    if gain >= ACC_MARGIN and _acc_apart(cells[hi], best):
        out.append(f"at {last} AGC {name} reaches top-1 {_mean_sd(best)}, {gain:+.3f} over the "
                   f"{_mean_sd(cells[hi])} without clipping{_acc_support(cells[hi], best)}.")
    elif gain >= ACC_MARGIN:
        out.append(f"NOT SHOWN: at {last} AGC {name} reaches top-1 {_mean_sd(best)}, {gain:+.3f} over the "
                   f"{_mean_sd(cells[hi])} without clipping in the mean, but within the seeds' range"
                   f"{_acc_support(cells[hi], best)}.")
    else:
        out.append(f"NOT SHOWN: at {last} AGC's best top-1 ({name}, {best['best_val_acc']:.3f}) is not ≥ "
                   f"{ACC_MARGIN} above no clipping's {acc[hi]:.3f}.")
    return out
