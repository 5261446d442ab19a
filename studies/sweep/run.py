"""run_study, top to bottom: check → lock → prepare → size → record → tune → report."""
from __future__ import annotations

import sys
import time
import uuid
from typing import Any

import storage
from studies.sweep import cluster, record, report
from studies.sweep.design import STUDY_ORDER, Study, budget_notes, design_params
from studies.training import runner
from studies.training.mlflow_ui import describe_experiment, save_view, source_tags
from studies.training.tracking import Tracker, check_tracking_uri, hardware

PROBE_S = {True: 2.0, False: 30.0}  # how often the driver probes the results folder: local, object store


def run_study(study: Study) -> dict[str, Any]:
    """Run (or resume) the study; returns its tables, figures, summary and where things are. A study refused before
    its record is written leaves its output as it found it: no lock file, no folder it made."""
    record.check_cells(study)
    check_tracking_uri(study.tracking_uri)
    record.check_record(study)  # before anything is written: --resume with no study there, a rerun without it
    made = storage.uri.missing_dirs(study.study_dir)
    record.check_paths(study)
    # One study per output at a time: a second would share its tables and MLflow runs.
    lock = storage.acquire_lock(study.study_dir, owner=f"study {study.name}")
    try:
        return _run_locked(study, record.check_record(study), lock)  # checked again: the record is ours now
    except Exception:
        if not _recorded(study):  # refused before its record: nothing of it stays
            lock.release(discard=True)
            storage.uri.remove_empty_dirs(made)
        raise
    finally:
        lock.release()


def _recorded(study: Study) -> bool:
    try:
        return record.read_record(study) is not None
    except Exception:
        return True  # unknown: keep everything


def _run_locked(study: Study, study_id: str | None, lock: storage.lock.Lock) -> dict[str, Any]:
    # Ray Tune is imported only here, once the checks have passed: `--help` and a refused flag answer at once.
    from studies.sweep import watch
    from studies.sweep.tpe import run_tpe
    from studies.sweep.tune import Phases, TrialEnv

    dataset_uri = runner.prepare_data(study.fixed)
    n_train = record.validate(study, dataset_uri)
    notes = budget_notes(study, n_train)
    for note in notes:
        print(f"budget: {note}", flush=True)
    runner.init_ray()  # workers' output off (NFNET_LAB_RAY_LOGS=1 shows it): a line per trial instead
    cap = cluster.cluster_capacity()
    cluster.check_cluster_paths(study, cap.nodes, cap.autoscaling)
    concurrency = study.max_concurrent or cluster.cluster_concurrency(study.fixed, cap)
    if study_id is None:  # only now: a study refused before any trial leaves nothing that would ask for --resume
        # A new id per new record: a study of the same name in another output, or rerun after its folder was
        # deleted, gets its own MLflow runs instead of adopting (and appending to) the old ones.
        study_id = uuid.uuid4().hex[:16]
        record.write_record(study, study_id)
    parent = study_run(study, study_id, concurrency)
    table = study.table()
    board = watch.BeatBoard.remote()
    env = TrialEnv(study.name, study_id, study.experiment, dataset_uri, study.tracking_uri, parent.run_id,
                   table.uri, storage.uri.join(study.study_dir, "train"), lock.fence(),
                   source=source_tags(study.script), incidents_uri=storage.uri.join(study.study_dir, "incidents"),
                   board=board)
    guard, watcher = WriteGuard(lock, table), watch.StudyWatch(env, table, board, autoscaling=cap.autoscaling)
    t0 = time.time()
    try:
        if study.preset.tpe is not None:
            complete = run_tpe(study, env, concurrency, guard, watcher)
        else:
            complete = Phases(study, env, table, concurrency, n_train, guard, watcher).fit()
    except Exception as e:  # Tune's own state files under the output fail on a full disk too
        if guard.unwritable(now=True) is None:
            raise
        raise stopped(study, parent, guard.fault) from e
    if watcher.waits.stuck is not None:
        raise stopped(study, parent, watch.StudyStuck(watcher.waits.stuck))
    try:
        lock.check()
    except storage.lock.LeaseLost as e:  # another driver may hold the study now: write nothing more
        raise storage.lock.LeaseLost(f"{e}. The study stopped starting trials and wrote nothing after the loss; "
                                     "its rows so far are kept: once no other driver runs it, continue with "
                                     "--resume") from None
    if not complete and guard.unwritable(now=True) is not None:
        raise stopped(study, parent, guard.fault)
    try:
        out = report.finish(study, table, parent, time.time() - t0, complete, notes)
    except storage.StorageUnwritable as e:  # the figures or the summary: the rows are in, --resume writes them
        raise stopped(study, parent, e.then("continue the study with --resume (it writes the report)")) from e
    return {**out, "concurrency": concurrency}


class WriteGuard:
    """The study's lock as Tune's stopper sees it (tune.LeaseStopper asks lost() at every step of the Tune loop):
    lost also once the results folder refuses writes (no space, read-only, permission lost). A trial's row write
    fails in the trial's own process, out of the driver's sight, and every trial started after it would train for
    nothing; a probe write of the folder (ResultsTable.check_writable, at most every PROBE_S seconds) finds it."""

    def __init__(self, lock: storage.lock.Lock, table: storage.ResultsTable):
        self.lock, self.table, self.every = lock, table, PROBE_S[storage.uri.is_local(table.fs)]
        self.fault: storage.StorageUnwritable | None = None
        self.next = 0.0

    def unwritable(self, now: bool = False) -> storage.StorageUnwritable | None:
        """The results folder's write fault, if it has one (probed now, or when the last probe is PROBE_S old)."""
        if self.fault is None and (now or time.monotonic() >= self.next):
            self.next = time.monotonic() + self.every
            try:
                self.table.check_writable()
            except storage.StorageUnwritable as e:
                self.fault = e
            except storage.StorageError:
                pass  # unreachable for a moment (object-store throttling): the trials' writes report their own
        return self.fault

    def lost(self) -> bool:
        return self.lock.lost() or self.unwritable() is not None


def stopped(study: Study, parent: Tracker, fault: Exception) -> Exception:
    """The study's MLflow run marked interrupted (KILLED: --resume reopens it), saying why, and the runs of the trials
    the stop cut off KILLED too (--resume replaces them; none is left RUNNING); -> fault, to raise."""
    try:
        cut = parent.client.search_runs([parent.experiment_id()], f"tags.mlflow.parentRunId = '{parent.run_id}' and "
                                        "attributes.status = 'RUNNING'", max_results=1000)
        for run in cut:
            parent.client.set_terminated(run.info.run_id, "KILLED")
        parent.set_tags({"status": "interrupted", "mlflow.note.content": f"## {study.name}\n\nstopped: {fault}"})
        parent.client.set_terminated(parent.run_id, "KILLED")
    except Exception as e:  # the MLflow store may be on the same full disk: the raised line still says what to do
        print(f"warning: the study's MLflow run could not be marked interrupted ({storage.uri.one_line(e)})",
              file=sys.stderr, flush=True)
    return fault


def study_run(study: Study, study_id: str, concurrency: int) -> Tracker:
    """The study's own MLflow run (the parent of its trials' runs); a resumed study continues the same one."""
    parent = Tracker.create(study.tracking_uri, study.experiment, study.name,
                            tags={"role": "study", "order": STUDY_ORDER, **source_tags(study.script),
                                  "hardware": hardware()},
                            reuse_tag=("study_id", study_id), reopen=True)
    describe_experiment(parent.client, parent.experiment_id(), report.experiment_description(study))
    save_view(parent.client, parent.experiment_id(), report.VIEW, report.study_view(study))
    parent.log_params(design_params(study, concurrency))
    parent.set_tags({"status": "running", "mlflow.note.content": f"## {study.name}\n\nrunning: the findings, the "
                     "frontier table and the figures appear here when the study ends."})
    return parent
