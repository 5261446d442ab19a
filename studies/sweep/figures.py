"""The study's figures, drawn from its pyarrow tables (results, epochs, cells): reruns offline, no Ray. The
frontier itself is frontier.py; its words, findings.py."""
from __future__ import annotations

import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402

from studies.sweep.findings import frontier_text  # noqa: E402
from studies.sweep.frontier import (  # noqa: E402
    FOUND,
    NONE,
    SCAN_PHASES,
    frontier,
    lr_results,
    num,
    rows_of,
    stability_rows,
    start_loss,
    top_k_mean,
)
from studies.sweep.layout import Layout, grids_of, sort_key, value_text  # noqa: E402

# A marker per verdict of an lr (the majority of its seeds; no majority: the commoner failure).
MARKERS = {"trained": ("o", "#1a9850"), "stalled": ("s", "#8c8c8c"), "diverged": ("x", "#d73027")}


def close(fig) -> None:
    plt.close(fig)


# ---- figures ----

def _grid_lrs(rows: list[dict]) -> set[float]:
    """The design's lrs, for tick labels: a refinement's midpoint is drawn, not labelled (it would crowd them)."""
    return {float(r["base_lr"]) for r in rows if r.get("phase") != "refine"}


def _lr_axis(ax, lrs) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(lrs), [f"{lr:g}" for lr in sorted(lrs)], fontsize=7)
    ax.minorticks_off()


def _row_axis(ax, g) -> None:
    """The map's rows, evenly spaced (batch sizes a factor apart read as a log axis; augmentation 0 fits)."""
    ax.set_yticks(range(len(g.rows)), [value_text(r) for r in g.rows])
    ax.set_ylim(-0.5, len(g.rows) - 0.5)


def plot_stable_region(results: pa.Table | list[dict], cells: pa.Table, title: str = ""):
    """Small multiples, one panel per column of the map (a row of panels per facet, a third axis's value): lr (log)
    × the map's rows (batch size, or augmentation), a marker per tried lr (trained, stalled or diverged in the
    majority of seeds), the frontier as a line, undecided cells written out."""
    grids = grids_of(cells)
    rows = rows_of(results)
    lrs_all = _grid_lrs(stability_rows(rows))
    ncols = max(len(g.cols) for g in grids)
    fig, axes = plt.subplots(len(grids), ncols, figsize=(3.2 * ncols + 0.8, 3.4 * len(grids) + 0.2), sharex=True,
                             squeeze=False)
    for axrow, g in zip(axes, grids):
        for ax in axrow[len(g.cols):]:
            ax.set_visible(False)
        for ax, col in zip(axrow, g.cols):
            front = []
            for i, r in enumerate(g.rows):
                c = g.at.get((r, col))
                if not c:
                    continue
                for x in frontier(stability_rows([row for row in rows if row["cell"] == c["cell"]])).lrs:
                    marker, color = MARKERS[x.verdict]
                    ax.plot(x.lr, i, marker, color=color, ms=7, mew=2, mfc=color if marker != "s" else "none")
                if c["frontier"] == FOUND:
                    front.append((c["max_stable_lr"], i))
                else:
                    ax.annotate(c["frontier"], (1.0, i), xycoords=("axes fraction", "data"), ha="right",
                                va="bottom", fontsize=8, color="#b00020" if c["frontier"] == NONE else "#555555")
            if front:
                ax.plot([f[0] for f in front], [f[1] for f in front], "-", color="black", lw=2)
            ax.set_title(f"{g.facet}\n{col}" if g.facet else col, fontsize=10)
            _lr_axis(ax, lrs_all)
            _row_axis(ax, g)
            ax.grid(alpha=0.3)
            ax.set_xlabel("base lr (per 256)")
        axrow[0].set_ylabel(g.layout.row_title)
    handles = [plt.Line2D([], [], marker=m, ls="", color=c, mew=2, mfc=c if m != "s" else "none", label=v)
               for v, (m, c) in MARKERS.items()]
    handles.append(plt.Line2D([], [], ls="-", color="black", lw=2, label="frontier (largest lr that trains)"))
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=9, bbox_to_anchor=(0.5, -0.06))
    fig.suptitle(title or "stable region", fontsize=11)
    fig.tight_layout()
    return fig


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
            acc = "" if c["best_val_acc"] is None else f"\nacc {c['best_val_acc']:.3f}"
            if c["frontier"] == NONE:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="#b00020",
                                           lw=0))
            found = c["frontier"] == FOUND
            text = f"lr {frontier_text(c)}" if found else "no lr trains" if c["frontier"] == NONE else "undecided"
            light = norm is not None and found and norm(c["max_stable_lr"]) > 0.6
            ax.text(j, i, text + acc, ha="center", va="center", fontsize=9,
                    color="black" if light or not found else "white")
    ax.set_xticks(range(len(g.cols)), g.cols)
    ax.set_yticks(range(len(g.rows)), [value_text(r) for r in g.rows])
    ax.set_ylabel(g.layout.row_title)
    if g.facet:
        ax.set_title(g.facet, fontsize=10)
    return im


def plot_stability_map(cells: pa.Table, title: str = ""):
    """Heatmap per facet (one without a third axis): colour = the largest lr that trains (log scale, one scale for
    all), text = it and the best accuracy; undecided cells grey, cells where no lr trains hatched."""
    from matplotlib.colors import LogNorm

    grids = grids_of(cells)
    found = [c["max_stable_lr"] for c in cells.to_pylist() if c["frontier"] == FOUND]
    norm = LogNorm(min(found), max(max(found), min(found) * 1.01)) if found else None
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
    ncols, nrows = max(len(g.cols) for g in grids), max(len(g.rows) for g in grids)
    fig, axes = plt.subplots(1, len(grids), figsize=((1.7 * ncols + 1.6) * len(grids) + 1.4, 0.9 * nrows + 2.2),
                             squeeze=False)
    im = None
    for ax, g in zip(axes[0], grids):
        im = _heatmap(ax, g, norm, cmap)
    fig.suptitle(f"{title}\ncolour: largest base lr that trains; text: it and the best val top-1", fontsize=10)
    if norm is not None and im is not None:
        fig.colorbar(im, ax=list(axes[0]), label="largest base lr that trains")
    else:
        fig.tight_layout()
    return fig


def _by_row_and_line(rows: list[dict]) -> tuple[Layout, dict[Any, dict[str, list[dict]]]]:
    """Results rows by the map's row (a panel each) and by line (column, facet first), in map order."""
    lay = Layout.of(rows)
    out: dict[Any, dict[str, list[dict]]] = {}
    for r in sorted(rows, key=lay.order):
        line = " ".join(filter(None, (lay.facet(r), lay.col(r))))
        out.setdefault(lay.row(r), {}).setdefault(line, []).append(r)
    return lay, {r: out[r] for r in sorted(out, key=sort_key)}


def _panels(n: int, ylabel: str):
    fig, axes = plt.subplots(1, max(1, n), figsize=(3.6 * max(1, n) + 0.6, 3.4), sharey=True, squeeze=False)
    axes[0][0].set_ylabel(ylabel)
    return fig, axes[0]


def _label_panel(ax, lay: Layout, row, lrs) -> None:
    _lr_axis(ax, lrs)
    ax.set_title(f"{lay.row_name} {value_text(row)}", fontsize=10)
    ax.set_xlabel("base lr (per 256)")
    ax.grid(alpha=0.3)


def _legend_and_fit(fig, axes):
    if axes[-1].get_legend_handles_labels()[0]:
        axes[-1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_lr_loss(results: pa.Table | list[dict]):
    """Final training loss vs lr (Wortsman et al. 2023), a panel per row of the map (batch size, or augmentation),
    a line per column (and facet), from the scan runs; a diverged lr is drawn at the start loss (✕), the start as a
    dotted line."""
    rows = stability_rows(rows_of(results))
    lay, groups = _by_row_and_line(rows)
    fig, axes = _panels(len(groups), "final train loss (diverged: start)")
    for ax, r in zip(axes, groups):
        for line_label, rs in groups[r].items():
            xs = lr_results(rs)
            line, = ax.plot([x.lr for x in xs], [x.loss for x in xs], "o-", ms=4, label=line_label)
            bad = [x for x in xs if x.verdict == "diverged"]
            ax.plot([x.lr for x in bad], [x.loss for x in bad], "x", color=line.get_color(), ms=9, mew=2)
        start = start_loss([x for rs in groups[r].values() for x in rs])
        if math.isfinite(start):
            ax.axhline(start, ls=":", color="gray", lw=1)
        _label_panel(ax, lay, r, _grid_lrs([x for rs in groups[r].values() for x in rs]))
    return _legend_and_fit(fig, axes)


def plot_lr_accuracy(results: pa.Table | list[dict], best_k: int | None = None):
    """Accuracy vs lr of the full runs, a panel per row of the map, a line per column (and facet); diverged full
    runs at 0 (✕)."""
    rows = [r for r in rows_of(results) if r.get("phase") not in SCAN_PHASES]
    lay, groups = _by_row_and_line(rows)
    fig, axes = _panels(len(groups), "best val top-1")
    for ax, r in zip(axes, groups):
        for line_label, rs in groups[r].items():
            pts: dict[float, list[float]] = {}
            for x in rs:
                pts.setdefault(float(x["base_lr"]), []).append(
                    num(x.get("best_val_acc")) if x["status"] == "completed" else 0.0)
            lrs = sorted(pts)
            line, = ax.plot(lrs, [top_k_mean(pts[lr], best_k) for lr in lrs], "o-", label=line_label)
            bad = [lr for lr in lrs if all(v == 0.0 for v in pts[lr])]
            ax.plot(bad, [0.0] * len(bad), "x", color=line.get_color(), ms=9, mew=2)
        _label_panel(ax, lay, r, {float(x["base_lr"]) for rs in groups[r].values() for x in rs})
    return _legend_and_fit(fig, axes)


def plot_batch_scaling(curves: dict[str, list[dict]], target: float, gns: float | None = None):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for v, pts in curves.items():
        bs = [p["batch_size"] for p in pts]
        axes[0].plot(bs, [p["acc"] for p in pts], "o-", label=v)
        reached = [(p["batch_size"], p["steps"]) for p in pts if p["steps"] is not None]
        if reached:
            axes[1].plot([r[0] for r in reached], [r[1] for r in reached], "o-", label=v)
        for p in pts:
            if p["diverged"] == p["trials"]:
                axes[0].plot([p["batch_size"]], [0], "x", color="#b00020", ms=10)
    for a in axes:
        a.set_xscale("log", base=2)
        a.grid(alpha=0.3)
        if gns and math.isfinite(gns):
            a.axvline(gns, ls="--", color="gray", label=f"gradient noise scale ≈ {gns:.0f}")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    axes[0].set(xlabel="batch size", ylabel="best val top-1", title="accuracy vs batch size (✕ = all diverged)")
    axes[1].set_yscale("log", base=2)
    axes[1].set(xlabel="batch size", ylabel=f"steps to val acc ≥ {target:g}", title="steps to target")
    fig.tight_layout()
    return fig
