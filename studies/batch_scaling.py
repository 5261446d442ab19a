"""Batch scaling (Brock et al. 2021, Fig. 2a): BN-ResNet vs NF-ResNet without clipping vs NF-ResNet with AGC,
each at its own tuned learning rate, over batch sizes. Plots best accuracy and steps to a target accuracy
(Shallue et al. 2018) against batch size, with the measured gradient noise scale (McCandlish et al. 2018).

  python studies/batch_scaling.py --preset laptop
"""
from __future__ import annotations

import math
import statistics
import sys

from studies.agc_lambda import SMOKE_DATA
from studies.sweep import figures, findings, frontier, scaling
from studies.sweep.cli import run_study_cli
from studies.sweep.design import Analysis, Preset, log_grid

VARIANTS = ["bn_resnet", "nf_resnet", "nf_resnet+agc"]
PRESETS = {
    "laptop": Preset(
        grid={"variant": VARIANTS, "batch_size": [64, 256, 1024]}, lrs=log_grid(0.1, 3.2), scan_steps=48,
        scan_examples=20480, full_top=1, target_acc=0.3,
        fixed=dict(model_overrides={"width": 8, "depth": 1}, dataset="synthetic", clip_threshold=0.04,
                   dataset_params={"n_train": 16384, "n_val": 2048, "image_size": 16}, epochs=6, warmup_steps=0,
                   gns_every_steps=2, log_every_steps=2, checkpoint_every_epochs=0),
    ),
    "cifar10": Preset(
        grid={"variant": VARIANTS, "batch_size": [256, 512, 1024, 2048, 4096]}, lrs=log_grid(0.025, 1.6),
        scan_steps=100, scan_examples=51200, full_top=2, target_acc=0.85,
        fixed=dict(model_overrides={"width": 64, "depth": 2}, dataset="cifar10", use_gpu=True, epochs=30,
                   warmup_epochs=2, precision="bf16", channels_last=True, clip_threshold=0.02),
    ),
    "smoke": Preset(
        grid={"variant": ["nf_resnet+agc"], "batch_size": [64]}, lrs=(0.4, 1.6), scan_steps=16, scan_examples=8192,
        full_top=1, target_acc=0.1,
        fixed=dict(model_overrides={"width": 8, "depth": 1}, dataset="synthetic", clip_threshold=0.04,
                   **SMOKE_DATA, max_steps=128, log_every_steps=4),
    ),
}

GRID_FLAGS = {"variant": (str, "model variants: bn_resnet, nf_resnet, nf_resnet+agc"),
              "batch_size": (int, "batch sizes")}


def analyze(study, results, epochs):
    cells = frontier.frontier_table(results, best_k=study.preset.best_k)
    target = study.preset.target_acc
    curves = scaling.batch_scaling(results, epochs, target)
    # The noise scale is measured on the NF models only: splitting a batch would change a BN model's statistics.
    gns_values = [p["gns"] for pts in curves.values() for p in pts if math.isfinite(p["gns"])]
    gns = statistics.median(gns_values) if gns_values else None
    fig = figures.plot_batch_scaling(curves, target, gns)
    lines = [f"batch scaling (target val acc {target:g}); gradient noise scale ≈ {gns and round(gns)} "
             "(measured on the NF models; BN models are not split)"]
    for v, pts in curves.items():
        lines.append(f"  {v:>14}: " + ", ".join(
            f"B={p['batch_size']} acc {p['acc']:.3f} steps {p['steps'] or '—'}"
            + (" DIVERGED" if p["diverged"] == p["trials"] else "") for p in pts))
    lines.append(findings.frontier_summary(cells))
    return Analysis(cells, "\n".join(lines), {"batch_scaling.png": fig}, {"curves": curves, "gns": gns})


def main(argv: list[str] | None = None):
    return run_study_cli("batch_scaling", PRESETS, argv, __doc__, GRID_FLAGS, analyze)


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1:])["complete"] else 130)  # 130: interrupted, as after Ctrl-C
