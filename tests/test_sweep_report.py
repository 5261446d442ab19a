"""The study's outputs: every file written to the output folder and logged on the run; no password printed."""
import pyarrow as pa
import pyarrow.parquet as pq

from studies.sweep import report


class FakeRun:
    def __init__(self):
        self.logged = {}

    def log_artifact(self, path, artifact_path=None):
        self.logged[path.name] = path.read_bytes()


def test_every_output_is_written_and_logged(tmp_path):
    run = FakeRun()
    files = report.write_outputs(str(tmp_path / "out"), {
        "summary.txt": lambda p: p.write_text("hello"),
        "t.parquet": lambda p: pq.write_table(pa.table({"a": [1]}), p)}, run)
    assert set(files) == set(run.logged) == {"summary.txt", "t.parquet"}
    assert (tmp_path / "out" / "summary.txt").read_text() == "hello"
    assert (tmp_path / "out" / "t.parquet").read_bytes() == run.logged["t.parquet"]


def test_the_mlflow_line_never_prints_a_password():
    line = report.mlflow_line("exp", "https://alice:s3cret@mlflow.example:5000")
    assert "s3cret" not in line and "alice:***@mlflow.example:5000" in line
    local = report.mlflow_line("exp", "sqlite:////x/mlflow.db")
    assert "mlflow ui --app-name nfnet-lab --workers 1 --backend-store-uri sqlite:////x/mlflow.db" in local
    # the study's last line: what to do if MLflow shows its GenAI view anyway
    assert local.splitlines()[-1].strip() == report.GENAI_HINT and "click \"Model training\"" in report.GENAI_HINT


def _cells():
    from studies.sweep import frontier

    rows = [dict.fromkeys(frontier.CELL_COLUMNS) | {
        "cell": f"batch_size={b} lambda={lam}", "batch_size": b, "lambda": lam, "frontier": "found",
        "max_stable_lr": lr, "max_stable_lr_at_edge": edge, "scan_trained": 3, "scan_stalled": 1,
        "scan_diverged": 2, "best_val_acc": 0.5, "best_base_lr": 0.1}
        for b, lam, lr, edge in ((256, 0.01, 12.8, True), (256, None, 0.4, False))]
    return pa.Table.from_pylist(rows, schema=pa.schema(frontier.CELL_COLUMNS))


def test_the_frontier_is_a_table_mlflow_previews_with_its_lower_bounds_marked():
    from studies.sweep import findings

    md = findings.frontier_markdown(_cells())
    assert "| batch | λ=0.01 | no clipping |" in md and "| 256 | ≥12.8 | 0.4 |" in md
    csv = report.cells_preview(_cells()).to_pylist()
    assert [(r["lambda"], r["frontier"]) for r in csv] == [("0.01", "≥12.8"), ("none", "0.4")]


def _study(**preset):
    from studies.sweep import design
    from studies.training.config import TrainConfig

    return design.Study("s", design.Preset(**{"grid": {"batch_size": [256]}, "fixed": {}, **preset}), TrainConfig())


TABLE = "**Largest base lr that trains (per 256 examples)**\n\n| batch | λ=0.01 |\n|---:|---:|\n| 256 | ≥12.8 |\n\n" \
    "**Best val top-1**\n\n| batch | λ=0.01 |\n|---:|---:|\n| 256 | 0.5 @ 0.1 |\n"


def test_the_study_runs_description_opens_with_the_frontier_table_and_the_findings_as_short_lines():
    words = "tables\nfindings:\n  batch 256, λ=0.01 trains up to lr ≥12.8\nAGC holds the frontier up"
    note = report.study_note(_study(), "study s: 2 trials in 0.1 min", TABLE, words, ["stability_map.png"])
    lines = note.splitlines()
    # a short title (its legend said under the table), so the table is within what MLflow shows before "Show more"
    assert lines[0] == "**Largest base lr that trains**" and lines[2] == "| &emsp;batch&emsp; | &emsp;λ=0.01&emsp; |"
    assert lines[3] == "|---:|---:|" and lines[4] == "| &emsp;256&emsp; | &emsp;≥12.8&emsp; |"
    assert lines[6] == "*per 256 examples*"
    assert "Best val top-1" not in note.split("**Findings**")[0]  # the other tables are in frontier.md
    assert lines[lines.index("**Findings**") + 2:][:2] == ["- batch 256, λ=0.01 trains up to lr ≥12.8",
                                                          "- AGC holds the frontier up"]
    assert "```" not in note  # no code block: its long lines widened the page


def test_the_study_runs_description_keeps_the_table_within_mlflows_limit():
    note = report.study_note(_study(), "study s: 2 trials", TABLE, "tables\nfindings:\n" + "x" * 300 + "\n" * 40,
                             ["stability_map.png"])
    many = "tables\nfindings:\n" + "\n".join(f"finding {i} " + "y" * 200 for i in range(60))
    note = report.study_note(_study(), "study s: 2 trials", TABLE, many, ["stability_map.png"])
    assert len(note) <= 8000 and "&emsp;≥12.8&emsp;" in note and "stability_map.png" in note
    assert "- …(the rest: summary.txt)" in note and "finding 0 " in note
    from studies.training.mlflow_ui import ui_link

    link = ui_link("sqlite:////x/mlflow.db", "3", report.VIEW)
    assert link == "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=study"
    assert link in report.mlflow_line("s", "sqlite:////x/mlflow.db", link)
    assert ui_link("https://u:pw@mlflow.example/", "3").startswith("https://u:***@mlflow.example/#/experiments/3/")


def test_the_experiment_description_keeps_the_docstrings_laid_out_blocks():
    about = "What it is, in a sentence\nwrapped over two lines.\n\n  scientific  batch size\n  fixed       the rest"
    md = report.experiment_description(_with_about(about))
    assert "What it is, in a sentence\nwrapped over two lines." in md
    assert "```text\nscientific  batch size\nfixed       the rest\n```" in md
    assert "expand" not in md and "each cell's together in lr order" in md  # as the saved view shows them


def _with_about(about: str):
    import dataclasses

    return dataclasses.replace(_study(), about=about)


def test_the_study_view_lists_a_cells_runs_together_with_verdict_phase_and_reason_first():
    view = report.study_view(_study(grid={"batch_size": [256], "clip_threshold": [0.01, None]}, replicates=3))
    assert view["orderByKey"] == "tags.`order`" and view["orderByAsc"] is True
    assert view["selectedColumns"][:3] == ["tags.`verdict`", "tags.`phase`", "tags.`reason`"]
    assert "params.`lambda`" in view["selectedColumns"] and "params.`seed`" in view["selectedColumns"]
    assert "params.`seed`" not in report.study_view(_study())["selectedColumns"]  # one seed: no column for it


def test_each_cell_has_a_ready_made_filter_and_view():
    st = _study(grid={"batch_size": [64, 256], "clip_threshold": [0.04, None]})
    views = report.cell_views(st)
    assert [(k, n) for k, n, _ in views][:2] == [("cell-batch_size-64-lambda-0.04", "batch_size=64 lambda=0.04"),
                                                 ("cell-batch_size-64-lambda-none", "batch_size=64 lambda=none")]
    assert views[0][2]["searchFilter"] == "tags.cell = 'batch_size=64 lambda=0.04'"
    assert views[0][2]["orderByKey"] == "tags.`order`"  # in lr order
    md = report.experiment_description(st)
    assert "  - `tags.cell = 'batch_size=256 lambda=none'`" in md


def test_a_cells_learning_curves_keep_a_diverged_run_from_flattening_the_others():
    import math

    from studies.sweep import cell_curves

    runs = [{"lr": lr, "seed": "0", "verdict": v, "steps": [4, 8, 12], "losses": ls}
            for lr, v, ls in ((0.4, "trained", [2.3, 2.0, 1.8]), (1.6, "stalled", [2.3, 2.3, 2.29]),
                              (25.6, "diverged", [2.3, 620.0, math.inf]))]
    fig = cell_curves.plot_cell_curves({"batch_size=64 lambda=0.04": runs, "batch_size=64 lambda=none": runs[:2]})
    ax = fig.axes[0]
    low, top = ax.get_ylim()
    assert top < 3.0 and low < 1.8  # the trained run's fall is what the panel shows, not the diverged 620
    assert {ln.get_label() for ln in ax.lines} >= {"start 2.3", "trained: ends below 2.185"}
    assert cell_curves.plot_cell_curves({}) is None
