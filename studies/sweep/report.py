"""The study's outputs: its analysis (figures, words, the cells table), written beside the results and logged on
the study's MLflow run, and the summary printed at the end. `write_outputs` is the one way a study writes files to
its output folder and its run (signal_prop uses it too)."""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import storage
from studies.sweep import figures, findings, frontier
from studies.sweep.design import Analysis, Study
from studies.training.summary import STATUSES
from studies.training.tracking import Tracker, redact


def frontier_analysis(study: Study, results: pa.Table, epochs: pa.Table) -> Analysis:
    """Default analysis: the stable region (frontier per cell), its words and its four figures."""
    cells = frontier.frontier_table(results, best_k=study.preset.best_k)
    if not cells.num_rows:
        return Analysis(cells)
    title = f"{study.name}: learning-rate frontier per batch size and AGC λ"
    figs = {"stable_region.png": figures.plot_stable_region(results, cells, title),
            "stability_map.png": figures.plot_stability_map(cells, title),
            "lr_loss.png": figures.plot_lr_loss(results),
            "lr_accuracy.png": figures.plot_lr_accuracy(results, best_k=study.preset.best_k)}
    return Analysis(cells, findings.frontier_summary(cells), figs)


def write_outputs(out_dir: str, writers: dict[str, Callable[[Path], None]], run: Tracker) -> dict[str, str]:
    """Each file written by its writer into a temporary folder, then copied (atomically) to `out_dir` and logged
    as an artifact of `run`. Returns name -> URI."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, write in writers.items():
            local = Path(tmp) / name
            write(local)
            fs, path = storage.resolve(storage.uri.join(out_dir, name))
            storage.uri.write_bytes_atomic(fs, path, local.read_bytes())
            run.log_artifact(local)
    return {name: storage.uri.join(out_dir, name) for name in writers}


def _figure_writer(fig) -> Callable[[Path], None]:
    def write(p: Path) -> None:
        fig.savefig(p, dpi=130, bbox_inches="tight")
        figures.close(fig)

    return write


def finish(study: Study, table: storage.ResultsTable, parent: Tracker, wall: float, complete: bool,
           notes: list[str] = ()) -> dict[str, Any]:
    """Analysis from the Parquet tables (resumed trials included), written beside the results and logged on the
    study's MLflow run. An interrupted study is marked so (MLflow KILLED), and --resume continues it."""
    results, epochs = table.read(), table.read_epochs()
    a = (study.analyze or frontier_analysis)(study, results, epochs)
    summary = summary_text(study, results, a.text, wall, complete, notes)
    files = write_outputs(study.study_dir, {
        **{name: _figure_writer(fig) for name, fig in a.figures.items()},
        "summary.txt": lambda p: p.write_text(summary),
        "results.parquet": lambda p: pq.write_table(results, p),
        "cells.parquet": lambda p: pq.write_table(a.cells, p)}, parent)
    statuses = results.column("status").to_pylist()
    parent.log_metrics({"trials": results.num_rows, "wall_time_s": wall,
                        **{f"trials_{s}": statuses.count(s) for s in STATUSES}}, step=0)
    for name, value, step in frontier.cell_metrics(a.cells):
        parent.log_metrics({name: value}, step=step)
    parent.set_tags({"status": "completed" if complete else "interrupted"})
    parent.client.set_terminated(parent.run_id, "FINISHED" if complete else "KILLED")
    return {"results": results, "epochs": epochs, "cells": a.cells, "wall_time_s": wall, "dir": study.study_dir,
            "parent_run_id": parent.run_id, "summary": summary, "complete": complete, "files": files, **a.extra}


def summary_text(study: Study, results, analysis_text: str, wall: float, complete: bool,
                 notes: list[str] = ()) -> str:
    statuses = results.column("status").to_pylist()
    state = "" if complete else ("INTERRUPTED — partial results (trials stopped, or lost to infrastructure "
                                 "after their retries); continue with --resume. ")
    lines = [f"{state}study {study.name}: {results.num_rows} trials in {wall / 60:.1f} min ("
             + ", ".join(f"{s} {statuses.count(s)}" for s in STATUSES) + ")"]
    lines += [f"budget: {n}" for n in notes]
    if analysis_text:
        lines.append(analysis_text)
    lines.append(f"outputs: {study.study_dir}/ (results.parquet, cells.parquet, figures, summary.txt)")
    lines.append(mlflow_line(study.experiment, study.tracking_uri))
    return "\n".join(lines)


def mlflow_line(experiment: str, uri: str) -> str:
    """Where to see the study's MLflow experiment (the URI without its password)."""
    uri = redact(uri)
    return (f"MLflow: experiment '{experiment}' — see it with: mlflow ui --backend-store-uri {uri}"
            if not uri.startswith("http") else f"MLflow: experiment '{experiment}' at {uri}")
