"""The study's phases through Ray Tune: ONE Tune experiment for all of them (its trial processes stay warm from
scan to full), a deterministic searcher that hands out a phase only once every run of the phase before has its
row, the trainable (a few runs of one cell in a row, each writing its own row), progress lines, SIGTERM as
Ctrl-C. Runs whose rows exist are skipped: nothing is lost or run twice. Public Ray API only."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.search import Searcher

import storage
from studies.sweep import frontier, tables, watch
from studies.sweep.design import Spec, Study, group_specs
from studies.sweep.phases import Blocked, Plan, Step, complete
from studies.training import runner
from studies.training.summary import OBJECTIVE, RunSummary
from studies.training.tracking import git_commit, hardware, marked_name
from studies.training.watchdog import Watch


@dataclass
class TrialEnv:
    """Where every trial of the study reads and writes (the same for all its trials)."""

    study: str
    study_id: str  # study.json's: keys the study's MLflow runs to this output
    experiment: str
    dataset_uri: str
    tracking_uri: str
    parent_run_id: str
    results_uri: str
    storage_path: str  # Ray Train's storage for multi-worker runs' checkpoints
    fence: storage.lock.Fence | None = None  # the study's lock: checked before a run starts and before its row
    source: dict[str, str] | None = None  # MLflow's source tags, from the driver (mlflow_ui.source_tags)
    incidents_uri: str | None = None  # hung runs' stalls, a folder per run (watch.record_hung reads them)
    board: Any = None  # watch.BeatBoard: every run's last beat, for the driver's waiting lines

    def table(self) -> storage.ResultsTable:
        return tables.open_table(self.results_uri, self.fence)


def train_specs(specs: list[Spec], env: TrialEnv) -> None:
    """Run the specs in a row inside one Tune trial; each writes its row when it ends, and a retried trial skips
    the runs that have one."""
    table = env.table()
    # Read for every trial, one run or many: a retried trial (Tune's, after its row was written) or a TPE trial
    # that a resumed searcher suggests again must not train (and log into its finished MLflow run) twice.
    done = set(table.read().column("trial_key").to_pylist())
    for spec in specs:
        if spec.key in done:
            continue
        summary = train_spec(spec, env, table)
        tune.report({**{k: v for k, v in summary.scalars().items() if v is not None}, "trial_key": spec.key,
                     "label": spec.label, OBJECTIVE: summary.objective()})


def phase_trial(config: dict[str, Any], env: TrialEnv) -> None:
    """The trainable of the grid phases: config["specs"] holds the runs the PhaseSearcher handed out."""
    train_specs(config["specs"], env)


def train_spec(spec: Spec, env: TrialEnv, table: storage.ResultsTable) -> RunSummary:
    cfg = spec.config
    if env.fence is not None:  # a driver that lost the study's lock starts no run (and no MLflow run)
        storage.lock.check_fence(env.fence)
    record = runner.RunRecord(
        env.tracking_uri, env.experiment, spec.label, parent_run_id=env.parent_run_id, source=env.source,
        reuse_key=f"{env.study_id}:{spec.key}",
        tags={"study": env.study, "cell": spec.cell.label, "phase": spec.phase, "trial_key": spec.key,
              "lambda": cfg.lambda_label, "seed": str(cfg.seed), "order": spec.order},
        system_metrics=spec.phase not in frontier.SCAN_PHASES)  # scans last seconds: no monitor thread for them
    launch = runner.Launch(  # this process is the trial's: its reports and checkpoints go to Tune
        dataset_uri=env.dataset_uri, storage_path=env.storage_path, reports=runner.tune_reports(), quiet=True,
        watch=Watch(watch.incidents_of(env.incidents_uri, spec), watch.publisher(env.board, spec.label)))
    summary = runner.train_and_track(cfg, record=record, launch=launch)
    table.append_epochs(tables.epoch_rows(spec.key, summary.history))
    # The row last: once it exists the run is done, and --resume skips it.
    table.append([tables.results_row(spec.identity(env.study), cfg, summary, hardware(), git_commit())])
    return summary


def trainable(fn: Callable, cfg, **params):
    """A Tune trainable holding what one run of `cfg` needs (runner.trial_resources)."""
    return tune.with_resources(tune.with_parameters(fn, **params), runner.trial_resources(cfg))


class PhaseSearcher(Searcher):
    """Hands out the study's phases one after another (phases.Plan): at each boundary, once every trial handed out
    has ended, it reads the results table once and asks the plan for the next phase's runs, so the full phase sees
    the whole scan. Deterministic: no suggestion depends on the order in which trials finish."""

    def __init__(self, plan: Plan, read_rows: Callable[[], list[dict]], announce: Callable[[Step], None] = print,
                 blocked: Callable[[Blocked], None] = print):
        super().__init__(metric=OBJECTIVE, mode="max")
        self.plan, self.read_rows, self.announce, self.blocked = plan, read_rows, announce, blocked
        self.queue: list[list[Spec]] = []
        self.running: set[str] = set()
        self.ended = False

    def suggest(self, trial_id: str):
        if not self.queue:
            if self.running:
                return None  # the phase is still running: wait
            if self.ended:
                return Searcher.FINISHED
            step = self.plan.next(self.read_rows())
            if not isinstance(step, Step):
                self.ended = True
                if isinstance(step, Blocked):
                    self.blocked(step)
                return Searcher.FINISHED
            self.announce(step)
            self.queue = group_specs(step.todo, step.phase.runs_per_trial)
        self.running.add(trial_id)
        return {"specs": self.queue.pop(0)}

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        self.running.discard(trial_id)

    def save(self, checkpoint_path: str) -> None:
        pass  # nothing to save: the phases are recomputed from the results table on --resume

    def restore(self, checkpoint_path: str) -> None:
        pass


class ProgressPrinter(tune.Callback):
    """A line per finished training run: '[12/36 scan, ETA 3 min] ✓ b64 λ0.04 lr0.4 scan s0: trained …'. The
    phases tell it how many runs each has (expect()); the ETA is the phase's own pace so far × the runs left."""

    def __init__(self):
        self.done = 0
        self.t0: dict[str, float] = {}
        self.phase, self.total, self.phase_done, self.phase_t0 = "", 0, 0, time.time()

    def expect(self, phase: str, runs: int) -> None:
        self.phase, self.total, self.phase_done, self.phase_t0 = phase, runs, 0, time.time()

    def progress(self) -> str:
        self.phase_done += 1
        if not self.total:
            return f"[{self.done}]"
        left = max(0, self.total - self.phase_done)
        eta = (time.time() - self.phase_t0) / self.phase_done * left
        when = "done" if not left else f"ETA {eta:.0f} s" if eta < 120 else f"ETA {eta / 60:.0f} min"
        return f"[{self.phase_done}/{self.total} {self.phase}, {when}]"

    def on_trial_start(self, iteration, trials, trial, **info):
        self.t0.setdefault(trial.trial_id, time.time())

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "label" in result:  # one training run of the trial ended
            self._line(trial, result["label"], result.get("status", "?"), result)

    def on_trial_error(self, iteration, trials, trial, **info):
        # No row: a trial that failed on infrastructure (after its retries) is rerun by --resume; a run of it that
        # hung gets its `failed` row from watch.StudyWatch. A bad config or bad data never gets here: the trial
        # records it as a `failed` row itself.
        where = getattr(trial, "error_file", "") or "the Tune logs"
        runs = trial.config.get("specs") or [None]
        self._line(trial, f"a trial of {len(runs)} run(s)", "failed",
                   {"error": f"after {trial.num_failures} attempt(s), see {where}; --resume reruns its runs that "
                             "have no row"})

    def _line(self, trial, label: str, status: str, r: dict[str, Any]) -> None:
        self.done += 1
        verdict = r.get("verdict")
        extra = f" at step {r.get('diverged_step')}" if status == "diverged" else \
            f": {str(r.get('error', ''))[:160]}" if status == "failed" else ""
        acc = f" best val acc {r['best_val_acc']:.3f}" if r.get("best_val_acc") is not None else \
            f" loss {r['final_train_loss']:.3f}" if r.get("final_train_loss") is not None and status == "completed" \
            else ""
        dt = r.get("wall_time_s") or time.time() - self.t0.get(trial.trial_id, time.time())
        said = verdict if verdict and verdict != status else status  # 'trained'/'stalled' say more than 'completed'
        print(f"{self.progress()} {marked_name(label, status, verdict)}: {said}{extra}{acc} ({dt:.0f} s)",
              flush=True)


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """SIGTERM (a scheduler, `kill`) stops the study as Ctrl-C does: Tune stops the trials, the study is marked
    interrupted and stays resumable. Installed after ray.init, whose own SIGTERM handler would end the driver."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class LeaseStopper(tune.Stopper):
    """Ends the Tune experiment once the driver has lost the study's lock (no new trial starts, running ones stop:
    their row writes would be refused by the fence anyway), or once the study can make no more progress
    (watch.StudyWatch found it stuck)."""

    def __init__(self, lock, watcher: watch.StudyWatch | None = None):
        self.lock, self.watcher = lock, watcher

    def __getstate__(self):  # Tune saves its run config; the lock (a thread, a client) stays with the driver
        return {"lock": None, "watcher": None}

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        stuck = self.watcher is not None and self.watcher.waits.stuck is not None
        return stuck or (self.lock is not None and self.lock.lost())


def fit(study: Study, trainable_, tune_config: tune.TuneConfig, name: str, lock=None,
        printer: ProgressPrinter | None = None, watcher: watch.StudyWatch | None = None) -> None:
    """Fit one Tune experiment of the study (its own JSON and CSV trial loggers, progress lines, retries, the
    watcher's waiting lines and hung runs' rows); it stops once `lock` (storage.lock.Lock) is lost or the watcher
    finds the study stuck."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    # Tune's own JSON and CSV trial loggers (its end-of-fit analysis reads them), not its TensorBoard one: the
    # study's record is the results table and MLflow, and TensorBoardX warns "NaN or Inf" on a metric left NaN
    # on purpose (the noise scale of an unmeasured run). Read by Tune when the Tuner fits.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    run_config = tune.RunConfig(
        name=f"{study.name}-{name}-{time.strftime('%Y%m%d-%H%M%S')}",
        **storage.uri.ray_storage(storage.uri.join(study.study_dir, "tune")), verbose=0,
        callbacks=[printer or ProgressPrinter(), JsonLoggerCallback(), CSVLoggerCallback(),
                   *([watcher] if watcher is not None else [])],
        failure_config=tune.FailureConfig(max_failures=study.trial_retries), stop=LeaseStopper(lock, watcher))
    with sigterm_as_ctrl_c():
        tune.Tuner(trainable_, tune_config=tune_config, run_config=run_config).fit()


class Phases:
    """A grid study's phases through one Tune experiment (phases.PHASES, each computed from the rows before it)."""

    def __init__(self, study: Study, env: TrialEnv, table: storage.ResultsTable, concurrency: int, n_train: int,
                 lock=None, watcher: watch.StudyWatch | None = None):
        self.study, self.env, self.table, self.concurrency, self.n_train = study, env, table, concurrency, n_train
        self.lock, self.printer, self.watcher = lock, ProgressPrinter(), watcher

    def __getstate__(self):  # Tune pickles the searcher (and so this) into its own state; the lock stays here
        return {**self.__dict__, "lock": None, "printer": None, "watcher": None}

    def rows(self) -> list[dict]:
        return self.table.read().to_pylist()

    def announce(self, step: Step) -> None:
        n = len(step.todo)
        print(f"{step.phase.name}: {n} run(s)" + (f" ({step.done} already done)" if step.done else ""), flush=True)
        if self.printer is not None:
            self.printer.expect(step.phase.name, n)

    def blocked(self, b: Blocked) -> None:
        print(f"{b.phase}: {len(b.missing)} run(s) have no row after their retries (lost to infrastructure), and the "
              "phases after it depend on them: the study stops here; --resume reruns them", flush=True)

    def fit(self) -> bool:
        """True when every run of every phase has its row (False: interrupted, or lost to infrastructure)."""
        searcher = PhaseSearcher(Plan(self.study, self.n_train), self.rows, self.announce, self.blocked)
        # reuse_actors: a finished trial's process runs the next one (no Python + torch start per trial).
        fit(self.study, trainable(phase_trial, self.study.fixed, env=self.env),
            tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=self.concurrency,
                            reuse_actors=True), "grid", self.lock, self.printer, self.watcher)
        return complete(self.study, self.rows(), self.n_train)
