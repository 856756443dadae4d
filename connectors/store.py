"""The feedback store (Parquet, partitioned by hour) and the spill files of open windows.

Layout::

    <root>/<kind>/hour=YYYY-MM-DDTHH/w<window_start>--<instance>--<seq>.parquet

A segment is written as ``<name>.inprogress``, fsynced, recorded in the state store by
the checkpoint transaction, and only then renamed into place. Readers list
``*.parquet`` only, so they never see a file the state store does not vouch for; on
start-up `recover` rolls registered ``.inprogress`` files forward and deletes the rest
(what a crash between write and commit leaves behind).

Spills hold the rows of windows that are still open at a checkpoint, in Arrow IPC
(uncompressed: they are written every few seconds and read once, when the window
closes). They keep the daemon's memory flat however long a window is: between
checkpoints only the new rows are in memory.

The store is local files here; an object-store URL through fsspec is the production
path (issue #8).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

__all__ = ["FEEDBACKS", "PREDICTIONS", "FeedbackStore", "SpillFiles", "conform", "unified_schema"]

#: The store's directory of each kind of event: by kind, not by topic, so a reader (the
#: training job) needs no Kafka configuration to find them.
PREDICTIONS = "predictions"
FEEDBACKS = "feedbacks"

INPROGRESS = ".inprogress"
_DICTIONARY_COLUMNS = frozenset({"model", "model_version", "type"})


def unified_schema(schemas: Iterable[pa.Schema]) -> pa.Schema:
    """One schema for batches whose feature columns differ.

    The contract columns always agree. A feature seen as a number in one batch and as
    a string in another becomes a string column: converting numbers to text loses
    nothing, the other way round would.
    """
    fields: dict[str, pa.DataType] = {}
    order: list[str] = []
    for schema in schemas:
        for f in schema:
            seen = fields.get(f.name)
            if seen is None:
                fields[f.name] = f.type
                order.append(f.name)
            elif seen != f.type:
                if pa.types.is_null(seen):
                    fields[f.name] = f.type
                elif not pa.types.is_null(f.type):
                    fields[f.name] = pa.string()
    return pa.schema([pa.field(n, fields[n]) for n in order])


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast ``table`` to ``schema``, adding absent columns as nulls."""
    if table.schema == schema:
        return table
    columns = []
    for field in schema:
        if field.name in table.column_names:
            col = table.column(field.name)
            columns.append(col if col.type == field.type else col.cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


class FeedbackStore:
    """Hourly-partitioned Parquet segments of validated events, written atomically.

    Args:
        root: the store directory.

    Example:
        >>> import tempfile
        >>> store = FeedbackStore(Path(tempfile.mkdtemp()))
        >>> p = store.segment_path("predictions", 1_700_000_040_000, "a", 1)
        >>> p.parent.name
        'hour=2023-11-14T22'
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def segment_path(self, kind: str, window_start_ms: int, instance: str, seq: int) -> Path:
        hour = dt.datetime.fromtimestamp(window_start_ms / 1000, tz=dt.UTC)
        part = self.root / kind / f"hour={hour:%Y-%m-%dT%H}"
        return part / f"w{window_start_ms}--{instance}--{seq:012d}.parquet"

    def write(self, path: Path, schema: pa.Schema, tables: Iterable[pa.Table]) -> int:
        """Write ``tables`` (conformed to ``schema``) to ``path + .inprogress``, fsynced.

        Returns the number of rows written. Each input table becomes a row group, so a
        window made of many spills is streamed, never held whole in memory.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + INPROGRESS)
        rows = 0
        # Dictionary encoding only where values repeat (model names, categorical
        # features): on unique ids it is tried and abandoned at a cost that halved
        # the write speed in bench/ingest. Statistics only on event time, the column
        # readers filter on.
        dictionary = [f.name for f in schema
                      if f.name in _DICTIONARY_COLUMNS
                      or (f.name.startswith("f.") and pa.types.is_string(f.type))]
        with pq.ParquetWriter(tmp, schema, compression="zstd", use_dictionary=dictionary,
                              write_statistics=["ts"]) as writer:
            for table in tables:
                if table.num_rows:
                    writer.write_table(conform(table, schema))
                    rows += table.num_rows
        _fsync_file(tmp)
        return rows

    def write_windows(self, kind: str, table: pa.Table, *, instance: str, window_ms: int) -> int:
        """Write a table of events as published segments, one per window of ``window_ms``.

        For data that did not come through the daemon (a training job's bootstrap data,
        simulations): the layout is the daemon's, without the state store's registry.
        Returns the number of segments written.
        """
        ts = table.column("ts").cast(pa.int64()).to_numpy()
        windows = ts - ts % window_ms
        starts = sorted({int(w) for w in windows.tolist()})
        for seq, w in enumerate(starts):
            path = self.segment_path(kind, w, instance, seq)
            self.write(path, table.schema, [table.filter(pa.array(windows == w))])
            self.publish(path)
        return len(starts)

    def publish(self, path: Path) -> None:
        """Rename a registered segment into place (idempotent)."""
        tmp = path.with_name(path.name + INPROGRESS)
        if tmp.exists():
            os.replace(tmp, path)
            _fsync_dir(path.parent)

    def discard(self, path: Path) -> None:
        path.with_name(path.name + INPROGRESS).unlink(missing_ok=True)

    def recover(self, registered: set[str], instance: str) -> tuple[int, int]:
        """Finish what a crash of ``instance`` interrupted: publish its registered
        segments, delete its unregistered ones.

        Only this instance's files are touched: another process sharing the store may
        be between writing a file and registering it.

        Returns (published, deleted).
        """
        published = deleted = 0
        for tmp in self.root.rglob(f"*--{instance}--*" + INPROGRESS):
            final = tmp.with_name(tmp.name[: -len(INPROGRESS)])
            if str(final) in registered:
                self.publish(final)
                published += 1
            else:
                tmp.unlink(missing_ok=True)
                deleted += 1
        return published, deleted

    def files(self, kind: str) -> list[Path]:
        return sorted((self.root / kind).rglob("*.parquet"))

    def files_between(self, kind: str, start_ms: int, end_ms: int) -> list[Path]:
        """Published segments of ``kind`` whose window may hold events in ``[start, end)``.

        A segment's name carries its window start, and windows divide an hour
        (``windows.size_seconds``), so a segment starting an hour before ``start`` is
        the earliest that can matter. The hour partitions prune the listing itself: a
        job reading one day of a year-old store lists one day.
        """
        hour = 3_600_000
        first = dt.datetime.fromtimestamp((start_ms - hour) / 1000, tz=dt.UTC)
        last = dt.datetime.fromtimestamp(end_ms / 1000, tz=dt.UTC)
        lo, hi = f"hour={first:%Y-%m-%dT%H}", f"hour={last:%Y-%m-%dT%H}"
        base = self.root / kind
        if not base.is_dir():
            return []
        out = []
        for part in sorted(p for p in base.iterdir() if p.is_dir() and lo <= p.name <= hi):
            for f in sorted(part.glob("*.parquet")):
                try:
                    w = int(f.name.split("--", 1)[0][1:])
                except ValueError:
                    continue  # not a segment of ours
                if start_ms - hour <= w < end_ms:
                    out.append(f)
        return out

    def read_window(self, kind: str, start_ms: int, end_ms: int,
                    columns: list[str] | None = None) -> pa.Table:
        """Published rows of ``kind`` with event time in ``[start_ms, end_ms)``.

        What a training job reads (retrain/job.py). Row groups are skipped by their
        ``ts`` statistics; feature columns are unified across files (a feature that is
        a number in one file and text in another becomes text).
        """
        lo = pa.scalar(start_ms, pa.timestamp("ms", tz="UTC"))
        hi = pa.scalar(end_ms, pa.timestamp("ms", tz="UTC"))
        tables = []
        for f in self.files_between(kind, start_ms, end_ms):
            t = pq.read_table(f, columns=columns, filters=[("ts", ">=", lo), ("ts", "<", hi)])
            if t.num_rows:
                tables.append(t)
        if not tables:
            return pa.table({})
        schema = unified_schema(t.schema for t in tables)
        return pa.concat_tables([conform(t, schema) for t in tables])

    def read(self, kind: str, columns: list[str] | None = None) -> pa.Table:
        """All published rows of one kind, with feature columns unified across files."""
        tables = [pq.read_table(f, columns=columns) for f in self.files(kind)]
        if not tables:
            return pa.table({})
        schema = unified_schema(t.schema for t in tables)
        return pa.concat_tables([conform(t, schema) for t in tables])


class SpillFiles:
    """Arrow IPC files holding the rows of still-open windows between checkpoints."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, topic: str, window_start_ms: int, instance: str, seq: int) -> Path:
        return self.root / f"{topic}--w{window_start_ms}--{instance}--{seq:012d}.arrow"

    def write(self, path: Path, table: pa.Table) -> None:
        with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        _fsync_file(path)

    def read(self, path: Path) -> pa.Table:
        with pa.memory_map(str(path)) as source:
            return ipc.open_file(source).read_all()

    def iter_read(self, paths: Iterable[Path]) -> Iterator[pa.Table]:
        for p in paths:
            yield self.read(p)

    def schema(self, path: Path) -> pa.Schema:
        with pa.memory_map(str(path)) as source:
            return ipc.open_file(source).schema

    def remove_unregistered(self, registered: set[str], instance: str) -> int:
        """Delete ``instance``'s spill files that no checkpoint recorded (written just
        before a crash). Other instances' files are left alone, for the same reason as
        in `FeedbackStore.recover`."""
        removed = 0
        for f in self.root.glob(f"*--{instance}--*.arrow"):
            if str(f) not in registered:
                f.unlink(missing_ok=True)
                removed += 1
        return removed

    def remove(self, paths: Iterable[str]) -> None:
        for p in paths:
            Path(p).unlink(missing_ok=True)
