"""Data and results storage: Parquet shards + manifest, loaders, results tables; URIs via pyarrow.fs."""

from storage.datasets import Manifest, ShardSet, open_dataset, prepare_dataset
from storage.loaders import ResidentLoader, StreamingLoader, derive_seed, iter_torch_batches, make_loader, ray_dataset
from storage.results import ResultsTable
from storage.uri import StorageError, resolve

__all__ = [
    "Manifest", "ResidentLoader", "ResultsTable", "ShardSet", "StorageError", "StreamingLoader",
    "derive_seed", "iter_torch_batches", "make_loader", "open_dataset", "prepare_dataset", "ray_dataset", "resolve",
]
