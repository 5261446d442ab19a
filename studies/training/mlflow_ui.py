"""What a run shows in MLflow's UI beyond its params and metrics: MLflow's own Source, Version and User fields, its
dataset as an MLflow dataset input, system metrics, the curves figure, and for an experiment its description and
the link and saved view that open its runs table in the training view (MLflow 3.17)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from studies.training.config import PROJECT_DIR
from studies.training.tracking import Tracker, git_commit, redact


def source_tags(script: str | None = None) -> dict[str, str]:
    """MLflow's own Source, Version and User fields of a run: the script that started it (relative to the project),
    its full commit, the user. Computed on the driver: inside a Ray trial sys.argv[0] is Ray's worker."""
    import getpass
    import sys

    path = Path(script or sys.argv[0]).resolve()
    try:
        name = str(path.relative_to(PROJECT_DIR))
    except ValueError:
        name = path.name
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = "unknown"
    return {"mlflow.source.name": name, "mlflow.source.type": "LOCAL", "mlflow.source.git.commit": git_commit(False),
            "mlflow.user": user}


def dataset_input(dataset_uri: str):
    """The run's dataset as MLflow's dataset input: named after its shard set, digest = a hash of every shard's
    sha256 (the same bytes, the same digest), source = its URI, profile = its splits and shapes."""
    import hashlib

    from mlflow.entities import Dataset, DatasetInput, InputTag

    import storage

    m = storage.open_dataset(dataset_uri).manifest
    h = hashlib.sha256()
    for split in sorted(m.shards):
        for s in m.shards[split]:
            h.update(f"{split}/{s['path']}:{s['sha256']}\n".encode())
    scheme = dataset_uri.split("://", 1)[0] if "://" in dataset_uri else "local"
    profile = {"source": m.source, "splits": m.splits, "num_classes": m.num_classes,
               "image_shape": list(m.image_shape) if m.image_shape else None}
    ds = Dataset(name=dataset_uri.rstrip("/").rsplit("/", 1)[-1], digest=h.hexdigest()[:16], source_type=scheme,
                 source=json.dumps({"uri": redact(dataset_uri)}), profile=json.dumps(profile))
    return DatasetInput(ds, tags=[InputTag("mlflow.data.context", "training")])


def log_dataset(client, run_id: str, dataset_uri: str, tries: int = 3) -> None:
    """Link the run to its dataset input. Trials that start together race to insert the same dataset row (the
    SQLite store answers 'UNIQUE constraint failed: datasets…' to the loser), so a refused insert is tried again:
    by then the row exists and only the link is added. A dataset that cannot be opened is left to the run, which
    fails on it with storage's message."""
    import time

    from mlflow.exceptions import MlflowException

    import storage

    try:
        inp = dataset_input(dataset_uri)
    except storage.StorageError:
        return
    for attempt in range(tries):
        try:
            client.log_inputs(run_id, [inp])
            return
        except MlflowException:
            if attempt == tries - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def start_system_metrics(uri: str, run_id: str, interval_s: float = 10.0):
    """MLflow's system metrics (CPU, memory, disk, network; GPUs with the NVIDIA bindings) sampled into the run
    from this process; None where psutil is missing. Stop it with .finish()."""
    try:
        import psutil  # noqa: F401
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError:
        return None
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=uri)
    monitor.start()
    return monitor


LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store


def ui_link(uri: str, experiment_id: str, view: str | None = None) -> str:
    """The experiment's Runs table in MLflow's training view. MLflow 3 opens an experiment in its GenAI view
    (traces, judges) unless the URL asks for `workflowType=machine_learning` (its UI reads the parameter first,
    then the browser's last choice); the experiment's kind tag alone does not change a fresh browser's view.
    `view`: a saved view of the experiment (save_view) the table opens with."""
    base = redact(uri).rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI
    share = f"&viewStateShareKey={view}" if view else ""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning{share}"


def save_view(client, experiment_id: str, key: str, state: dict[str, Any], name: str | None = None) -> None:
    """A saved view of the experiment's runs table (columns, sort, a search filter), as MLflow 3.17's UI stores
    one: the experiment tag `mlflow.sharedViewState.<key>` holding {name, createdAt, updatedAt, state (JSON)}; it
    is listed under "Views" by its name (default: the key) and opened by ui_link(…, view=key)."""
    now = int(time.time() * 1000)
    client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{key}", json.dumps(
        {"name": name or key, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}))


def describe_experiment(client, experiment_id: str, description: str) -> None:
    """The experiment's Markdown description (MLflow's note) and its kind: a model-training experiment."""
    client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
    if description:
        client.set_experiment_tag(experiment_id, "mlflow.note.content", description[:7990])


def log_curves(tracker: Tracker, history: list[dict[str, Any]], title: str = "") -> None:
    """The run's loss and accuracy per epoch, train beside val, as `curves.png`: for a run evaluated at least twice
    (a curve needs two points). A run that never evaluates (a study's scan) gets none: its train loss per step is in
    MLflow's metrics and in the study's `cell_curves.png`, beside its cell's other lrs, and the figure took ~0.25 s
    of CPU per run, ~35 s over the 134 scan runs of the laptop study on 2 cores."""
    if sum("val_loss" in h for h in history) < 2:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot_curves(history, title)
    tracker.log_figure(fig, "curves.png")
    plt.close(fig)


def plot_curves(history: list[dict[str, Any]], title: str = ""):
    import math

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [h["step"] for h in history]
    axes[0].plot(steps, [h.get("train_loss", math.nan) for h in history], "o-", label="train")
    val = [(h["step"], h["val_loss"], h["val_acc"]) for h in history if "val_loss" in h]
    if val:
        axes[0].plot([v[0] for v in val], [v[1] for v in val], "s-", label="val")
        axes[1].plot([v[0] for v in val], [v[2] for v in val], "s-", label="val top-1")
    axes[1].plot(steps, [h.get("train_acc", math.nan) for h in history], "o-", label="train")
    axes[0].set(xlabel="step", ylabel="loss", title="loss")
    axes[1].set(xlabel="step", ylabel="accuracy", title="accuracy")
    for a in axes:
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
