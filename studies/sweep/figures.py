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
    DIVERGED,
    FOUND,
    NONE,
    SCAN_PHASES,
    frontier,
    lr_results,
    num,
    rows_of,
    run_verdict,
    stability_rows,
    start_loss,
    top_k_mean,
)
from studies.sweep.layout import Layout, grids_of, sort_key, value_text  # noqa: E402

# A marker per verdict of an lr (the majority of its seeds; no majority: the commoner failure).
MARKERS = {"trained": ("o", "#1a9850"), "stalled": ("s", "#8c8c8c"), "diverged": ("x", "#d73027")}
# Replication (issue 30): where an lr has several seeds, each seed's verdict is drawn small in a column beneath
# the lr's majority marker, seed order downwards (a column, not a row: a refinement's midpoint is only √2 from its
# neighbour); the frontier's spread over seeds is a band behind the row. Artists are tagged (gid) for the tests:
# a seed's marker has its lr and row as data, its place beneath them an offset in points.
SEED_GID, SPREAD_GID, ACC_SPREAD_GID = "seed", "frontier spread", "accuracy spread"
SEED_TOP, SEED_STEP = 9.0, 4.8  # points beneath the lr's marker of the first seed, and between two seeds
SPREAD_STYLE = {"color": "#3b6fb6", "alpha": 0.35, "lw": 8, "solid_capstyle": "butt"}
SEED_HANDLE = {"marker": "o", "ls": "", "color": "#555555", "ms": 3.5, "alpha": 0.5, "label": "one seed"}


def close(fig) -> None:
    plt.close(fig)


# ---- figures ----

def _grid_lrs(rows: list[dict]) -> set[float]:
    """The design's lrs, for tick labels: a refinement's midpoint is drawn, not labelled (it would crowd them),
    nor is it when replicated (a replicate reruns an lr the scan or the refinement tried)."""
    return {float(r["base_lr"]) for r in rows if r.get("phase") not in ("refine", "replicate")}


def _by_lr(rows: list[dict]) -> dict[float, list[dict]]:
    """Runs per lr, in seed order."""
    out: dict[float, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (float(r["base_lr"]), int(r.get("seed") or 0))):
        out.setdefault(float(r["base_lr"]), []).append(r)
    return out


def _replicated_runs(rows: list[dict]) -> list[dict]:
    """The decided runs of the lrs that have several (the replicated lrs), in seed order per lr."""
    out = []
    for rs in _by_lr(rows).values():
        decided = [r for r in rs if run_verdict(r) is not None]
        out += decided if len(decided) > 1 else []
    return out


def seed_verdicts(rows: list[dict]) -> dict[float, list[str]]:
    """Per lr that has several decided runs (a replicated lr): each seed's verdict, in seed order."""
    out: dict[float, list[str]] = {}
    for r in _replicated_runs(rows):
        out.setdefault(float(r["base_lr"]), []).append(run_verdict(r))
    return out


def _beneath(ax, k: int):
    """Data coordinates shifted down to the k-th seed's place beneath a marker (a fixed distance in points, whatever
    the axis's scale)."""
    from matplotlib.transforms import offset_copy

    return offset_copy(ax.transData, fig=ax.figure, y=-(SEED_TOP + SEED_STEP * k), units="points")


def _spread(c: dict) -> tuple[float, float] | None:
    """The range of the seeds' own frontiers of a cell (0: every lr diverged for that seed); None when there is
    none to draw (one seed, or every seed agrees)."""
    lo, hi = c.get("max_stable_lr_min"), c.get("max_stable_lr_max")
    if lo is None or hi is None or lo == hi or len(c.get("seed_list") or []) < 2:
        return None
    return lo, hi


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
    majority of seeds), the frontier as a line, undecided cells written out. Where an lr has several seeds, each
    seed's verdict is drawn small beneath it; where the seeds' own frontiers differ, their range is a band across
    the row."""
    grids = grids_of(cells)
    rows = rows_of(results)
    lrs_all = _grid_lrs(stability_rows(rows))
    ncols = max(len(g.cols) for g in grids)
    fig, axes = plt.subplots(len(grids), ncols, figsize=(3.2 * ncols + 0.8, 3.4 * len(grids) + 0.2), sharex=True,
                             squeeze=False)
    seeds_drawn = spread_drawn = False
    for axrow, g in zip(axes, grids):
        for ax in axrow[len(g.cols):]:
            ax.set_visible(False)
        for ax, col in zip(axrow, g.cols):
            front = []
            for i, r in enumerate(g.rows):
                c = g.at.get((r, col))
                if not c:
                    continue
                runs = stability_rows([row for row in rows if row["cell"] == c["cell"]])
                seeds, spread = _draw_cell(ax, i, c, runs)
                seeds_drawn, spread_drawn = seeds_drawn or seeds, spread_drawn or spread
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
    majority = " (majority of seeds)" if seeds_drawn else ""
    handles = [plt.Line2D([], [], marker=m, ls="", color=c, mew=2, mfc=c if m != "s" else "none",
                          label=v + majority) for v, (m, c) in MARKERS.items()]
    handles.append(plt.Line2D([], [], ls="-", color="black", lw=2, label="frontier (largest lr that trains)"))
    if seeds_drawn:
        handles.append(plt.Line2D([], [], marker="o", ls="", color="#555555", ms=3.5,
                                  label="each seed's verdict (beneath its lr)"))
    if spread_drawn:
        handles.append(plt.Line2D([], [], label="frontier range over seeds", **SPREAD_STYLE))
    ncol = 4 if len(handles) <= 4 else 3
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=9,
               bbox_to_anchor=(0.5, -0.06 * math.ceil(len(handles) / ncol)))
    fig.suptitle(title or "stable region", fontsize=11)
    fig.tight_layout()
    return fig


def _draw_cell(ax, i: int, c: dict, runs: list[dict]) -> tuple[bool, bool]:
    """One cell's row of a stable-region panel: a marker per tried lr (its majority verdict), each seed's verdict
    small beneath a replicated lr, and the band of the seeds' own frontiers. Returns (seeds drawn, band drawn)."""
    tried = frontier(runs).lrs
    for x in tried:
        marker, color = MARKERS[x.verdict]
        ax.plot(x.lr, i, marker, color=color, ms=7, mew=2, mfc=color if marker != "s" else "none")
    seeds = False
    for lr, vs in seed_verdicts(runs).items():
        for k, v in enumerate(vs):
            marker, color = MARKERS[v]
            ax.plot(lr, i, marker, color=color, ms=3.5, mew=1.2, mfc=color if marker != "s" else "none",
                    transform=_beneath(ax, k), zorder=3, gid=SEED_GID)
        seeds = True
    spread = _spread(c)
    if spread:
        lo, hi = spread
        low = lo or min(x.lr for x in tried) / 2 ** 0.5  # 0 (every lr diverged): left of them all
        ax.plot([low, hi], [i, i], zorder=1, gid=SPREAD_GID, **SPREAD_STYLE)
    return seeds, bool(spread)


def _lr_text(v: float) -> str:
    return "none" if v == 0 else f"{v:g}"


def cell_text(c: dict) -> str:
    """A cell of the stability map: the frontier and, where its lrs were replicated, the seeds that trained there
    and that failed at the next lr ('lr 0.4 (3/3)', '0.5657 fails 2/3'); the seeds' own frontiers where they
    differ ('seeds 0.2828–0.4'; none: every lr diverged for a seed); the best accuracy, mean ± sd over seeds."""
    state = c["frontier"]
    lines = [f"lr {frontier_text(c)}" if state == FOUND else "no lr trains" if state == NONE else "undecided"]
    if state == FOUND and (c.get("max_stable_lr_decided") or 0) > 1:
        lines[0] += f" ({c['max_stable_lr_trained']}/{c['max_stable_lr_decided']})"
        if c["first_unstable_lr"] is not None:
            lines.append(f"{c['first_unstable_lr']:g} fails {c['first_unstable_failed']}/{c['first_unstable_decided']}")
    spread = _spread(c)
    if spread:
        lines.append(f"seeds {_lr_text(spread[0])}–{_lr_text(spread[1])}")
    if c["best_val_acc"] is not None:
        sd = c.get("best_val_acc_sd")
        lines.append(f"acc {c['best_val_acc']:.3f}" + (f" ± {sd:.3f}" if sd is not None else ""))
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
            found = c["frontier"] == FOUND
            light = norm is not None and found and norm(c["max_stable_lr"]) > 0.6
            ax.text(j, i, cell_text(c), ha="center", va="center", fontsize=9, linespacing=1.25,
                    color="black" if light or not found else "white")
    ax.set_xticks(range(len(g.cols)), g.cols)
    ax.set_yticks(range(len(g.rows)), [value_text(r) for r in g.rows])
    ax.set_ylabel(g.layout.row_title)
    if g.facet:
        ax.set_title(g.facet, fontsize=10)
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
    width, height = (2.0, 1.25) if replicated else (1.7, 0.9)  # room for up to four lines a cell
    fig, axes = plt.subplots(1, len(grids), figsize=((width * ncols + 1.6) * len(grids) + 1.4,
                                                     height * nrows + 2.2), squeeze=False)
    im = None
    for ax, g in zip(axes[0], grids):
        im = _heatmap(ax, g, norm, cmap)
    say = ("colour: largest base lr that trains; text: it (k/n = seeds that trained there),\nthe next lr (seeds that "
           "failed there), the seeds' own frontiers, best val top-1 (mean ± sd over seeds)" if replicated else
           "colour: largest base lr that trains; text: it and the best val top-1")
    fig.suptitle(f"{title}\n{say}", fontsize=10)
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


def _legend_and_fit(fig, axes, extra: list | None = None):
    handles, _ = axes[-1].get_legend_handles_labels()
    if handles:
        axes[-1].legend(handles=handles + (extra or []), fontsize=8)
    fig.tight_layout()
    return fig


def _seed_points(ax, lrs: list[float], values: list[float], bad: list[bool], color) -> None:
    """Each seed's value at a replicated lr: small, translucent (✕: the seed diverged)."""
    for keep, marker in ((False, "o"), (True, "x")):
        pts = [(x, y) for x, y, b in zip(lrs, values, bad) if b == keep]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, ls="", color=color, ms=3.5, mew=1.2,
                    alpha=0.5, gid=SEED_GID)


def plot_lr_loss(results: pa.Table | list[dict]):
    """Final training loss vs lr (Wortsman et al. 2023), a panel per row of the map (batch size, or augmentation),
    a line per column (and facet), from the scan runs; a diverged lr is drawn at the start loss (✕), the start as a
    dotted line. Where an lr has several seeds the line is their mean and each seed is a small point."""
    rows = stability_rows(rows_of(results))
    lay, groups = _by_row_and_line(rows)
    fig, axes = _panels(len(groups), "final train loss (diverged: start)")
    seeds_drawn = False
    for ax, r in zip(axes, groups):
        for line_label, rs in groups[r].items():
            xs = lr_results(rs)
            line, = ax.plot([x.lr for x in xs], [x.loss for x in xs], "o-", ms=4, label=line_label)
            bad = [x for x in xs if x.verdict == "diverged"]
            ax.plot([x.lr for x in bad], [x.loss for x in bad], "x", color=line.get_color(), ms=9, mew=2)
            seeds = _replicated_runs(rs)
            if seeds:  # each seed's loss as the line's mean counts it: min(final, start), a diverged run at start
                start, div = start_loss(rs), [run_verdict(x) == DIVERGED for x in seeds]
                _seed_points(ax, [float(x["base_lr"]) for x in seeds],
                             [start if d else min(num(x.get("final_train_loss")), start) for x, d in zip(seeds, div)],
                             div, line.get_color())
                seeds_drawn = True
        start = start_loss([x for rs in groups[r].values() for x in rs])
        if math.isfinite(start):
            ax.axhline(start, ls=":", color="gray", lw=1)
        _label_panel(ax, lay, r, _grid_lrs([x for rs in groups[r].values() for x in rs]))
    return _legend_and_fit(fig, axes, [plt.Line2D([], [], **SEED_HANDLE)] if seeds_drawn else None)


def plot_lr_accuracy(results: pa.Table | list[dict], best_k: int | None = None):
    """Accuracy vs lr of the full runs, a panel per row of the map, a line per column (and facet); diverged full
    runs at 0 (✕). Where an lr has several seeds the line is their (best-k) mean, each seed a small point and the
    range over seeds a bar."""
    rows = [r for r in rows_of(results) if r.get("phase") not in SCAN_PHASES]
    lay, groups = _by_row_and_line(rows)
    fig, axes = _panels(len(groups), "best val top-1")
    seeds_drawn = False
    for ax, r in zip(axes, groups):
        for line_label, rs in groups[r].items():
            pts: dict[float, list[float]] = {}
            for x in rs:  # a diverged run scores 0; a failed or stopped one says nothing
                if x["status"] in ("completed", "diverged"):
                    pts.setdefault(float(x["base_lr"]), []).append(
                        num(x.get("best_val_acc")) if x["status"] == "completed" else 0.0)
            lrs = sorted(pts)
            line, = ax.plot(lrs, [top_k_mean(pts[lr], best_k) for lr in lrs], "o-", label=line_label)
            bad = [lr for lr in lrs if all(v == 0.0 for v in pts[lr])]
            ax.plot(bad, [0.0] * len(bad), "x", color=line.get_color(), ms=9, mew=2)
            many = {lr: [v for v in pts[lr] if not math.isnan(v)] for lr in lrs}
            many = {lr: vs for lr, vs in many.items() if len(vs) > 1}
            if many:
                xs = [lr for lr, vs in many.items() for _ in vs]
                ys = [v for vs in many.values() for v in vs]
                _seed_points(ax, xs, ys, [v == 0.0 for v in ys], line.get_color())
                bars = ax.vlines(list(many), [min(vs) for vs in many.values()], [max(vs) for vs in many.values()],
                                 color=line.get_color(), lw=1.2, alpha=0.6)
                bars.set_gid(ACC_SPREAD_GID)
                seeds_drawn = True
        _label_panel(ax, lay, r, {float(x["base_lr"]) for rs in groups[r].values() for x in rs})
    extra = [plt.Line2D([], [], **SEED_HANDLE),
             plt.Line2D([], [], color="#555555", lw=1.2, alpha=0.6, label="range over seeds")] if seeds_drawn else None
    return _legend_and_fit(fig, axes, extra)


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
