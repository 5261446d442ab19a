"""Study results as a directory of Parquet part-files: append = one new part (atomic), read = concat all parts
and keep the LAST row per trial_id (per (trial_id, epoch) for epochs), so resumed studies never duplicate."""

import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from storage.uri import StorageError, join, read_bytes, resolve, write_bytes_atomic

STATUSES = ("completed", "diverged", "failed", "stopped")
PREFIXES = ("sci_", "nui_", "metric_")
COLUMNS = {
    "study": pa.string(), "trial_id": pa.string(), "cell": pa.string(), "seed": pa.int64(),
    "status": pa.string(), "diverged_step": pa.int64(), "diverged_reason": pa.string(), "error": pa.string(),
    "final_val_acc": pa.float64(), "best_val_acc": pa.float64(), "final_train_loss": pa.float64(),
    "best_val_loss": pa.float64(), "steps": pa.int64(), "images_per_sec": pa.float64(),
    "wall_time_s": pa.float64(), "hardware": pa.string(), "git_commit": pa.string(), "mlflow_run_id": pa.string(),
}
EPOCH_KEYS = {"trial_id": pa.string(), "epoch": pa.int64(), "study": pa.string(), "cell": pa.string()}


def _column(name: str, values: list, typ: pa.DataType | None) -> pa.Array:
    try:
        return pa.array(values, typ)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as e:
        raise StorageError(f"results column {name!r}: values {values[:3]}... do not fit {typ or 'one type'} ({e});"
                           " pass one type per column") from e


def _results_table(rows: list[dict]) -> pa.Table:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    for k in keys:
        if k not in COLUMNS and not k.startswith(PREFIXES):
            raise StorageError(f"unknown results column {k!r}; use one of {sorted(COLUMNS)} or a key starting "
                               f"with {PREFIXES}")
    for i, r in enumerate(rows):
        if not r.get("trial_id"):
            raise StorageError(f"results row {i} has no trial_id; every row needs one")
        if r.get("status") not in STATUSES:
            raise StorageError(f"results row {i} (trial {r['trial_id']}): status {r.get('status')!r} must be one "
                               f"of {STATUSES}")
    cols = {}
    for k in [*COLUMNS, *[k for k in keys if k not in COLUMNS]]:
        typ = COLUMNS.get(k) or (pa.float64() if k.startswith("metric_") else None)
        cols[k] = _column(k, [r.get(k) for r in rows], typ)
    return pa.table(cols)


def _epochs_table(rows: list[dict]) -> pa.Table:
    for i, r in enumerate(rows):
        if r.get("trial_id") is None or r.get("epoch") is None:
            raise StorageError(f"epoch row {i} needs trial_id and epoch; got keys {sorted(r)}")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return pa.table({k: _column(k, [r.get(k) for r in rows], EPOCH_KEYS.get(k, pa.float64())) for k in keys})


def _keep_last(table: pa.Table, keys: list[str]) -> pa.Table:
    table = table.append_column("__row", pa.array(range(table.num_rows), pa.int64()))
    last = table.group_by(keys, use_threads=False).aggregate([("__row", "max")])
    keep = pc.sort_indices(last.column("__row_max"))
    rows = pc.take(last.column("__row_max"), keep)
    return table.take(rows).drop_columns(["__row"])


class ResultsTable:
    """ResultsTable(uri): <uri>/results/part-*.parquet and <uri>/epochs/part-*.parquet."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.path = resolve(uri)

    def _write(self, sub: str, table: pa.Table) -> str:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        # time-ordered names: reading sorts by name, so 'last row wins' follows append order
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        path = join(self.path, sub, name)
        write_bytes_atomic(self.fs, path, sink.getvalue().to_pybytes())
        return path

    def _read(self, sub: str, keys: list[str]) -> pa.Table | None:
        d = join(self.path, sub)
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(d, allow_not_found=True))
        except OSError as e:
            raise StorageError(f"cannot list {self.uri}/{sub} ({e}); check the URI and credentials") from e
        parts = sorted(i.path for i in infos if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))
        tables = []
        for p in parts:
            try:
                tables.append(pq.read_table(pa.BufferReader(read_bytes(self.fs, p))))
            except (pa.ArrowInvalid, OSError) as e:
                raise StorageError(f"{p}: unreadable results part ({e}); move it aside and re-run the trials "
                                   "it held") from e
        if not tables:
            return None
        try:
            table = pa.concat_tables(tables, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise StorageError(f"{self.uri}/{sub}: part files have incompatible column types ({e}); keep one type "
                               "per column") from e
        return _keep_last(table, keys)

    def append(self, rows: list[dict]) -> None:
        if rows:
            self._write("results", _results_table(rows))

    def read(self) -> pa.Table:
        t = self._read("results", ["trial_id"])
        return t if t is not None else pa.schema(COLUMNS).empty_table()

    def to_pandas(self):
        return self.read().to_pandas()

    def append_epochs(self, rows: list[dict]) -> None:
        if rows:
            self._write("epochs", _epochs_table(rows))

    def read_epochs(self) -> pa.Table:
        t = self._read("epochs", ["trial_id", "epoch"])
        if t is None:
            return pa.schema({"trial_id": pa.string(), "epoch": pa.int64()}).empty_table()
        return t.sort_by([("trial_id", "ascending"), ("epoch", "ascending")])


EpochsTable = ResultsTable  # one object owns both tables; the alias is the name the spec uses
