"""Does AGC let NF-ResNets train under strong augmentation? Brock et al. 2021 train NFNets with RandAugment +
MixUp + CutMix, and report that normalizer-free networks without AGC could not be trained with it. This study
maps the stable region over augmentation strength × λ at one large batch: for every cell, the range of learning
rates that trains, and the accuracy inside it.

  scientific  augmentation strength (one knob 0..1: RandAugment layers and magnitude, MixUp α, CutMix α; 1 = the
              big NFNets' setting) × λ (None = no clipping, the control)     → the map's rows × columns
  nuisance    learning rate: a fixed log grid scanned in EVERY cell (short runs judged trained / stalled /
              diverged), refined once at the frontier, then full runs at each cell's best lr and at its frontier
  fixed       one large batch and everything else (model, data, budget, schedule)

The findings say whether the no-clipping frontier (and its accuracy) falls as augmentation grows and whether AGC
holds it up at the strongest augmentation — or NOT SHOWN.

  python studies/augmentation.py --preset laptop     # built-in synthetic data, under 5 min on 2 CPU cores
  python studies/augmentation.py --augment-strengths 0 0.5 1 --lambdas 0.01 none   # a strength between
  python studies/augmentation.py --preset cifar10 --dataset-params '{"path": "/data/cifar10"}'
"""
from __future__ import annotations

import sys

from studies import agc_lambda
from studies.agc_lambda import LAPTOP_MODEL, SMOKE_DATA
from studies.sweep.cli import run_study_cli
from studies.sweep.design import Preset, log_grid

PRESETS = {
    # 2 CPU cores, under 5 min. Batch 512 of 16,384 images: in agc_lambda's laptop map the no-clipping frontier sits
    # between batch 256 (0.14) and 1024 (0.025) while AGC λ=0.01 holds ~8-20× more, so the control can fail here
    # and a scan costs half of batch 1024's. Measured on this data: under strength-1 augmentation nothing learns
    # within 96 steps (λ=0.01 at lr 0.2: 2.30 → 2.22, a stall), and without clipping lr 0.1 learns within 192
    # (2.30 → 2.12) but not reliably within 144-160 (2.16-2.27 over seeds); so scans and full runs are 192 steps,
    # which leaves room for two strengths (none and the big NFNets' 1) and an lr grid a factor 2 apart (√2 at the
    # frontier) from 0.05 (where the control learns without augmentation; 0.1 is borderline there) to 0.4. AGC
    # λ=0.01 trains at 0.4 in both rows (0.8 too without augmentation), so its frontier is a lower bound (≥).
    "laptop": Preset(
        grid={"augment_strength": [0.0, 1.0], "clip_threshold": [0.01, None]},
        lrs=log_grid(0.05, 0.4), scan_steps=192, scan_examples=0, full_top=1, seeds=1,
        fixed=dict(**LAPTOP_MODEL, dataset_params={"n_train": 16384, "n_val": 1024, "image_size": 16},
                   batch_size=512, epochs=6, warmup_steps=0, gns_every_steps=0, log_every_steps=8,
                   checkpoint_every_epochs=0),
    ),
    "cifar10": Preset(  # one GPU node, real CIFAR-10 from a path; the paper's large batch, its λ sweep
        grid={"augment_strength": [0.0, 0.25, 0.5, 0.75, 1.0], "clip_threshold": [0.01, 0.02, 0.04, None]},
        lrs=log_grid(0.025, 1.6), scan_steps=100, scan_examples=51200, full_top=1, seeds=1,
        fixed=dict(model="nf_resnet_cifar", model_overrides={"width": 64, "depth": 2}, dataset="cifar10",
                   use_gpu=True, batch_size=2048, epochs=40, warmup_epochs=2, precision="bf16",
                   channels_last=True, label_smoothing=0.1),
    ),
    # --smoke-test: tiny model, two cells (no and strong augmentation), one lr: the map's rows are augmentation
    "smoke": Preset(
        grid={"augment_strength": [0.0, 1.0], "clip_threshold": [0.04]}, lrs=(1.6,), scan_steps=16,
        scan_examples=8192, full_top=1,
        fixed=dict(**LAPTOP_MODEL, **SMOKE_DATA, batch_size=64, max_steps=128, log_every_steps=4),
    ),
}

GRID_FLAGS = {"augment_strength": (float, "augmentation strengths, 0..1 (rows of the map)"),
              "clip_threshold": agc_lambda.GRID_FLAGS["clip_threshold"]}


def main(argv: list[str] | None = None):
    return run_study_cli("augmentation", PRESETS, argv, __doc__, GRID_FLAGS)


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1:])["complete"] else 130)  # 130: interrupted, as after Ctrl-C
