"""The results tables, derived from the dataclasses."""
import json

import pyarrow as pa

from studies.sweep import frontier, tables
from studies.training.summary import RunSummary
from tests.helpers import ROOT


def test_results_schema_is_derived_from_the_summary_and_config():
    names = tables.results_schema().names
    for col in ("batch_size", "clipping", "lambda", "base_lr", "peak_lr", "seed", "model", "phase", "status",
                "diverged_step", "best_val_acc", "final_train_loss", "steps", "node_id", "mlflow_run_id"):
        assert col in names, col
    assert not [n for n in names if n.startswith(("sci_", "nui_", "metric_"))]
    # One name per concept: λ is `lambda` (a float, null without clipping), never also clip_threshold; the lr a run
    # used is peak_lr, beside base_lr (per 256 examples).
    assert "clip_threshold" not in names + list(frontier.CELL_COLUMNS) and "lr" not in names
    assert tables.results_schema().field("lambda").type == frontier.CELL_COLUMNS["lambda"] == pa.float64()
    readme = (ROOT / "README.md").read_text()
    for col in names + list(frontier.CELL_COLUMNS):  # the public tables are documented, column by column
        assert f"`{col}`" in readme, col
    assert json.loads(json.dumps(RunSummary(status="completed").scalars()))["status"] == "completed"
