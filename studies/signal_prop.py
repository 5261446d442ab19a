"""Signal Propagation Plots at initialization (Brock et al. ICLR 2021, "Characterizing signal propagation to
close the performance gap in unnormalized ResNets", Figs. 1-2): one forward pass of a batch of N(0, 1) images
through an NF-ResNet, the same NF-ResNet without Scaled Weight Standardization, and a BatchNorm ResNet, and per
residual block the average channel squared mean and average channel variance of the residual stream and the
variance of the residual branch's output.

What it shows: in the NF-ResNet the stream variance grows by α² per block, as the analytic β of x + α·f(x/β)
predicts, and restarts near 1 after every transition block, with no mean shift. The same net without Scaled WS
(raw He-init weights, mean not removed per filter) develops a mean shift that grows with depth and outgrows the
variance (Sec. 4.1). The BN ResNet's residual branch ends in BatchNorm, so its variance is 1 in every block, and
its stream resets at each transition (torchvision's post-activation ResNet, where the paper plots a ResNetV2).
The paper's plots are of 600-layer ResNetV2s at 512 px (α = 1 in Fig. 2); the default here is ResNet-50s with
α = 0.2 at 224 px and batch 8, small enough for a laptop; --image-size, --batch-size and --models change it.

  python studies/signal_prop.py                 # NF-ResNet-50s and BN ResNet-50, 224 px, batch 8: ~30 s on 2 idle cores
  python studies/signal_prop.py --smoke-test    # CIFAR-size nets (4 blocks per stage), 32 px: a few seconds

Writes <output>/<name>/signal_prop.png, signal_prop.parquet and summary.txt, logged to one MLflow run.
A model is a registry name (nfnet.list_models()); the suffix ":no_ws" strips its Scaled WS.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

import nfnet
import storage
from nfnet.signal import residual_blocks, signal_propagation, without_weight_standardization
from studies.sweep.report import mlflow_line, write_outputs
from studies.training import mlflow_ui, tracking
from studies.training.runner import default_storage_path

NO_WS = ":no_ws"
PRESETS = {
    # 224 px as in the paper's ImageNet nets; batch 8 keeps the three ResNet-50 passes to ~20 s on 2 CPU cores.
    "default": dict(models=["nf_resnet50", "nf_resnet50" + NO_WS, "bn_resnet50"], image_size=224, batch_size=8,
                    overrides={}),
    "smoke": dict(models=["nf_resnet_cifar", "nf_resnet_cifar" + NO_WS, "bn_resnet_cifar"], image_size=32,
                  batch_size=32, overrides={"depth": 4}),
}
QUANTITIES = {"mean_sq": "avg channel squared mean", "var": "avg channel variance",
              "residual_var": "residual-branch variance"}


def build(spec: str, overrides: dict, seed: int) -> torch.nn.Module:
    name, no_ws = spec.removesuffix(NO_WS), spec.endswith(NO_WS)
    torch.manual_seed(seed)  # the same seed for every model: the no-WS twin gets the same raw weights
    model = nfnet.create_model(name, num_classes=1000, **overrides)
    return without_weight_standardization(model) if no_ws else model


def expected_var(block) -> float:
    """NF-ResNet's analytic stream variance after a block: β² + α², or 1 + α² after a transition (Sec. 4)."""
    if not isinstance(block, nfnet.layers.NFBlock) or block.skip_gain is not None:
        return math.nan
    return (1.0 if block.shortcut is not None else block.beta**2) + block.alpha**2


def measure(spec: str, overrides: dict, x: torch.Tensor, seed: int) -> list[dict]:
    model = build(spec, overrides, seed).to(x.device)
    # BatchNorm normalizes with the batch's statistics, as in training and in the paper's plots.
    signals = signal_propagation(model, x, batch_stats=True)
    blocks = residual_blocks(model)
    return [dict(model=spec, block=i, name=s.name, stage=s.name.rsplit(".", 1)[0], mean_sq=s.mean_sq, var=s.var,
                 residual_var=s.residual_var, expected_var=expected_var(b))
            for i, (s, (_, b, _)) in enumerate(zip(signals, blocks))]


def _one_two_five(v: float, _pos) -> str:
    return f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v)), 6) in (1, 2, 5) else ""


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    analytic = False
    for i, spec in enumerate(dict.fromkeys(r["model"] for r in rows)):
        rs = [r for r in rows if r["model"] == spec]
        ends = [r for r, nxt in zip(rs, rs[1:] + [None]) if nxt is None or nxt["stage"] != r["stage"]]
        for ax, q in zip(axes, QUANTITIES):
            ax.plot([r["block"] for r in rs], [r[q] for r in rs], marker=".", color=f"C{i}", label=spec)
            ax.plot([r["block"] for r in ends], [r[q] for r in ends], "o", color="black", ms=4)
        if not analytic and not math.isnan(rs[0]["expected_var"]):
            axes[1].plot([r["block"] for r in rs], [r["expected_var"] for r in rs], ":", color="black",
                         label="NF-ResNet analytic β² + α²")
            analytic = True
    for ax, (q, label) in zip(axes, QUANTITIES.items()):
        values = [r[q] for r in rows]
        decades = math.log10(max(values) / min(values))
        ax.set(title=label, xlabel="residual block", yscale="log" if decades > 1 else "linear")
        ax.grid(True, which="both", alpha=0.3)
        if 1 < decades < 2.5:  # a log axis over a decade or two: label 1, 2, 5 × 10^k
            ax.yaxis.set_major_formatter(FuncFormatter(_one_two_five))
            ax.yaxis.set_minor_formatter(FuncFormatter(_one_two_five))
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend([h for h, n in zip(handles, labels) if not n.startswith("_")],
               [n for n in labels if not n.startswith("_")], loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle(title + " (black dots: last block of a stage)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def summarize(rows: list[dict]) -> list[str]:
    """One line per model: the stream's variance per stage, its growth per block, the mean shift, the branch."""
    fmt = lambda vs: ", ".join(f"{v:.3g}" for v in vs)  # noqa: E731
    lines = []
    for spec in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == spec]
        stages = {}
        for r in rs:
            stages.setdefault(r["stage"], []).append(r)
        firsts, lasts = [v[0] for v in stages.values()], [v[-1] for v in stages.values()]
        steps = [b["var"] - a["var"] for v in stages.values() for a, b in zip(v, v[1:])]
        text = (f"{spec} ({len(rs)} blocks): channel variance after each stage's first block "
                f"{fmt(r['var'] for r in firsts)}, after its last {fmt(r['var'] for r in lasts)}")
        if steps:
            text += f"; it grows by {sum(steps) / len(steps):.3g} per block within a stage"
        if not math.isnan(rs[0]["expected_var"]):
            gap = max(abs(r["var"] / r["expected_var"] - 1) for r in rs)
            text += (f" (α² = {rs[0]['expected_var'] - 1:.3g}); analytic β² + α² after the last blocks "
                     f"{fmt(r['expected_var'] for r in lasts)}, largest gap over all blocks {gap:.0%}")
        resets = sum(f["var"] < prev["var"] for prev, f in zip(lasts, firsts[1:]))
        if len(firsts) > 1:
            text += f"; it falls back at {resets} of {len(firsts) - 1} stage transitions"
        ms, shift = [r["mean_sq"] for r in rs], max(r["mean_sq"] / r["var"] for r in rs)
        text += (f". Squared channel mean {ms[0]:.3g} → {ms[-1]:.3g} from first to last block (×{ms[-1] / ms[0]:.3g}),"
                 f" at most {shift:.3g}× the variance")
        if shift > 1:
            text += f" (mean shift: above it in {sum(r['mean_sq'] > r['var'] for r in rs)} of {len(rs)} blocks)"
        lo, hi = min(r["residual_var"] for r in rs), max(r["residual_var"] for r in rs)
        text += f". Residual-branch variance {lo:.3g}" + (" in every block." if f"{lo:.3g}" == f"{hi:.3g}"
                                                         else f"–{hi:.3g}.")
        lines.append(text)
    return lines


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, help="model names, ':no_ws' strips Scaled WS "
                   f"(default: {' '.join(PRESETS['default']['models'])})")
    p.add_argument("--overrides", type=json.loads, default=None,
                   help='JSON model config overrides for every model, e.g. \'{"depth": 4}\'')
    p.add_argument("--image-size", type=int, default=None, help="input resolution in px (default 224)")
    p.add_argument("--batch-size", type=int, default=None, help="N(0, 1) images in the batch (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of the input batch")
    p.add_argument("--smoke-test", action="store_true", help="CIFAR-size nets at 32 px: a few seconds")
    p.add_argument("--name", default="signal_prop", help="MLflow experiment and output folder")
    p.add_argument("--output", default=None, help="local path, s3://, gs:// (default <project>/results)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///<project>/mlflow.db)")
    args = p.parse_args(argv)
    preset = PRESETS["smoke" if args.smoke_test else "default"]
    models = args.models or preset["models"]
    overrides = preset["overrides"] if args.overrides is None else args.overrides
    size, batch = args.image_size or preset["image_size"], args.batch_size or preset["batch_size"]
    if not isinstance(overrides, dict):
        p.error(f"--overrides must be a JSON object, got {overrides!r}")
    for spec in models:
        try:
            nfnet.model_config(spec.removesuffix(NO_WS), **overrides)
        except ValueError as e:
            p.error(str(e))
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    tracking.check_tracking_uri(uri)
    out_dir = storage.uri.join(args.output or default_storage_path(), args.name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    run = tracking.Tracker.create(uri, args.name, args.name, tags={
        "role": "study", **mlflow_ui.source_tags(), "hardware": tracking.hardware()})
    mlflow_ui.describe_experiment(run.client, run.experiment_id(), f"# {args.name}\n\n{__doc__.strip()}")
    run.log_params({"models": " ".join(models), "overrides": json.dumps(overrides), "image_size": size,
                    "batch_size": batch, "seed": args.seed, "device": device.type})
    t0 = time.time()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(args.seed)).to(device)
    rows = [r for spec in models for r in measure(spec, overrides, x, args.seed)]
    wall = time.time() - t0
    for r in rows:
        run.log_metrics({f"{r['model']}/{q}": r[q] for q in QUANTITIES}, step=r["block"])

    header = f"signal propagation at init: {size} px, batch {batch} of N(0, 1) images, {device.type}, {wall:.1f} s"
    link = mlflow_ui.ui_link(uri, run.experiment_id())
    summary = "\n".join([header, *summarize(rows), f"outputs: {out_dir}/", mlflow_line(args.name, uri, link)])
    table = pa.Table.from_pylist(rows)
    files = write_outputs(out_dir, {
        "signal_prop.png": lambda f: plot(rows, f"Signal propagation at init, {size} px, batch {batch}", f),
        "signal_prop.parquet": lambda f: pq.write_table(table, f),
        "summary.txt": lambda f: f.write_text(summary)}, run)
    run.log_metrics({"wall_time_s": wall}, step=0)
    run.end("completed")
    print(summary, flush=True)
    return {"table": table, "rows": rows, "files": files, "summary": summary, "run_id": run.run_id,
            "wall_time_s": wall}


if __name__ == "__main__":
    main(sys.argv[1:])
