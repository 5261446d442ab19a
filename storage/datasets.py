"""Dataset format: Parquet shards + manifest.json, written by prepare_dataset, read by open_dataset.

Layout under root/<source>-<hash>/:
  shards-<token>/<split>-00000.parquet   one attempt's shards (an interrupted attempt leaves an orphan dir)
  manifest.json                          written LAST: its presence is the commit marker
Fixed-size sets store raw uint8 HWC bytes per row; imagefolder stores the encoded file bytes.
"""

import dataclasses
import hashlib
import json
import os
import pickle
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from storage import synthetic
from storage.uri import StorageError, exists, join, read_bytes, resolve, write_bytes_atomic

SCHEMA_VERSION = 1
SPLITS = ("train", "val")
SOURCES = ("synthetic", "cifar10", "cifar100", "imagefolder")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


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


# ---------------------------------------------------------------- sources -> (split -> (images, labels))

def _synthetic(seed: int, n_train: int = 20000, n_val: int = 5000, num_classes: int = 10,
               image_size: int = 32, noise: float = 0.12):
    out = {}
    for i, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        x, y = synthetic.generate(n, seed * 2 + i, num_classes=num_classes, image_size=image_size, noise=noise)
        out[split] = (x.numpy(), y.numpy())
    return out, list(synthetic.CLASS_NAMES[:num_classes])


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except FileNotFoundError as e:
        raise StorageError(f"{path}: missing CIFAR batch file; point path= at the folder holding it "
                           "(torchvision python format) or pass download=True") from e
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise StorageError(f"{path}: not a readable CIFAR pickle ({e}); re-download the dataset") from e


def _cifar(path: str | None, hundred: bool, download: bool = False):
    if path is None:
        raise StorageError("cifar needs path=<directory containing cifar-10-batches-py/ or cifar-100-python/>")
    sub = "cifar-100-python" if hundred else "cifar-10-batches-py"
    folder = path if os.path.basename(os.path.normpath(path)) == sub else os.path.join(path, sub)
    if not os.path.isdir(folder):
        if not download:
            raise StorageError(f"{folder}: not found; pass the directory holding {sub}/ as path=, "
                               "or download=True to fetch it")
        import torchvision  # only when the user asked for a download

        (torchvision.datasets.CIFAR100 if hundred else torchvision.datasets.CIFAR10)(path, download=True)
    if hundred:
        files = {"train": ["train"], "val": ["test"]}
        meta, names_key, label_key = "meta", b"fine_label_names", b"fine_labels"
    else:
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"]}
        meta, names_key, label_key = "batches.meta", b"label_names", b"labels"
    names = [n.decode() for n in _unpickle(os.path.join(folder, meta))[names_key]]
    out = {}
    for split, fnames in files.items():
        xs, ys = [], []
        for fn in fnames:
            d = _unpickle(os.path.join(folder, fn))
            data = np.asarray(d[b"data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3072:
                raise StorageError(f"{os.path.join(folder, fn)}: expected data of shape [N, 3072], got "
                                   f"{data.shape}; the file is not CIFAR, re-download it")
            xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # stored CHW planes -> HWC
            ys.append(np.asarray(d[label_key], dtype=np.int64))
        out[split] = (np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys))
    return out, names


def _imagefolder(path: str | None, seed: int, val_fraction: float = 0.1):
    """Class sub-folders; if path has train/ and val/ sub-dirs they are the splits, else a seeded split."""
    from PIL import Image  # header-only size reads

    if path is None:
        raise StorageError("imagefolder needs path=<directory with one sub-folder per class>")
    if not os.path.isdir(path):
        raise StorageError(f"{path}: not a directory; pass path= a folder with one sub-folder per class")
    has_splits = all(os.path.isdir(os.path.join(path, s)) for s in SPLITS)
    roots = {s: os.path.join(path, s) for s in SPLITS} if has_splits else {"all": path}
    classes = sorted(d for d in os.listdir(next(iter(roots.values())))
                     if os.path.isdir(os.path.join(next(iter(roots.values())), d)))
    if not classes:
        raise StorageError(f"{next(iter(roots.values()))}: no class sub-folders; put images in <class>/ folders")
    rows = {}
    for split, root in roots.items():
        files, labels = [], []
        for ci, c in enumerate(classes):
            cdir = os.path.join(root, c)
            for fn in sorted(os.listdir(cdir)) if os.path.isdir(cdir) else []:
                if fn.lower().endswith(IMAGE_EXTS):
                    files.append(os.path.join(cdir, fn))
                    labels.append(ci)
        if not files:
            raise StorageError(f"{root}: no .png/.jpg images in the class folders; add images or fix path=")
        rows[split] = (files, np.asarray(labels, dtype=np.int64))
    if not has_splits:
        files, labels = rows.pop("all")
        perm = np.random.default_rng(seed).permutation(len(files))
        n_val = max(1, int(round(len(files) * val_fraction)))
        rows = {"val": ([files[i] for i in perm[:n_val]], labels[perm[:n_val]]),
                "train": ([files[i] for i in perm[n_val:]], labels[perm[n_val:]])}
    out, sizes = {}, set()
    for split, (files, labels) in rows.items():
        blobs, hw = [], []
        for fp in files:
            try:
                with Image.open(fp) as im:
                    w, h = im.size
            except OSError as e:
                raise StorageError(f"{fp}: not a readable image ({e}); remove or replace the file") from e
            with open(fp, "rb") as f:
                blobs.append(f.read())
            hw.append((h, w))
            sizes.add((h, w))
        out[split] = (blobs, labels, np.asarray(hw, dtype=np.int32).reshape(-1, 2))
    return out, classes, sizes


# ---------------------------------------------------------------- writing

def _shard_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", compression_level=1)  # level 1: fast, pixels barely shrink
    return sink.getvalue().to_pybytes()


def _raw_table(images: np.ndarray, labels: np.ndarray) -> pa.Table:
    n, row = len(images), int(np.prod(images.shape[1:]))
    offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int32) * row).tobytes())
    values = pa.py_buffer(np.ascontiguousarray(images).reshape(-1))
    image = pa.Array.from_buffers(pa.binary(), n, [None, offsets, values])
    return pa.table({"image": image, "label": pa.array(labels, pa.int64())})


def prepare_dataset(source: str, root: str, *, seed: int = 0, path: str | None = None,
                    rows_per_shard: int = 10000, **params) -> Manifest:
    """Write (or reuse) the shard set for source+params under root/<source>-<hash>/ and return its manifest."""
    if source not in SOURCES:
        if "://" in source or os.path.isdir(source):
            return open_dataset(source).manifest  # an existing shard set
        raise StorageError(f"unknown dataset source {source!r}; use one of {SOURCES} or an existing shard-set URI")
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    key = dict(params)
    if path is not None:
        key["path"] = os.path.abspath(os.path.expanduser(path))
        path = key["path"]
    download = bool(key.pop("download", False))
    fs, base = resolve(root)
    uri = join(root, f"{source}-{_params_hash(source, seed, key)}")
    dpath = join(base, uri.rsplit("/", 1)[1])
    if exists(fs, join(dpath, "manifest.json")):
        return open_dataset(uri).manifest

    sizes = set()
    if source == "synthetic":
        try:
            data, names = _synthetic(seed, **params)
        except TypeError as e:
            raise StorageError(f"synthetic: bad parameter ({e}); accepted: n_train, n_val, num_classes, "
                               "image_size, noise") from e
        encoding = "raw"
    elif source in ("cifar10", "cifar100"):
        data, names = _cifar(path, source == "cifar100", download=download)
        encoding = "raw"
    else:
        data, names, sizes = _imagefolder(path, seed, **params)
        encoding = "encoded"

    if encoding == "raw":
        h, w, c = next(iter(data.values()))[0].shape[1:]
        image_shape = (int(c), int(h), int(w))
    else:
        image_shape = (3, *sizes.pop()) if len(sizes) == 1 else None

    # clear orphans of earlier interrupted attempts (no manifest means nothing committed references them)
    try:
        for info in fs.get_file_info(pafs.FileSelector(dpath, allow_not_found=True)):
            if info.base_name.startswith("shards-") and info.type == pafs.FileType.Directory:
                fs.delete_dir(info.path)
    except OSError as e:
        raise StorageError(f"cannot list {uri} ({e}); check the URI and credentials") from e
    shard_dir = f"shards-{uuid.uuid4().hex[:8]}"
    fs.create_dir(join(dpath, shard_dir), recursive=True)
    shards = {}
    for split in SPLITS:
        shards[split] = []
        x, y = data[split][0], data[split][1]
        for i, start in enumerate(range(0, max(len(y), 1), rows_per_shard)):
            sl = slice(start, start + rows_per_shard)
            if encoding == "raw":
                table = _raw_table(x[sl], y[sl])
            else:
                hw = data[split][2][sl]
                table = pa.table({"image": pa.array(x[sl], pa.binary()), "label": pa.array(y[sl], pa.int64()),
                                  "height": pa.array(hw[:, 0]), "width": pa.array(hw[:, 1])})
            blob = _shard_bytes(table)
            rel = f"{shard_dir}/{split}-{i:05d}.parquet"
            with fs.open_output_stream(join(dpath, rel)) as f:
                f.write(blob)
            shards[split].append({"path": rel, "rows": table.num_rows, "sha256": hashlib.sha256(blob).hexdigest()})
    manifest = Manifest(uri=uri, source=source, params={**key, "seed": seed}, num_classes=len(names),
                        class_names=names, image_shape=image_shape,
                        splits={s: len(data[s][1]) for s in SPLITS}, shards=shards, encoding=encoding)
    write_bytes_atomic(fs, join(dpath, "manifest.json"), manifest.to_json().encode())  # the commit
    return manifest


# ---------------------------------------------------------------- reading

def decode_raw(images: pa.Array, shape: tuple[int, int, int], where: str) -> torch.Tensor:
    """Binary column of HWC uint8 rows -> uint8 tensor [N, C, H, W], zero-copy until the final permute."""
    if isinstance(images, pa.ChunkedArray):
        images = images.combine_chunks() if images.num_chunks != 1 else images.chunk(0)
    if not pa.types.is_binary(images.type) and not pa.types.is_large_binary(images.type):
        raise StorageError(f"{where}: column 'image' has type {images.type}, expected binary; prepare again")
    c, h, w = shape
    n, row = len(images), c * h * w
    if n == 0:
        return torch.empty(0, c, h, w, dtype=torch.uint8)
    odt = np.int64 if pa.types.is_large_binary(images.type) else np.int32
    offsets = np.frombuffer(images.buffers()[1], dtype=odt)[images.offset:images.offset + n + 1]
    if not np.all(np.diff(offsets) == row):
        bad = int(np.argmax(np.diff(offsets) != row))
        raise StorageError(f"{where}: row {bad} holds {int(offsets[bad + 1] - offsets[bad])} bytes but the "
                           f"manifest says images are {shape} ({row} bytes); manifest and shards disagree, "
                           "prepare the data again")
    values = np.frombuffer(images.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
    return torch.from_numpy(values.reshape(n, h, w, c).copy()).permute(0, 3, 1, 2).contiguous()


def decode_encoded(blobs, image_size: int | None, where: str) -> torch.Tensor:
    """Encoded JPEG/PNG bytes -> uint8 [N, 3, S, S]: shorter side resized to S then centre-cropped."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as F

    out = []
    for i, b in enumerate(blobs):
        try:
            with warnings.catch_warnings():  # torchvision 0.29 flags its decoders deprecated (-> torchcodec)
                warnings.simplefilter("ignore", DeprecationWarning)
                img = decode_image(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError as e:
            raise StorageError(f"{where}: row {i} is not a decodable image ({e}); prepare the data again") from e
        if image_size is not None:
            img = F.center_crop(F.resize(img, image_size, antialias=True), [image_size, image_size])
        out.append(img)
    if len({tuple(t.shape) for t in out}) > 1:
        raise StorageError(f"{where}: images have mixed sizes {sorted({tuple(t.shape[1:]) for t in out})}; "
                           "pass image_size=<pixels> to resize them to one size")
    return torch.stack(out) if out else torch.empty(0, 3, image_size or 0, image_size or 0, dtype=torch.uint8)


class ShardSet:
    """A committed shard set: manifest + readers."""

    def __init__(self, uri: str):
        self.fs, self.path = resolve(uri)
        self.uri = uri
        mpath = join(self.path, "manifest.json")
        if not exists(self.fs, mpath):
            if not exists(self.fs, self.path):
                raise StorageError(f"{uri}: does not exist; prepare it with storage.prepare_dataset or fix the URI")
            raise StorageError(f"{mpath}: no manifest (empty directory or an interrupted write); "
                               "run storage.prepare_dataset again")
        self.manifest = Manifest.from_json(read_bytes(self.fs, mpath).decode(), uri)

    def shard_paths(self, split: str) -> list[str]:
        """Filesystem paths (for self.fs) of the split's shards."""
        return [join(self.path, s["path"]) for s in self._shards(split)]

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
        p = join(self.path, info["path"])
        blob = read_bytes(self.fs, p)
        if verify and hashlib.sha256(blob).hexdigest() != info["sha256"]:
            raise StorageError(f"{p}: checksum mismatch (corrupt or truncated shard); delete {self.uri} and run "
                               "storage.prepare_dataset again")
        try:
            table = pq.read_table(pa.BufferReader(blob))
        except (pa.ArrowInvalid, OSError) as e:
            raise StorageError(f"{p}: unreadable parquet ({e}); delete {self.uri} and prepare again") from e
        if "image" not in table.column_names or "label" not in table.column_names:
            raise StorageError(f"{p}: columns {table.column_names} lack 'image'/'label'; the manifest does not "
                               "match the shards, prepare the data again")
        if table.num_rows != info["rows"]:
            raise StorageError(f"{p}: {table.num_rows} rows, manifest says {info['rows']}; prepare again")
        return table

    def load_split(self, split: str, verify: bool = True,
                   image_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (uint8 [N, C, H, W], int64 [N]). Encoded sets are decoded (resized when image_size is given)."""
        xs, ys = [], []
        for i, p in enumerate(self.shard_paths(split)):
            t = self.read_shard(split, i, verify)
            if self.manifest.encoding == "raw":
                xs.append(decode_raw(t.column("image"), self.manifest.image_shape, p))
            else:
                xs.append(decode_encoded(t.column("image").to_pylist(), image_size, p))
            ys.append(torch.from_numpy(t.column("label").to_numpy().astype(np.int64)))
        if not xs:
            shape = self.manifest.image_shape or (3, image_size or 0, image_size or 0)
            return torch.empty(0, *shape, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
        if len({tuple(x.shape[1:]) for x in xs}) > 1:
            raise StorageError(f"{self.uri}: shards of {split!r} hold images of mixed sizes; "
                               "pass image_size=<pixels>")
        return torch.cat(xs), torch.cat(ys)


def open_dataset(uri: "str | ShardSet") -> ShardSet:
    return uri if isinstance(uri, ShardSet) else ShardSet(os.fspath(uri))

