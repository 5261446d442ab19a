"""The study's outputs: its analysis (figures, words, the cells table), written beside the results and logged on
the study's MLflow run, and the summary printed at the end. `write_outputs` is the one way a study writes files to
its output folder and its run (signal_prop uses it too)."""
from __future__ import annotations

import re
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

import storage
from studies.sweep import cell_curves, figures, findings, frontier, layout
from studies.sweep.design import Analysis, Study
from studies.training.config import lambda_label, public_name
from studies.training.mlflow_app import DEFAULT_VIEW_TAG
from studies.training.mlflow_ui import save_view, ui_link
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
    "cell_curves.png": "every cell's scan runs as learning curves (loss per step), a panel per cell, coloured by "
                       "lr (log scale); diverged runs drawn until they leave the panel and marked ✕; the start loss "
                       "dotted, the loss a run must end below to count as trained dashed",
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
    figs = {**a.figures, **cell_figure(study, parent)}
    files = write_outputs(study.study_dir, {
        **{name: _figure_writer(fig) for name, fig in figs.items()},
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
    for key, name, state in cell_views(study):
        save_view(parent.client, parent.experiment_id(), key, state, name)
    # the study's view as the experiment's default, where the server runs the nfnet-lab app (mlflow_app)
    parent.client.set_experiment_tag(parent.experiment_id(), DEFAULT_VIEW_TAG, VIEW)
    parent.set_tags({"status": "completed" if complete else "interrupted",
                     "mlflow.note.content": study_note(study, summary, table_md, a.text, list(figs))})
    parent.client.set_terminated(parent.run_id, "FINISHED" if complete else "KILLED")
    return {"results": results, "epochs": epochs, "cells": a.cells, "wall_time_s": wall, "dir": study.study_dir,
            "parent_run_id": parent.run_id, "summary": summary, "complete": complete, "files": files, **a.extra}


def cell_figure(study: Study, parent: Tracker) -> dict[str, Any]:
    """{cell_curves.png: its figure} from the scans' step losses in MLflow; {} where there are none, or where MLflow
    cannot give them (a figure is never worth failing the study's end)."""
    try:
        curves = cell_curves.scan_curves(parent.client, parent.experiment_id(), parent.run_id)
        fig = cell_curves.plot_cell_curves(curves, f"{study.name}: each cell's scans, coloured by lr")
    except Exception as e:
        print(f"warning: {cell_curves.NAME} not drawn ({type(e).__name__}: {e})", flush=True)
        return {}
    return {cell_curves.NAME: fig} if fig is not None else {}


VIEW = "study"  # the saved view of the runs table every printed link opens


def study_view(study: Study) -> dict[str, Any]:
    """The runs table the printed link opens: sorted by the trials' `order` tag (design.Spec.order), so the study
    run comes first and each cell's runs follow together in lr order (a full run beside its scan), listed flat
    (MLflow nests children only when sorting by date); its first columns, visible at 1,500 px: the verdict, the
    phase and the verdict's reason in numbers, then the grid axes, base lr, seed (where a study has several) and
    the full runs' val top-1; the name column wide enough for a whole name."""
    axes = [public_name(a) if a != "variant" else "model" for a in study.preset.grid]
    seeds = ["seed"] if max(study.preset.seeds, study.preset.replicates) > 1 else []
    params = [*axes, *(public_name(k) for k in study.preset.tpe or {}), "base_lr", *seeds]
    columns = ["tags.`verdict`", "tags.`phase`", "tags.`reason`", *dict.fromkeys(f"params.`{p}`" for p in params),
               "metrics.`top1/val`"]
    order = [RUN_NAME, *columns, *TRAILING]  # MLflow would put metrics, then params, then tags
    return {"orderByKey": "tags.`order`", "orderByAsc": True, "selectedColumns": columns, "columnOrder": order,
            "columnWidths": {c: COLUMN_WIDTHS.get(c, 100) for c in order}}


def cell_views(study: Study) -> list[tuple[str, str, dict[str, Any]]]:
    """A saved view per cell, (key, name, state): the study's view filtered to the cell's runs (`tags.cell`), in lr
    order; listed under "Views" by the cell's label, for comparing a cell's lrs in the runs table and its charts."""
    out = []
    for cell in study.cells():
        label = cell.label
        key = "cell-" + re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-")
        out.append((key, label, {**study_view(study), "searchFilter": cell_filter(label)}))
    return out


def cell_filter(label: str) -> str:
    """The runs table's search filter for one cell's runs (MLflow's syntax has no escapes: quote with the other)."""
    return f"tags.cell = '{label}'" if "'" not in label else f'tags.cell = "{label}"'


# MLflow 3.17's column ids (ag-grid's): the run name, then the view's own columns, then the date and duration it
# always shows. A view's column order and widths apply only where it lists the columns' order.
RUN_NAME = "attributes.`Run Name`"
TRAILING = ["runDateAndNestInfo", "duration"]
# Widths (px): the name whole ('✓ b1024 λ0.01 lr0.5657 replicate s2'), the reason's numbers whole ('2.303→2.181
# fell 0.122 > 0.1152', 'step 37: loss 181 > 5.0x initial 2.3'); 100 for the others.
COLUMN_WIDTHS = {RUN_NAME: 280, "tags.`verdict`": 90, "tags.`phase`": 85, "tags.`reason`": 290,
                 "runDateAndNestInfo": 140, "duration": 80}


def experiment_description(study: Study) -> str:
    """The MLflow experiment's description (Markdown): what the study is (its script's docstring, its indented
    blocks kept as they are laid out) and how to read what it logged, as the saved view shows it."""
    about = markdown_blocks(study.about.strip())
    kind = "a TPE search" if study.preset.tpe else "a grid study"
    return "\n".join([
        f"# {study.name}", "", *([about, ""] if about else []), "## How to read this experiment", "",
        f"- **The study run** `{study.name}` ({kind}; the first row of the study's view): its description opens "
        "with the outcome, the frontier table and the findings; its Artifacts tab holds the figures, `frontier.md`, "
        "`cells.csv` and the Parquet tables. Its params are the design (`grid.*`, `design.*`) and what is held "
        "fixed (`fixed.*`).",
        "- **Trials** follow it, each cell's together in lr order, named by what differs: `✓ b1024 λ0.16 lr3.2 "
        "scan s0` = verdict, batch size (`aug0.5`: augmentation strength, where it is an axis), λ (`none`: no "
        "clipping), base lr per 256 examples, phase (`scan`: a short run at a constant lr; `refine`: one more lr at "
        "the frontier; `replicate`: a deciding lr at another seed; `full`: the whole budget; `tpe`), seed. "
        "Verdicts: ✓ trained (its loss fell clearly below its start), ≈ stalled (finite but did not learn: heavy "
        "clipping can do that), ↯ collapsed (did not train, and its loss left its start: an instability that "
        "stayed finite), ✗ diverged, ! failed; the `verdict` column says it in words, `reason` in numbers, "
        "and a trial's description explains it.",
        "- **A trial's charts**: `loss/*` first (train per epoch and per step, val), then `opt/lr` (the peak lr "
        "= base lr × batch / 256, after warmup), `stability/*` (AGC's clipped fraction per stage, gradient norms, "
        "the noise scale), `throughput/*`, `top1/*`.",
        "- **The frontier** of a cell (one value of each grid axis: " + " × ".join(
            public_name(a) for a in study.preset.grid) + ") is the largest base lr that trains; `≥` marks a lower "
        "bound (it trained up to the largest lr tried). The study run's metrics `max_stable_lr/<cell>` hold it per "
        "cell (`max_stable_lr/b1024/lambda_0.01`, `max_stable_lr/aug0.5/lambda_none`).",
        f"- **This view**: `…/#/experiments/<id>/runs?workflowType=machine_learning&viewStateShareKey={VIEW}` "
        f"(\"Views\" → {VIEW}). {GENAI_HINT}",
        "- **One cell's runs** (to compare its lrs, in the table or its charts): pick the cell under \"Views\" "
        "(saved when the study ends), or paste its filter into the search box:", "",
        *[f"  - `{cell_filter(c.label)}`" for c in study.cells()[:MAX_CELL_LINES]]])


MAX_CELL_LINES = 40  # a description has room for that many cells' filters (MLflow keeps 8000 characters)


# What to do when MLflow shows its GenAI view (traces, "Evaluation runs") instead of the runs and their charts.
GENAI_HINT = ("If MLflow's sidebar shows GenAI (Traces, Evaluation runs), click \"Model training\" in it once: the "
              "browser keeps that choice (a server started with `--app-name nfnet-lab` makes it for you).")


def markdown_blocks(text: str) -> str:
    """A docstring as Markdown that keeps its layout: a paragraph whose lines are all indented (a table of
    axes, commands) becomes a code block with its line breaks; other paragraphs stay prose (MLflow's renderer
    joins their lines)."""
    out = []
    for para in text.split("\n\n"):
        lines = para.split("\n")
        if all(line.startswith((" ", "\t")) for line in lines if line.strip()):
            out.append("```text\n" + "\n".join(textwrap.dedent(para).splitlines()) + "\n```")
        else:
            out.append(para)
    return "\n\n".join(out)


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
    """The study run's MLflow description (Markdown), the outcome first: the frontier table (its cells padded:
    MLflow draws Markdown tables unpadded), the findings one per line as a list (they wrap, never
    widen the page), the trial counts, then what each figure and file holds. MLflow holds at most 8000
    characters in a tag: findings past that are cut (the rest is in summary.txt), never the table."""
    head_md, rest_md = _first_table(table_md)
    head_md, legend = _short_titles(head_md)
    table = [padded_tables(head_md), ""] + ([f"*{legend}*", ""] if legend else []) if head_md else []
    words = analysis_text.split("findings:", 1)[-1] if table_md else analysis_text
    finds = [f"- {line.strip()}" for line in words.splitlines() if line.strip()]
    counts = [f"*{summary.splitlines()[0]}*", ""]
    figs = ["### Figures (Artifacts tab)", ""] + [f"- `{n}`: {FIGURES.get(n, 'see the file')}" for n in figure_names]
    files = ["", "Tables: `frontier.md` (the tables above and " + ("the seeds' spread, the scan counts and the best "
             "accuracy" if rest_md else "more") + "; previewed), `cells.csv` (previewed), `cells.parquet`, "
             "`results.parquet` (one row per trial), `summary.txt`. Trials are the runs below this one in the "
             "study's view, each cell's together in lr order, named `<verdict> <cell> lr<base lr> <phase> s<seed>`: "
             "✓ trained, ≈ stalled (finite but did not learn), ↯ collapsed (left its start, stayed finite), "
             "✗ diverged, ! failed; each explains its verdict in "
             "its description."]

    def compose(lines: list[str]) -> str:
        return "\n".join(table + (["**Findings**", "", *lines, ""] if lines else []) + counts + figs + files)

    note = compose(finds)
    while len(note) > 7990 and finds:
        finds = finds[:-1]
        note = compose(finds + ["- …(the rest: summary.txt)"])
    return note[:7990]


def _first_table(md: str) -> tuple[str, str]:
    """frontier_markdown's first table (one per facet, under the same bold title) and the rest."""
    blocks = md.strip().split("\n\n") if md.strip() else []
    if not blocks:
        return "", ""
    title = blocks[0].split(" — ")[0].rstrip("*")
    n = 0
    while n < len(blocks) and (blocks[n].startswith(title) or blocks[n].startswith("|")):
        n += 1
    return "\n\n".join(blocks[:n]), "\n\n".join(blocks[n:])


def _short_titles(md: str) -> tuple[str, str]:
    """The tables' bold titles without their long parenthesised legend ('**Largest base lr that trains (per 256
    examples; ≥ = …)**' -> '**Largest base lr that trains**'), and the legend, said once under the tables: a title
    that wraps over three lines pushes the table below what MLflow shows of a description before "Show more"."""
    legend = ""
    out = []
    for line in md.splitlines():
        m = re.fullmatch(r"\*\*(.+?) \((.+)\)\*\*(.*)", line)
        if m:
            legend = legend or m[2]
            line = f"**{m[1]}**{m[3]}"
        out.append(line)
    return "\n".join(out), legend


PAD = "&emsp;"  # MLflow's renderer keeps no style, padding or align attribute: a cell's gap is an em space each side


def padded_tables(md: str) -> str:
    """Markdown tables whose cells are padded with em spaces (MLflow draws them unpadded: '5 / 3 / 06 / 3 / 0' ran
    together); every other line as it is."""
    out = []
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if cells and not all(set(c) <= set(":-") for c in cells):  # not the alignment row
            line = "| " + " | ".join(f"{PAD}{c}{PAD}" for c in cells) + " |"
        out.append(line)
    return "\n".join(out)


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
    store on a small machine in MLflow's training view (mlflow_app), the link that opens the study's view of its
    runs, and what to do if MLflow shows its GenAI view anyway."""
    safe = redact(uri)
    where = f"\n  open {link}" if link else ""
    hint = f"\n  {GENAI_HINT}"
    if safe.startswith("http"):
        return f"MLflow: experiment '{experiment}' at {safe}{where}{hint}"
    return (f"MLflow: experiment '{experiment}'; serve it with: MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "
            f"{mlflow_command()} ui --app-name nfnet-lab --workers 1 --backend-store-uri {safe}{where}{hint}")


def mlflow_command() -> str:
    """The `mlflow` beside this Python (the project's .venv/bin/mlflow, relative to the working directory when
    inside it): one web worker, none of MLflow's GenAI job workers, every page in the training view (the
    nfnet-lab server app, studies/training/mlflow_app.py)."""
    import os
    import sys

    exe = Path(sys.executable).parent / "mlflow"
    if not exe.exists():
        return "mlflow"
    rel = os.path.relpath(exe)
    return rel if not rel.startswith("..") else str(exe)
