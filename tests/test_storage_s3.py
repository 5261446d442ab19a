import pyarrow.fs as pafs
import pytest
import torch

import storage
from storage import StorageError
from tests.s3_server import s3_bucket  # noqa: F401  (module fixture: moto S3 server on loopback)


def test_resolve_schemes(tmp_path, monkeypatch):
    fs, p = storage.resolve(str(tmp_path))
    assert isinstance(fs, pafs.LocalFileSystem) and p == str(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, p = storage.resolve("s3://bucket/some/key/")
    assert isinstance(fs, pafs.S3FileSystem) and p == "bucket/some/key"
    opts = fs.__reduce__()[1][0]  # pyarrow pickles the constructor options; no public getter
    assert opts["endpoint_override"] == "127.0.0.1:9" and opts["scheme"] == "http"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example.org")  # the S3-specific variable wins
    assert storage.resolve("s3://b/k")[0].__reduce__()[1][0]["endpoint_override"] == "s3.example.org"
    fs, p = storage.resolve("file:///tmp/x")
    assert isinstance(fs, pafs.LocalFileSystem) and p == "/tmp/x"


def test_dataset_roundtrip_on_s3(s3_bucket, tmp_path):  # noqa: F811
    m = storage.prepare_dataset("synthetic", s3_bucket + "/data", seed=1, n_train=300, n_val=100,
                                rows_per_shard=128)
    assert m.uri.startswith(s3_bucket + "/data/synthetic-")
    local = storage.prepare_dataset("synthetic", str(tmp_path), seed=1, n_train=300, n_val=100, rows_per_shard=128)
    xs, ys = storage.open_dataset(m.uri).load_split("train")
    xl, yl = storage.open_dataset(local.uri).load_split("train")
    assert torch.equal(xs, xl) and torch.equal(ys, yl)
    assert [s["sha256"] for s in m.shards["train"]] == [s["sha256"] for s in local.shards["train"]]
    again = storage.prepare_dataset("synthetic", s3_bucket + "/data", seed=1, n_train=300, n_val=100,
                                    rows_per_shard=128)
    assert again.uri == m.uri and again.shards == m.shards  # reused, not rewritten
    fs, path = storage.resolve(m.uri)
    assert fs.get_file_info(path + "/.lock").type == pafs.FileType.NotFound  # the writer's lease was released
    loader = storage.make_loader(m.uri, "val", batch_size=50, seed=0)
    assert sum(len(b[1]) for b in loader.epoch(0)) == 100


def test_s3_corruption_and_missing(s3_bucket):  # noqa: F811
    m = storage.prepare_dataset("synthetic", s3_bucket + "/corrupt", seed=2, n_train=200, n_val=50)
    fs, base = storage.resolve(m.uri)
    shard = base + "/" + m.shards["val"][0]["path"]
    with fs.open_output_stream(shard) as f:
        f.write(b"truncated")
    with pytest.raises(StorageError, match="checksum mismatch"):
        storage.open_dataset(m.uri).load_split("val")
    with pytest.raises(StorageError, match="does not exist"):
        storage.open_dataset(s3_bucket + "/nothing-here")


def test_results_table_on_s3(s3_bucket):  # noqa: F811
    import pyarrow as pa

    cols = pa.schema({"trial_id": pa.string(), "status": pa.string(), "final_val_acc": pa.float64()})
    eps = pa.schema({"trial_id": pa.string(), "epoch": pa.int64(), "val_acc": pa.float64()})
    rt = storage.ResultsTable(s3_bucket + "/studies/s1", cols, eps, key="trial_id")
    rt.append([{"trial_id": "a", "status": "completed", "final_val_acc": 0.5}])
    rt.append([{"trial_id": "a", "status": "completed", "final_val_acc": 0.7},
               {"trial_id": "b", "status": "stopped"}])
    rt.append_epochs([{"trial_id": "a", "epoch": 0, "val_acc": 0.3}])
    df = storage.ResultsTable(s3_bucket + "/studies/s1", cols, key="trial_id").to_pandas().set_index("trial_id")
    assert df.loc["a", "final_val_acc"] == 0.7 and len(df) == 2
    assert rt.read_epochs().num_rows == 1


def test_check_writable_on_s3(s3_bucket):  # noqa: F811
    storage.check_writable(s3_bucket + "/studies/new")
    fs, path = storage.resolve(s3_bucket + "/studies/new")
    assert not [i for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                if i.base_name.startswith(".write-probe")]  # the probe was removed
    with pytest.raises(StorageError, match=r"cannot write to s3://no-such-bucket/out \(.*\); fix its permissions "
                                           r"or credentials, or pass another location$"):
        storage.check_writable("s3://no-such-bucket/out")
