"""run_study, top to bottom: check → lock → prepare → size → record → tune → report."""
from __future__ import annotations

import time
import uuid
from typing import Any

import storage
from studies.sweep import cluster, record, report
from studies.sweep.design import Study, budget_notes, design_params
from studies.training import runner
from studies.training.mlflow_ui import describe_experiment, save_view, source_tags
from studies.training.tracking import Tracker, check_tracking_uri, hardware


def run_study(study: Study) -> dict[str, Any]:
    """Run (or resume) the study; returns its tables, figures, summary and where things are."""
    record.check_cells(study)
    check_tracking_uri(study.tracking_uri)
    record.check_paths(study)
    # One study per output at a time: a second would share its tables and MLflow runs.
    with storage.acquire_lock(study.study_dir, owner=f"study {study.name}") as lock:
        return _run_locked(study, record.check_record(study), lock)


def _run_locked(study: Study, study_id: str | None, lock: storage.lock.Lock) -> dict[str, Any]:
    # Ray Tune is imported only here, once the checks have passed: `--help` and a refused flag answer at once.
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
    env = TrialEnv(study.name, study_id, study.experiment, dataset_uri, study.tracking_uri, parent.run_id,
                   table.uri, storage.uri.join(study.study_dir, "train"), lock.fence(),
                   source=source_tags(study.script))
    t0 = time.time()
    if study.preset.tpe is not None:
        complete = run_tpe(study, env, concurrency, lock)
    else:
        complete = Phases(study, env, table, concurrency, n_train, lock).fit()
    try:
        lock.check()
    except storage.lock.LeaseLost as e:  # another driver may hold the study now: write nothing more
        raise storage.lock.LeaseLost(f"{e}. The study stopped starting trials and wrote nothing after the loss; "
                                     "its rows so far are kept: once no other driver runs it, continue with "
                                     "--resume") from None
    return {**report.finish(study, table, parent, time.time() - t0, complete, notes), "concurrency": concurrency}


def study_run(study: Study, study_id: str, concurrency: int) -> Tracker:
    """The study's own MLflow run (the parent of its trials' runs); a resumed study continues the same one."""
    parent = Tracker.create(study.tracking_uri, study.experiment, study.name,
                            tags={"role": "study", **source_tags(study.script), "hardware": hardware()},
                            reuse_tag=("study_id", study_id), reopen=True)
    describe_experiment(parent.client, parent.experiment_id(), report.experiment_description(study))
    save_view(parent.client, parent.experiment_id(), report.VIEW, report.study_view(study))
    parent.log_params(design_params(study, concurrency))
    parent.set_tags({"status": "running", "mlflow.note.content": f"## {study.name}\n\nrunning: the findings, the "
                     "frontier table and the figures appear here when the study ends."})
    return parent
