import pyarrow as pa
import pytest

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
