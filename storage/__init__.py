"""Data and results storage: Parquet shards + manifest, loaders, results tables, locks; URIs via pyarrow.fs."""

from storage.datasets import Manifest, ShardSet, open_dataset, prepare_dataset, source_params
from storage.loaders import (
    EpochStream,
    ResidentLoader,
    StreamingLoader,
    derive_seed,
    iter_torch_batches,
    make_loader,
    ray_dataset,
)
from storage.lock import acquire_lock
from storage.results import ResultsTable
from storage.uri import StorageError, StorageUnavailable, StorageUnwritable, check_writable, require_absolute, resolve

__all__ = [
    "EpochStream", "Manifest", "ResidentLoader", "ResultsTable", "ShardSet", "StorageError", "StorageUnavailable",
    "StorageUnwritable", "StreamingLoader",
    "acquire_lock", "check_writable", "derive_seed", "iter_torch_batches", "make_loader", "open_dataset",
    "prepare_dataset", "ray_dataset", "require_absolute", "resolve", "source_params",
]
