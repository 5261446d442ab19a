"""The stable region in words: the frontier table, the verdict counts, LR sensitivity, the best accuracy and the
findings, each with its numbers, read from cells.parquet (pure functions). A finding the runs do not show is
printed as NOT SHOWN, never softened."""
from __future__ import annotations

import math

import pyarrow as pa

from studies.sweep.frontier import FOUND, NONE, grid_of

NO_CLIP_COL = "no clipping"


def frontier_text(c: dict | None) -> str:
    """A cell's frontier in the map: '0.4', '≥12.8' (trains up to the largest lr tried), 'undecided', 'none'."""
    if c is None:
        return "-"
    if c["frontier"] != FOUND:
        return c["frontier"]
    return ("≥" if c["max_stable_lr_at_edge"] else "") + f"{c['max_stable_lr']:g}"


def _fails(c: dict) -> str:
    return "stalls" if c["first_unstable_verdict"] == "stalled" else "diverges"


def cell_sentence(b: int, col: str, c: dict) -> str:
    """'batch 1024, λ=0.01 trains up to lr 0.4 (loss 2.18, start 2.30); lr 0.8 stalls (loss 2.30)'."""
    head, start = f"batch {b}, {col}", c["start_loss"]
    if c["frontier"] == NONE:
        return f"{head}: no lr trains — every lr tried diverged"
    if c["frontier"] != FOUND:
        return (f"{head}: undecided — no lr trained in the scan ({c['scan_stalled']} stalled, {c['scan_diverged']} "
                f"diverged; start loss {_f(start)}): too short for it, raise --scan-steps / --scan-examples")
    s = f"{head} trains up to lr {c['max_stable_lr']:g} (loss {_f(c['frontier_loss'])}, start {_f(start)})"
    if c["first_unstable_lr"] is None:
        s += ", the largest lr tried"
    else:
        s += f"; lr {c['first_unstable_lr']:g} {_fails(c)}"
        if c["first_unstable_verdict"] == "stalled":
            s += f" (loss {_f(c['first_unstable_loss'])})"
    if c["frontier_holds"] is False:
        s += f" — NOT held over the full budget (the full run at lr {c['max_stable_lr']:g} did not train)"
    return s


def _f(v) -> str:
    return "?" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _table(title: str, batches, cols, at, text) -> list[str]:
    cells = {(b, c): text(at.get((b, c))) for b in batches for c in cols}
    w = max(12, *(len(c) + 2 for c in cols), *(len(t) + 2 for t in cells.values()))
    lines = [title, "batch".rjust(7) + "".join(c.rjust(w) for c in cols)]
    for b in batches:
        lines.append(str(b).rjust(7) + "".join(cells[b, c].rjust(w) for c in cols))
    return lines


def frontier_summary(cells: pa.Table) -> str:
    """The frontier table, verdict counts, LR sensitivity, best accuracy and the findings, with their numbers."""
    batches, cols, at = grid_of(cells)
    lines = _table("largest base lr that trains (per 256 examples; ≥ = up to the largest lr tried; undecided = "
                    "no lr trained in the scan):", batches, cols, at, frontier_text)
    lines += _table("scan runs trained / stalled / diverged:", batches, cols, at, lambda c: "-" if c is None else
                    f"{c['scan_trained']}/{c['scan_stalled']}/{c['scan_diverged']}")
    lines += _table("LR sensitivity (mean over the lr grid of min(loss, start) − best loss; 0 = flat):", batches,
                    cols, at, lambda c: "-" if c is None or c["lr_sensitivity"] is None else
                    f"{c['lr_sensitivity']:.3f}")
    lines += _table("best val top-1 (at base lr):", batches, cols, at, lambda c: "-" if not c or
                    c["best_val_acc"] is None else f"{c['best_val_acc']:.3f} @{c['best_base_lr']:g}")
    lines += findings(cells)
    return "\n".join(lines)


def _md_table(title: str, batches, cols, at, text) -> list[str]:
    lines = [f"**{title}**", "", "| batch | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
    lines += [f"| {b} | " + " | ".join(text(at.get((b, c))) for c in cols) + " |" for b in batches]
    return lines + [""]


def frontier_markdown(cells: pa.Table) -> str:
    """The frontier and the best accuracy per cell as Markdown tables (`frontier.md`, and the study run's MLflow
    description): ≥ marks a frontier at the largest lr tried, a lower bound."""
    batches, cols, at = grid_of(cells)
    if not batches:
        return ""
    lines = _md_table("Largest base lr that trains (per 256 examples; ≥ = up to the largest lr tried, a lower "
                      "bound; undecided = no lr trained in the scan; none = every lr diverged)", batches, cols, at,
                      frontier_text)
    lines += _md_table("Scan runs trained / stalled / diverged", batches, cols, at, lambda c: "-" if c is None else
                       f"{c['scan_trained']} / {c['scan_stalled']} / {c['scan_diverged']}")
    lines += _md_table("Best val top-1 of the full runs (at base lr)", batches, cols, at, lambda c: "-" if not c or
                       c["best_val_acc"] is None else f"{c['best_val_acc']:.3f} @ {c['best_base_lr']:g}")
    return "\n".join(lines)


def _frontier_lr(c: dict | None) -> float | None:
    """A cell's frontier as a number for comparisons: 0 when no lr trains (every lr diverged), None when
    undecided or missing."""
    if c is None or c["frontier"] not in (FOUND, NONE):
        return None
    return c["max_stable_lr"] if c["frontier"] == FOUND else 0.0


def findings(cells: pa.Table) -> list[str]:
    batches, cols, at = grid_of(cells)
    out = ["findings:"]
    out += ["  " + cell_sentence(b, col, at[b, col]) for b in batches for col in cols if (b, col) in at]
    held = [c for c in at.values() if c["frontier_holds"] is not None]
    if held:
        ok = sum(c["frontier_holds"] for c in held)
        out.append(f"the frontier lr trained over the full budget in {ok} of {len(held)} cells"
                   + ("" if ok == len(held) else " — NOT everywhere: see the cells above"))
    if NO_CLIP_COL not in cols or len(batches) < 2:
        return out
    lo, hi = batches[0], batches[-1]
    small, large = _frontier_lr(at.get((lo, NO_CLIP_COL))), _frontier_lr(at.get((hi, NO_CLIP_COL)))
    a, z = frontier_text(at.get((lo, NO_CLIP_COL))), frontier_text(at.get((hi, NO_CLIP_COL)))
    if small is not None and large is not None and large < small:
        ratio = f" (÷{small / large:.3g})" if large else " (no lr trains at the largest batch)"
        out.append(f"without clipping the largest lr that trains falls as the batch grows: {a} at batch {lo} → "
                   f"{z} at batch {hi}{ratio}.")
    else:
        out.append(f"NOT SHOWN: without clipping the largest lr that trains does not fall from batch {lo} to {hi} "
                   f"({a} → {z}).")
    agc = [(col, at[hi, col]) for col in cols if col != NO_CLIP_COL and (hi, col) in at]
    found = [(col, c) for col, c in agc if c["frontier"] == FOUND]
    if not found:
        out.append(f"NOT SHOWN: at batch {hi} no AGC setting has a frontier ("
                   + ", ".join(f"{col} {frontier_text(c)}" for col, c in agc) + ").")
        return out
    name, best = max(found, key=lambda x: (x[1]["max_stable_lr"], -x[1]["lr_sensitivity"] if
                                           x[1]["lr_sensitivity"] is not None else 0))
    if large is None:
        out.append(f"NOT SHOWN: at batch {hi} the frontier without clipping is {z}, so AGC cannot be compared.")
    elif large == 0 or best["max_stable_lr"] / large >= 2:
        times = "where no lr trains without clipping" if large == 0 else \
            f"{best['max_stable_lr'] / large:.3g}× the {z} without clipping"
        weak = at[hi, NO_CLIP_COL]["frontier_holds"] is False  # the control is worse still over the full run
        out.append(f"at batch {hi} AGC {name} trains up to lr {frontier_text(best)}, {times}"
                   + (f" (and without clipping lr {z} did not even train over the full budget)." if weak else "."))
    else:
        out.append(f"NOT SHOWN: at batch {hi} the best AGC setting ({name}, lr {frontier_text(best)}) is not ≥ 2× "
                   f"no clipping's {z}.")
    return out
