import errno
import os

import pyarrow as pa
import pytest

import storage
from storage import ResultsTable, StorageError

SCHEMA = pa.schema({"trial_id": pa.string(), "cell": pa.string(), "seed": pa.int64(), "status": pa.string(),
                    "diverged_step": pa.int64(), "diverged_reason": pa.string(), "error": pa.string(),
                    "final_val_acc": pa.float64(), "batch_size": pa.int64(), "lr": pa.float64(),
                    "clipping": pa.string()})
EPOCHS = pa.schema({"trial_id": pa.string(), "epoch": pa.int64(), "val_acc": pa.float64(),
                    "train_loss": pa.float64()})


def table(uri) -> ResultsTable:
    return ResultsTable(uri, SCHEMA, EPOCHS, key="trial_id")


def _row(trial, status="completed", **kw):
    return {"trial_id": trial, "cell": "bs256-agc", "seed": 0, "status": status, **kw}


def test_append_dedupes_last_row_per_trial(tmp_path):
    rt = table(str(tmp_path / "study"))
    assert rt.read().num_rows == 0 and rt.read().schema == SCHEMA
    rt.append([_row("t1", final_val_acc=0.4, batch_size=256), _row("t2", status="stopped")])
    rt.append([_row("t1", status="diverged", diverged_step=120, diverged_reason="nan loss", batch_size=256,
                    lr=0.4)])  # resumed study re-reports t1
    rt.append([_row("t3", status="failed", error="OOM", clipping="agc")])
    t = rt.read()
    assert sorted(t.column("trial_id").to_pylist()) == ["t1", "t2", "t3"]
    df = rt.to_pandas().set_index("trial_id")
    assert df.loc["t1", "status"] == "diverged" and df.loc["t1", "diverged_step"] == 120
    assert df.loc["t1", "lr"] == 0.4 and df.loc["t1", "batch_size"] == 256
    assert df.loc["t3", "clipping"] == "agc" and df.loc["t3", "error"] == "OOM"
    assert t.schema.field("final_val_acc").type == pa.float64() and t.schema.field("seed").type == pa.int64()
    assert df["final_val_acc"].isna().all()  # t1's newest row has no accuracy: the old row is gone entirely
    assert len(list((tmp_path / "study" / "results").glob("part-*.parquet"))) == 3


def test_a_folder_written_before_a_column_existed_reads_it_as_nulls(tmp_path):
    old = pa.schema([f for f in SCHEMA if f.name != "clipping"])
    ResultsTable(str(tmp_path), old, EPOCHS, key="trial_id").append([_row("t1", batch_size=64)])
    rt = table(str(tmp_path))  # the newer schema, with `clipping`
    rt.append([_row("t2", clipping="agc")])
    t = rt.read()
    assert t.schema == SCHEMA and sorted(zip(t.column("trial_id").to_pylist(), t.column("clipping").to_pylist())) \
        == [("t1", None), ("t2", "agc")]
    only_old = table(str(tmp_path / "old"))
    ResultsTable(only_old.uri, old, EPOCHS, key="trial_id").append([_row("t1")])
    assert only_old.read().schema == SCHEMA and only_old.read().column("clipping").to_pylist() == [None]


def test_epochs_keyed_by_trial_and_epoch(tmp_path):
    rt = table(str(tmp_path))
    rt.append_epochs([{"trial_id": "t1", "epoch": e, "val_acc": 0.1 * e} for e in range(3)])
    rt.append_epochs([{"trial_id": "t1", "epoch": 2, "val_acc": 0.9, "train_loss": 1},
                      {"trial_id": "t2", "epoch": 0, "val_acc": 0.5}])
    ep = rt.read_epochs().to_pylist()
    assert [(r["trial_id"], r["epoch"]) for r in ep] == [("t1", 0), ("t1", 1), ("t1", 2), ("t2", 0)]
    assert ep[2]["val_acc"] == 0.9 and ep[2]["train_loss"] == 1.0 and ep[0]["train_loss"] is None


def test_bad_rows_rejected_nothing_written(tmp_path):
    rt = table(str(tmp_path))
    with pytest.raises(StorageError, match="unknown column.*'base_lr'"):
        rt.append([_row("t1"), _row("t2", base_lr=0.1)])
    with pytest.raises(StorageError, match="'lr'.*do not fit double"):
        rt.append([_row("t1", lr="fast")])
    with pytest.raises(StorageError, match="needs trial_id"):
        rt.append([{"status": "completed"}])
    with pytest.raises(StorageError, match="needs trial_id and epoch"):
        rt.append_epochs([{"trial_id": "t1", "val_acc": 1.0}])
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").iterdir())


def test_corrupt_part_named(tmp_path):
    rt = table(str(tmp_path))
    rt.append([_row("t1")])
    (tmp_path / "results" / "part-99999999999999999999-deadbeef.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(StorageError, match="part-99999999999999999999-deadbeef.parquet"):
        rt.read()


def test_empty_part_after_power_loss_skipped_with_warning(tmp_path):
    rt = table(str(tmp_path))
    rt.append([_row("t1", final_val_acc=0.5)])
    rt.append_epochs([{"trial_id": "t1", "epoch": 0, "val_acc": 0.5}])
    empty = tmp_path / "results" / "part-99999999999999999999-0badc0de.parquet"
    empty.write_bytes(b"")  # renamed into place, its bytes never reached the disk
    (tmp_path / "epochs" / empty.name).write_bytes(b"")
    with pytest.warns(UserWarning, match=r"part-99999999999999999999-0badc0de\.parquet: empty results part .*"
                                         r"skipped; the trials it held have no row, so --resume reruns them"):
        assert rt.read().column("trial_id").to_pylist() == ["t1"]
    with pytest.warns(UserWarning, match="the epoch rows it held are gone"):
        assert rt.read_epochs().num_rows == 1
    empty.write_bytes(b"\0" * 16)  # not empty but not parquet: still refused, as before
    with pytest.raises(StorageError, match="0badc0de.parquet: unreadable results part"):
        rt.read()


def test_local_atomic_write_fsyncs_file_then_folder(tmp_path, monkeypatch):
    import os
    import stat

    from storage.uri import resolve, write_bytes_atomic

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", "dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    fs, path = resolve(str(tmp_path / "d" / "part-1.parquet"))
    write_bytes_atomic(fs, path, b"payload")
    assert (tmp_path / "d" / "part-1.parquet").read_bytes() == b"payload"
    file_ino, dir_ino = (tmp_path / "d" / "part-1.parquet").stat().st_ino, (tmp_path / "d").stat().st_ino
    # the data is on disk before the new name points at it, and the rename itself is on disk before we return
    assert events == [("fsync", "file", file_ino), ("replace", "part-1.parquet"), ("fsync", "dir", dir_ino)]


class _Full:
    """A file on a disk that fills up half-way through the write: the first half lands, then ENOSPC."""

    def __init__(self, f):
        self.f = f

    def write(self, b):
        self.f.write(b[:len(b) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.f.name)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _refusing(code):
    def fake_open(file, mode="r", *a, **kw):
        if "w" not in mode:
            return open(file, mode, *a, **kw)
        if code == errno.ENOSPC:
            return _Full(open(file, mode, *a, **kw))
        raise OSError(code, os.strerror(code), file)
    return fake_open


@pytest.mark.parametrize("code, why, fix", [
    (errno.ENOSPC, "no space left on the device (ENOSPC)", "free space there"),
    (errno.EROFS, "the file system is read-only (EROFS)", "make it writable (remount it read-write)"),
    (errno.EACCES, "permission denied (EACCES)", "give this user write access to it (or fix the credentials)"),
])
def test_a_refused_write_leaves_no_part_and_says_the_folder_and_the_fix(tmp_path, monkeypatch, code, why, fix):
    import pickle

    rt = table(str(tmp_path / "study"))
    rt.append([_row("t1", final_val_acc=0.5)])
    rt.append_epochs([{"trial_id": "t1", "epoch": 0, "val_acc": 0.5}])
    before = sorted(p.name for p in (tmp_path / "study").rglob("*"))
    monkeypatch.setattr(storage.uri, "open", _refusing(code), raising=False)  # the disk fills up, or turns read-only
    line = f"cannot write {tmp_path}/study/results: {why}; {fix}, then continue the study with --resume (the rows " \
        "written so far are kept)"
    for write in (lambda: rt.append([_row("t2")]), rt.check_writable):  # a trial's row, the driver's probe
        with pytest.raises(storage.StorageUnwritable) as e:
            write()
        assert str(e.value) == line and e.value.errno == code
    with pytest.raises(storage.StorageUnwritable, match=f"cannot write {tmp_path}/study/epochs: "):
        rt.append_epochs([{"trial_id": "t2", "epoch": 0, "val_acc": 0.1}])
    # nothing half-written: no temp file, no probe, no part; what was recorded reads as before
    assert sorted(p.name for p in (tmp_path / "study").rglob("*")) == before
    assert rt.read().column("trial_id").to_pylist() == ["t1"] and rt.read_epochs().num_rows == 1
    back = pickle.loads(pickle.dumps(e.value))  # a trial's error reaches the driver pickled (Ray)
    assert str(back) == str(e.value) and back.errno == code
    monkeypatch.undo()  # space freed: the same table takes rows again
    rt.append([_row("t2")])
    rt.check_writable()
    assert sorted(rt.read().column("trial_id").to_pylist()) == ["t1", "t2"]


def test_an_object_store_access_denied_is_a_refused_write():
    from storage.uri import refused_write

    e = refused_write(OSError("When uploading part for key 'r/part-1': AWS Error ACCESS_DENIED during "
                              "UploadPart operation: Access Denied"), "s3://bucket/study/results")
    assert e.errno == errno.EACCES and str(e) == (
        "cannot write s3://bucket/study/results: access denied (When uploading part for key 'r/part-1': AWS Error "
        "ACCESS_DENIED during UploadPart operation: Access Denied); give this user write access to it (or fix the "
        "credentials)")
    assert refused_write(OSError("AWS Error NETWORK_CONNECTION: connection reset"), "s3://b/r") is None  # retried
