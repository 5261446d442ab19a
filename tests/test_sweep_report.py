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
    assert "mlflow ui --backend-store-uri sqlite:////x/mlflow.db" in report.mlflow_line("exp", "sqlite:////x/mlflow.db")


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


def test_the_study_runs_description_keeps_the_table_within_mlflows_limit():
    from studies.sweep import design
    from studies.training.config import TrainConfig

    st = design.Study("s", design.Preset(grid={"batch_size": [256]}, fixed={}), TrainConfig())
    table = "| batch | λ=0.01 |\n|---:|---:|\n| 256 | ≥12.8 |"
    note = report.study_note(st, "study s: 2 trials", table, "tables\nfindings:\n" + "x" * 20000,
                             ["stability_map.png"])
    assert len(note) <= 8000 and table in note and "stability_map.png" in note and "see summary.txt" in note
    from studies.training.mlflow_ui import ui_link

    link = ui_link("sqlite:////x/mlflow.db", "3", report.VIEW)
    assert link == "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=study"
    assert link in report.mlflow_line("s", "sqlite:////x/mlflow.db", link)
    assert ui_link("https://u:pw@mlflow.example/", "3").startswith("https://u:***@mlflow.example/#/experiments/3/")
