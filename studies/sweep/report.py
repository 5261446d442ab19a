"""The study's outputs: its analysis (figures, words, the cells table), written beside the results and logged on
the study's MLflow run, and the summary printed at the end. `write_outputs` is the one way a study writes files to
its output folder and its run (signal_prop uses it too)."""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

import storage
from studies.sweep import figures, findings, frontier, layout
from studies.sweep.design import Analysis, Study
from studies.training.config import lambda_label, public_name
from studies.training.mlflow_ui import ui_link
from studies.training.summary import STATUSES
from studies.training.tracking import Tracker, redact

# What each figure of the frontier analysis shows: the study run's description lists them.
FIGURES = {
    "stability_map.png": "heatmap, the map's rows (batch size, or augmentation) × λ, one per value of a third axis: "
                         "the largest base lr that trains (colour, log scale; ≥ = a lower bound) with the seeds "
                         "it rests on, the next lr and the seeds that failed there, the seeds' own frontiers and the "
                         "best accuracy (mean ± sd); grey = undecided, hatched = no lr trains",
    "stable_region.png": "a panel per λ (a row of panels per third-axis value): every tried lr (log) × the map's "
                         "rows, marked trained / stalled / diverged (majority of seeds; each seed's verdict small "
                         "beneath a replicated lr), the frontier as a line, its range over seeds as a band",
    "lr_loss.png": "final scan loss vs lr, a panel per row of the map, a line per λ (Wortsman et al. 2023); "
                   "diverged lrs drawn at the start loss; each seed a small point at a replicated lr",
    "lr_accuracy.png": "val top-1 of the full runs vs lr, a panel per row of the map, a line per λ (mean over "
                       "seeds, each seed a point, their range a bar)",
    "frontier_scaling.png": "the frontier's peak lr (base × B/256) vs batch size, log-log, a line per λ with its "
                            "fitted slope α (peak lr ∝ B^α; bounds drawn open, left out of the fit) and the "
                            "linear-scaling line (α = 1)",
}


def frontier_analysis(study: Study, results: pa.Table, epochs: pa.Table) -> Analysis:
    """Default analysis: the stable region (frontier per cell), its words and its five figures."""
    cells = frontier.frontier_table(results, best_k=study.preset.best_k)
    if not cells.num_rows:
        return Analysis(cells)
    axes = " × ".join("AGC λ" if a == "clip_threshold" else a.replace("_", " ") for a in study.preset.grid)
    title = f"{study.name}: learning-rate frontier per {axes}"
    figs = {"stable_region.png": figures.plot_stable_region(results, cells, title),
            "stability_map.png": figures.plot_stability_map(cells, title),
            "lr_loss.png": figures.plot_lr_loss(results),
            "lr_accuracy.png": figures.plot_lr_accuracy(results, best_k=study.preset.best_k),
            "frontier_scaling.png": figures.plot_frontier_scaling(cells, results)}
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
    link = ui_link(study.tracking_uri, parent.experiment_id(), VIEW)
    summary = summary_text(study, results, a.text, wall, complete, notes, link)
    table_md = findings.frontier_markdown(a.cells) if "max_stable_lr" in a.cells.column_names else ""
    files = write_outputs(study.study_dir, {
        **{name: _figure_writer(fig) for name, fig in a.figures.items()},
        "summary.txt": lambda p: p.write_text(summary),
        **({"frontier.md": lambda p: p.write_text(table_md),
            "cells.csv": lambda p: pcsv.write_csv(cells_preview(a.cells), p)} if table_md else {}),
        "results.parquet": lambda p: pq.write_table(results, p),
        "cells.parquet": lambda p: pq.write_table(a.cells, p)}, parent)
    statuses = results.column("status").to_pylist()
    parent.log_metrics({"trials": results.num_rows, "wall_time_s": wall,
                        **{f"trials_{s}": statuses.count(s) for s in STATUSES}}, step=0)
    for name, value, step in layout.cell_metrics(a.cells):
        parent.log_metrics({name: value}, step=step)
    parent.set_tags({"status": "completed" if complete else "interrupted",
                     "mlflow.note.content": study_note(study, summary, table_md, a.text, list(a.figures))})
    parent.client.set_terminated(parent.run_id, "FINISHED" if complete else "KILLED")
    return {"results": results, "epochs": epochs, "cells": a.cells, "wall_time_s": wall, "dir": study.study_dir,
            "parent_run_id": parent.run_id, "summary": summary, "complete": complete, "files": files, **a.extra}


VIEW = "study"  # the saved view of the runs table every printed link opens


def study_view(study: Study) -> dict[str, Any]:
    """The runs table the printed link opens: sorted by name, so the study run comes first and its trials follow,
    listed flat (MLflow nests children only when sorting by date, and a shared view cannot expand a parent),
    grouped by their verdict's mark; columns: verdict, the grid axes, base lr, phase, seed, loss, accuracy."""
    axes = [public_name(a) if a != "variant" else "model" for a in study.preset.grid]
    params = [*axes, *(public_name(k) for k in study.preset.tpe or {}), "base_lr", "seed"]
    return {"orderByKey": "tags.`mlflow.runName`", "orderByAsc": True,
            "selectedColumns": ["tags.`verdict`", *dict.fromkeys(f"params.`{p}`" for p in params), "tags.`phase`",
                                "metrics.`loss/train`", "metrics.`top1/val`"]}


def experiment_description(study: Study) -> str:
    """The MLflow experiment's description (Markdown): what the study is (its script's docstring) and how to read
    what it logged."""
    about = study.about.strip()
    kind = "a TPE search" if study.preset.tpe else "a grid study"
    return "\n".join([
        f"# {study.name}", "", *([about, ""] if about else []), "## How to read this experiment", "",
        f"- **The study run** `{study.name}` ({kind}; the parent row of the Runs table, expand it for its trials): "
        "its description holds the outcome, the frontier table and the findings in words; its Artifacts tab holds "
        "the figures, `frontier.md`, `cells.csv` and the Parquet tables. Its params are the design (`grid.*`, "
        "`design.*`) and what is held fixed (`fixed.*`).",
        "- **Trials** are its nested runs, named by what differs: `✓ b1024 λ0.16 lr3.2 scan s0` = verdict, batch "
        "size (`aug0.5`: augmentation strength, where it is an axis), λ (`none`: no clipping), base lr per 256 "
        "examples, phase (`scan`: a short run at a constant lr; "
        "`refine`: one more lr at the frontier; `full`: the whole budget; `tpe`), seed. Verdicts: ✓ trained (its "
        "loss fell clearly below its start), ≈ stalled (finite but did not learn: heavy clipping can do that), "
        "✗ diverged, ! failed; the `verdict` tag says it in words.",
        "- **A trial's charts**: `loss/*` first (train per epoch and per step, val), then `opt/lr`, `stability/*` "
        "(AGC's clipped fraction per stage, gradient norms, the noise scale), `throughput/*`, `top1/*`.",
        "- **The frontier** of a cell (one value of each grid axis: " + " × ".join(
            public_name(a) for a in study.preset.grid) + ") is the largest base lr that trains; `≥` marks a lower "
        "bound (it trained up to the largest lr tried). The study run's metrics `max_stable_lr/<cell>` hold it per "
        "cell (`max_stable_lr/b1024/lambda_0.01`, `max_stable_lr/aug0.5/lambda_none`).",
        "- This view: `…/#/experiments/<id>/runs?workflowType=machine_learning` (MLflow 3 opens experiments in its "
        "GenAI view otherwise)."])


PREVIEW = ("cell", "batch_size", "lambda", "augment_strength", "frontier", "agreement", "max_stable_lr",
           "max_stable_lr_min", "max_stable_lr_max", "first_unstable_lr", "first_unstable_verdict",
           "first_unstable_kind", "scan_trained", "scan_stalled", "scan_collapsed", "scan_diverged", "frontier_holds",
           "best_val_acc", "best_val_acc_sd", "best_base_lr")


def cells_preview(cells: pa.Table) -> pa.Table:
    """cells.csv, the table MLflow's artifact view previews: the cells' main columns, λ as its label ('none') and
    the frontier as the map writes it ('≥12.8' = up to the largest lr tried; 'undecided', 'none')."""
    rows = []
    for c in cells.to_pylist():
        row = {k: c.get(k) for k in PREVIEW}
        row["lambda"] = lambda_label(c.get("lambda"))
        row["frontier"] = findings.frontier_text(c)
        row["agreement"] = findings.support_text(c)
        rows.append(row)
    return pa.Table.from_pylist(rows) if rows else pa.table({k: pa.array([], pa.string()) for k in PREVIEW})


def study_note(study: Study, summary: str, table_md: str, analysis_text: str, figure_names: list[str]) -> str:
    """The study run's MLflow description (Markdown): its outcome, the frontier table, the findings in words and
    what each figure shows. MLflow holds at most 8000 characters in a tag: the findings are cut, never the table."""
    head = [f"## {study.name}", "", summary.splitlines()[0], ""]
    figs = ["### Figures (Artifacts tab)", ""] + [f"- `{n}`: {FIGURES.get(n, 'see the file')}" for n in figure_names]
    files = ["", "Tables: `frontier.md`, `cells.csv` (previewed), `cells.parquet`, `results.parquet` (one row per "
             "trial), `summary.txt`. Trials are the nested runs, named `<verdict> <cell> lr<base lr> <phase> s<seed>` "
             "(a cell: `b1024 λ0.16`, `aug0.5 λnone`): ✓ trained, ≈ stalled (finite but did not learn), ✗ diverged, "
             "! failed."]
    table = ["### The stable region", "", table_md] if table_md else []
    words = analysis_text.split("findings:", 1)[-1].strip() if table_md else analysis_text.strip()
    text = ["### Findings", "", "```text", words, "```", ""] if words else []
    note = "\n".join(head + table + text + figs + files)
    if len(note) > 7900:
        room = 7900 - len("\n".join(head + table + figs + files)) - 40
        text = ["### Findings", "", "```text", words[:max(0, room)] + " …(see summary.txt)", "```", ""]
        note = "\n".join(head + table + text + figs + files)[:7990]
    return note


def summary_text(study: Study, results, analysis_text: str, wall: float, complete: bool,
                 notes: list[str] = (), link: str | None = None) -> str:
    statuses = results.column("status").to_pylist()
    state = "" if complete else ("INTERRUPTED — partial results (trials stopped, or lost to infrastructure "
                                 "after their retries); continue with --resume. ")
    lines = [f"{state}study {study.name}: {results.num_rows} trials in {wall / 60:.1f} min ("
             + ", ".join(f"{s} {statuses.count(s)}" for s in STATUSES) + ")"]
    lines += [f"budget: {n}" for n in notes]
    if analysis_text:
        lines.append(analysis_text)
    lines.append(f"outputs: {study.study_dir}/ (results.parquet, cells.parquet, cells.csv, frontier.md, figures, "
                 "summary.txt)")
    lines.append(mlflow_line(study.experiment, study.tracking_uri, link))
    return "\n".join(lines)


def mlflow_line(experiment: str, uri: str, link: str | None = None) -> str:
    """Where to see the study's MLflow experiment (the URI without its password): the command that serves a local
    store on a small machine, and the link that opens its runs table in MLflow's training view."""
    safe = redact(uri)
    where = f"\n  open {link}" if link else ""
    if safe.startswith("http"):
        return f"MLflow: experiment '{experiment}' at {safe}{where}"
    return (f"MLflow: experiment '{experiment}'; serve it with: MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui "
            f"--backend-store-uri {safe} --workers 1{where}")
