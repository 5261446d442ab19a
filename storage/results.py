"""Study results as a directory of Parquet part-files: append = one new part (atomic), read = concat all parts
and keep the LAST row per key (per (key, epoch) for epochs), so resumed studies never duplicate.

A write the storage refuses (no space, read-only, permission lost) leaves no part, not even a partial one, and
raises StorageUnwritable naming the folder and the fix: the rows written before are kept, and --resume reruns the
trials without a row once the fix is in."""

import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from storage.lock import Fence, check_fence
from storage.uri import (
    StorageError,
    StorageUnwritable,
    join,
    probe_write,
    read_bytes,
    refused_write,
    resolve,
    write_bytes_atomic,
)

RESUME = "continue the study with --resume (the rows written so far are kept)"


def _column(name: str, values: list, typ: pa.DataType) -> pa.Array:
    try:
        return pa.array(values, typ)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
        raise StorageError(f"results column {name!r}: values {values[:3]}... do not fit {typ} ({e});"
                           " pass one type per column") from e


def _table(rows: list[dict], schema: pa.Schema, keys: list[str], what: str) -> pa.Table:
    names = set(schema.names)
    for i, r in enumerate(rows):
        unknown = set(r) - names
        if unknown:
            raise StorageError(f"{what} row {i}: unknown column(s) {sorted(unknown)}; the table's columns are "
                               f"{schema.names}")
        if any(r.get(k) is None for k in keys):
            raise StorageError(f"{what} row {i} needs {' and '.join(keys)}; got keys {sorted(r)}")
    return pa.table({f.name: _column(f.name, [r.get(f.name) for r in rows], f.type) for f in schema}, schema=schema)


def _keep_last(table: pa.Table, keys: list[str]) -> pa.Table:
    table = table.append_column("__row", pa.array(range(table.num_rows), pa.int64()))
    last = table.group_by(keys, use_threads=False).aggregate([("__row", "max")])
    keep = pc.sort_indices(last.column("__row_max"))
    rows = pc.take(last.column("__row_max"), keep)
    return table.take(rows).drop_columns(["__row"])


class ResultsTable:
    """<uri>/results/part-*.parquet (one row per `key`) and <uri>/epochs/part-*.parquet (one per key and epoch),
    with the schemas the caller owns."""

    def __init__(self, uri: str, schema: pa.Schema, epochs_schema: pa.Schema | None = None, key: str = "trial_key",
                 fence: Fence | None = None):
        """fence: the lock this table is written under (storage.lock.Lock.fence()); every write checks it first
        and is refused (LeaseLost) once another holder may have the location, and carries its generation."""
        self.uri, self.schema, self.epochs_schema, self.key, self.fence = uri, schema, epochs_schema, key, fence
        self.fs, self.path = resolve(uri)

    def _write(self, sub: str, table: pa.Table) -> str:
        if self.fence is not None:
            check_fence(self.fence)
            table = table.replace_schema_metadata({b"nfnet.lease_generation": str(self.fence.generation).encode()})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        # time-ordered names: reading sorts by name, so 'last row wins' follows append order
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        path = join(self.path, sub, name)
        try:
            write_bytes_atomic(self.fs, path, sink.getvalue().to_pybytes())
        except StorageUnwritable as e:  # the folder, not the part's name (never written): that is what to fix
            raise (refused_write(e.__cause__, join(self.uri, sub)) or e).then(RESUME) from e.__cause__
        return path

    def check_writable(self) -> None:
        """Raise StorageUnwritable (naming the results folder and the fix) when a row written now would be refused:
        a probe write of a part's size, deleted again. For a driver that cannot see its trials' writes fail."""
        try:
            probe_write(join(self.uri, "results"))
        except StorageUnwritable as e:
            raise e.then(RESUME) from None

    def _read(self, sub: str, keys: list[str]) -> pa.Table | None:
        d = join(self.path, sub)
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(d, allow_not_found=True))
        except OSError as e:
            raise StorageError(f"cannot list {self.uri}/{sub} ({e}); check the URI and credentials") from e
        parts = sorted(i.path for i in infos if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))
        tables = []
        for p in parts:
            blob = read_bytes(self.fs, p)
            if not blob:  # renamed into place before its bytes reached the disk (a power loss): it holds no rows
                import warnings  # only this rare path needs it

                lost = "the trials it held have no row, so --resume reruns them" if sub == "results" else \
                    "the epoch rows it held are gone (their trials keep their results rows)"
                warnings.warn(f"{p}: empty results part (cut off by a crash or power loss), skipped; {lost}",
                              stacklevel=3)
                continue
            try:
                tables.append(pq.read_table(pa.BufferReader(blob)))
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
            self._write("results", _table(rows, self.schema, [self.key], "results"))

    def read(self) -> pa.Table:
        """Every row (the last per key), in the schema's columns; a column no part has (the folder was written
        before the column existed) reads as nulls, so an older study stays readable and resumable."""
        t = self._read("results", [self.key])
        if t is None:
            return self.schema.empty_table()
        for f in self.schema:
            if f.name not in t.column_names:
                t = t.append_column(f, pa.nulls(t.num_rows, f.type))
        return t.select(self.schema.names)

    def to_pandas(self):
        return self.read().to_pandas()

    def append_epochs(self, rows: list[dict]) -> None:
        if rows:
            self._write("epochs", _table(rows, self._epochs_schema(), [self.key, "epoch"], "epochs"))

    def read_epochs(self) -> pa.Table:
        t = self._read("epochs", [self.key, "epoch"])
        if t is None:
            return self._epochs_schema().empty_table()
        return t.sort_by([(self.key, "ascending"), ("epoch", "ascending")])

    def _epochs_schema(self) -> pa.Schema:
        if self.epochs_schema is None:
            raise StorageError(f"{self.uri}: this results table was opened without an epochs schema")
        return self.epochs_schema
