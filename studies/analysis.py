# Analysis as pure functions over pyarrow tables (storage's results / epochs tables): reruns offline, no Ray.
from __future__ import annotations

import math
from dataclasses import dataclass, field
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


def lambda_label(clipping: str, threshold: float | None) -> str:
    return NO_CLIP if clipping == "none" else f"{threshold:g}"


def _lambda_key(label: str) -> float:
    return math.inf if label == NO_CLIP else float(label)


def top_k_mean(values: list[float], k: int | None) -> float:
    vals = sorted((v for v in values if not math.isnan(v)), reverse=True)
    if not vals:
        return float("nan")
    return sum(vals[: k or len(vals)]) / len(vals[: k or len(vals)])


@dataclass
class Cell:
    batch_size: int
    lam: str
    trials: int = 0
    diverged: int = 0
    failed: int = 0
    best_acc: float = float("nan")  # best over nuisance settings of the (top-k) seed mean
    best_nuisance: dict[str, Any] = field(default_factory=dict)

    @property
    def frac_diverged(self) -> float:
        return self.diverged / self.trials if self.trials else float("nan")

    @property
    def stable(self) -> bool:
        # Trained: a majority of its trials did not diverge and at least one reached a validation score.
        return self.trials > 0 and self.frac_diverged <= 0.5 and not math.isnan(self.best_acc)


@dataclass
class StabilityMap:
    batch_sizes: list[int]
    lambdas: list[str]
    cells: dict[tuple[int, str], Cell]
    metric: str

    def cell(self, b: int, lam: str) -> Cell:
        return self.cells.get((b, lam)) or Cell(b, lam)

    def best_lambda(self) -> dict[int, str | None]:
        out = {}
        for b in self.batch_sizes:
            cands = [self.cell(b, lam) for lam in self.lambdas if self.cell(b, lam).stable]
            out[b] = max(cands, key=lambda c: c.best_acc).lam if cands else None
        return out

    def largest_stable_batch(self, agc: bool) -> int | None:
        lams = [lam for lam in self.lambdas if (lam != NO_CLIP) == agc]
        ok = [b for b in self.batch_sizes if any(self.cell(b, lam).stable for lam in lams)]
        return max(ok) if ok else None

    def summary(self) -> str:
        lines = [f"stability map ({self.metric}; rows = batch size, columns = AGC λ):"]
        head = "batch".rjust(7) + "".join(lam.rjust(14) for lam in self.lambdas)
        lines.append(head)
        for b in self.batch_sizes:
            row = str(b).rjust(7)
            for lam in self.lambdas:
                c = self.cell(b, lam)
                if not c.trials:
                    txt = "-"
                elif c.stable:
                    txt = f"{c.best_acc:.3f}" + (f" ({c.diverged}/{c.trials}d)" if c.diverged else "")
                else:
                    txt = f"DIVERGED {c.diverged}/{c.trials}" if c.diverged else f"failed {c.failed}/{c.trials}"
                row += txt.rjust(14)
            lines.append(row)
        best = self.best_lambda()
        lines.append("best λ per batch size: " + ", ".join(f"{b}: {best[b] or '—'}" for b in self.batch_sizes))
        lines.append(f"largest batch that trained with AGC: {self.largest_stable_batch(True) or 'none'}; "
                     f"without clipping: {self.largest_stable_batch(False) or 'none'}")
        stable = [f"{b}×{lam}" for (b, lam), c in sorted(self.cells.items()) if c.stable]
        lines.append(f"stable cells: {len(stable)}/{len(self.cells)}")
        return "\n".join(lines)


def stability_map(results: pa.Table | list[dict], metric: str = "best_val_acc", best_k: int | None = None,
                  nuisance: tuple[str, ...] = ("nui_base_lr", "nui_augment_strength")) -> StabilityMap:
    """Cells keyed by (sci_batch_size, sci_lambda). Each nuisance setting's score is the mean of its best
    `best_k` seeds (the paper: best 4 of 5); a cell's score is its best nuisance setting's."""
    rows = _rows(results)
    groups: dict[tuple[int, str], dict[tuple, list[float]]] = {}
    cells: dict[tuple[int, str], Cell] = {}
    for r in rows:
        key = (int(r["sci_batch_size"]), str(r["sci_lambda"]))
        c = cells.setdefault(key, Cell(*key))
        c.trials += 1
        c.diverged += r["status"] == "diverged"
        c.failed += r["status"] == "failed"
        if r["status"] in ("completed", "stopped"):
            nk = tuple((n, r.get(n)) for n in nuisance if r.get(n) is not None)
            groups.setdefault(key, {}).setdefault(nk, []).append(_num(r.get(metric)))
    for key, by_nuisance in groups.items():
        for nk, vals in by_nuisance.items():
            score = top_k_mean(vals, best_k)
            c = cells[key]
            if not math.isnan(score) and (math.isnan(c.best_acc) or score > c.best_acc):
                c.best_acc, c.best_nuisance = score, dict(nk)
    batch_sizes = sorted({k[0] for k in cells})
    lambdas = sorted({k[1] for k in cells}, key=_lambda_key)
    return StabilityMap(batch_sizes, lambdas, cells, metric)


def plot_stability_map(smap: StabilityMap, title: str = "AGC stability map"):
    import numpy as np

    nb, nl = len(smap.batch_sizes), len(smap.lambdas)
    acc = np.full((nb, nl), np.nan)
    for i, b in enumerate(smap.batch_sizes):
        for j, lam in enumerate(smap.lambdas):
            c = smap.cell(b, lam)
            if c.stable:
                acc[i, j] = c.best_acc
    fig, ax = plt.subplots(figsize=(1.6 * nl + 3, 0.9 * nb + 2.2))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
    finite = acc[np.isfinite(acc)]
    vmin, vmax = (finite.min(), finite.max()) if finite.size else (0, 1)
    im = ax.imshow(np.ma.masked_invalid(acc), cmap=cmap, vmin=vmin, vmax=max(vmax, vmin + 1e-6), aspect="auto")
    best = smap.best_lambda()
    for i, b in enumerate(smap.batch_sizes):
        for j, lam in enumerate(smap.lambdas):
            c = smap.cell(b, lam)
            if not c.trials:
                txt, color = "not run", "black"
            elif c.stable:
                frac = (acc[i, j] - vmin) / (vmax - vmin) if vmax > vmin else 1
                txt = f"{c.best_acc:.3f}\ndiv {c.diverged}/{c.trials}"
                color = "white" if frac < 0.6 else "black"
            else:
                txt = f"✕ diverged\n{c.diverged}/{c.trials}" if c.diverged else f"failed\n{c.failed}/{c.trials}"
                color = "#b00020"
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///",
                                           edgecolor="#b00020", lw=0))
            ax.text(j, i, txt, ha="center", va="center", fontsize=9, color=color)
            if best.get(b) == lam:
                ax.add_patch(plt.Rectangle((j - 0.48, i - 0.48), 0.96, 0.96, fill=False, edgecolor="#ff8c00",
                                           lw=3))
    ax.set_xticks(range(nl), [("no clipping" if lam == NO_CLIP else f"λ={lam}") for lam in smap.lambdas])
    ax.set_yticks(range(nb), [str(b) for b in smap.batch_sizes])
    ax.set_xlabel("AGC clipping threshold λ")
    ax.set_ylabel("batch size")
    ax.set_title(f"{title}\n{smap.metric} per cell (best lr); orange box = best λ per batch; ✕ = diverged",
                 fontsize=10)
    cbar = fig.colorbar(im, ax=ax, label=smap.metric)
    cbar.formatter.set_useOffset(False)
    cbar.update_ticks()
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
    for r in sorted(_rows(epochs), key=lambda r: (r["trial_id"], r["step"])):
        v = r.get(metric)
        if r["trial_id"] not in out and v is not None and not math.isnan(v) and v >= target:
            out[r["trial_id"]] = int(r["step"])
    return out


def batch_scaling(results: pa.Table | list[dict], epochs: pa.Table | list[dict], target: float,
                  variant_col: str = "sci_variant", metric: str = "best_val_acc") -> dict[str, list[dict]]:
    """Per variant and batch size: best accuracy and fewest steps to `target` over the tuned nuisance."""
    rows = _rows(results)
    reach = steps_to_target(epochs, target)
    out: dict[str, dict[int, dict]] = {}
    for r in rows:
        v, b = str(r[variant_col]), int(r["sci_batch_size"])
        d = out.setdefault(v, {}).setdefault(b, {"batch_size": b, "acc": math.nan, "steps": None,
                                                 "trials": 0, "diverged": 0, "gns": math.nan})
        d["trials"] += 1
        d["diverged"] += r["status"] == "diverged"
        acc = _num(r.get(metric))
        if r["status"] == "completed" and not math.isnan(acc) and (math.isnan(d["acc"]) or acc > d["acc"]):
            d["acc"] = acc
        s = reach.get(r["trial_id"])
        if s is not None and (d["steps"] is None or s < d["steps"]):
            d["steps"] = s
        g = _num(r.get("metric_gns"))
        if not math.isnan(g):
            d["gns"] = g if math.isnan(d["gns"]) else (d["gns"] + g) / 2
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
