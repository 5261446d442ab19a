"""Built-in dataset sources: the parameters each accepts, and how each one's images are read.

Raw sources (synthetic, cifar10/100) return whole splits as uint8 HWC arrays; they fit in memory (CIFAR is
180 MB). imagefolder returns a listing, and its files are read one shard at a time while shards are written,
because a folder like ImageNet (~140 GB) does not fit.
"""

import difflib
import hashlib
import io
import os
import pickle
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from storage import synthetic
from storage.uri import StorageError

SOURCES = ("synthetic", "cifar10", "cifar100", "imagefolder")
SPLITS = ("train", "val")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
# any source: its seed (prepare_dataset(seed=...); studies pass it inside dataset_params) and how shards are cut
COMMON_PARAMS = frozenset({"seed", "rows_per_shard", "max_shard_bytes"})
_PARAMS = {
    "synthetic": {"n_train", "n_val", "num_classes", "image_size", "noise"},
    "cifar10": {"path", "download"},
    "cifar100": {"path", "download"},
    "imagefolder": {"path", "val_fraction"},
}


def source_params(source: str) -> set[str]:
    """Every key a built-in source accepts in dataset_params (validate a study's flags before any work)."""
    if source not in _PARAMS:
        raise StorageError(f"unknown dataset source {source!r}; use one of {SOURCES} or an existing shard-set URI")
    return set(_PARAMS[source] | COMMON_PARAMS)


def check_params(source: str, keys: Iterable[str]) -> None:
    valid = sorted(source_params(source))
    for k in sorted(keys):
        if k not in valid:
            close = difflib.get_close_matches(k, valid, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise StorageError(f"unknown parameter {k!r} for {source}; valid: {', '.join(valid)}{hint}")


# ---------------------------------------------------------------- raw sources -> split -> (images, labels)

def synthetic_splits(seed: int, n_train: int = 20000, n_val: int = 5000, num_classes: int = 10,
                     image_size: int = 32, noise: float = 0.12, check_only: bool = False):
    """check_only: validate the values and return None (prepare_dataset does this before taking any lock)."""
    try:
        for n in (n_train, n_val):
            synthetic.check_args(n, num_classes, image_size)
    except (TypeError, ValueError) as e:
        raise StorageError(str(e)) from e
    if check_only:
        return None
    out = {}
    for i, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        x, y = synthetic.generate(n, seed * 2 + i, num_classes=num_classes, image_size=image_size, noise=noise)
        out[split] = (x.numpy(), y.numpy())
    return out, list(synthetic.CLASS_NAMES[:num_classes])


# What a CIFAR python batch holds: a dict of bytes keys -> lists, bytes and one numpy uint8 array. Containers and
# bytes need no global; the array needs numpy's rebuilder, ndarray and dtype. Any other global (os.system, eval,
# builtins...) is how a pickle runs code, and a CIFAR file never names one.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's array rebuilder, from whichever module this numpy keeps it in
_CIFAR_GLOBALS = {("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # as the CIFAR files name it
                  ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # as numpy 2 writes it
                  ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}


class _Refused(pickle.UnpicklingError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    """pickle.load runs whatever callable the file names, so anyone who can write the CIFAR folder would run code
    on the driver; this one resolves only the globals a numpy array needs, and refuses the rest unrun."""

    def find_class(self, module: str, name: str):
        if (module, name) in _CIFAR_GLOBALS:
            return _CIFAR_GLOBALS[module, name]
        raise _Refused(f"{module}.{name}")


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except FileNotFoundError as e:
        raise StorageError(f"{path}: missing CIFAR batch file; point path= at the folder holding it "
                           "(torchvision python format) or pass download=True") from e
    except _Refused as e:
        raise StorageError(f"{path}: the pickle calls {e}, which no CIFAR batch does (unpickling it could run "
                           "code); refused without running it, replace the folder with a fresh download "
                           "(download=True)") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise StorageError(f"{path}: not a readable CIFAR pickle ({e}); re-download the dataset") from e
    if not isinstance(d, dict):
        raise StorageError(f"{path}: holds a {type(d).__name__}, not a CIFAR batch (a dict); re-download the dataset")
    return d


def _labels(values, n: int, num_classes: int, path: str) -> np.ndarray:
    """A batch's labels, refused unless there is one per image in [0, num_classes): a label past the class list
    would otherwise reach the loss as an index (a CUDA assert, or a silently wrong class on CPU)."""
    y = np.asarray(values, dtype=np.int64)
    if len(y) != n:
        raise StorageError(f"{path}: {len(y)} labels for {n} images; the file is not CIFAR, re-download it")
    if n and not (y.min() >= 0 and y.max() < num_classes):
        raise StorageError(f"{path}: labels span {y.min()}..{y.max()}, outside [0, {num_classes}) of the class "
                           "list; the file is not this CIFAR, re-download it")
    return y


def cifar_splits(path: str | None, hundred: bool, download: bool = False):
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
            ys.append(_labels(d[label_key], len(data), len(names), os.path.join(folder, fn)))
        out[split] = (np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys))
    return out, names


# ---------------------------------------------------------------- imagefolder: listing, then streamed reads

@dataclass
class Listing:
    classes: list[str]
    splits: dict[str, list[tuple[str, int, int]]]  # split -> [(file, size in bytes, label)]
    fingerprint: str  # sha256 of every image's relative path, size and mtime: a changed folder gets a new key


def _scan(root: str, classes: list[str]) -> list[tuple[str, int, int, int]]:
    """-> [(path, size, mtime_ns, label)] of the images in root/<class>/, in a fixed order."""
    found = []
    for label, c in enumerate(classes):
        cdir = os.path.join(root, c)
        if not os.path.isdir(cdir):
            continue
        for e in sorted(os.scandir(cdir), key=lambda e: e.name):
            if e.name.lower().endswith(IMAGE_EXTS) and e.is_file():
                st = e.stat()
                found.append((e.path, st.st_size, st.st_mtime_ns, label))
    return found


def list_imagefolder(path: str | None, seed: int, val_fraction: float = 0.1) -> Listing:
    """Class sub-folders; if path has train/ and val/ sub-dirs they are the splits, else a seeded split."""
    if path is None:
        raise StorageError("imagefolder needs path=<directory with one sub-folder per class>")
    if not os.path.isdir(path):
        raise StorageError(f"{path}: not a directory; pass path= a folder with one sub-folder per class")
    has_splits = all(os.path.isdir(os.path.join(path, s)) for s in SPLITS)
    roots = {s: os.path.join(path, s) for s in SPLITS} if has_splits else {"all": path}
    first = next(iter(roots.values()))
    classes = sorted(d for d in os.listdir(first) if os.path.isdir(os.path.join(first, d)))
    if not classes:
        raise StorageError(f"{first}: no class sub-folders; put images in <class>/ folders")
    scans, h = {}, hashlib.sha256()
    for split, root in roots.items():
        scans[split] = _scan(root, classes)
        if not scans[split]:
            raise StorageError(f"{root}: no .png/.jpg images in the class folders; add images or fix path=")
        for fp, size, mtime, label in scans[split]:
            h.update(f"{os.path.relpath(fp, path)}\t{size}\t{mtime}\t{label}\n".encode())
    rows = {s: [(fp, size, label) for fp, size, _, label in found] for s, found in scans.items()}
    if not has_splits:
        files = rows.pop("all")
        perm = np.random.default_rng(seed).permutation(len(files))
        n_val = max(1, int(round(len(files) * val_fraction)))
        rows = {"val": [files[i] for i in perm[:n_val]], "train": [files[i] for i in perm[n_val:]]}
    return Listing(classes, rows, h.hexdigest()[:16])


def looks_like_image_folder(fs: pafs.FileSystem, path: str) -> bool:
    """A few class sub-folders (maybe under train/) hold .jpg/.png files: raw images, not shards."""
    try:
        for depth in range(2):
            dirs = [i for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.Directory]
            for d in sorted(dirs, key=lambda i: i.path)[:3]:
                files = fs.get_file_info(pafs.FileSelector(d.path))
                if any(f.base_name.lower().endswith(IMAGE_EXTS) for f in files):
                    return True
            train = [d for d in dirs if d.base_name == "train"]
            if depth or not train:
                return False
            path = train[0].path
    except OSError:
        return False
    return False


def _image_table(blobs: list[bytes], labels: list[int], hw: list[tuple[int, int]]) -> pa.Table:
    return pa.table({"image": pa.array(blobs, pa.binary()), "label": pa.array(labels, pa.int64()),
                     "height": pa.array([a for a, _ in hw], pa.int32()), "width": pa.array([b for _, b in hw],
                                                                                           pa.int32())})


class Preparing:
    """A dataset being prepared, said in one line when it starts and one when it is done (on stderr)."""

    def __init__(self, name: str, source: str):
        self.name, self.t0 = name, time.time()
        print(f"dataset {name}: preparing {source} once (reused afterwards) …", file=sys.stderr, flush=True)

    def done(self, splits: dict[str, int], shards: int, uri: str) -> None:
        print(f"dataset {self.name}: " + ", ".join(f"{s} {n}" for s, n in splits.items()) + f" images in {shards} "
              f"shards ({time.time() - self.t0:.0f} s), at {uri}", file=sys.stderr, flush=True)


class Progress:
    """A line on stderr every `every` files, and one at the end of each split (no dependency, works in logs)."""

    def __init__(self, total: int, every: int, what: str):
        self.total, self.every, self.what, self.done, self.bytes = total, every, what, 0, 0

    def step(self, nbytes: int, split: str, shards: int, last: bool = False) -> None:
        self.done += 1
        self.bytes += nbytes
        if last or (self.every and self.done % self.every == 0):
            print(f"{self.what}: {self.done}/{self.total} files read ({self.bytes / 1e9:.2f} GB), {split}: "
                  f"{shards} shards written", file=sys.stderr, flush=True)


def imagefolder_tables(files: list[tuple[str, int, int]], rows_per_shard: int, max_shard_bytes: int,
                       progress: Progress, split: str) -> Iterator[pa.Table]:
    """Read the files in order, yielding a shard-sized table whenever the buffer reaches either limit.

    Memory stays about 2 x max_shard_bytes (the buffered files, then the table built from them), whatever
    the folder's size.
    """
    from PIL import Image  # header-only size reads

    blobs, labels, hw, buffered, shards = [], [], [], 0, 0
    for i, (fp, size, label) in enumerate(files):
        try:
            with open(fp, "rb") as f:
                blob = f.read()
            with Image.open(io.BytesIO(blob)) as im:
                w, h = im.size
        except OSError as e:
            raise StorageError(f"{fp}: not a readable image ({e}); remove or replace the file") from e
        if len(blob) != size:  # the listing (and so the dataset's key) no longer describes this file
            raise StorageError(f"{fp} changed while the dataset was being prepared ({size} -> {len(blob)} bytes); "
                               "leave the folder alone and prepare again")
        blobs.append(blob)
        labels.append(label)
        hw.append((h, w))
        buffered += len(blob)
        last = i == len(files) - 1
        if last or buffered >= max_shard_bytes or len(blobs) >= rows_per_shard:
            table = _image_table(blobs, labels, hw)
            blobs, labels, hw, buffered = [], [], [], 0  # drop the bytes before the table is encoded
            shards += 1
            progress.step(len(blob), split, shards, last)
            yield table
        else:
            progress.step(len(blob), split, shards)
