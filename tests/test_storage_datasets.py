import os
import pickle

import numpy as np
import pytest
import torch

import storage
from storage import StorageError
from storage.synthetic import generate

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
SMALL = dict(n_train=600, n_val=200, rows_per_shard=256)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return storage.prepare_dataset("synthetic", str(tmp_path_factory.mktemp("data")), seed=3, **SMALL)


def test_roundtrip_same_pixels_and_labels(synth):
    x, y = storage.open_dataset(synth.uri).load_split("train")
    gx, gy = generate(600, 3 * 2, num_classes=10, image_size=32)  # train split uses seed*2
    assert x.dtype == torch.uint8 and x.shape == (600, 3, 32, 32)
    assert torch.equal(x, gx.permute(0, 3, 1, 2)) and torch.equal(y, gy)
    assert synth.splits == {"train": 600, "val": 200} and len(synth.shards["train"]) == 3
    assert synth.image_shape == (3, 32, 32) and synth.encoding == "raw" and synth.num_classes == 10


def test_seed_determinism_and_reuse(tmp_path, synth):
    a = storage.prepare_dataset("synthetic", str(tmp_path / "a"), seed=3, **SMALL)
    b = storage.prepare_dataset("synthetic", str(tmp_path / "a"), seed=4, **SMALL)
    xa, _ = storage.open_dataset(a.uri).load_split("val")
    xs, _ = storage.open_dataset(synth.uri).load_split("val")
    xb, _ = storage.open_dataset(b.uri).load_split("val")
    assert torch.equal(xa, xs) and not torch.equal(xa, xb)
    assert a.uri != b.uri
    mtime = os.path.getmtime(os.path.join(a.uri, "manifest.json"))
    again = storage.prepare_dataset("synthetic", str(tmp_path / "a"), seed=3, **SMALL)
    assert again.uri == a.uri and os.path.getmtime(os.path.join(a.uri, "manifest.json")) == mtime


def test_generation_is_fast_and_balanced():
    import time

    t = time.perf_counter()
    x, y = generate(10000, 0)
    assert time.perf_counter() - t < 10
    counts = torch.bincount(y, minlength=10)
    assert counts.min() > 800 and x.float().std() > 30  # balanced classes, non-flat images


def test_interrupted_write_is_not_complete(tmp_path, monkeypatch):
    import storage.datasets as ds

    calls = {"n": 0}
    real = ds._shard_bytes

    def dies_on_second_shard(table):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed mid-write")
        return real(table)

    monkeypatch.setattr(ds, "_shard_bytes", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        storage.prepare_dataset("synthetic", str(tmp_path), seed=0, **SMALL)
    (d,) = list(tmp_path.iterdir())
    assert not (d / "manifest.json").exists()
    with pytest.raises(StorageError, match="no manifest"):
        storage.open_dataset(str(d))
    monkeypatch.setattr(ds, "_shard_bytes", real)
    m = storage.prepare_dataset("synthetic", str(tmp_path), seed=0, **SMALL)
    assert storage.open_dataset(m.uri).load_split("train")[0].shape[0] == 600
    assert len([p for p in d.iterdir() if p.name.startswith("shards-")]) == 1  # the orphan was cleared


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_corrupt_and_truncated_shards_detected(tmp_path, synth):
    uri = _copy(synth.uri, tmp_path / "c")
    shard = os.path.join(uri, synth.shards["train"][1]["path"])
    blob = bytearray(open(shard, "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(blob))
    with pytest.raises(StorageError, match="checksum mismatch") as e:
        storage.open_dataset(uri).load_split("train")
    assert "train-00001.parquet" in str(e.value)
    open(shard, "wb").write(bytes(blob[: len(blob) // 3]))  # truncated: parquet itself refuses without checksums
    with pytest.raises(StorageError, match="unreadable parquet"):
        storage.open_dataset(uri).load_split("train", verify=False)


def test_manifest_mismatch_detected(tmp_path, synth):
    import json

    uri = _copy(synth.uri, tmp_path / "m")
    mpath = os.path.join(uri, "manifest.json")
    m = json.load(open(mpath))
    m["image_shape"] = [3, 16, 16]
    json.dump(m, open(mpath, "w"))
    with pytest.raises(StorageError, match="manifest and shards disagree"):
        storage.open_dataset(uri).load_split("val", verify=False)
    m["image_shape"], m["splits"]["val"] = [3, 32, 32], 999
    json.dump(m, open(mpath, "w"))
    with pytest.raises(StorageError, match="says 999 rows"):
        storage.open_dataset(uri)
    m["splits"]["val"], m["schema_version"] = 200, 99
    json.dump(m, open(mpath, "w"))
    with pytest.raises(StorageError, match="schema_version"):
        storage.open_dataset(uri)


def test_bad_inputs(tmp_path):
    with pytest.raises(StorageError, match="unknown dataset source 'mnist'"):
        storage.prepare_dataset("mnist", str(tmp_path))
    with pytest.raises(StorageError, match="does not exist"):
        storage.open_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match="no manifest"):
        storage.open_dataset(str(tmp_path / "empty"))
    with pytest.raises(StorageError, match="not a directory"):
        storage.prepare_dataset("imagefolder", str(tmp_path / "out"), path=str(tmp_path / "missing"))
    with pytest.raises(StorageError, match="no class sub-folders"):
        storage.prepare_dataset("imagefolder", str(tmp_path / "out"), path=str(tmp_path / "empty"))
    with pytest.raises(StorageError, match="cifar-10-batches-py"):
        storage.prepare_dataset("cifar10", str(tmp_path / "out"), path=str(tmp_path / "empty"))
    with pytest.raises(StorageError, match="unknown parameter 'colour' for synthetic"):
        storage.prepare_dataset("synthetic", str(tmp_path / "out"), colour="red")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("manifest.json"))


def _write_fake_cifar(root, rng):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, open(d / "batches.meta", "wb"))
    images = {}
    for name, n in [*[(f"data_batch_{i}", 4) for i in range(1, 6)], ("test_batch", 3)]:
        chw = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        pickle.dump({b"data": chw.reshape(n, 3072), b"labels": labels}, open(d / name, "wb"))
        images[name] = (chw, labels)
    return images


def test_cifar_pickle_reader(tmp_path):
    fake = _write_fake_cifar(tmp_path / "src", np.random.default_rng(0))
    m = storage.prepare_dataset("cifar10", str(tmp_path / "out"), path=str(tmp_path / "src"))
    assert m.class_names[3] == "c3" and m.splits == {"train": 20, "val": 3}
    x, y = storage.open_dataset(m.uri).load_split("train")
    want = np.concatenate([fake[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert np.array_equal(x.numpy(), want)  # CHW planes survive the HWC storage round trip
    assert y.tolist() == sum((fake[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    xv, _ = storage.open_dataset(m.uri).load_split("val")
    assert np.array_equal(xv.numpy(), fake["test_batch"][0])
    open(tmp_path / "src/cifar-10-batches-py/data_batch_2", "wb").write(b"garbage")
    with pytest.raises(StorageError, match="data_batch_2"):
        storage.prepare_dataset("cifar10", str(tmp_path / "out2"), path=str(tmp_path / "src"))


def _write_imagefolder(root, sizes, rng):
    from torchvision.io import encode_jpeg, encode_png

    pix = set()
    for ci, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            img = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
            if i % 2:
                (root / cls / f"{i}.jpg").write_bytes(encode_jpeg(img, quality=95).numpy().tobytes())
            else:
                (root / cls / f"{i}.png").write_bytes(encode_png(img).numpy().tobytes())
                pix.add((ci, img.numpy().tobytes()))
    (root / "cat" / "notes.txt").write_text("not an image")
    return pix


def test_imagefolder_reader(tmp_path):
    pix = _write_imagefolder(tmp_path / "src", [(12, 12)] * 6, np.random.default_rng(1))
    m = storage.prepare_dataset("imagefolder", str(tmp_path / "out"), path=str(tmp_path / "src"),
                                val_fraction=0.25)
    assert m.encoding == "encoded" and m.class_names == ["cat", "dog"] and m.image_shape == (3, 12, 12)
    assert m.splits["train"] + m.splits["val"] == 12 and m.splits["val"] == 3
    x, y = storage.open_dataset(m.uri).load_split("train")
    assert x.shape[1:] == (3, 12, 12) and x.dtype == torch.uint8
    got = {(int(lbl), img.numpy().tobytes()) for img, lbl in zip(x, y)}
    assert len(got & pix) >= 3  # >= 3 of the 6 PNGs land in train (9 of 12); they decode losslessly, right label
    xr, _ = storage.open_dataset(m.uri).load_split("train", image_size=8)
    assert xr.shape[1:] == (3, 8, 8)


def test_imagefolder_mixed_sizes_need_image_size(tmp_path):
    _write_imagefolder(tmp_path / "src", [(10, 10), (14, 10), (10, 16), (12, 12)], np.random.default_rng(2))
    m = storage.prepare_dataset("imagefolder", str(tmp_path / "out"), path=str(tmp_path / "src"), val_fraction=0.25)
    assert m.image_shape is None
    with pytest.raises(StorageError, match="mixed sizes.*image_size"):
        storage.open_dataset(m.uri).load_split("train")
    x, _ = storage.open_dataset(m.uri).load_split("train", image_size=8)
    assert x.shape == (m.splits["train"], 3, 8, 8)


@pytest.mark.parametrize("path", ["../outside/train-00000.parquet", "shards-x/../../outside.parquet", "/etc/hosts",
                                  "s3://other-bucket/train-00000.parquet", ".", ""])
def test_manifest_shard_path_outside_the_dataset_refused(tmp_path, synth, path):
    import json

    uri = _copy(synth.uri, tmp_path / "p")
    outside = tmp_path / "outside"
    outside.mkdir()
    first = os.path.join(uri, synth.shards["train"][0]["path"])
    (outside / "train-00000.parquet").write_bytes(open(first, "rb").read())  # a good shard, but not the dataset's
    mpath = os.path.join(uri, "manifest.json")
    m = json.load(open(mpath))
    m["shards"]["train"][0]["path"] = path
    json.dump(m, open(mpath, "w"))
    with pytest.raises(StorageError) as e:
        storage.open_dataset(uri)
    assert str(e.value) == (f"manifest {uri}: shard path {path!r} of split 'train' points outside the dataset; the "
                            "manifest is damaged or hand-edited, prepare again")


def _tamper_labels(uri, synth, split, index, labels):
    """Rewrite one shard with other labels and give the manifest its new sha256: damage the checksums cannot see."""
    import hashlib
    import json

    import pyarrow.parquet as pq

    import storage.datasets as ds

    shard = os.path.join(uri, synth.shards[split][index]["path"])
    t = pq.read_table(shard)
    blob = ds._shard_bytes(t.set_column(t.schema.get_field_index("label"), "label", labels(t)))
    open(shard, "wb").write(blob)
    mpath = os.path.join(uri, "manifest.json")
    m = json.load(open(mpath))
    m["shards"][split][index]["sha256"] = hashlib.sha256(blob).hexdigest()
    json.dump(m, open(mpath, "w"))
    return shard


def test_labels_outside_num_classes_refused(tmp_path, synth):
    import json

    import pyarrow as pa
    import pyarrow.compute as pc

    uri = _copy(synth.uri, tmp_path / "l")
    shard = _tamper_labels(uri, synth, "train", 1, lambda t: pc.add(t["label"], 10))  # labels 10..19
    with pytest.raises(StorageError) as e:
        storage.open_dataset(uri).load_split("train")
    assert str(e.value).startswith(f"{shard}: labels span 10..19, outside [0, 10) of the manifest's num_classes; "
                                   f"delete {uri} and prepare again")
    with pytest.raises(StorageError, match=r"train-00001\.parquet: labels span"):  # verify=False checks them too
        storage.open_dataset(uri).load_split("train", verify=False)
    _tamper_labels(uri, synth, "train", 1, lambda t: pa.array([-1] * t.num_rows, pa.int64()))
    with pytest.raises(StorageError, match=r"labels span -1\.\.-1, outside \[0, 10\)"):
        storage.open_dataset(uri).load_split("train")
    uri2 = _copy(synth.uri, tmp_path / "n")  # intact shards, a manifest that claims fewer classes
    mpath = os.path.join(uri2, "manifest.json")
    m = json.load(open(mpath))
    m["num_classes"], m["class_names"] = 5, m["class_names"][:5]
    json.dump(m, open(mpath, "w"))
    with pytest.raises(StorageError, match=r"train-00000\.parquet: labels span 0\.\.9, outside \[0, 5\)"):
        storage.open_dataset(uri2).load_split("train")
    m["num_classes"] = 0
    json.dump(m, open(mpath, "w"))
    with pytest.raises(StorageError, match="num_classes 0 is not a positive integer"):
        storage.open_dataset(uri2)


def test_streaming_reader_checks_labels(tmp_path, synth):
    import pyarrow as pa
    import pyarrow.compute as pc

    from storage.loaders import read_shards

    uri = _copy(synth.uri, tmp_path / "s")
    _tamper_labels(uri, synth, "val", 0, lambda t: pc.add(t["label"], 10))
    ss = storage.open_dataset(uri)
    rows = pa.table({"path": ss.shard_paths("val"), "sha256": [s["sha256"] for s in ss.manifest.shards["val"]],
                     "rows": [s["rows"] for s in ss.manifest.shards["val"]]})
    with pytest.raises(StorageError, match=r"val-00000\.parquet: labels span 10\.\."):
        list(read_shards(rows, ss.fs, uri, num_classes=10))


@pytest.mark.ray
def test_ray_dataset_checks_labels(tmp_path, synth, ray_cluster):
    import pyarrow.compute as pc

    uri = _copy(synth.uri, tmp_path / "r")
    _tamper_labels(uri, synth, "val", 0, lambda t: pc.add(t["label"], 10))
    with pytest.raises(Exception, match=r"val-00000\.parquet: labels span 10\.\."):
        storage.ray_dataset(uri, "val").take_all()
