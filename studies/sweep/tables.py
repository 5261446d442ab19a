"""The study's tables, derived from the dataclasses: `results.parquet` (one row per training run: identity, the
config values it ran with, provenance, its RunSummary) and the epochs table (one row per run and epoch). A new
column is added here or in RunSummary, once; README's "Results tables" documents each column."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import pyarrow as pa

import storage
from studies.training.config import TrainConfig, public_name
from studies.training.summary import RunSummary
from studies.training.tracking import code_version

# Study-side identity of a row: which study, which trial (its content, not Tune's id), which phase, which cell
# (its label, and its axes typed: JSON, cells.Cell.column).
IDENTITY = {"study": pa.string(), "trial_key": pa.string(), "phase": pa.string(), "cell": pa.string(),
            "axes": pa.string()}
# The TrainConfig fields a row carries: the values the trial actually ran with, each column named by its public
# name (clip_threshold is `lambda`: λ, null without clipping).
CONFIG_COLUMNS = ("model", "batch_size", "clipping", "clip_threshold", "base_lr", "augment_strength", "seed",
                  "max_steps", "num_workers", "precision")
PROVENANCE = {"peak_lr": pa.float64(), "config_hash": pa.string(), "hardware": pa.string(), "git_commit": pa.string(),
              "code_version": pa.string()}

_ARROW = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}


def _arrow_type(tp) -> pa.DataType:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return _ARROW[tp]


def results_schema() -> pa.Schema:
    cfg_types = typing.get_type_hints(TrainConfig)
    sum_types = typing.get_type_hints(RunSummary)
    fields = [*IDENTITY.items(), *((public_name(n), _arrow_type(cfg_types[n])) for n in CONFIG_COLUMNS),
              *PROVENANCE.items(),
              *((f.name, _arrow_type(sum_types[f.name])) for f in dataclasses.fields(RunSummary)
                if f.name != "history")]
    return pa.schema(fields)


def results_row(identity: dict[str, Any], cfg: TrainConfig, summary: RunSummary, hardware: str,
                commit: str) -> dict[str, Any]:
    return {**identity, **{public_name(n): getattr(cfg, n) for n in CONFIG_COLUMNS}, "peak_lr": cfg.lr,
            "config_hash": cfg.fingerprint(), "hardware": hardware, "git_commit": commit,
            "code_version": code_version(), **summary.scalars()}


EPOCH_COLUMNS = ("epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_sec",
                 "grad_norm_before", "grad_norm_after", "agc_clipped_frac", "gns", "step_time_ms")


def epoch_rows(trial_key: str, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"trial_key": trial_key, "epoch": int(h["epoch"]),
             **{k: float(h[k]) for k in EPOCH_COLUMNS if k in h and k != "epoch" and h[k] is not None}}
            for h in history]


def epochs_schema() -> pa.Schema:
    return pa.schema([("trial_key", pa.string()), ("epoch", pa.int64()),
                      *((k, pa.float64()) for k in EPOCH_COLUMNS if k != "epoch")])


def open_table(uri: str, fence: storage.lock.Fence | None = None) -> storage.ResultsTable:
    """A study's results and epochs tables at `uri`; written only under `fence` when given."""
    return storage.ResultsTable(uri, results_schema(), epochs_schema(), fence=fence)
