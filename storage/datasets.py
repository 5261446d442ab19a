"""Dataset format: Parquet shards + manifest.json, written by prepare_dataset, read by open_dataset.

Layout under root/<source>-<hash>/:
  shards-<token>/<split>-00000.parquet   one attempt's shards (an attempt that fails or is refused removes its dir,
                                         the lock file and the folders it made; a killed one leaves an orphan dir,
                                         cleared by the next attempt, except under a best-effort lease: gs://)
  manifest.json                          written LAST: its presence is the commit marker
  .lock                                  held while writing (storage.lock): a second writer waits, then reuses
Fixed-size sets store raw uint8 HWC bytes per row; imagefolder stores the encoded file bytes. The hash covers
the source, seed and parameters, and for imagefolder a fingerprint of the folder's listing. Every read checks
a shard's sha256 against the manifest (unless verify=False), on the resident and streaming (Ray Data) paths alike."""

import dataclasses
import functools
import hashlib
import json
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from storage import sources
from storage.decode import decode_encoded, decode_encoded_hwc, decode_raw  # noqa: F401  (re-exported)
from storage.lock import acquire_lock
from storage.sources import IMAGE_EXTS, SOURCES, SPLITS, source_params  # noqa: F401  (re-exported)
from storage.uri import (
    StorageError,
    exists,
    join,
    missing_dirs,
    one_line,
    read_bytes,
    refused_write,
    remove_empty_dirs,
    resolve,
    stays_inside,
    write_bytes_atomic,
)

SCHEMA_VERSION = 1
DEFAULT_MAX_SHARD_BYTES = 256 << 20  # bounds preparation memory (imagefolder) and keeps shards well below 2 GiB


@dataclass
class Manifest:
    uri: str
    source: str
    params: dict[str, Any]
    num_classes: int
    class_names: list[str]
    image_shape: tuple[int, int, int] | None  # (C, H, W); None when images differ in size
    splits: dict[str, int]
    shards: dict[str, list[dict[str, Any]]]  # split -> [{path (relative), rows, sha256}]
    encoding: str = "raw"  # 'raw' uint8 HWC bytes | 'encoded' JPEG/PNG bytes
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.encoding not in ("raw", "encoded"):
            raise StorageError(f"manifest {self.uri}: encoding must be 'raw' or 'encoded', got {self.encoding!r}")
        if self.image_shape is not None:
            self.image_shape = tuple(int(d) for d in self.image_shape)
        if self.encoding == "raw" and self.image_shape is None:
            raise StorageError(f"manifest {self.uri}: raw encoding needs image_shape; prepare the data again")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise StorageError(f"manifest {self.uri}: num_classes {self.num_classes!r} is not a positive integer; "
                               "the manifest is damaged, prepare the data again")
        for split, entries in self.shards.items():  # readers join these to the dataset's root: '../x' reads elsewhere
            for s in entries:
                if not stays_inside(s["path"]):
                    raise StorageError(f"manifest {self.uri}: shard path {s['path']!r} of split {split!r} points "
                                       "outside the dataset; the manifest is damaged or hand-edited, prepare again")
        for split, n in self.splits.items():
            got = sum(s["rows"] for s in self.shards.get(split, []))
            if got != n:
                raise StorageError(f"manifest {self.uri}: split {split!r} says {n} rows but shards hold {got};"
                                   " the manifest is damaged, prepare the data again")

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d.pop("uri")
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, uri: str) -> "Manifest":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise StorageError(f"{join(uri, 'manifest.json')}: not valid JSON ({e}); prepare the data again") from e
        if d.get("schema_version") != SCHEMA_VERSION:
            raise StorageError(f"{join(uri, 'manifest.json')}: schema_version {d.get('schema_version')!r}, this "
                               f"code reads {SCHEMA_VERSION}; prepare the data again with this version")
        names = {f.name for f in dataclasses.fields(cls)} - {"uri"}
        missing = names - set(d) - {"extra"}
        if missing:
            raise StorageError(f"{join(uri, 'manifest.json')}: missing fields {sorted(missing)}; prepare again")
        return cls(uri=uri, **{k: d[k] for k in names if k in d})


def _params_hash(source: str, seed: int, params: dict) -> str:
    blob = json.dumps({"source": source, "seed": seed, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


# ---------------------------------------------------------------- writing

def _shard_bytes(table: pa.Table) -> bytes:
    # Image columns get no dictionary (every row is unique: pyarrow builds a dictionary page, gives up and falls
    # back, and readers pay for both) and, when encoded (JPEG/PNG), no compression (it saved 0.02 % of 120 MB and
    # cost most of a streamed shard's read time). Raw pixels keep zstd level 1: fast, and they do shrink.
    encoded = "height" in table.column_names  # imagefolder tables carry each image's size; raw ones do not
    sink = pa.BufferOutputStream()
    zstd = [c for c in table.column_names if not (encoded and c == "image")]
    pq.write_table(table, sink, use_dictionary=[c for c in table.column_names if c != "image"],
                   compression={c: "zstd" if c in zstd else "none" for c in table.column_names},
                   compression_level=dict.fromkeys(zstd, 1))
    return sink.getvalue().to_pybytes()


def _raw_table(images: np.ndarray, labels: np.ndarray) -> pa.Table:
    # 64-bit offsets (large_binary): 32-bit ones wrap once a shard passes 2 GiB (10000 rows of 268 px images)
    n, row = len(images), int(np.prod(images.shape[1:]))
    offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int64) * row).tobytes())
    values = pa.py_buffer(np.ascontiguousarray(images).reshape(-1))
    image = pa.Array.from_buffers(pa.large_binary(), n, [None, offsets, values])
    return pa.table({"image": image, "label": pa.array(labels, pa.int64())})


def _raw_tables(x: np.ndarray, y: np.ndarray, rows: int) -> Iterator[pa.Table]:
    for start in range(0, max(len(y), 1), rows):  # an empty split still gets one (empty) shard
        yield _raw_table(x[start:start + rows], y[start:start + rows])


def _write_split(fs, dpath: str, shard_dir: str, split: str, tables: Iterator[pa.Table],
                 sizes: set | None = None) -> list[dict]:
    """Write each table as one shard; -> manifest entries. Encoded tables add their (h, w) pairs to sizes."""
    out = []
    for i, table in enumerate(tables):
        blob = _shard_bytes(table)
        rel = f"{shard_dir}/{split}-{i:05d}.parquet"
        try:
            with fs.open_output_stream(join(dpath, rel)) as f:
                f.write(blob)
        except OSError as e:
            raise refused_write(e, join(dpath, rel)) or StorageError(
                f"cannot write {join(dpath, rel)} ({one_line(e)}); check permissions / credentials") from e
        out.append({"path": rel, "rows": table.num_rows, "sha256": hashlib.sha256(blob).hexdigest()})
        if sizes is not None:
            sizes.update(zip(table["height"].to_pylist(), table["width"].to_pylist()))
    return out


def _clear_orphans(fs, dpath: str, uri: str, lock) -> None:
    """Shard dirs of attempts that died before their manifest; only called while holding the dataset's lock.

    Deleted only where that lock provably excludes other writers (flock, S3's conditional-put lease). Under a
    best-effort lease (gs://, storage.lock) two preparers can both hold it, and a dir that looks orphaned may be a
    live attempt's: those dirs are kept (each attempt writes its own dir and its manifest names only its own
    shards, so whichever manifest lands last is a complete set) and named, for deleting by hand.
    """
    exclusive = lock.exclusive
    try:
        dirs = [i.path for i in fs.get_file_info(pafs.FileSelector(dpath, allow_not_found=True))
                if i.base_name.startswith("shards-") and i.type == pafs.FileType.Directory]
        if not exclusive:
            if dirs:
                print(f"note: kept {len(dirs)} shard dir(s) of other attempts under {uri} (the lock there is best "
                      "effort, one may be live); delete those not named in manifest.json once no preparer runs",
                      file=sys.stderr, flush=True)
            return
        for d in dirs:
            fs.delete_dir(d)
    except OSError as e:
        raise StorageError(f"cannot list {uri} ({one_line(e)}); check the URI and credentials") from e


def _discard_attempt(fs, shard_dir: str, lock, made: list[str]) -> None:
    """What a failed preparation wrote, taken back: its own shard dir (no manifest names it; on a full disk this
    frees what it used), the lock file, and the folders it created once they are empty (an interrupted attempt, a
    killed process, leaves its dir to the next attempt's _clear_orphans instead)."""
    try:
        fs.delete_dir(shard_dir)
    except OSError:
        pass  # not created, or unreachable: a later attempt clears it (an orphan)
    lock.release(discard=True)
    remove_empty_dirs(made)


def _check_request(source: str, seed: int, path: str | None, params: dict, **sizes) -> None:
    """Unknown or bad source parameters and shard sizes, refused before anything is written."""
    sources.check_params(source, [*params, *(["path"] if path is not None else [])])
    if source == "synthetic":
        sources.synthetic_splits(seed, **params, check_only=True)
    for name, v in sizes.items():
        if not isinstance(v, int) or v < 1:
            raise StorageError(f"{name} must be a positive integer, got {v!r}")


def prepare_dataset(source: str, root: str, *, seed: int = 0, path: str | None = None,
                    rows_per_shard: int = 10000, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    progress_every: int = 10000, **params) -> Manifest:
    """Write (or reuse) the shard set for source+params under root/<source>-<hash>/ and return its manifest.

    A shard closes at rows_per_shard rows or max_shard_bytes of image bytes, whichever comes first. Writers of
    the same dataset take its lock in turn: the second waits, then reuses what the first wrote."""
    if source not in SOURCES:
        if "/" in source or os.path.isdir(source):
            return open_dataset(source).manifest  # an existing shard set (or a clear error saying what it is)
        raise StorageError(f"unknown dataset source {source!r}; use one of {SOURCES} or an existing shard-set URI")
    _check_request(source, seed, path, params, rows_per_shard=rows_per_shard, max_shard_bytes=max_shard_bytes)
    key = dict(params)
    if path is not None:
        key["path"] = path = os.path.abspath(os.path.expanduser(path))
    download = bool(key.pop("download", False))
    listing = sources.list_imagefolder(path, seed, **params) if source == "imagefolder" else None
    if listing is not None:
        key["listing"] = listing.fingerprint  # touched, added or removed images -> another dataset
    fs, base = resolve(root)
    name = f"{source}-{_params_hash(source, seed, key)}"
    uri = join(root if "://" in os.fspath(root) else base, name)  # local roots made absolute: trials run elsewhere
    dpath = join(base, name)
    if exists(fs, join(dpath, "manifest.json")):
        return open_dataset(uri).manifest
    made = missing_dirs(dpath)  # the local folders this preparation creates: taken back if it fails
    with acquire_lock(uri, f"prepare_dataset {source} on {socket.gethostname()}", wait_s=None) as lock:
        if exists(fs, join(dpath, "manifest.json")):
            return open_dataset(uri).manifest  # another writer finished it while we waited
        _clear_orphans(fs, dpath, uri, lock)
        said = sources.Preparing(name, source)
        shard_dir = f"shards-{uuid.uuid4().hex[:8]}"
        try:
            fs.create_dir(join(dpath, shard_dir), recursive=True)
            write = functools.partial(_write_split, fs, dpath, shard_dir)
            if listing is None:
                data, names = sources.synthetic_splits(seed, **params) if source == "synthetic" else \
                    sources.cifar_splits(path, source == "cifar100", download=download)
                h, w, c = data["train"][0].shape[1:]
                rows = max(1, min(rows_per_shard, max_shard_bytes // (h * w * c)))
                shards = {s: write(s, _raw_tables(*data[s], rows)) for s in SPLITS}
                image_shape, encoding = (int(c), int(h), int(w)), "raw"
            else:
                progress = sources.Progress(sum(len(f) for f in listing.splits.values()), progress_every, name)
                sizes = set()
                shards = {s: write(s, sources.imagefolder_tables(listing.splits[s], rows_per_shard, max_shard_bytes,
                                                                 progress, s), sizes) for s in SPLITS}
                names, encoding = listing.classes, "encoded"
                image_shape = (3, *sizes.pop()) if len(sizes) == 1 else None
            manifest = Manifest(uri=uri, source=source, params={**key, "seed": seed}, num_classes=len(names),
                                class_names=names, image_shape=image_shape,
                                splits={s: sum(x["rows"] for x in shards[s]) for s in SPLITS}, shards=shards,
                                encoding=encoding)
            lock.check()  # an object-store lease lost mid-way means another writer may have cleared our shards
            write_bytes_atomic(fs, join(dpath, "manifest.json"), manifest.to_json().encode())  # the commit
        except Exception:  # refused (a missing or bad source) or failed (no space): nothing of it is left behind
            _discard_attempt(fs, join(dpath, shard_dir), lock, made)
            raise
    said.done(manifest.splits, sum(len(v) for v in shards.values()), uri)
    return manifest


# ---------------------------------------------------------------- reading

def read_verified_shard(fs: pafs.FileSystem, path: str, sha256: str | None, rows: int, dataset: str,
                        num_classes: int | None = None) -> pa.Table:
    """One shard's table, its bytes checked against the manifest's sha256 first (skipped when sha256 is None),
    its labels against [0, num_classes) (when given; one min/max pass over an int column, a cheap check).

    Both the resident path (ShardSet.read_shard) and Ray Data's streaming reads go through here, so a flipped
    byte, or a label past the class list (the loss would index out of range), fails the run with the shard's name
    instead of training on it.
    """
    blob = read_bytes(fs, path)
    if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
        raise StorageError(f"{path}: checksum mismatch (corrupt or truncated shard); delete {dataset} and run "
                           "storage.prepare_dataset again")
    try:
        table = pq.read_table(pa.BufferReader(blob))
    except (pa.ArrowInvalid, OSError) as e:
        raise StorageError(f"{path}: unreadable parquet ({one_line(e)}); delete {dataset} and prepare again") from e
    if "image" not in table.column_names or "label" not in table.column_names:
        raise StorageError(f"{path}: columns {table.column_names} lack 'image'/'label'; the manifest does not "
                           "match the shards, prepare the data again")
    if table.num_rows != rows:
        raise StorageError(f"{path}: {table.num_rows} rows, manifest says {rows}; prepare again")
    if num_classes is not None:
        _check_labels(table.column("label"), num_classes, path, dataset)
    return table


def _check_labels(labels: pa.ChunkedArray, num_classes: int, path: str, dataset: str) -> None:
    if not pa.types.is_integer(labels.type):
        raise StorageError(f"{path}: column 'label' has type {labels.type}, expected integers; delete {dataset} and "
                           "prepare again")
    span = pc.min_max(labels)
    lo, hi = span["min"].as_py(), span["max"].as_py()
    if labels.null_count or (lo is not None and not 0 <= lo <= hi < num_classes):
        raise StorageError(f"{path}: labels span {lo}..{hi}{' with nulls' if labels.null_count else ''}, outside "
                           f"[0, {num_classes}) of the manifest's num_classes; delete {dataset} and prepare again")


class ShardSet:
    """A committed shard set: manifest + readers."""

    def __init__(self, uri: str):
        self.fs, self.path = resolve(uri)
        self.uri = uri
        mpath = join(self.path, "manifest.json")
        if not exists(self.fs, mpath):
            if not exists(self.fs, self.path):
                raise StorageError(f"{uri}: does not exist; prepare it with storage.prepare_dataset or fix the URI")
            if sources.looks_like_image_folder(self.fs, self.path):
                raise StorageError(f"{uri} is a folder of images, not a prepared dataset; use the imagefolder "
                                   f'source: dataset "imagefolder" with dataset_params {{"path": "{uri}"}}')
            raise StorageError(f"{mpath}: no manifest (empty directory or an interrupted write); "
                               "run storage.prepare_dataset again")
        self.manifest = Manifest.from_json(read_bytes(self.fs, mpath).decode(), uri)

    def shard_paths(self, split: str) -> list[str]:
        """Filesystem paths (for self.fs) of the split's shards."""
        return [join(self.path, s["path"]) for s in self._shards(split)]

    def rows(self, split: str) -> int:
        """Rows in the split (a clear error naming the splits there are, for one that is not)."""
        return sum(s["rows"] for s in self._shards(split))

    def _shards(self, split):
        if split not in self.manifest.shards:
            raise StorageError(f"{self.uri}: no split {split!r}; available: {sorted(self.manifest.shards)}")
        return self.manifest.shards[split]

    def decoded_bytes(self, split: str, image_size: int | None = None) -> int:
        shape = self.manifest.image_shape
        per = 3 * image_size * image_size if image_size else (int(np.prod(shape)) if shape else 3 * 224 * 224)
        return self.manifest.splits[split] * per

    def read_shard(self, split: str, index: int, verify: bool = True) -> pa.Table:
        info = self._shards(split)[index]
        return read_verified_shard(self.fs, join(self.path, info["path"]), info["sha256"] if verify else None,
                                   info["rows"], self.uri, self.manifest.num_classes)

    def load_shard(self, split: str, index: int, verify: bool = True,
                   image_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One shard, decoded: (uint8 [n, C, H, W], int64 [n])."""
        t, p = self.read_shard(split, index, verify), join(self.path, self._shards(split)[index]["path"])
        if self.manifest.encoding == "raw":
            x = decode_raw(t.column("image"), self.manifest.image_shape, p)
        else:
            x = decode_encoded(t.column("image").to_pylist(), image_size, p)
        return x, torch.from_numpy(t.column("label").to_numpy().astype(np.int64))

    def load_split(self, split: str, verify: bool = True,
                   image_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (uint8 [N, C, H, W], int64 [N]). Encoded sets are decoded (resized when image_size is given)."""
        xs, ys = [], []
        for i in range(len(self.shard_paths(split))):
            x, y = self.load_shard(split, i, verify, image_size)
            xs.append(x)
            ys.append(y)
        if not xs:
            shape = self.manifest.image_shape or (3, image_size or 0, image_size or 0)
            return torch.empty(0, *shape, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
        if len({tuple(x.shape[1:]) for x in xs}) > 1:
            raise StorageError(f"{self.uri}: shards of {split!r} hold images of mixed sizes; "
                               "pass image_size=<pixels>")
        return torch.cat(xs), torch.cat(ys)


def open_dataset(uri: "str | ShardSet") -> ShardSet:
    return uri if isinstance(uri, ShardSet) else ShardSet(os.fspath(uri))

