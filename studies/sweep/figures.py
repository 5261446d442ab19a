"""The study's map figures, drawn from its pyarrow tables (results, cells): `stable_region.png` and
`stability_map.png`; the curves (loss and accuracy vs lr, the frontier vs the batch) are curves.py's, their
shared style figstyle.py's. Reruns offline, no Ray. The frontier itself is frontier.py; its words, findings.py."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pyarrow as pa

from studies.sweep.curves import (  # noqa: F401  (the figures' one entry point for report.py and the scripts)
    plot_batch_scaling,
    plot_frontier_scaling,
    plot_lr_accuracy,
    plot_lr_loss,
)
from studies.sweep.figstyle import (  # noqa: F401  (MARKERS and the gids: the tests read them from here)
    ACC_SPREAD_GID,
    CHANCE_GID,
    DIVERGED_GID,
    EDGE_GID,
    FIT_GID,
    LINEAR_GID,
    LR_LABEL,
    MARKERS,
    MCCANDLISH_GID,
    NOT_HELD_GID,
    NOT_HELD_STYLE,
    SEED_GID,
    SEED_STEP,
    SEED_TOP,
    SPREAD_GID,
    SPREAD_STYLE,
    THRESHOLD_GID,
    close,
    grid_lrs,
    lr_axis,
    marker_kw,
    replicated_runs,
    verdict_handles,
)
from studies.sweep.findings import FAILS
from studies.sweep.frontier import FOUND, NONE, frontier_of, rows_of, run_verdict, stability_rows
from studies.sweep.layout import grids_of, value_text
from studies.sweep.support import frontier_text


def seed_verdicts(rows: list[dict]) -> dict[float, list[str]]:
    """Per lr that has several decided runs (a replicated lr): each seed's verdict, in seed order."""
    out: dict[float, list[str]] = {}
    for r in replicated_runs(rows):
        out.setdefault(float(r["base_lr"]), []).append(run_verdict(r))
    return out


def _beneath(ax, k: int):
    """Data coordinates shifted down to the k-th seed's place beneath a marker (a fixed distance in points, whatever
    the axis's scale)."""
    from matplotlib.transforms import offset_copy

    return offset_copy(ax.transData, fig=ax.figure, y=-(SEED_TOP + SEED_STEP * k), units="points")


def _spread(c: dict) -> tuple[float, float] | None:
    """The range of the seeds' own frontiers of a cell (0: below the grid for that seed); None when there is
    none to draw (one seed, or every seed agrees)."""
    lo, hi = c.get("max_stable_lr_min"), c.get("max_stable_lr_max")
    if lo is None or hi is None or lo == hi or len(c.get("seed_list") or []) < 2:
        return None
    return lo, hi


def _row_axis(ax, g) -> None:
    """The map's rows, evenly spaced (batch sizes a factor apart read as a log axis; augmentation 0 fits), the
    first (smallest) on top, as in the stability map."""
    ax.set_yticks(range(len(g.rows)), [value_text(r) for r in g.rows])
    ax.set_ylim(len(g.rows) - 0.5, -0.5)


def plot_stable_region(results: pa.Table | list[dict], cells: pa.Table, title: str = ""):
    """Small multiples, one panel per column of the map (a row of panels per facet, a third axis's value): lr (log)
    × the map's rows (batch size, or augmentation; the smallest on top), a marker per tried lr (trained, stalled,
    collapsed or diverged in the majority of seeds), the frontier as a line (≥ where it is the largest lr tried,
    ≤ by a best lr at the smallest), a red ring where it did not hold over the full budget,
    undecided cells written out. Where an lr has several seeds, each seed's verdict is drawn small beneath it;
    where the seeds' own frontiers differ, their range is a band across the row."""
    grids = grids_of(cells)
    rows = rows_of(results)
    lrs_all = grid_lrs(stability_rows(rows))
    ncols = max(len(g.cols) for g in grids)
    fig, axes = plt.subplots(len(grids), ncols, figsize=(3.4 * ncols + 1.0, 0.6 * max(len(g.rows) for g in grids)
                                                         * len(grids) + 2.6 * len(grids)), sharex=True, squeeze=False)
    drawn: set[str] = set()
    for axrow, g in zip(axes, grids):
        for ax in axrow[len(g.cols):]:
            ax.set_visible(False)
        for ax, col in zip(axrow, g.cols):
            front = []
            for i, r in enumerate(g.rows):
                c = g.at.get((r, col))
                if not c:
                    continue
                drawn |= _draw_cell(ax, i, c, stability_rows([row for row in rows if row["cell"] == c["cell"]]))
                if c["frontier"] == FOUND:
                    front.append((c["max_stable_lr"], i))
                else:
                    ax.annotate(c["frontier"], (1.0, i), xycoords=("axes fraction", "data"), xytext=(-2, 8),
                                textcoords="offset points", ha="right", va="bottom", fontsize=10,
                                color="#b00020" if c["frontier"] == NONE else "#555555")
            if front:
                ax.plot([f[0] for f in front], [f[1] for f in front], "-", color="black", lw=2)
            ax.set_title(f"{g.facet}\n{col}" if g.facet else col)
            lr_axis(ax, lrs_all)
            _row_axis(ax, g)
            ax.grid(alpha=0.3)
            ax.set_xlabel(LR_LABEL)
        axrow[0].set_ylabel(g.layout.row_title + (" (examples per step)" if g.layout.row_axis == "batch_size" else ""))
    _region_legend(fig, drawn)
    fig.suptitle(title or "stable region: which learning rates train, per cell", fontsize=13)
    fig.tight_layout()
    return fig


def _region_legend(fig, drawn: set[str]) -> None:
    handles = verdict_handles(" (majority of seeds)" if "seeds" in drawn else "")
    handles.append(plt.Line2D([], [], ls="-", color="black", lw=2, label="frontier (largest lr that trains)"))
    if "not held" in drawn:
        handles.append(plt.Line2D([], [], label="frontier NOT held over the full budget", **NOT_HELD_STYLE))
    if "edge" in drawn:
        handles.append(plt.Line2D([], [], ls="", marker=r"$\geq$", color="black", ms=9,
                                  label="≥ frontier at the largest lr tried; ≤ best lr at the smallest"))
    if "seeds" in drawn:
        handles.append(plt.Line2D([], [], marker="o", ls="", color="#555555", ms=3.5,
                                  label="each seed's verdict (beneath its lr)"))
    if "spread" in drawn:
        handles.append(plt.Line2D([], [], label="frontier range over seeds", **SPREAD_STYLE))
    ncol = 2 if len(handles) > 4 else 4
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=10,
               bbox_to_anchor=(0.5, -0.055 * math.ceil(len(handles) / ncol)))


def _edge_marks(ax, i: int, c: dict) -> bool:
    """≥ right of a frontier at the largest lr tried (a lower bound), ≤ left of a best lr at the smallest (the
    optimum may lie below)."""
    marks = []
    if c["frontier"] == FOUND and c["max_stable_lr_at_edge"]:
        marks.append((c["max_stable_lr"], "≥"))
    if c.get("best_scan_lr_at_low_edge"):
        marks.append((c["best_scan_lr"], "≤"))
    for lr, text in marks:  # above its marker: inside the panel even at its first or last lr
        ax.annotate(text, (lr, i), xytext=(0, 7), textcoords="offset points", ha="center", va="bottom",
                    fontsize=13, fontweight="bold").set_gid(EDGE_GID)
    return bool(marks)


def _draw_cell(ax, i: int, c: dict, runs: list[dict]) -> set[str]:
    """One cell's row of a stable-region panel: a marker per tried lr (its majority verdict), each seed's verdict
    small beneath a replicated lr, the band of the seeds' own frontiers, the edge marks, and a ring on a frontier
    that did not hold over the full budget. Returns what it drew ('seeds', 'spread', 'edge', 'not held')."""
    tried = frontier_of(runs).lrs
    drawn = set()
    for x in tried:
        ax.plot(x.lr, i, **marker_kw(x.verdict, ms=8))
    for lr, vs in seed_verdicts(runs).items():
        for k, v in enumerate(vs):
            ax.plot(lr, i, transform=_beneath(ax, k), zorder=3, gid=SEED_GID, **marker_kw(v, ms=3.5, mew=1.2))
        drawn.add("seeds")
    spread = _spread(c)
    if spread:
        lo, hi = spread
        low = lo or min(x.lr for x in tried) / 2 ** 0.5  # 0 (`none`: below the grid): left of them all
        ax.plot([low, hi], [i, i], zorder=1, gid=SPREAD_GID, **SPREAD_STYLE)
        drawn.add("spread")
    if c["frontier"] == FOUND and c["frontier_holds"] is False:
        ax.plot(c["max_stable_lr"], i, zorder=4, gid=NOT_HELD_GID, **NOT_HELD_STYLE)
        drawn.add("not held")
    if _edge_marks(ax, i, c):
        drawn.add("edge")
    return drawn


def _lr_text(v: float) -> str:
    return "none" if v == 0 else f"{v:g}"


def cell_text(c: dict) -> str:
    """A cell of the stability map: the frontier and, where its lrs were replicated, the seeds that trained there
    and the next lr with its seeds' commonest failure ('lr 0.4 (3/3)', '0.5657 collapses 2/3'); the seeds' own
    frontiers where they differ ('seeds 0.2828–0.4'; none: below the grid for a seed); the best accuracy, mean
    ± sd over seeds; 'NOT held (full run)' where the frontier did not train over the full budget."""
    state = c["frontier"]
    lines = [f"lr {frontier_text(c)}" if state == FOUND else "no lr trains" if state == NONE else "undecided"]
    replicated = (c.get("max_stable_lr_decided") if state == FOUND else c.get("first_unstable_decided")) or 0
    if state in (FOUND, NONE) and replicated > 1:
        if state == FOUND:
            lines[0] += f" ({c['max_stable_lr_trained']}/{c['max_stable_lr_decided']})"
        if c["first_unstable_lr"] is not None:  # in a `none` cell: the smallest lr tried, already failing
            verb = FAILS.get(c["first_unstable_verdict"], "fails")  # why it failed: stalls, collapses, diverges
            lines.append(f"{c['first_unstable_lr']:g} {verb} "
                         f"{c['first_unstable_failed']}/{c['first_unstable_decided']}")
    spread = _spread(c)
    if spread:
        lines.append(f"seeds {_lr_text(spread[0])}–{_lr_text(spread[1])}")
    if c["best_val_acc"] is not None:
        sd = c.get("best_val_acc_sd")
        lines.append(f"acc {c['best_val_acc']:.3f}" + (f" ± {sd:.3f}" if sd is not None else ""))
    if state == FOUND and c["frontier_holds"] is False:
        lines.append("NOT held (full run)")
    return "\n".join(lines)


def _heatmap(ax, g, norm, cmap):
    import numpy as np

    grid = np.full((len(g.rows), len(g.cols)), np.nan)
    for i, r in enumerate(g.rows):
        for j, col in enumerate(g.cols):
            c = g.at.get((r, col))
            if c and c["frontier"] == FOUND:
                grid[i, j] = c["max_stable_lr"]
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
    for i, r in enumerate(g.rows):
        for j, col in enumerate(g.cols):
            c = g.at.get((r, col))
            if not c:
                ax.text(j, i, "not run", ha="center", va="center", fontsize=9)
                continue
            if c["frontier"] == NONE:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="#b00020",
                                           lw=0))
            if c["frontier"] == FOUND and c["frontier_holds"] is False:  # a red frame: the frontier did not hold
                ax.add_patch(plt.Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, fill=False, edgecolor="#b00020", lw=3,
                                           gid=NOT_HELD_GID))
            found = c["frontier"] == FOUND
            light = norm is not None and found and norm(c["max_stable_lr"]) > 0.6
            ax.text(j, i, cell_text(c), ha="center", va="center", fontsize=10, linespacing=1.25,
                    color="black" if light or not found else "white")
    ax.set_xticks(range(len(g.cols)), g.cols)
    ax.set_yticks(range(len(g.rows)), [value_text(r) for r in g.rows])
    ax.set_ylabel(g.layout.row_title + (" (examples per step)" if g.layout.row_axis == "batch_size" else ""))
    ax.set_xlabel("AGC clipping threshold λ" if g.layout.col_axes == ("lambda",) else " ".join(g.layout.col_axes))
    if g.facet:
        ax.set_title(g.facet)
    return im


def _replicated(cells: list[dict]) -> bool:
    return any((c.get("max_stable_lr_decided") or 0) > 1 or (c.get("best_val_acc_seeds") or 0) > 1 or _spread(c)
               for c in cells)


def plot_stability_map(cells: pa.Table, title: str = ""):
    """Heatmap per facet (one without a third axis): colour = the largest lr that trains (log scale, one scale for
    all), text = it and the best accuracy (with replicated lrs: the seeds' agreement there, the seeds' own
    frontiers where they differ, the accuracy's mean ± sd); undecided cells grey, cells where no lr trains
    hatched."""
    from matplotlib.colors import LogNorm

    grids = grids_of(cells)
    found = [c["max_stable_lr"] for c in cells.to_pylist() if c["frontier"] == FOUND]
    norm = LogNorm(min(found), max(max(found), min(found) * 1.01)) if found else None
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
    ncols, nrows = max(len(g.cols) for g in grids), max(len(g.rows) for g in grids)
    replicated = _replicated(cells.to_pylist())
    width, height = (2.3, 1.45) if replicated else (2.0, 1.05)  # room for up to five lines a cell
    fig, axes = plt.subplots(1, len(grids), figsize=((width * ncols + 1.6) * len(grids) + 1.4,
                                                     height * nrows + 2.2), squeeze=False)
    im = None
    for ax, g in zip(axes[0], grids):
        im = _heatmap(ax, g, norm, cmap)
    say = ("colour: largest base lr that trains; text: it (k/n = seeds that trained there),\nthe next lr (how and "
           "in how many seeds it failed), the seeds' own frontiers, best val top-1 (mean ± sd over seeds)"
           if replicated else "colour: largest base lr that trains; text: it and the best val top-1")
    fig.suptitle(f"{title}\n{say}", fontsize=11)
    if norm is not None and im is not None:
        bar = fig.colorbar(im, ax=list(axes[0]), label="largest base lr that trains (per 256 examples)")
        ticks = sorted(set(found))  # every frontier the map holds, labelled: the scale reads without a guess
        bar.set_ticks(ticks if len(ticks) <= 8 else ticks[:: math.ceil(len(ticks) / 8)])
        bar.set_ticklabels([f"{t:g}" for t in bar.get_ticks()])
        bar.minorticks_off()
    else:
        fig.tight_layout()
    return fig


