"""The study's curves, drawn from its pyarrow tables: final loss vs lr (`lr_loss.png`), accuracy vs lr
(`lr_accuracy.png`), the frontier's peak lr vs the batch (`frontier_scaling.png`), and batch_scaling.py's
accuracy and steps vs the batch. A panel per row of the map (the smallest first), a line per column. Reruns
offline, no Ray; the shared style is figstyle.py's."""
from __future__ import annotations

import math
from typing import Any

import matplotlib.pyplot as plt
import pyarrow as pa
from matplotlib.transforms import offset_copy

from studies.sweep.figstyle import (
    ACC_SPREAD_GID,
    CHANCE_GID,
    DIVERGED_GID,
    EDGE_GID,
    FIT_GID,
    LINEAR_GID,
    LR_LABEL,
    MCCANDLISH_GID,
    SEED_GID,
    SEED_HANDLE,
    THRESHOLD_GID,
    classes_at,
    grid_lrs,
    lr_axis,
    replicated_runs,
    trained_threshold,
)
from studies.sweep.frontier import (
    DIVERGED,
    SCAN_PHASES,
    lr_results,
    num,
    rows_of,
    run_verdict,
    stability_rows,
    start_loss,
    top_k_mean,
)
from studies.sweep.layout import Layout, sort_key, value_text
from studies.sweep.scaling import LOWER, fit_alpha, laws, mccandlish_eps_max, noise_scale, num2, seeds_text

DIVERGED_STEP = 6.0  # points between two lines' diverged ✕s above the start loss, so each λ's show


def _by_row_and_line(rows: list[dict]) -> tuple[Layout, dict[Any, dict[str, list[dict]]]]:
    """Results rows by the map's row (a panel each) and by line (column, facet first), in map order."""
    lay = Layout.of(rows)
    out: dict[Any, dict[str, list[dict]]] = {}
    for r in sorted(rows, key=lay.order):
        line = " ".join(filter(None, (lay.facet(r), lay.col(r))))
        out.setdefault(lay.row(r), {}).setdefault(line, []).append(r)
    return lay, {r: out[r] for r in sorted(out, key=sort_key)}


def _panels(n: int, ylabel: str, title: str):
    fig, axes = plt.subplots(1, max(1, n), figsize=(3.6 * max(1, n) + 0.8, 4.2), sharey=True, squeeze=False)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title)
    return fig, axes[0]


def _label_panel(ax, lay: Layout, row, lrs) -> None:
    lr_axis(ax, lrs)
    ax.set_title(f"{lay.row_name} {value_text(row)}")
    ax.set_xlabel(LR_LABEL)
    ax.grid(alpha=0.3)


def _legend_and_fit(fig, axes, extra: list | None = None):
    """One legend right of the last panel for every panel's lines (a panel may lack a column's line)."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    if seen:
        axes[-1].legend(handles=[*seen.values(), *(extra or [])], fontsize=9, loc="upper left",
                        bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def _colors(groups: dict) -> dict[str, str]:
    """A colour per line (column, facet first), the same in every panel."""
    labels = dict.fromkeys(label for lines in groups.values() for label in lines)
    return {label: f"C{i % 10}" for i, label in enumerate(labels)}


def _room_above(ax, y: float, points: float) -> None:
    """Raise the panel's top so that `points` above `y` stay inside it (the diverged ✕s' steps)."""
    lo, hi = ax.get_ylim()
    height = ax.get_window_extent().height * 72 / ax.figure.dpi
    need = (hi - lo) * points / max(height - points, 1.0)
    if y + need > hi:
        ax.set_ylim(lo, y + need)


def _level(ax, y: float, gid: str, **style) -> None:
    """A horizontal reference (chance, the trained threshold), tagged; its legend entry is added once per figure."""
    ax.axhline(y, gid=gid, label="_" + gid, **style)


CHANCE_STYLE = {"ls": ":", "color": "#555555", "lw": 1.4}
THRESHOLD_STYLE = {"ls": "--", "color": "#1a9850", "lw": 1.2}


def _seed_points(ax, lrs: list[float], values: list[float], bad: list[bool], color) -> None:
    """Each seed's value at a replicated lr: small, translucent (✕: the seed diverged)."""
    for keep, marker in ((False, "o"), (True, "x")):
        pts = [(x, y) for x, y, b in zip(lrs, values, bad) if b == keep]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, ls="", color=color, ms=3.5, mew=1.2,
                    alpha=0.5, gid=SEED_GID)


def plot_lr_loss(results: pa.Table | list[dict]):
    """Final training loss vs lr (Wortsman et al. 2023), a panel per row of the map (batch size, or augmentation),
    a line per column (and facet), from the scan runs; a diverged lr counts at the start loss in the line and is
    drawn as a ✕ just above it, each line's a step higher so that every λ's show. The start (at initialisation:
    chance, ln K) is dotted, the "trained" threshold (5 % below it) dashed. Where an lr has several seeds the line
    is their mean and each seed is a small point."""
    rows = stability_rows(rows_of(results))
    lay, groups = _by_row_and_line(rows)
    fig, axes = _panels(len(groups), "final train loss (nats)", "final training loss vs learning rate (scan runs)")
    seeds_drawn, colors = False, _colors(groups)
    for ax, r in zip(axes, groups):
        for k, (line_label, rs) in enumerate(groups[r].items()):
            xs = lr_results(rs)
            line, = ax.plot([x.lr for x in xs], [x.loss for x in xs], "o-", ms=5, label=line_label,
                            color=colors[line_label])
            bad = [x for x in xs if x.verdict == DIVERGED]
            if bad:
                up = offset_copy(ax.transData, fig=fig, y=DIVERGED_STEP * (k + 1), units="points")
                ax.plot([x.lr for x in bad], [x.loss for x in bad], "x", color=line.get_color(), ms=9, mew=2,
                        transform=up, gid=DIVERGED_GID)
            seeds = replicated_runs(rs)
            if seeds:  # each seed's loss as the line's mean counts it: min(final, start), a diverged run at start
                start, div = start_loss(rs), [run_verdict(x) == DIVERGED for x in seeds]
                _seed_points(ax, [float(x["base_lr"]) for x in seeds],
                             [start if d else min(num(x.get("final_train_loss")), start) for x, d in zip(seeds, div)],
                             div, line.get_color())
                seeds_drawn = True
        start = start_loss([x for rs in groups[r].values() for x in rs])
        if math.isfinite(start):
            _level(ax, start, CHANCE_GID, **CHANCE_STYLE)
            _level(ax, trained_threshold(start), THRESHOLD_GID, **THRESHOLD_STYLE)
        _label_panel(ax, lay, r, grid_lrs([x for rs in groups[r].values() for x in rs]))
    if math.isfinite(start_loss(rows)):
        _room_above(axes[0], start_loss(rows), DIVERGED_STEP * (max(len(g) for g in groups.values()) + 2))
    k = classes_at(start_loss(rows))
    extra = [plt.Line2D([], [], label="start" + (f" ≈ chance (ln {k})" if k else ""), **CHANCE_STYLE),
             plt.Line2D([], [], label="trained below (start − 5 %)", **THRESHOLD_STYLE),
             plt.Line2D([], [], marker="x", ls="", color="#555555", ms=8, mew=2, label="diverged (at the start)")]
    return _legend_and_fit(fig, axes, extra + ([plt.Line2D([], [], **SEED_HANDLE)] if seeds_drawn else []))


def plot_lr_accuracy(results: pa.Table | list[dict], best_k: int | None = None):
    """Accuracy vs lr of the full runs, a panel per row of the map, a line per column (and facet; markers alone
    through fewer than three lrs); diverged full runs at 0 (✕); chance (1/K, K from the start loss) dotted. Where
    an lr has several seeds the line is their (best-k) mean, each seed a small point and the range a bar."""
    rows = [r for r in rows_of(results) if r.get("phase") not in SCAN_PHASES]
    lay, groups = _by_row_and_line(rows)
    fig, axes = _panels(len(groups), "best val top-1 (fraction correct)", "validation accuracy vs learning rate "
                        "(full runs)")
    seeds_drawn, colors = False, _colors(groups)
    for ax, r in zip(axes, groups):
        for line_label, rs in groups[r].items():
            pts: dict[float, list[float]] = {}
            for x in rs:  # a diverged run scores 0; a failed or stopped one says nothing
                if x["status"] in ("completed", "diverged"):
                    pts.setdefault(float(x["base_lr"]), []).append(
                        num(x.get("best_val_acc")) if x["status"] == "completed" else 0.0)
            lrs = sorted(pts)
            line, = ax.plot(lrs, [top_k_mean(pts[lr], best_k) for lr in lrs], marker="o", ms=6,
                            ls="-" if len(lrs) >= 3 else "", label=line_label, color=colors[line_label])
            bad = [lr for lr in lrs if all(v == 0.0 for v in pts[lr])]
            ax.plot(bad, [0.0] * len(bad), "x", color=line.get_color(), ms=9, mew=2)
            seeds_drawn |= _accuracy_spread(ax, pts, line.get_color())
        _label_panel(ax, lay, r, {float(x["base_lr"]) for rs in groups[r].values() for x in rs})
    k = classes_at(start_loss(rows))
    extra = []
    if k:
        for ax in axes:
            _level(ax, 1 / k, CHANCE_GID, **CHANCE_STYLE)
        extra.append(plt.Line2D([], [], label=f"chance (1/{k})", **CHANCE_STYLE))
    if seeds_drawn:
        extra += [plt.Line2D([], [], **SEED_HANDLE),
                  plt.Line2D([], [], color="#555555", lw=1.2, alpha=0.6, label="range over seeds")]
    return _legend_and_fit(fig, axes, extra)


def _accuracy_spread(ax, pts: dict[float, list[float]], color) -> bool:
    """Each seed's accuracy at an lr with several, and their range as a bar. True if any."""
    many = {lr: [v for v in vs if not math.isnan(v)] for lr, vs in pts.items()}
    many = {lr: vs for lr, vs in sorted(many.items()) if len(vs) > 1}
    if not many:
        return False
    xs = [lr for lr, vs in many.items() for _ in vs]
    ys = [v for vs in many.values() for v in vs]
    _seed_points(ax, xs, ys, [v == 0.0 for v in ys], color)
    bars = ax.vlines(list(many), [min(vs) for vs in many.values()], [max(vs) for vs in many.values()], color=color,
                     lw=1.2, alpha=0.6)
    bars.set_gid(ACC_SPREAD_GID)
    return True


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
            a.legend(fontsize=9)
    axes[0].set(xlabel="batch size (examples per step)", ylabel="best val top-1 (fraction correct)",
                title="accuracy vs batch size (✕ = all diverged)")
    axes[1].set_yscale("log", base=2)
    axes[1].set(xlabel="batch size (examples per step)", ylabel=f"optimizer steps to val top-1 ≥ {target:g}",
                title="steps to target")
    fig.tight_layout()
    return fig


def plot_frontier_scaling(cells: pa.Table | list[dict], results: pa.Table | list[dict] | None = None,
                          title: str = ""):
    """`frontier_scaling.png`: the frontier's peak lr (base × B/256) vs batch size, log-log, a line per column
    (λ, no clipping) through its measured frontiers, the fitted slope α in the legend (with its range over seeds);
    lower bounds (≥, ▲: the largest lr tried) and cells below the grid (`none`: <, ▼ at the smallest lr tried)
    drawn open and left out of the fit; the linear-scaling rule (α = 1) dashed through the measured frontiers at
    the smallest batch; where the runs measured the gradient noise scale (`gns` in `results`), McCandlish et al.'s
    ε_max / (1 + B_noise/B) dotted per column, ε_max fitted to its measured frontiers."""
    from matplotlib.ticker import FuncFormatter

    ls = laws(cells)
    fig, ax = plt.subplots(figsize=(8.0, 5.6))
    ax.set_title(title or "how the frontier scales with the batch: peak lr ∝ B^α")
    if not ls:
        ax.text(0.5, 0.5, "the map's rows are not batch sizes: no scaling to draw", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    batches = sorted({p.batch for law in ls for p in law.points})
    marks, colors = set(), {}
    for law in ls:
        f = fit_alpha(law.points)
        name = f"{law.facet} {law.column}".strip()
        label = f"{name}: too few measured frontiers to fit" if f is None else \
            f"{name}: α = {num2(f[0])}{seeds_text(law)}"
        line, = ax.plot([p.batch for p in law.used], [p.peak for p in law.used], "o", ms=8, label=label)
        colors[id(law)] = line.get_color()
        if f is not None:  # over the batch sizes it was fitted to
            xs = [b for b in batches if min(p.batch for p in law.used) <= b <= max(p.batch for p in law.used)]
            ax.plot(xs, [math.exp(f[1]) * b ** f[0] for b in xs], "-", lw=2, color=line.get_color(), gid=FIT_GID,
                    label="_fit")
        for p in law.left_out:
            if p.peak is not None:
                ax.plot(p.batch, p.peak, "^" if p.mark == LOWER else "v", ms=11, mew=2, mfc="none",
                        color=line.get_color(), gid=EDGE_GID, label="_bound")
                marks.add(p.mark)
    _linear_reference(ax, ls, batches)
    _mccandlish(ax, ls, batches, noise_scale(results), colors)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("batch size (examples per step; log scale)")
    ax.set_ylabel("frontier peak lr (base lr × B/256; log scale)")
    ax.grid(alpha=0.3, which="both")
    handles, _ = ax.get_legend_handles_labels()
    bound = {"marker": "", "ls": "", "mfc": "none", "mew": 2, "color": "#555555", "ms": 9}
    handles += [plt.Line2D([], [], **(bound | {"marker": "^"}), label="≥: trains at the largest lr tried (left out)")
                for m in marks if m == LOWER]
    handles += [plt.Line2D([], [], **(bound | {"marker": "v"}),
                           label="<: no lr trains, below the smallest tried (left out)") for m in marks if m != LOWER]
    ax.legend(handles=handles, fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.tight_layout()
    return fig


def _mccandlish(ax, ls, batches: list[int], b_noise: float | None, colors: dict) -> None:
    """McCandlish et al. (2018)'s ε_opt(B) = ε_max / (1 + B_noise/B) per column, dotted, with the measured B_noise:
    near linear scaling below it, flat above it."""
    if not b_noise:
        return
    xs = [batches[0] * (batches[-1] / batches[0]) ** (i / 40) for i in range(41)]
    drawn = False
    for law in ls:
        eps = mccandlish_eps_max(law.points, b_noise)
        if eps is not None:
            ax.plot(xs, [eps / (1 + b_noise / b) for b in xs], ":", lw=1.8, color=colors[id(law)],
                    gid=MCCANDLISH_GID, label="_mccandlish")
            drawn = True
    if drawn:
        ax.plot([], [], ":", color="#555555", lw=1.8,
                label=f"McCandlish: ε_max / (1 + B_noise/B), B_noise ≈ {b_noise:.0f}")


def _linear_reference(ax, ls, batches: list[int]) -> None:
    """The linear-scaling rule (peak lr ∝ B) through the geometric mean of the measured frontiers at the
    smallest batch that has one."""
    measured = [p for law in ls for p in law.used]
    if not measured:
        return
    b0 = min(p.batch for p in measured)
    at = [math.log(p.peak) for p in measured if p.batch == b0]
    y0 = math.exp(sum(at) / len(at))
    ax.plot(batches, [y0 * b / b0 for b in batches], "--", color="#777777", lw=1.3, gid=LINEAR_GID,
            label="linear scaling (α = 1)")
