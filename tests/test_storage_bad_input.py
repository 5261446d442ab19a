"""Each bad input fails at once with one line that names the problem and the fix."""

import os
import re

import numpy as np
import pytest

import storage
from storage import StorageError


def _image_folder(root, splits=False):
    from PIL import Image

    for sub in (["train", "val"] if splits else [""]):
        for cls in ("cat", "dog"):
            d = root / sub / cls
            d.mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "0.png")
    return str(root)


def _file_in_the_way(tmp):
    (tmp / "file").write_text("x")
    return str(tmp / "file" / "out")


def _tampered_dataset(tmp, **changes):
    """A small prepared set whose manifest.json has been edited: changes maps a key path 'a.b.0.c' to a value."""
    import json

    m = storage.prepare_dataset("synthetic", str(tmp / "data"), n_train=20, n_val=10)
    mpath = os.path.join(m.uri, "manifest.json")
    d = json.load(open(mpath))
    for key, value in changes.items():
        *path, last = key.split(".")
        at = d
        for k in path:
            at = at[int(k)] if k.isdigit() else at[k]
        at[int(last) if last.isdigit() else last] = value
    json.dump(d, open(mpath, "w"))
    return m.uri


def _pickle_calling(tmp, call, arg):
    import pickle

    class Payload:
        def __reduce__(self):
            return call, (arg,)

    (tmp / "data_batch_1").write_bytes(pickle.dumps({b"data": Payload()}))
    return str(tmp / "data_batch_1")


CASES = {
    "s3 one slash": (lambda t: storage.resolve("s3:/bucket/key"),
                     r"'s3:/bucket/key' is not a URI .*; write s3://bucket/key"),
    "gs no slash": (lambda t: storage.resolve("gs:bucket"), r"write gs://bucket"),
    "one slash as output": (lambda t: storage.require_absolute("s3:/b/results", "--output"), r"write s3://b/results"),
    "one slash as dataset": (lambda t: storage.open_dataset("s3:/b/data"), r"write s3://b/data"),
    "credentials in URI": (lambda t: storage.resolve("s3://AKIAX:s3cr3t@bucket/results"),
                           r"^s3://\*\*\*@bucket/results: credentials in a URI end up in logs; remove them and "
                           r"use the environment"),
    "relative data root": (lambda t: storage.require_absolute("data", "--data-root"),
                           r"--data-root 'data' is a relative path, which breaks inside Ray trials .*; pass an "
                           r"absolute path, e\.g\. --data-root /"),
    "unwritable output": (lambda t: storage.check_writable(_file_in_the_way(t)),
                          r"cannot write to .*/file/out \(.*\); fix its permissions or credentials"),
    "image folder as dataset": (lambda t: storage.open_dataset(_image_folder(t / "raw")),
                                r"/raw is a folder of images, not a prepared dataset; use the imagefolder source: "
                                r'dataset "imagefolder" with dataset_params \{"path": ".*/raw"\}'),
    "image folder with splits as dataset": (lambda t: storage.open_dataset(_image_folder(t / "raw", splits=True)),
                                            r"use the imagefolder source"),
    "image folder as source": (lambda t: storage.prepare_dataset(_image_folder(t / "raw"), str(t / "out")),
                               r"use the imagefolder source"),
    "synthetic typo": (lambda t: storage.prepare_dataset("synthetic", str(t / "out"), num_train=10),
                       r"unknown parameter 'num_train' for synthetic; valid: image_size, max_shard_bytes, n_train, "
                       r"n_val, noise, num_classes, rows_per_shard, seed \(did you mean n_train\?\)$"),
    "imagefolder foreign key": (lambda t: storage.prepare_dataset("imagefolder", str(t / "out"),
                                                                  path=_image_folder(t / "raw"), image_size=64),
                                r"unknown parameter 'image_size' for imagefolder; valid: max_shard_bytes, path, "),
    "path for synthetic": (lambda t: storage.prepare_dataset("synthetic", str(t / "out"), path=str(t)),
                           r"unknown parameter 'path' for synthetic"),
    "zero rows per shard": (lambda t: storage.prepare_dataset("synthetic", str(t / "out"), rows_per_shard=0),
                            r"rows_per_shard must be a positive integer, got 0"),
    "bad synthetic value": (lambda t: storage.prepare_dataset("synthetic", str(t / "out"), num_classes=11),
                            r"synthetic num_classes must be in 2\.\.10, got 11; pass a value in that range"),
    "zero ttl": (lambda t: storage.acquire_lock(str(t), "me", ttl_s=0), r"ttl_s must be > 0"),
    "shard path out of the dataset": (lambda t: storage.open_dataset(_tampered_dataset(
        t, **{"shards.train.0.path": "../../elsewhere.parquet"})),
        r"shard path '\.\./\.\./elsewhere\.parquet' of split 'train' points outside the dataset; .* prepare again$"),
    "labels past num_classes": (lambda t: storage.open_dataset(_tampered_dataset(
        t, num_classes=1, class_names=["only"])).load_split("train"),
        r"train-00000\.parquet: labels span 0\.\.\d, outside \[0, 1\) of the manifest's num_classes; delete "),
    "CIFAR pickle that runs code": (lambda t: storage.sources._unpickle(_pickle_calling(t, os.system, "true")),
                                    r"data_batch_1: the pickle calls posix\.system, which no CIFAR batch does .*"
                                    r"download=True\)$"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_one_line_with_fix(tmp_path, case):
    call, pattern = CASES[case]
    with pytest.raises(StorageError) as e:
        call(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "s3cr3t" not in msg
    assert re.search(pattern, msg), msg
    assert not (tmp_path / "out").exists()  # refused before any work


def test_source_params_and_good_inputs_pass(tmp_path):
    assert storage.source_params("synthetic") >= {"n_train", "n_val", "image_size", "rows_per_shard"}
    assert "path" in storage.source_params("imagefolder") and "num_train" not in storage.source_params("synthetic")
    with pytest.raises(StorageError, match="unknown dataset source 'mnist'"):
        storage.source_params("mnist")
    assert storage.require_absolute(str(tmp_path), "--output") == str(tmp_path)
    assert storage.require_absolute("s3://b/k", "--output") == "s3://b/k"
    storage.check_writable(str(tmp_path / "new" / "dir"))  # created, probe written and removed
    assert os.listdir(tmp_path / "new" / "dir") == []
