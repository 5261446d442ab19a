"""Joint search at one batch size: Optuna (TPE) over learning rate, AGC λ and augmentation strength.
Reports the best configuration, Optuna's parameter importances and the search history (plots in MLflow).

  python studies/hpo.py --preset laptop --trials-per-cell 16
"""
from __future__ import annotations

import math
import sys

from studies.search import OBJECTIVE, run_cli

PRESETS = {
    "laptop": dict(
        grid={"batch_size": [256]}, trials_per_cell=12, seeds=1,
        nuisance={"base_lr": (0.05, 1.6, True), "clip_threshold": (0.005, 0.32, True),
                  "augment_strength": (0.0, 1.0, False)},
        fixed=dict(model="nf_resnet_cifar", model_overrides={"width": 8, "depth": 1}, dataset="synthetic",
                   clipping="agc", dataset_params={"n_train": 16384, "n_val": 2048, "image_size": 16}, epochs=3,
                   warmup_epochs=0.5),
    ),
    "cifar10": dict(
        grid={"batch_size": [1024]}, trials_per_cell=64, seeds=1,
        nuisance={"base_lr": (0.025, 0.8, True), "clip_threshold": (0.005, 0.32, True),
                  "augment_strength": (0.0, 1.0, False)},
        fixed=dict(model="nf_resnet_cifar", model_overrides={"width": 64, "depth": 2}, dataset="cifar10",
                   clipping="agc", use_gpu=True, epochs=30, warmup_epochs=2, precision="bf16", channels_last=True),
    ),
    "smoke": dict(
        grid={"batch_size": [64]}, trials_per_cell=2, seeds=1,
        nuisance={"base_lr": (0.05, 0.4, True), "clip_threshold": (0.01, 0.16, True),
                  "augment_strength": (0.0, 1.0, False)},
        fixed=dict(model="nf_resnet_cifar", model_overrides={"width": 8, "depth": 1}, dataset="synthetic",
                   clipping="agc", dataset_params={"n_train": 512, "n_val": 128}, max_steps=6, log_every_steps=2),
    ),
}


def optuna_study(results, nuisance: dict):
    """Rebuild an Optuna study from the results table (offline, no Ray) for Optuna's own analyses."""
    import optuna

    dists = {k: optuna.distributions.FloatDistribution(lo, hi, log=log) for k, (lo, hi, log) in nuisance.items()}
    st = optuna.create_study(direction="maximize")
    for r in results.to_pylist():
        params = {k: r[f"nui_{k}"] for k in nuisance if r.get(f"nui_{k}") is not None}
        if len(params) != len(nuisance):
            continue
        acc = r.get("best_val_acc")
        value = acc if r["status"] == "completed" and acc is not None and math.isfinite(acc) else 0.0
        st.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value))
    return st


def analyze(study, results, epochs):
    import matplotlib.pyplot as plt
    import optuna

    st = optuna_study(results, study.nuisance)
    if not st.trials:
        return {}, "no finished trials", {}
    importances = optuna.importance.get_param_importances(st) if len(st.trials) > 2 else {}
    values = [t.value for t in st.trials]
    fig_h, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(range(len(values)), values, "o", alpha=0.6, label=OBJECTIVE)
    ax.plot(range(len(values)), [max(values[: i + 1]) for i in range(len(values))], "-", label="best so far")
    ax.set(xlabel="trial", ylabel="best val top-1 (0 = diverged)", title="search history")
    ax.legend()
    fig_i, ax = plt.subplots(figsize=(6, 3))
    ax.barh(list(importances), list(importances.values()))
    ax.set(xlabel="importance (Optuna fANOVA)", title="parameter importances")
    fig_i.tight_layout()
    best = st.best_trial
    text = (f"best: val acc {best.value:.4f} with " + ", ".join(f"{k}={v:.4g}" for k, v in best.params.items())
            + "\nimportances: " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()))
    return ({"search_history.png": fig_h, "importances.png": fig_i}, text,
            {"best_params": best.params, "best_value": best.value, "importances": importances})


def main(argv: list[str] | None = None):
    return run_cli("hpo", PRESETS, argv, __doc__, {"batch_size": (int, "the batch size to search at")}, analyze)


if __name__ == "__main__":
    main(sys.argv[1:])
