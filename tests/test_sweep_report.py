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
