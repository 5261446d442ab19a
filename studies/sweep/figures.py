"""The study's figures, drawn from its pyarrow tables (results, epochs, cells): reruns offline, no Ray. The
frontier itself is frontier.py; its words, findings.py."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402

from studies.sweep.findings import frontier_text  # noqa: E402
from studies.sweep.frontier import (  # noqa: E402
    FOUND,
    NONE,
    SCAN_PHASES,
    column_of,
    frontier,
    grid_of,
    lr_results,
    num,
    rows_of,
    stability_rows,
    start_loss,
    top_k_mean,
)

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


def plot_stable_region(results: pa.Table | list[dict], cells: pa.Table, title: str = ""):
    """Small multiples, one panel per column of the map: lr (log) × batch (log), a marker per tried lr (trained,
    stalled or diverged in the majority of seeds), the frontier as a line, undecided cells written out."""
    batches, cols, at = grid_of(cells)
    rows = rows_of(results)
    lrs_all = _grid_lrs(stability_rows(rows))
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols) + 0.8, 3.6), sharex=True, sharey=True,
                             squeeze=False)
    for ax, col in zip(axes[0], cols):
        front = []
        for b in batches:
            c = at.get((b, col))
            if not c:
                continue
            for x in frontier(stability_rows([r for r in rows if r["cell"] == c["cell"]])).lrs:
                marker, color = MARKERS[x.verdict]
                ax.plot(x.lr, b, marker, color=color, ms=7, mew=2, mfc=color if marker != "s" else "none")
            if c["frontier"] == FOUND:
                front.append((c["max_stable_lr"], b))
            else:
                ax.annotate(c["frontier"], (1.0, b), xycoords=("axes fraction", "data"), ha="right",
                            va="bottom", fontsize=8, color="#b00020" if c["frontier"] == NONE else "#555555")
        if front:
            ax.plot([f[0] for f in front], [f[1] for f in front], "-", color="black", lw=2)
        ax.set_title(col, fontsize=10)
        _lr_axis(ax, lrs_all)
        ax.set_yscale("log", base=2)
        ax.set_yticks(batches, [str(b) for b in batches])
        ax.grid(alpha=0.3)
        ax.set_xlabel("base lr (per 256)")
    axes[0][0].set_ylabel("batch size")
    handles = [plt.Line2D([], [], marker=m, ls="", color=c, mew=2, mfc=c if m != "s" else "none", label=v)
               for v, (m, c) in MARKERS.items()]
    handles.append(plt.Line2D([], [], ls="-", color="black", lw=2, label="frontier (largest lr that trains)"))
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=9, bbox_to_anchor=(0.5, -0.06))
    fig.suptitle(title or "stable region", fontsize=11)
    fig.tight_layout()
    return fig


def plot_stability_map(cells: pa.Table, title: str = ""):
    """Heatmap: colour = the largest lr that trains (log scale), text = it and the best accuracy; undecided cells
    grey, cells where no lr trains hatched."""
    import numpy as np
    from matplotlib.colors import LogNorm

    batches, cols, at = grid_of(cells)
    grid = np.full((len(batches), len(cols)), np.nan)
    for i, b in enumerate(batches):
        for j, col in enumerate(cols):
            c = at.get((b, col))
            if c and c["frontier"] == FOUND:
                grid[i, j] = c["max_stable_lr"]
    fig, ax = plt.subplots(figsize=(1.7 * len(cols) + 3, 0.9 * len(batches) + 2.2))
    finite = grid[np.isfinite(grid)]
    norm = LogNorm(finite.min(), max(finite.max(), finite.min() * 1.01)) if finite.size else None
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=plt.get_cmap("viridis").with_extremes(bad="#d9d9d9"),
                   norm=norm, aspect="auto")
    for i, b in enumerate(batches):
        for j, col in enumerate(cols):
            c = at.get((b, col))
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
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(batches)), [str(b) for b in batches])
    ax.set_ylabel("batch size")
    ax.set_title(f"{title}\ncolour: largest base lr that trains; text: it and the best val top-1", fontsize=10)
    if norm is not None:
        fig.colorbar(im, ax=ax, label="largest base lr that trains")
    fig.tight_layout()
    return fig


def _by_batch_and_column(rows: list[dict]) -> dict[int, dict[str, list[dict]]]:
    out: dict[int, dict[str, list[dict]]] = {}
    for r in rows:
        out.setdefault(int(r["batch_size"]), {}).setdefault(column_of(r)[1], []).append(r)
    return out


def _panels(n: int, ylabel: str):
    fig, axes = plt.subplots(1, max(1, n), figsize=(3.6 * max(1, n) + 0.6, 3.4), sharey=True, squeeze=False)
    axes[0][0].set_ylabel(ylabel)
    return fig, axes[0]


def _label_panel(ax, batch: int, lrs) -> None:
    _lr_axis(ax, lrs)
    ax.set_title(f"batch {batch}", fontsize=10)
    ax.set_xlabel("base lr (per 256)")
    ax.grid(alpha=0.3)


def _legend_and_fit(fig, axes):
    if axes[-1].get_legend_handles_labels()[0]:
        axes[-1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_lr_loss(results: pa.Table | list[dict]):
    """Final training loss vs lr (Wortsman et al. 2023), a panel per batch size, a line per column of the map,
    from the scan runs; a diverged lr is drawn at the start loss (✕), the start as a dotted line."""
    rows = stability_rows(rows_of(results))
    groups = _by_batch_and_column(rows)
    fig, axes = _panels(len(groups), "final train loss (diverged: start)")
    for ax, b in zip(axes, sorted(groups)):
        for col in sorted(groups[b], key=lambda c: column_of(groups[b][c][0])[0]):
            xs = lr_results(groups[b][col])
            line, = ax.plot([x.lr for x in xs], [x.loss for x in xs], "o-", ms=4, label=col)
            bad = [x for x in xs if x.verdict == "diverged"]
            ax.plot([x.lr for x in bad], [x.loss for x in bad], "x", color=line.get_color(), ms=9, mew=2)
        start = start_loss([r for rs in groups[b].values() for r in rs])
        if math.isfinite(start):
            ax.axhline(start, ls=":", color="gray", lw=1)
        _label_panel(ax, b, _grid_lrs([r for r in rows if r["batch_size"] == b]))
    return _legend_and_fit(fig, axes)


def plot_lr_accuracy(results: pa.Table | list[dict], best_k: int | None = None):
    """Accuracy vs lr of the full runs, a panel per batch size, a line per column; diverged full runs at 0 (✕)."""
    rows = [r for r in rows_of(results) if r.get("phase") not in SCAN_PHASES]
    groups = _by_batch_and_column(rows)
    fig, axes = _panels(len(groups), "best val top-1")
    for ax, b in zip(axes, sorted(groups)):
        for col in sorted(groups[b], key=lambda c: column_of(groups[b][c][0])[0]):
            pts: dict[float, list[float]] = {}
            for r in groups[b][col]:
                pts.setdefault(float(r["base_lr"]), []).append(
                    num(r.get("best_val_acc")) if r["status"] == "completed" else 0.0)
            lrs = sorted(pts)
            line, = ax.plot(lrs, [top_k_mean(pts[lr], best_k) for lr in lrs], "o-", label=col)
            bad = [lr for lr in lrs if all(v == 0.0 for v in pts[lr])]
            ax.plot(bad, [0.0] * len(bad), "x", color=line.get_color(), ms=9, mew=2)
        _label_panel(ax, b, {float(r["base_lr"]) for r in rows if r["batch_size"] == b})
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
