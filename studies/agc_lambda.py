"""The AGC stable region (Brock et al. 2021, Fig. 2): for every batch size × clipping threshold λ, the range of
learning rates that trains — the frontier — and the accuracy inside it.

  scientific  batch size × λ (None = no clipping, the control)          → the map's rows × columns
  nuisance    learning rate: a fixed log grid scanned in EVERY cell (short runs judged trained / stalled /
              diverged), refined once at the frontier, then full runs at each cell's best lr and at its
              frontier; lr = base_lr × batch / 256 (linear scaling)
  fixed       everything else (model, data, budget, schedule)

  python studies/agc_lambda.py --preset laptop       # built-in synthetic data, 3 seeds where it decides
  python studies/agc_lambda.py --preset cifar10 --dataset-params '{"path": "/data/cifar10"}'
  python studies/agc_lambda.py --preset paper-imagenet --dataset-params '{"path": "/data/imagenet"}'
"""
from __future__ import annotations

import sys

from studies.sweep.cli import run_study_cli
from studies.sweep.design import Preset, log_grid
from studies.training.config import parse_lambda

LAMBDAS = [0.01, 0.02, 0.04, 0.08, 0.16, None]  # the paper's λ sweep plus its control
BATCHES = [256, 512, 1024, 2048, 4096]
LAPTOP_MODEL = dict(model="nf_resnet_cifar", model_overrides={"width": 8, "depth": 1}, dataset="synthetic")
SMOKE_DATA = dict(dataset_params={"n_train": 2048, "n_val": 256, "image_size": 16})

PRESETS = {
    # 2 CPU cores; 16 px images keep batch 1024 cheap. Budgets measured on this data: nothing learns in
    # its first ~5k examples (batch 64) or ~30 steps (batch 1024), and without clipping only base lr ≤ 0.025
    # learns at batch 1024, within ~90 steps; so a scan sees ≥ 20k examples and ≥ 96 steps, from lr 0.025.
    # 6 epochs give batch 1024 96 steps, where its best run reaches > 0.3 top-1 (2 epochs, 32 steps: 0.17).
    # bf16 autocast (fp32 parameters, as the NFNet recipe) + channels_last: ~2.5× the fp32 NCHW images/s per core
    # at batch 256-1024, ~1.3× at 64 (benchmarks/study_speed.py), which pays for replication; its verdicts were
    # compared with fp32 run by run on the same seed (README, "Replication").
    "laptop": Preset(
        grid={"batch_size": [64, 256, 1024], "clip_threshold": [0.01, 0.04, None]},
        lrs=log_grid(0.025, 3.2), scan_steps=96, scan_examples=20480, full_top=1, seeds=1, replicates=3,
        fixed=dict(**LAPTOP_MODEL, dataset_params={"n_train": 16384, "n_val": 2048, "image_size": 16}, epochs=6,
                   warmup_steps=0, gns_every_steps=0, log_every_steps=4, checkpoint_every_epochs=0,
                   precision="bf16", channels_last=True),
    ),
    "cifar10": Preset(  # one GPU node, real CIFAR-10 from a path; scans run past the 2-epoch warmup
        grid={"batch_size": BATCHES, "clip_threshold": LAMBDAS}, lrs=log_grid(0.025, 1.6), scan_steps=100,
        scan_examples=51200, full_top=2, seeds=1, replicates=3,
        fixed=dict(model="nf_resnet_cifar", model_overrides={"width": 64, "depth": 2}, dataset="cifar10",
                   use_gpu=True, epochs=30, warmup_epochs=2, precision="bf16", channels_last=True,
                   augment_strength=0.2, label_smoothing=0.1),
    ),
    # The paper's protocol (Fig. 2 as published): lr by the linear scaling rule (base 0.1), no lr search, 5 seeds,
    # each point the mean of the best 4.
    "paper-cifar10": Preset(
        grid={"batch_size": BATCHES, "clip_threshold": LAMBDAS}, lrs=(0.1,), seeds=5, best_k=4,
        fixed=dict(model="nf_resnet_cifar", model_overrides={"width": 64, "depth": 2}, dataset="cifar10",
                   use_gpu=True, epochs=30, warmup_epochs=2, precision="bf16", channels_last=True,
                   augment_strength=0.2, label_smoothing=0.1),
    ),
    "paper-imagenet": Preset(  # NF-ResNet-50, 90 epochs, 8 GPUs per trial
        grid={"batch_size": BATCHES, "clip_threshold": LAMBDAS}, lrs=(0.1,), seeds=5, best_k=4,
        fixed=dict(model="nf_resnet50", dataset="imagefolder", image_size=224, use_gpu=True, num_workers=8,
                   cpus_per_worker=8, epochs=90, warmup_epochs=5, precision="bf16", channels_last=True,
                   loader="streaming", label_smoothing=0.1, max_failures=3),
    ),
    # --smoke-test: tiny model, one cell, two lrs; ~130-step scans, enough for this data to leave chance loss, so
    # every phase runs (scan, refine, full). The laptop study's kernels (bf16 autocast + channels_last): the path
    # it checks is the one the study runs, and its runs take 0.6-0.7× the time of fp32 NCHW at batch 64-128.
    "smoke": Preset(
        grid={"batch_size": [64], "clip_threshold": [0.04]}, lrs=(0.4, 1.6), scan_steps=16, scan_examples=8192,
        full_top=1, fixed=dict(**LAPTOP_MODEL, **SMOKE_DATA, max_steps=128, log_every_steps=4, precision="bf16",
                               channels_last=True),
    ),
}
PRESETS["imagenet"] = PRESETS["paper-imagenet"]

GRID_FLAGS = {"batch_size": (int, "batch sizes (rows of the map)"),
              "clip_threshold": (parse_lambda, "AGC λ values; 'none' = no clipping (columns of the map)")}


def main(argv: list[str] | None = None):
    return run_study_cli("agc_lambda", PRESETS, argv, __doc__, GRID_FLAGS)


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1:])["complete"] else 130)  # 130: interrupted, as after Ctrl-C
