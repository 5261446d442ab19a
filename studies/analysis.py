"""Analysis as pure functions over the study's pyarrow tables (results, epochs, cells): reruns offline, no Ray.
The frontier of a cell is the largest learning rate such that every tried lr up to it trained in a strict
majority of its seeds."""
from __future__ import annotations

import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402

NO_CLIP = "none"


def close(fig) -> None:
    plt.close(fig)


def _rows(table: pa.Table | list[dict]) -> list[dict[str, Any]]:
    return table.to_pylist() if isinstance(table, pa.Table) else list(table)


def _num(v) -> float:
    return float(v) if v is not None and not (isinstance(v, float) and math.isnan(v)) else float("nan")


def top_k_mean(values: list[float], k: int | None) -> float:
    vals = sorted((v for v in values if not math.isnan(v)), reverse=True)
    if not vals:
        return float("nan")
    return sum(vals[: k or len(vals)]) / len(vals[: k or len(vals)])


# ---- the frontier: where each cell trains ----

DECIDED = ("completed", "diverged")  # failed and stopped runs say nothing about stability


def lr_verdicts(rows: list[dict]) -> list[tuple[float, bool, int, int]]:
    """(base_lr, stable, trained seeds, decided seeds) per tried lr, ascending. Stable: a strict majority of the
    decided seeds trained (1 of 2 is not stable)."""
    by_lr: dict[float, list[str]] = {}
    for r in rows:
        if r["status"] in DECIDED:
            by_lr.setdefault(float(r["base_lr"]), []).append(r["status"])
    out = []
    for lr in sorted(by_lr):
        trained = by_lr[lr].count("completed")
        out.append((lr, 2 * trained > len(by_lr[lr]), trained, len(by_lr[lr])))
    return out


def frontier(rows: list[dict]) -> tuple[float | None, float | None]:
    """(largest stable lr, first unstable lr): the largest lr such that every tried lr up to it is stable. None
    when the smallest tried lr is already unstable (or nothing was decided)."""
    best = None
    for lr, stable, _, _ in lr_verdicts(rows):
        if not stable:
            return best, lr
        best = lr
    return best, None


def best_accuracy(rows: list[dict], best_k: int | None) -> tuple[float, float | None]:
    """(score, base lr) of the best lr among completed full runs; a setting's score is the mean of its best k
    seeds. Ties go to the smaller lr."""
    by_lr: dict[float, list[float]] = {}
    for r in rows:
        if r["status"] == "completed" and r.get("best_val_acc") is not None:
            by_lr.setdefault(float(r["base_lr"]), []).append(_num(r["best_val_acc"]))
    best, best_lr = float("nan"), None
    for lr in sorted(by_lr):
        score = top_k_mean(by_lr[lr], best_k)
        if not math.isnan(score) and (math.isnan(best) or score > best):
            best, best_lr = score, lr
    return best, best_lr


def full_phase_lrs(scan: pa.Table | list[dict], top: int) -> dict[str, list[float]]:
    """Per cell, the `top` stable lrs at or below the frontier with the lowest mean scan loss (ties: smaller lr)."""
    out = {}
    for cell, rows in _by_cell(_rows(scan), phase="scan").items():
        limit, _ = frontier(rows)
        stable = [lr for lr, ok, _, _ in lr_verdicts(rows) if ok and limit is not None and lr <= limit]
        loss = {lr: [_num(r.get("final_train_loss")) for r in rows
                     if float(r["base_lr"]) == lr and r["status"] == "completed"] for lr in stable}
        mean = {lr: sum(v) / len(v) if v else math.inf for lr, v in loss.items()}
        out[cell] = sorted(sorted(stable, key=lambda lr: (mean[lr], lr))[:top])
    return out


def _by_cell(rows: list[dict], phase: str | None = None) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        if phase is None or r.get("phase") == phase:
            out.setdefault(r["cell"], []).append(r)
    return out


CELL_COLUMNS = {
    "cell": pa.string(), "batch_size": pa.int64(), "model": pa.string(), "clipping": pa.string(),
    "clip_threshold": pa.float64(), "lambda": pa.string(), "lrs_tried": pa.int64(),
    "max_stable_lr": pa.float64(), "max_stable_lr_at_edge": pa.bool_(), "first_unstable_lr": pa.float64(),
    "stable_fraction": pa.float64(), "scan_trials": pa.int64(), "scan_diverged": pa.int64(),
    "full_trials": pa.int64(), "full_diverged": pa.int64(), "failed_trials": pa.int64(),
    "best_val_acc": pa.float64(), "best_base_lr": pa.float64(),
}


def frontier_table(results: pa.Table | list[dict], best_k: int | None = None) -> pa.Table:
    """cells.parquet: one row per cell. Stability comes from the scan (or, in a study without a scan, from the
    full runs); accuracy from the full runs."""
    out = []
    for cell, rows in _by_cell(_rows(results)).items():
        scan = [r for r in rows if r.get("phase") == "scan"]
        full = [r for r in rows if r.get("phase") != "scan"]
        basis = scan or full
        verdicts = lr_verdicts(basis)
        limit, unstable = frontier(basis)
        acc, acc_lr = best_accuracy(full, best_k)
        first = rows[0]
        out.append({
            "cell": cell, "batch_size": first["batch_size"], "model": first["model"], "clipping": first["clipping"],
            "clip_threshold": first["clip_threshold"], "lambda": first["lambda"], "lrs_tried": len(verdicts),
            "max_stable_lr": limit, "max_stable_lr_at_edge": limit is not None and limit == verdicts[-1][0],
            "first_unstable_lr": unstable,
            "stable_fraction": sum(v[1] for v in verdicts) / len(verdicts) if verdicts else None,
            "scan_trials": len(scan), "scan_diverged": sum(r["status"] == "diverged" for r in scan),
            "full_trials": len(full), "full_diverged": sum(r["status"] == "diverged" for r in full),
            "failed_trials": sum(r["status"] == "failed" for r in rows),
            "best_val_acc": None if math.isnan(acc) else acc, "best_base_lr": acc_lr,
        })
    out.sort(key=lambda c: (c["batch_size"], column_of(c)[0]))
    return pa.Table.from_pylist(out, schema=pa.schema(CELL_COLUMNS))


def column_of(c: dict) -> tuple[tuple, str]:
    """(sort key, label) of a cell's column in the map: its λ, or the rest of its label beside the batch size."""
    rest = " ".join(t for t in c["cell"].split() if not t.startswith(("batch_size=", "lambda=")))
    if rest:
        return (0, rest, 0.0), rest
    lam = c["lambda"]
    return (1, "", math.inf if lam == NO_CLIP else float(lam)), ("no clipping" if lam == NO_CLIP else f"λ={lam}")


def lr_text(lr: float | None, at_edge: bool = False) -> str:
    return "none" if lr is None else ("≥" if at_edge else "") + f"{lr:g}"


def frontier_text(c: dict) -> str:
    if c["max_stable_lr"] is None:
        return "no stable lr"
    return f"lr {'≥' if c['max_stable_lr_at_edge'] else '≤'} {c['max_stable_lr']:g}"


def _lr_axis(ax, lrs) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(lrs), [f"{lr:g}" for lr in sorted(lrs)], fontsize=8)
    ax.minorticks_off()


def _grid(cells: pa.Table):
    rows = cells.to_pylist()
    batches = sorted({c["batch_size"] for c in rows})
    cols = sorted({column_of(c) for c in rows})
    at = {(c["batch_size"], column_of(c)[1]): c for c in rows}
    return batches, [label for _, label in cols], at


def frontier_summary(cells: pa.Table) -> str:
    """The frontier table, the accuracy table and the findings in words, with their numbers."""
    batches, cols, at = _grid(cells)
    w = max(14, *(len(c) + 2 for c in cols))
    lines = ["largest stable base lr (per 256 examples; ≥ = stable up to the largest lr tried):",
             "batch".rjust(7) + "".join(c.rjust(w) for c in cols)]
    for b in batches:
        lines.append(str(b).rjust(7) + "".join(
            (lr_text(at[b, c]["max_stable_lr"], at[b, c]["max_stable_lr_at_edge"]) if (b, c) in at else "-").rjust(w)
            for c in cols))
    lines += ["best val top-1 (at base lr):", "batch".rjust(7) + "".join(c.rjust(w) for c in cols)]
    for b in batches:
        lines.append(str(b).rjust(7) + "".join(_acc_text(at.get((b, c))).rjust(w) for c in cols))
    lines += findings(cells)
    return "\n".join(lines)


def _acc_text(c: dict | None) -> str:
    return "-" if not c or c["best_val_acc"] is None else f"{c['best_val_acc']:.3f} @{c['best_base_lr']:g}"


def _stability_key(c: dict) -> tuple:
    return (c["max_stable_lr"] or 0.0, c["stable_fraction"] or 0.0, c["best_val_acc"] or 0.0)


def findings(cells: pa.Table) -> list[str]:
    batches, cols, at = _grid(cells)
    out = ["findings:"]
    most = {b: max((at[b, c] for c in cols if (b, c) in at), key=_stability_key) for b in batches}
    out.append("most stable setting per batch size: " + ", ".join(
        f"{b}: {column_of(most[b])[1]} ({frontier_text(most[b])})" for b in batches))
    if "no clipping" not in cols or len(batches) < 2:
        return out
    base = [at[b, "no clipping"]["max_stable_lr"] if (b, "no clipping") in at else None for b in batches]
    lo, hi = batches[0], batches[-1]
    if base[0] and base[-1] and base[-1] < base[0]:
        out.append(f"without clipping the stable lr falls as the batch grows: {lr_text(base[0])} at batch {lo} → "
                   f"{lr_text(base[-1])} at batch {hi} (÷{base[0] / base[-1]:.3g}).")
    else:
        out.append(f"NOT SHOWN: without clipping the stable lr does not fall from batch {lo} to {hi} "
                   f"({lr_text(base[0])} → {lr_text(base[-1])}).")
    agc = [at[hi, c] for c in cols if c != "no clipping" and (hi, c) in at]
    if agc:
        best = max(agc, key=_stability_key)
        ratio = (best["max_stable_lr"] or 0) / base[-1] if base[-1] else math.inf
        name = column_of(best)[1]
        if best["max_stable_lr"] and ratio >= 2:
            edge = lr_text(best["max_stable_lr"], best["max_stable_lr_at_edge"])
            out.append(f"at batch {hi} AGC {name} trains up to lr {edge}, {ratio:.3g}× the {lr_text(base[-1])} "
                       "without clipping.")
        else:
            out.append(f"NOT SHOWN: at batch {hi} the most stable AGC setting ({name}, lr ≤ "
                       f"{lr_text(best['max_stable_lr'])}) is not ≥ 2× no clipping's {lr_text(base[-1])}.")
    return out


def cell_metrics(cells: pa.Table) -> list[tuple[str, float, int]]:
    """(metric name, value, step = batch size): the frontier as MLflow metrics, one line per column of the map."""
    out = []
    for c in cells.to_pylist():
        col = column_of(c)[1].replace("λ=", "lambda_").replace(" ", "_").replace("=", "_").replace("+", "_")
        for k in ("max_stable_lr", "stable_fraction", "best_val_acc"):
            if c[k] is not None:
                out.append((f"{k}/{col}", float(c[k]), int(c["batch_size"])))
    return out


# ---- figures ----

def plot_stable_region(results: pa.Table | list[dict], cells: pa.Table, title: str = ""):
    """Small multiples, one panel per column of the map: lr (log) × batch (log), a marker per tried lr (trained /
    diverged in the majority of seeds), the frontier as a line."""
    batches, cols, at = _grid(cells)
    rows = _rows(results)
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols) + 0.8, 3.6), sharex=True, sharey=True,
                             squeeze=False)
    for ax, col in zip(axes[0], cols):
        front = []
        for b in batches:
            c = at.get((b, col))
            if not c:
                continue
            basis = [r for r in rows if r["cell"] == c["cell"] and r.get("phase") == "scan"] or \
                [r for r in rows if r["cell"] == c["cell"]]
            for lr, ok, _, _ in lr_verdicts(basis):
                ax.plot(lr, b, "o" if ok else "x", color="#1a9850" if ok else "#d73027", ms=7 if ok else 8,
                        mew=2)
            if c["max_stable_lr"] is not None:
                front.append((c["max_stable_lr"], b))
        if front:
            ax.plot([f[0] for f in front], [f[1] for f in front], "-", color="black", lw=2, label="frontier")
        ax.set_title(col, fontsize=10)
        _lr_axis(ax, {float(r["base_lr"]) for r in rows})
        ax.set_yscale("log", base=2)
        ax.set_yticks(batches, [str(b) for b in batches])
        ax.grid(alpha=0.3)
        ax.set_xlabel("base lr (per 256)")
    axes[0][0].set_ylabel("batch size")
    handles = [plt.Line2D([], [], marker="o", ls="", color="#1a9850", label="trained"),
               plt.Line2D([], [], marker="x", ls="", color="#d73027", mew=2, label="diverged"),
               plt.Line2D([], [], ls="-", color="black", lw=2, label="frontier (largest stable lr)")]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=9, bbox_to_anchor=(0.5, -0.06))
    fig.suptitle(title or "stable region", fontsize=11)
    fig.tight_layout()
    return fig


def plot_stability_map(cells: pa.Table, title: str = ""):
    """Heatmap: colour = largest stable lr (log scale), text = that lr and the best accuracy."""
    import numpy as np
    from matplotlib.colors import LogNorm

    batches, cols, at = _grid(cells)
    grid = np.full((len(batches), len(cols)), np.nan)
    for i, b in enumerate(batches):
        for j, col in enumerate(cols):
            c = at.get((b, col))
            if c and c["max_stable_lr"] is not None:
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
            if c["max_stable_lr"] is None:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="#b00020",
                                           lw=0))
            light = norm is not None and c["max_stable_lr"] is not None and \
                norm(c["max_stable_lr"]) > 0.6
            ax.text(j, i, f"{frontier_text(c)}{acc}", ha="center",
                    va="center", fontsize=9, color="black" if light or c["max_stable_lr"] is None else "white")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(batches)), [str(b) for b in batches])
    ax.set_ylabel("batch size")
    ax.set_title(f"{title}\ncolour: largest stable base lr; text: it and the best val top-1", fontsize=10)
    if norm is not None:
        fig.colorbar(im, ax=ax, label="largest stable base lr")
    fig.tight_layout()
    return fig


def plot_lr_sensitivity(results: pa.Table | list[dict], best_k: int | None = None):
    """Accuracy vs lr, a panel per batch size, a line per column; diverged full runs at 0 (✕)."""
    rows = [r for r in _rows(results) if r.get("phase") != "scan"]
    batches = sorted({r["batch_size"] for r in rows})
    fig, axes = plt.subplots(1, max(1, len(batches)), figsize=(3.6 * max(1, len(batches)) + 0.6, 3.4),
                             sharey=True, squeeze=False)
    for ax, b in zip(axes[0], batches):
        by_col: dict[str, list[dict]] = {}
        for r in rows:
            if r["batch_size"] == b:
                by_col.setdefault(column_of(r)[1], []).append(r)
        for col in sorted(by_col, key=lambda c: column_of(by_col[c][0])[0]):
            pts = {}
            for r in by_col[col]:
                pts.setdefault(float(r["base_lr"]), []).append(
                    _num(r.get("best_val_acc")) if r["status"] == "completed" else 0.0)
            lrs = sorted(pts)
            line, = ax.plot(lrs, [top_k_mean(pts[lr], best_k) for lr in lrs], "o-", label=col)
            bad = [lr for lr in lrs if all(v == 0.0 for v in pts[lr])]
            ax.plot(bad, [0.0] * len(bad), "x", color=line.get_color(), ms=9, mew=2)
        _lr_axis(ax, {float(r["base_lr"]) for r in rows if r["batch_size"] == b})
        ax.set_title(f"batch {b}", fontsize=10)
        ax.set_xlabel("base lr (per 256)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("best val top-1")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_curves(history: list[dict[str, Any]], title: str = ""):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [h["step"] for h in history]
    axes[0].plot(steps, [h.get("train_loss", math.nan) for h in history], "o-", label="train")
    val = [(h["step"], h["val_loss"], h["val_acc"]) for h in history if "val_loss" in h]
    if val:
        axes[0].plot([v[0] for v in val], [v[1] for v in val], "s-", label="val")
        axes[1].plot([v[0] for v in val], [v[2] for v in val], "s-", label="val top-1")
    axes[1].plot(steps, [h.get("train_acc", math.nan) for h in history], "o-", label="train")
    axes[0].set(xlabel="step", ylabel="loss", title="loss")
    axes[1].set(xlabel="step", ylabel="accuracy", title="accuracy")
    for a in axes:
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def steps_to_target(epochs: pa.Table | list[dict], target: float, metric: str = "val_acc") -> dict[str, int]:
    """First step at which each trial's `metric` reached `target` (Shallue et al. 2018); trials that never
    did are absent."""
    out: dict[str, int] = {}
    for r in sorted(_rows(epochs), key=lambda r: (r["trial_key"], r["step"])):
        v = r.get(metric)
        if r["trial_key"] not in out and v is not None and not math.isnan(v) and v >= target:
            out[r["trial_key"]] = int(r["step"])
    return out


def batch_scaling(results: pa.Table | list[dict], epochs: pa.Table | list[dict], target: float,
                  metric: str = "best_val_acc") -> dict[str, list[dict]]:
    """Per column of the map (a model variant) and batch size, over the full runs: best accuracy, fewest steps
    to `target`, the gradient noise scale measured (NF models only: BN's batch statistics forbid the split)."""
    reach = steps_to_target(epochs, target)
    out: dict[str, dict[int, dict]] = {}
    for r in _rows(results):
        if r.get("phase") == "scan":
            continue
        v, b = column_of(r)[1], int(r["batch_size"])
        d = out.setdefault(v, {}).setdefault(b, {"batch_size": b, "acc": math.nan, "steps": None,
                                                 "trials": 0, "diverged": 0, "gns": []})
        d["trials"] += 1
        d["diverged"] += r["status"] == "diverged"
        acc = _num(r.get(metric))
        if r["status"] == "completed" and not math.isnan(acc) and (math.isnan(d["acc"]) or acc > d["acc"]):
            d["acc"] = acc
        s = reach.get(r["trial_key"])
        if s is not None and (d["steps"] is None or s < d["steps"]):
            d["steps"] = s
        if not math.isnan(_num(r.get("gns"))):
            d["gns"].append(_num(r["gns"]))
    for by_b in out.values():
        for d in by_b.values():
            d["gns"] = sum(d["gns"]) / len(d["gns"]) if d["gns"] else math.nan
    return {v: [by_b[b] for b in sorted(by_b)] for v, by_b in out.items()}


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
