"""What the MLflow UI shows beyond metrics (studies/training/mlflow_ui.py): the dataset input of a run."""
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from studies.training import mlflow_ui


class LosesTheRace:
    """A client whose first log_inputs is refused as the SQLite store refuses the second of two trials inserting
    the same dataset row at once; the row is there afterwards (the winner's)."""

    def __init__(self, client):
        self.client, self.calls = client, 0

    def log_inputs(self, run_id, inputs):
        self.calls += 1
        if self.calls == 1:
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                                  "datasets.name, datasets.digest")
        return self.client.log_inputs(run_id, inputs)


def test_a_dataset_insert_lost_to_a_concurrent_trial_is_retried_and_linked_once(tmp_path, tiny_data):
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    run = client.create_run(client.create_experiment("e"))
    racer = LosesTheRace(client)
    mlflow_ui.log_dataset(racer, run.info.run_id, tiny_data)
    inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert racer.calls == 2 and len(inputs) == 1
    assert inputs[0].dataset.name == tiny_data.rstrip("/").rsplit("/", 1)[-1]


def test_a_dataset_that_cannot_be_linked_after_its_retries_is_raised(tmp_path, tiny_data):
    class Refuses:
        calls = 0

        def log_inputs(self, run_id, inputs):
            Refuses.calls += 1
            raise MlflowException("store down")

    try:
        mlflow_ui.log_dataset(Refuses(), "r", tiny_data, tries=2)
    except MlflowException:
        assert Refuses.calls == 2
    else:
        raise AssertionError("a store that keeps refusing must be raised (the trial is retried as infrastructure)")
