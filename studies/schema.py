"""What a training run returns (RunSummary) and the study tables derived from it: `results.parquet` (one row per
trial) and `cells.parquet` (one row per scientific cell). A new column is added here, once; README's "Results
tables" documents each column."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

import storage
from studies.config import TrainConfig
from studies.verdict import judge

STATUSES = ("completed", "diverged", "failed", "stopped")


@dataclass
class RunSummary:
    status: str  # one of STATUSES
    steps: int = 0
    epochs: int = 0
    diverged_step: int | None = None
    diverged_reason: str | None = None
    error: str | None = None
    best_val_acc: float | None = None
    final_val_acc: float | None = None
    best_val_loss: float | None = None
    final_val_loss: float | None = None
    initial_train_loss: float | None = None  # the first step's loss: the loss at initialisation
    final_train_loss: float | None = None  # mean over the last tenth of the steps run
    final_train_loss_se: float | None = None  # its standard error (spread of those steps' losses / √steps)
    verdict: str | None = None  # trained | stalled | diverged (studies/verdict.py); None: failed or stopped
    images_per_sec: float | None = None
    train_time_s: float | None = None
    wall_time_s: float | None = None
    gns: float | None = None  # gradient noise scale B_simple (McCandlish et al. 2018)
    node_id: str | None = None
    mlflow_run_id: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)  # per epoch; the epochs table

    def __post_init__(self):
        if self.verdict is None:
            self.verdict = judge(self.status, self.initial_train_loss, self.final_train_loss,
                                 self.final_train_loss_se)

    def scalars(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "history"}

    @classmethod
    def from_scalars(cls, d: dict[str, Any]) -> RunSummary:
        names = {f.name for f in dataclasses.fields(cls)} - {"history"}
        return cls(**{k: v for k, v in d.items() if k in names})

    def objective(self) -> float:
        """What searches maximise: best validation top-1; 0 for a run that diverged, failed or never evaluated."""
        v = self.best_val_acc
        if self.status in ("diverged", "failed") or v is None or not math.isfinite(v):
            return 0.0
        return float(v)


# Study-side identity of a row: which study, which trial (its content, not Tune's id), which phase.
IDENTITY = {"study": pa.string(), "trial_key": pa.string(), "phase": pa.string(), "cell": pa.string(),
            "lambda": pa.string()}
# The TrainConfig fields a row carries: the values the trial actually ran with.
CONFIG_COLUMNS = ("model", "batch_size", "clipping", "clip_threshold", "base_lr", "augment_strength", "seed",
                  "max_steps", "num_workers", "precision")
PROVENANCE = {"lr": pa.float64(), "config_hash": pa.string(), "hardware": pa.string(), "git_commit": pa.string()}

_ARROW = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}


def _arrow_type(tp) -> pa.DataType:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return _ARROW[tp]


def results_schema() -> pa.Schema:
    cfg_types = typing.get_type_hints(TrainConfig)
    sum_types = typing.get_type_hints(RunSummary)
    fields = [*IDENTITY.items(), *((n, _arrow_type(cfg_types[n])) for n in CONFIG_COLUMNS), *PROVENANCE.items(),
              *((f.name, _arrow_type(sum_types[f.name])) for f in dataclasses.fields(RunSummary)
                if f.name != "history")]
    return pa.schema(fields)


def results_row(identity: dict[str, Any], cfg: TrainConfig, summary: RunSummary, hardware: str,
                commit: str) -> dict[str, Any]:
    return {**identity, "lambda": cfg.lambda_label, **{n: getattr(cfg, n) for n in CONFIG_COLUMNS}, "lr": cfg.lr,
            "config_hash": cfg.fingerprint(), "hardware": hardware, "git_commit": commit, **summary.scalars()}


EPOCH_COLUMNS = ("epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_sec",
                 "grad_norm_before", "grad_norm_after", "agc_clipped_frac", "gns", "step_time_ms")


def epoch_rows(trial_key: str, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"trial_key": trial_key, "epoch": int(h["epoch"]),
             **{k: float(h[k]) for k in EPOCH_COLUMNS if k in h and k != "epoch" and h[k] is not None}}
            for h in history]


def epochs_schema() -> pa.Schema:
    return pa.schema([("trial_key", pa.string()), ("epoch", pa.int64()),
                      *((k, pa.float64()) for k in EPOCH_COLUMNS if k != "epoch")])


def open_table(uri: str) -> storage.ResultsTable:
    """A study's results and epochs tables at `uri`."""
    return storage.ResultsTable(uri, results_schema(), epochs_schema())
