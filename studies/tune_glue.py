"""Ray Tune glue of the studies: the driver's progress callback and the TPE search of hpo.py. Plain classes,
public Ray API only."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ray import tune
from ray.tune.search import Searcher

from studies import runner, schema

if TYPE_CHECKING:
    from studies.search import Phases, Study, TrialContext


class PhaseSearcher(Searcher):
    """Hands out the trials of one phase after another: a phase's trials are computed (by its function) only once
    every trial of the previous phase has ended, so the full phase sees the whole scan. Deterministic: no
    suggestion depends on the order in which trials finish."""

    def __init__(self, phases: list[Callable[[], list[list[dict]]]]):
        super().__init__(metric=runner.OBJECTIVE, mode="max")
        self.phases, self.queue, self.running = list(phases), [], set()

    def suggest(self, trial_id: str):
        while not self.queue:
            if self.running:
                return None  # the phase is still running: wait
            if not self.phases:
                return Searcher.FINISHED
            self.queue = self.phases.pop(0)()
        self.running.add(trial_id)
        return {"specs": self.queue.pop(0)}

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        self.running.discard(trial_id)

    def save(self, checkpoint_path: str) -> None:
        pass  # nothing to save: the phases are recomputed from the results table on --resume

    def restore(self, checkpoint_path: str) -> None:
        pass


class ProgressPrinter(tune.Callback):
    """A line per finished training run."""

    def __init__(self, ctx: TrialContext):
        self.ctx, self.done = ctx, 0
        self.t0: dict[str, float] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.t0.setdefault(trial.trial_id, time.time())

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "label" in result:  # one training run of the trial ended
            self._line(trial, result["label"], result.get("status", "?"), result)

    def on_trial_error(self, iteration, trials, trial, **info):
        # No row: a trial that failed on infrastructure (after its retries) is rerun by --resume. A bad config or
        # bad data never gets here: the trial records it as a `failed` row itself.
        where = getattr(trial, "error_file", "") or "the Tune logs"
        runs = trial.config.get("specs") or [{}]
        self._line(trial, f"a trial of {len(runs)} run(s)", "failed",
                   {"error": f"after {trial.num_failures} attempt(s), see {where}; --resume reruns it"})

    def _line(self, trial, label: str, status: str, r: dict[str, Any]) -> None:
        self.done += 1
        extra = f" at step {r.get('diverged_step')}" if status == "diverged" else \
            f": {str(r.get('error', ''))[:160]}" if status == "failed" else ""
        acc = f" best val acc {r['best_val_acc']:.3f}" if r.get("best_val_acc") is not None else \
            f" loss {r['final_train_loss']:.3f}" if r.get("final_train_loss") is not None and status == "completed" \
            else ""
        dt = r.get("wall_time_s") or time.time() - self.t0.get(trial.trial_id, time.time())
        print(f"[{self.done}] {label}: {status}{extra}{acc} ({dt:.0f} s)", flush=True)


def tpe_space(ranges: dict[str, tuple[float, float, bool]]):
    import optuna

    return {k: optuna.distributions.FloatDistribution(lo, hi, log=log) for k, (lo, hi, log) in ranges.items()}


def run_tpe(study: Study, ctx: TrialContext, phases: Phases) -> bool:
    """hpo: one cell, TPE over the preset's ranges. On --resume the finished trials are told to Optuna from the
    results table (a data format, not a pickled searcher), then the remaining trials run."""
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from studies.search import cell_label

    (cell,) = study.cells()
    ctx.fixed, ctx.cell = study.config(cell, seed=study.seed).to_dict(), cell_label(cell)
    space = tpe_space(study.preset.tpe)
    rows = [r for r in phases.table.read().to_pylist() if r["phase"] == "tpe"]
    remaining = study.preset.trials - len(rows)
    if remaining <= 0:
        return True
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    told = [{k: r[k] for k in space} for r in rows]
    rewards = [schema.RunSummary.from_scalars(r).objective() for r in rows]
    searcher = OptunaSearch(space=space, metric=runner.OBJECTIVE, mode="max",
                            sampler=optuna.samplers.TPESampler(seed=study.seed, n_startup_trials=4),
                            points_to_evaluate=told or None, evaluated_rewards=rewards or None)
    tuner = tune.Tuner(
        phases.trainable(),
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=phases.concurrency),
                                    num_samples=remaining, reuse_actors=True),
        run_config=phases.run_config("tpe", ProgressPrinter(ctx)))
    from studies.search import sigterm_as_ctrl_c

    with sigterm_as_ctrl_c():
        tuner.fit()
    return len([r for r in phases.table.read().to_pylist() if r["phase"] == "tpe"]) >= study.preset.trials

