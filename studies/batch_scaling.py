"""Batch scaling (Brock et al. 2021, Fig. 2a): BN-ResNet vs NF-ResNet without clipping vs NF-ResNet with AGC,
each at its own tuned learning rate, over batch sizes. Plots best accuracy and steps to a target accuracy
(Shallue et al. 2018) against batch size, with the measured gradient noise scale (McCandlish et al. 2018).

  python studies/batch_scaling.py --preset laptop
"""
from __future__ import annotations

import math
import statistics
import sys

from studies import analysis
from studies.search import run_cli

PRESETS = {
    "laptop": dict(
        grid={"variant": ["bn_resnet", "nf_resnet", "nf_resnet+agc"], "batch_size": [64, 256, 1024]},
        nuisance={"base_lr": (0.1, 3.2, True)}, centre={"base_lr": 0.4}, trials_per_cell=2, seeds=1,
        options={"target_acc": 0.3},
        fixed=dict(model_overrides={"width": 8, "depth": 1}, dataset="synthetic", clip_threshold=0.04,
                   dataset_params={"n_train": 16384, "n_val": 2048, "image_size": 16}, epochs=3, warmup_epochs=0.5,
                   gns_every_steps=2, log_every_steps=2),
    ),
    "cifar10": dict(
        grid={"variant": ["bn_resnet", "nf_resnet", "nf_resnet+agc"], "batch_size": [256, 512, 1024, 2048, 4096]},
        nuisance={"base_lr": (0.025, 0.8, True)}, centre={"base_lr": 0.1}, trials_per_cell=4, seeds=1,
        options={"target_acc": 0.85},
        fixed=dict(model_overrides={"width": 64, "depth": 2}, dataset="cifar10", use_gpu=True, epochs=30,
                   warmup_epochs=2, precision="bf16", channels_last=True, clip_threshold=0.02),
    ),
    "smoke": dict(
        grid={"variant": ["nf_resnet+agc"], "batch_size": [64]},
        nuisance={"base_lr": (0.05, 0.4, True)}, centre={"base_lr": 0.1}, trials_per_cell=1, seeds=1,
        options={"target_acc": 0.1},
        fixed=dict(model_overrides={"width": 8, "depth": 1}, dataset="synthetic", clip_threshold=0.04,
                   dataset_params={"n_train": 512, "n_val": 128}, max_steps=6, log_every_steps=2),
    ),
}

GRID_FLAGS = {"variant": (str, "model variants: bn_resnet, nf_resnet, nf_resnet+agc"),
              "batch_size": (int, "batch sizes")}


def analyze(study, results, epochs):
    target = study.options["target_acc"]
    curves = analysis.batch_scaling(results, epochs, target)
    gns_values = [g for g in results.column("metric_gns").to_pylist() if g is not None and math.isfinite(g)] \
        if "metric_gns" in results.column_names else []
    gns = statistics.median(gns_values) if gns_values else None
    fig = analysis.plot_batch_scaling(curves, target, gns)
    lines = [f"batch scaling (target val acc {target:g}); gradient noise scale ≈ {gns and round(gns)}"]
    for v, pts in curves.items():
        lines.append(f"  {v:>14}: " + ", ".join(
            f"B={p['batch_size']} acc {p['acc']:.3f} steps {p['steps'] or '—'}" + (" DIVERGED" if
                                                                                   p["diverged"] == p["trials"] else "")
            for p in pts))
    return {"batch_scaling.png": fig}, "\n".join(lines), {"curves": curves, "gns": gns}


def main(argv: list[str] | None = None):
    return run_cli("batch_scaling", PRESETS, argv, __doc__, GRID_FLAGS, analyze,
                   options={"target_acc": (float, "validation accuracy that counts as reached")})


if __name__ == "__main__":
    main(sys.argv[1:])
