"""The AGC stability map (Brock et al. 2021, Fig. 2): over batch size × clipping threshold λ, where does a
normalizer-free ResNet train, and which λ is best at each batch size?

  python studies/agc_lambda.py --preset laptop       # built-in synthetic data, ~6 min on 2 CPU cores
  python studies/agc_lambda.py --preset cifar10 --dataset-params '{"path": "/data/cifar10"}'
"""
from __future__ import annotations

import sys

from studies.search import parse_grid_value, run_cli

LAMBDAS = [0.01, 0.02, 0.04, 0.08, 0.16, None]  # None = no clipping: the paper's λ sweep plus its control

PRESETS = {
    # scientific: "grid" (the map's axes). nuisance: searched by Optuna in EVERY cell (lr per 256 examples,
    # log-uniform around the linear scaling rule's 0.1·B/256). fixed: everything else.
    "laptop": dict(  # 2 CPU cores, ~6 min: 16 px synthetic images keep 3 epochs at batch 1024 at 48 steps
        grid={"batch_size": [64, 256, 1024], "lambda": [0.01, 0.04, 0.16, None]},
        nuisance={"base_lr": (0.1, 3.2, True)}, centre={"base_lr": 0.4}, trials_per_cell=3, seeds=1,
        fixed=dict(model="nf_resnet_cifar", model_overrides={"width": 8, "depth": 1}, dataset="synthetic",
                   dataset_params={"n_train": 16384, "n_val": 2048, "image_size": 16}, epochs=3,
                   warmup_epochs=0.5, gns_every_steps=2, log_every_steps=2, checkpoint_every_epochs=1),
    ),
    "cifar10": dict(  # one GPU node, real CIFAR-10 from a path
        grid={"batch_size": [256, 512, 1024, 2048, 4096], "lambda": LAMBDAS},
        nuisance={"base_lr": (0.025, 0.8, True)}, centre={"base_lr": 0.1}, trials_per_cell=4, seeds=1,
        fixed=dict(model="nf_resnet_cifar", model_overrides={"width": 64, "depth": 2}, dataset="cifar10",
                   use_gpu=True, epochs=30, warmup_epochs=2, precision="bf16", channels_last=True,
                   augment_strength=0.2, label_smoothing=0.1),
    ),
    "imagenet": dict(  # a GPU cluster: the paper's setting (NF-ResNet-50, 90 epochs, best 4 of 5 seeds)
        grid={"batch_size": [256, 512, 1024, 2048, 4096], "lambda": LAMBDAS},
        nuisance={"base_lr": (0.025, 0.4, True)}, centre={"base_lr": 0.1}, trials_per_cell=3, seeds=5, best_k=4,
        fixed=dict(model="nf_resnet50", dataset="imagefolder", image_size=224, use_gpu=True, num_workers=8,
                   cpus_per_worker=8, epochs=90, warmup_epochs=5, precision="bf16", channels_last=True,
                   loader="streaming", label_smoothing=0.1, max_failures=3),
    ),
    "smoke": dict(  # --smoke-test: tiny model, one trial, a few steps
        grid={"batch_size": [64], "lambda": [0.04]},
        nuisance={"base_lr": (0.05, 0.4, True)}, centre={"base_lr": 0.1}, trials_per_cell=1, seeds=1,
        fixed=dict(model="nf_resnet_cifar", model_overrides={"width": 8, "depth": 1}, dataset="synthetic",
                   dataset_params={"n_train": 512, "n_val": 128}, max_steps=6, log_every_steps=2),
    ),
}

GRID_FLAGS = {"batch_size": (int, "batch sizes (rows of the map)"),
              "lambda": (parse_grid_value, "AGC λ values; 'none' = no clipping (columns of the map)")}


def main(argv: list[str] | None = None):
    return run_cli("agc_lambda", PRESETS, argv, __doc__, GRID_FLAGS)


if __name__ == "__main__":
    main(sys.argv[1:])
