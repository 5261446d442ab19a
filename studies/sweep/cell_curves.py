"""`cell_curves.png`: every cell's scan runs as learning curves in one figure, for comparing a cell's lrs without
MLflow's chart view (where one diverged run's loss of hundreds flattens every other curve, and colours say nothing
about the lr). A panel per cell; a line per scan run (its `loss/train_step` from MLflow), coloured by its lr on a
log scale; a diverged run drawn until it leaves the panel and marked ✕ where it diverged; the start loss dotted
and the loss a run must end below to count as trained dashed."""
from __future__ import annotations

import math
from typing import Any

from studies.sweep import frontier
from studies.training.verdict import margin

NAME = "cell_curves.png"
SCAN_PHASES = frontier.SCAN_PHASES


def scan_curves(client, experiment_id: str, parent_run_id: str) -> dict[str, list[dict[str, Any]]]:
    """cell label -> its scan runs: lr, seed, verdict, steps and losses (MLflow's `loss/train_step` history)."""
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=5000)
    out: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(runs, key=lambda r: r.data.tags.get("order", "")):
        tags = r.data.tags
        if tags.get("phase") not in SCAN_PHASES or not tags.get("cell"):
            continue
        hist = sorted(client.get_metric_history(r.info.run_id, "loss/train_step"), key=lambda m: m.step)
        if not hist:
            continue
        out.setdefault(tags["cell"], []).append({
            "lr": float(r.data.params.get("base_lr", "nan")), "seed": tags.get("seed", ""),
            "verdict": tags.get("verdict"), "steps": [m.step for m in hist], "losses": [m.value for m in hist]})
    return out


def plot_cell_curves(curves: dict[str, list[dict[str, Any]]], title: str = ""):
    """The figure (None without curves)."""
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    lrs = [c["lr"] for runs in curves.values() for c in runs if c["lr"] > 0]
    norm = LogNorm(min(lrs), max(lrs) if max(lrs) > min(lrs) else min(lrs) * 2)
    cmap = plt.get_cmap("viridis")
    n = len(curves)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, (cell, runs) in zip(axes.flat, curves.items()):
        _panel(ax, cell, runs, norm, cmap)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.8, label="base lr (per 256)")
    fig.suptitle(title or "scan learning curves per cell (colour: lr; ✕ diverged, drawn clipped)", fontsize=10)
    return fig


def _panel(ax, cell: str, runs: list[dict[str, Any]], norm, cmap) -> None:
    starts = sorted(c["losses"][0] for c in runs if math.isfinite(c["losses"][0]))
    start = starts[len(starts) // 2] if starts else 1.0
    finite = [v for c in runs if c["verdict"] != "diverged" for v in c["losses"] if math.isfinite(v)]
    low = min(finite + [start]) if finite else start * 0.5
    top = start + max(0.5 * (start - low), 0.1 * start)  # a diverged run leaves the panel here
    for c in sorted(runs, key=lambda c: c["lr"]):
        color = cmap(norm(c["lr"])) if c["lr"] > 0 else "grey"
        ys = [min(v, top) if math.isfinite(v) else top for v in c["losses"]]
        ax.plot(c["steps"], ys, color=color, lw=1.2, alpha=0.9)
        if c["verdict"] == "diverged":
            ax.plot(c["steps"][-1], ys[-1], "x", color="red", ms=8, mew=2)
    ax.axhline(start, color="black", ls=":", lw=1, label=f"start {start:.4g}")
    ax.axhline(start - margin(start, None), color="black", ls="--", lw=1,
               label=f"trained: ends below {start - margin(start, None):.4g}")
    ax.set_ylim(low - 0.05 * (top - low), top + 0.05 * (top - low))
    ax.set(title=cell, xlabel="step", ylabel="training loss (per step)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
