"""hpo's joint search: Optuna's TPE over the preset's ranges in one cell, on the same trainable as the grid
phases (each trial one run, its own row). On --resume the finished trials are told to Optuna from the results
table (a data format, not a pickled searcher), then the remaining trials run."""
from __future__ import annotations

from typing import Any

from ray import tune

from studies.sweep.cells import Cell
from studies.sweep.design import Spec, Study
from studies.sweep.tune import ProgressPrinter, TrialEnv, fit, train_specs, trainable
from studies.training.config import TrainConfig, public_name
from studies.training.summary import OBJECTIVE, RunSummary


def tpe_space(ranges: dict[str, tuple[float, float, bool]]):
    import optuna

    return {k: optuna.distributions.FloatDistribution(lo, hi, log=log) for k, (lo, hi, log) in ranges.items()}


def tpe_trial(config: dict[str, Any], env: TrialEnv, base: TrainConfig, cell: Cell) -> None:
    """The trainable of a TPE trial: the searched values onto the cell's config; its name shows what TPE chose."""
    chosen = Cell(tuple((k, v) for k, v in config.items() if k != "base_lr")).short
    train_specs([Spec("tpe", cell, base.replace(**config), short=f"{cell.short} {chosen}".strip())], env)


def tpe_rows(table) -> list[dict]:
    return [r for r in table.read().to_pylist() if r["phase"] == "tpe"]


def run_tpe(study: Study, env: TrialEnv, concurrency: int, lock=None, watcher=None) -> bool:
    """True once the study has all its TPE trials."""
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    (cell,) = study.cells()
    base = study.config(cell, seed=study.seed)
    space = tpe_space(study.preset.tpe)
    table = env.table()
    rows = tpe_rows(table)
    remaining = study.preset.trials - len(rows)
    if remaining <= 0:
        return True
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = OptunaSearch(space=space, metric=OBJECTIVE, mode="max",
                            sampler=optuna.samplers.TPESampler(seed=study.seed, n_startup_trials=4),
                            points_to_evaluate=[{k: r[public_name(k)] for k in space} for r in rows] or None,
                            evaluated_rewards=[RunSummary.from_scalars(r).objective() for r in rows] or None)
    printer = ProgressPrinter()
    printer.expect("tpe", remaining)
    fit(study, trainable(tpe_trial, base, env=env, base=base, cell=cell),
        tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrency),
                        num_samples=remaining, reuse_actors=True), "tpe", lock, printer, watcher)
    return len(tpe_rows(table)) >= study.preset.trials
