"""What every figure of a study shares (figures.py: the map; curves.py: loss, accuracy and frontier curves): a
style readable in MLflow's artifact preview (~830 px wide: fonts scaled for it), the verdicts' markers, the tags
(gid) the tests find artists by, the lr axis, and the replicated runs' helpers."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from studies.sweep.frontier import run_verdict  # noqa: E402
from studies.training.verdict import RELATIVE_MARGIN  # noqa: E402

# A figure ~10 in wide at 130 dpi is shown at ~830 px: fonts of 11 pt and ticks of 10 pt stay ≥ 10 px there.
STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 10,
         "ytick.labelsize": 10, "legend.fontsize": 10, "figure.titlesize": 13}
plt.rcParams.update(STYLE)

# A marker per verdict of an lr (the majority of its seeds; no majority: the commonest failure, the severer on a
# tie). Filled: trained, collapsed; open: stalled (never left its start); ✕: diverged.
MARKERS = {"trained": ("o", "#1a9850"), "stalled": ("s", "#8c8c8c"), "collapsed": ("v", "#e08214"),
           "diverged": ("x", "#d73027")}
OPEN = {"stalled"}
VERDICT_WORDS = {"trained": "trained", "stalled": "stalled (never left its start)",
                 "collapsed": "collapsed (left its start, stayed finite)", "diverged": "diverged"}
# Replication (issue 30): where an lr has several seeds, each seed's verdict is drawn small in a column beneath
# the lr's majority marker, seed order downwards; the frontier's spread over seeds is a band behind the row.
# Artists are tagged (gid) for the tests: a seed's marker has its lr and row as data, its place beneath them an
# offset in points.
SEED_GID, SPREAD_GID, ACC_SPREAD_GID = "seed", "frontier spread", "accuracy spread"
NOT_HELD_GID, EDGE_GID, DIVERGED_GID = "frontier not held", "edge mark", "diverged"
CHANCE_GID, THRESHOLD_GID, FIT_GID, LINEAR_GID = "chance", "trained threshold", "fit", "linear scaling"
MCCANDLISH_GID = "mccandlish"
SEED_TOP, SEED_STEP = 9.0, 4.8  # points beneath the lr's marker of the first seed, and between two seeds
SPREAD_STYLE = {"color": "#3b6fb6", "alpha": 0.35, "lw": 8, "solid_capstyle": "butt"}
SEED_HANDLE = {"marker": "o", "ls": "", "color": "#555555", "ms": 3.5, "alpha": 0.5, "label": "one seed"}
NOT_HELD_STYLE = {"marker": "o", "ms": 17, "mfc": "none", "mec": "#b00020", "mew": 2.2, "ls": ""}
LR_LABEL = "base lr per 256 examples (log)"


def close(fig) -> None:
    plt.close(fig)


def marker_kw(verdict: str, ms: float = 8, mew: float = 2) -> dict:
    marker, color = MARKERS[verdict]
    return {"marker": marker, "color": color, "ms": ms, "mew": mew, "ls": "",
            "mfc": "none" if verdict in OPEN else color}


def verdict_handles(suffix: str = "", verdicts=tuple(MARKERS)) -> list:
    return [plt.Line2D([], [], label=VERDICT_WORDS[v] + suffix, **marker_kw(v)) for v in verdicts]


def lr_axis(ax, lrs) -> None:
    """A log lr axis labelled at the design's lrs (slanted: eight of them fit a panel at 830 px)."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(lrs), [f"{lr:g}" for lr in sorted(lrs)], rotation=45, ha="right",
                  rotation_mode="anchor")
    ax.minorticks_off()


def grid_lrs(rows: list[dict]) -> set[float]:
    """The design's lrs, for tick labels: a refinement's midpoint is drawn, not labelled (it would crowd them),
    nor is it when replicated (a replicate reruns an lr the scan or the refinement tried)."""
    return {float(r["base_lr"]) for r in rows if r.get("phase") not in ("refine", "replicate")}


def by_lr(rows: list[dict]) -> dict[float, list[dict]]:
    """Runs per lr, in seed order."""
    out: dict[float, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (float(r["base_lr"]), int(r.get("seed") or 0))):
        out.setdefault(float(r["base_lr"]), []).append(r)
    return out


def replicated_runs(rows: list[dict]) -> list[dict]:
    """The decided runs of the lrs that have several (the replicated lrs), in seed order per lr."""
    out = []
    for rs in by_lr(rows).values():
        decided = [r for r in rs if run_verdict(r) is not None]
        out += decided if len(decided) > 1 else []
    return out


def classes_at(start: float) -> int | None:
    """The number of classes a start loss implies: at initialisation a classifier's outputs are near uniform, so
    its loss is ln K (NF nets zero their last layer: exactly). None where it implies no class count."""
    if not math.isfinite(start) or start <= 0.3:
        return None
    return max(2, round(math.exp(start)))


def trained_threshold(start: float) -> float:
    """The loss a run must end below to count as trained (its noise aside): the start less RELATIVE_MARGIN."""
    return start * (1 - RELATIVE_MARGIN)
