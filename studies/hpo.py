"""Joint search at one batch size: Optuna (TPE) over learning rate, AGC λ and augmentation strength.
Reports the best configuration, Optuna's parameter importances and the search history (plots in MLflow).

  python studies/hpo.py --preset laptop --trials 16
"""
from __future__ import annotations

import sys

from studies.sweep import frontier
from studies.sweep.cli import run_study_cli
from studies.sweep.design import Analysis, Preset
from studies.sweep.tpe import tpe_space
from studies.training.config import public_name
from studies.training.summary import OBJECTIVE, RunSummary

RANGES = {"base_lr": (0.05, 1.6, True), "clip_threshold": (0.005, 0.32, True), "augment_strength": (0.0, 1.0, False)}
LAPTOP = dict(model="nf_resnet_cifar", model_overrides={"width": 8, "depth": 1}, dataset="synthetic", clipping="agc")
PRESETS = {
    "laptop": Preset(grid={"batch_size": [256]}, tpe=RANGES, trials=12,
                     fixed=dict(**LAPTOP, dataset_params={"n_train": 16384, "n_val": 2048, "image_size": 16},
                                epochs=3, warmup_epochs=0.5)),
    "cifar10": Preset(grid={"batch_size": [1024]}, tpe={**RANGES, "base_lr": (0.025, 0.8, True)}, trials=64,
                      fixed=dict(model="nf_resnet_cifar", model_overrides={"width": 64, "depth": 2},
                                 dataset="cifar10", clipping="agc", use_gpu=True, epochs=30, warmup_epochs=2,
                                 precision="bf16", channels_last=True)),
    "smoke": Preset(grid={"batch_size": [64]}, tpe={**RANGES, "base_lr": (0.05, 0.4, True)}, trials=2,
                    fixed=dict(**LAPTOP, dataset_params={"n_train": 512, "n_val": 128}, max_steps=6,
                               log_every_steps=2)),
}


def optuna_study(results, ranges: dict):
    """Rebuild an Optuna study from the results table (offline, no Ray) for Optuna's own analyses. A trial's
    value is RunSummary.objective(), exactly what the search was told."""
    import optuna

    dists = {public_name(k): d for k, d in tpe_space(ranges).items()}  # named as in the table: λ is `lambda`
    st = optuna.create_study(direction="maximize")
    for r in results.to_pylist():
        if r["phase"] == "tpe" and all(r.get(k) is not None for k in dists):
            st.add_trial(optuna.trial.create_trial(params={k: r[k] for k in dists}, distributions=dists,
                                                   value=RunSummary.from_scalars(r).objective()))
    return st


def analyze(study, results, epochs):
    import matplotlib.pyplot as plt
    import optuna

    cells = frontier.frontier_table(results)
    st = optuna_study(results, study.preset.tpe)
    if not st.trials:
        return Analysis(cells, "no finished trials")
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
    return Analysis(cells, text, {"search_history.png": fig_h, "importances.png": fig_i},
                    {"best_params": best.params, "best_value": best.value, "importances": importances})


def main(argv: list[str] | None = None):
    return run_study_cli("hpo", PRESETS, argv, __doc__, {"batch_size": (int, "the batch size to search at")},
                         analyze)


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1:])["complete"] else 130)  # 130: interrupted, as after Ctrl-C
