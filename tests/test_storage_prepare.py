"""Dataset preparation under stress: corrupt shards on the streaming path, big folders, changed folders,
two writers at once, large images."""

import os
import shutil
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

import storage
import storage.datasets as ds
from storage import StorageError, sources
from storage.loaders import read_shards
from storage.synthetic import generate

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    """A small synthetic set with one byte flipped in its second train shard."""
    m = storage.prepare_dataset("synthetic", str(tmp_path_factory.mktemp("data")), seed=0, n_train=300, n_val=50,
                                rows_per_shard=100)
    shard = os.path.join(m.uri, m.shards["train"][1]["path"])
    blob = bytearray(open(shard, "rb").read())
    blob[len(blob) // 2] ^= 0x01
    open(shard, "wb").write(bytes(blob))
    return m


def _shard_rows(m, split):
    ss = storage.open_dataset(m.uri)
    return pa.table({"path": ss.shard_paths(split), "sha256": [s["sha256"] for s in m.shards[split]],
                     "rows": [s["rows"] for s in m.shards[split]]})


def test_streaming_reader_verifies_checksums(corrupt):
    fs = storage.open_dataset(corrupt.uri).fs
    rows = _shard_rows(corrupt, "train")
    first = next(read_shards(rows.slice(0, 1), fs, corrupt.uri))
    assert first.num_rows == 100 and first.column_names == ["image", "label"]
    with pytest.raises(StorageError, match=r"train-00001\.parquet: checksum mismatch .*prepare_dataset again"):
        list(read_shards(rows.slice(1, 1), fs, corrupt.uri))
    assert next(read_shards(rows.slice(1, 1), fs, corrupt.uri, verify=False)).num_rows == 100  # opt-out reads


@pytest.mark.ray
def test_ray_dataset_fails_on_corrupt_shard(corrupt, ray_cluster):
    val = storage.ray_dataset(corrupt.uri, "val").take_all()
    assert len(val) == 50 and val[0]["image"].shape == (32, 32, 3)  # rows are HWC, as stored
    with pytest.raises(Exception, match=r"train-00001\.parquet: checksum mismatch"):
        storage.ray_dataset(corrupt.uri, "train").take_all()


def test_large_images_use_64_bit_offsets(tmp_path):
    row = 272 * 272 * 3  # 10000 rows of this overflow 32-bit offsets (2^31 bytes)
    m = storage.prepare_dataset("synthetic", str(tmp_path), seed=1, n_train=5, n_val=2, image_size=272,
                                max_shard_bytes=2 * row)
    assert [s["rows"] for s in m.shards["train"]] == [2, 2, 1]  # max_shard_bytes cuts raw shards too
    x, y = storage.open_dataset(m.uri).load_split("train")
    gx, gy = generate(5, 2, image_size=272)
    assert x.shape == (5, 3, 272, 272) and torch.equal(x, gx.permute(0, 3, 1, 2)) and torch.equal(y, gy)
    col = pq.read_table(os.path.join(m.uri, m.shards["train"][0]["path"])).column("image")
    assert col.type == pa.large_binary()  # int64 offsets, as stored
    offsets = np.frombuffer(ds._raw_table(gx.numpy()[:3], gy.numpy()[:3]).column("image").chunk(0).buffers()[1],
                            np.int64)
    assert offsets.tolist() == [0, row, 2 * row, 3 * row]


def _folder(root, n_per_class, rng, size=16):
    from PIL import Image

    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return str(root)


def test_imagefolder_written_as_it_is_read(tmp_path, monkeypatch, capsys):
    src = _folder(tmp_path / "src", 12, np.random.default_rng(0))
    biggest = max(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(src) for f in fs)
    reads, shards = [], []
    step = sources.Progress.step
    monkeypatch.setattr(sources.Progress, "step", lambda self, *a, **k: (reads.append(1), step(self, *a, **k)))
    real = ds._shard_bytes
    monkeypatch.setattr(ds, "_shard_bytes", lambda t: (
        shards.append((len(reads), pc.sum(pc.binary_length(t["image"])).as_py())), real(t))[1])
    limit = 3 * biggest
    m = storage.prepare_dataset("imagefolder", str(tmp_path / "out"), path=src, val_fraction=0.25,
                                max_shard_bytes=limit, progress_every=5)
    assert len(m.shards["train"]) >= 4 and len(m.shards["val"]) >= 2
    assert max(b for _, b in shards) <= limit + biggest  # never more than one file past the limit in memory
    assert shards[0][0] < 24  # the first shard was written before the folder was fully read
    x, _ = storage.open_dataset(m.uri).load_split("train")
    assert x.shape == (18, 3, 16, 16)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "files read" in ln]
    assert lines[0].startswith("imagefolder-") and " 5/24 files read" in lines[0] and " 24/24 " in lines[-1]
    assert len(lines) == 6  # every 5 files (4 lines) and one at the end of each split


def test_folder_fingerprint_in_dataset_key(tmp_path):
    src = tmp_path / "src"
    _folder(src, 3, np.random.default_rng(1))
    kw = dict(path=str(src), val_fraction=0.34)
    a = storage.prepare_dataset("imagefolder", str(tmp_path / "out"), **kw)
    assert storage.prepare_dataset("imagefolder", str(tmp_path / "out"), **kw).uri == a.uri  # unchanged: reused
    (src / "cat" / "notes.txt").write_text("not an image")
    assert storage.prepare_dataset("imagefolder", str(tmp_path / "out"), **kw).uri == a.uri
    st = os.stat(src / "dog" / "1.png")
    os.utime(src / "dog" / "1.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    b = storage.prepare_dataset("imagefolder", str(tmp_path / "out"), **kw)
    shutil.copy(src / "dog" / "1.png", src / "dog" / "9.png")  # added
    c = storage.prepare_dataset("imagefolder", str(tmp_path / "out"), **kw)
    assert len({a.uri, b.uri, c.uri}) == 3
    assert sum(c.splits.values()) == 7 and a.params["listing"] != c.params["listing"]


def test_folder_changed_during_preparation_refused(tmp_path, monkeypatch):
    src = _folder(tmp_path / "src", 3, np.random.default_rng(2))
    real = sources.list_imagefolder

    def then_edit(*a, **k):
        listing = real(*a, **k)
        with open(os.path.join(src, "cat", "2.png"), "ab") as f:
            f.write(b"more")
        return listing

    monkeypatch.setattr(sources, "list_imagefolder", then_edit)
    with pytest.raises(StorageError, match=r"cat/2\.png changed while the dataset was being prepared"):
        storage.prepare_dataset("imagefolder", str(tmp_path / "out"), path=src)


def test_two_writers_of_one_dataset(tmp_path, monkeypatch, capsys):
    real, start = ds._shard_bytes, threading.Barrier(2)
    monkeypatch.setattr(ds, "_shard_bytes", lambda t: (time.sleep(0.05), real(t))[1])  # long enough to overlap
    got, errors = [], []

    def prepare():
        start.wait()
        try:
            got.append(storage.prepare_dataset("synthetic", str(tmp_path), seed=5, n_train=400, n_val=100,
                                               rows_per_shard=50))
        except Exception as e:  # reported by the assert below
            errors.append(e)

    threads = [threading.Thread(target=prepare) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(got) == 2 and got[0].uri == got[1].uri and got[0].shards == got[1].shards
    assert "waiting: " in capsys.readouterr().err  # the second one waited instead of clearing the first's shards
    (d,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len([p for p in d.iterdir() if p.name.startswith("shards-")]) == 1
    ss = storage.open_dataset(got[0].uri)
    assert ss.load_split("train")[0].shape[0] == 400 and ss.load_split("val")[0].shape[0] == 100  # all verify


def _both_hold_the_lease(monkeypatch):
    """storage.lock's best-effort lease (gs://, no conditional put) in the race it cannot see: two preparers whose
    puts crossed each read their own lease back, so both hold it."""
    import storage.lock as lock
    from storage.uri import resolve

    class Raced(lock._PlainLease):
        def try_acquire(self):
            self.fs.create_dir(self.path.rsplit("/", 1)[0])  # a local folder stands in for the bucket's prefix
            self.info.setdefault("generation", 1)
            self._write()
            self.held = True
            return None

    monkeypatch.setattr(lock, "_backend", lambda uri, info: Raced(resolve(uri)[0], f"{resolve(uri)[1]}/.lock", info))


def test_best_effort_lease_keeps_other_attempts_shards(tmp_path, monkeypatch, capsys):
    _both_hold_the_lease(monkeypatch)
    kw = dict(seed=6, n_train=300, n_val=50, rows_per_shard=100)
    real, started, go = ds._shard_bytes, threading.Event(), threading.Event()
    first, errors = [], []

    def slow(t):  # the first preparer, its shard dir made, waits here until the second one has finished
        started.set()
        go.wait(30)
        return real(t)

    def prepare_first():
        try:
            first.append(storage.prepare_dataset("synthetic", str(tmp_path), **kw))
        except Exception as e:  # reported by the assert below
            errors.append(e)

    monkeypatch.setattr(ds, "_shard_bytes", slow)
    t = threading.Thread(target=prepare_first)
    t.start()
    assert started.wait(30), errors
    (d,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    (theirs,) = [p for p in d.iterdir() if p.name.startswith("shards-")]
    monkeypatch.setattr(ds, "_shard_bytes", real)
    try:
        second = storage.prepare_dataset("synthetic", str(tmp_path), **kw)  # holds the "same" lease meanwhile
    finally:
        go.set()
    t.join(60)
    assert not errors, errors
    assert theirs.is_dir() and len(list(d.glob("shards-*"))) == 2  # neither deleted the other's shards
    assert "note: kept 1 shard dir(s) of other attempts" in capsys.readouterr().err
    assert first[0].shards != second.shards
    fs = storage.open_dataset(second.uri).fs
    for m in (first[0], second):  # whichever manifest landed last, the shards it names are all there and verify
        for split in ("train", "val"):
            assert [ds.read_verified_shard(fs, str(d / s["path"]), s["sha256"], s["rows"], m.uri).num_rows
                    for s in m.shards[split]] == ([100, 100, 100] if split == "train" else [50])
    assert storage.open_dataset(second.uri).load_split("train")[0].shape[0] == 300


def test_preparation_is_said_in_a_line_when_it_starts_and_one_when_done_and_reuse_is_silent(tmp_path, capsys):
    m = storage.prepare_dataset("synthetic", str(tmp_path), seed=3, n_train=200, n_val=40, rows_per_shard=100)
    lines = capsys.readouterr().err.strip().splitlines()
    name = m.uri.rsplit("/", 1)[-1]
    assert lines[0] == f"dataset {name}: preparing synthetic once (reused afterwards) …"
    assert lines[1].startswith(f"dataset {name}: train 200, val 40 images in 3 shards (") and lines[1].endswith(m.uri)
    assert len(lines) == 2
    storage.prepare_dataset("synthetic", str(tmp_path), seed=3, n_train=200, n_val=40, rows_per_shard=100)
    assert capsys.readouterr().err == ""  # reused: nothing to say


def test_a_refused_or_failed_preparation_leaves_nothing_behind(tmp_path, monkeypatch):
    # Refused (a CIFAR folder that is not there), or failed mid-way (the disk fills up at the second shard): no
    # shards-*/ dir, no .lock, no folder it made; a data root that held another dataset keeps just that.
    import errno

    root = tmp_path / "data"
    with pytest.raises(StorageError, match="/nonexistent/cifar"):
        storage.prepare_dataset("cifar10", str(root), path="/nonexistent/cifar")
    assert not root.exists()
    kept = storage.prepare_dataset("synthetic", str(root), seed=1, n_train=100, n_val=20)
    real, calls = ds._shard_bytes, []

    def full_at_second_shard(table):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table)

    monkeypatch.setattr(ds, "_shard_bytes", full_at_second_shard)
    with pytest.raises(OSError, match="No space left"):
        storage.prepare_dataset("synthetic", str(root), seed=2, n_train=300, n_val=50, rows_per_shard=100)
    assert [p.name for p in root.iterdir()] == [os.path.basename(kept.uri)]
    with pytest.raises(StorageError, match="/nonexistent/cifar"):  # also beside a prepared set
        storage.prepare_dataset("cifar10", str(root), path="/nonexistent/cifar")
    assert [p.name for p in root.iterdir()] == [os.path.basename(kept.uri)]
    monkeypatch.setattr(ds, "_shard_bytes", real)
    assert storage.open_dataset(kept.uri).load_split("train")[0].shape[0] == 100
