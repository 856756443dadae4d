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

The store's root is a local directory (a `Path`, or a ``file://`` URL, which is the same
thing) or an object-store URL opened through fsspec (``s3://bucket/prefix``, and
``memory://`` in tests; docs/storage-objects.md). An object store has no rename, so there
a segment is written as the object ``<root>/_inprogress/<kind>/hour=.../<name>.inprogress``
(one PUT, or a multipart upload, which becomes visible only when complete) and published
by a server-side copy to its final key followed by deleting the staged object. Either
way a reader sees a segment whole or not at all, the state store's registry stays the
source of truth, and a crash between commit and publish is rolled forward by `recover`:
the registered bytes are already durable in the staged object, wherever the process
restarts.

Spills stay on local disk: they are per-instance scratch written every checkpoint, and
an object PUT per open window per second would cost more than it protects.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

__all__ = ["FEEDBACKS", "PREDICTIONS", "FeedbackStore", "SpillFiles", "conform", "open_feedback_store",
           "unified_schema"]

#: The store's directory of each kind of event: by kind, not by topic, so a reader (the
#: training job) needs no Kafka configuration to find them.
PREDICTIONS = "predictions"
FEEDBACKS = "feedbacks"

INPROGRESS = ".inprogress"
#: Where an object store's unpublished segments wait, beside the kinds' directories: a
#: restart lists only this prefix (in-flight writes, not the whole history), readers'
#: listings never meet an unpublished object, and a lifecycle rule can be scoped to it.
STAGING = "_inprogress"
#: ``scheme:/`` followed by any number of slashes: a URL, also after `Path` has collapsed
#: its ``//`` (monitor/ingest.py hands registered paths back as ``Path(seg.path)``).
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/+(.*)$")
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
        root: the store directory (a `Path` or a path string), or an fsspec URL:
            ``file:///abs/dir`` is the same local directory, anything else
            (``s3://bucket/prefix``, ``memory://name``) is an object store.
        storage_options: passed to fsspec for a URL (an endpoint, a profile). Credentials
            belong in the environment the filesystem reads (``AWS_*`` for s3fs), never in
            the configuration file.

    Paths given back (`segment_path`, `files`) are what the state store registers and
    what `exists`, `open_parquet` and `publish` take: `Path` objects for a local store,
    URL strings for an object store. The methods accept either form, so a caller that
    round-trips a URL through `Path` (which collapses its ``//``) still names the object.

    Example:
        >>> import tempfile
        >>> store = FeedbackStore(Path(tempfile.mkdtemp()))
        >>> p = store.segment_path("predictions", 1_700_000_040_000, "a", 1)
        >>> p.parent.name
        'hour=2023-11-14T22'
    """

    def __init__(self, root: Path | str, *, storage_options: Mapping[str, Any] | None = None) -> None:
        self._fs: Any = None
        url = root if isinstance(root, str) and _URL.match(root) else None
        if url is not None:
            from fsspec.core import url_to_fs
            from fsspec.implementations.local import LocalFileSystem

            # No listing cache: several processes write the store, and a cached listing
            # (s3fs keeps one per instance) would hide their segments from this one.
            opts = {"use_listings_cache": False, **(storage_options or {})}
            fs, path = url_to_fs(url, **opts)
            if isinstance(fs, LocalFileSystem):
                root = path  # fsync and an atomic rename are available: use them
            else:
                self._fs = fs
                self._root = path.rstrip("/")
                self._scheme = url.split(":", 1)[0]
                self.root: Path | str = url
                return
        self._dir = Path(root)
        self._dir.mkdir(parents=True, exist_ok=True)
        self.root = self._dir

    @property
    def location(self) -> str:
        """What another process (the training job) opens the same store with."""
        return str(self.root) if self._fs is not None else str(self._dir.resolve())

    @property
    def is_object_store(self) -> bool:
        return self._fs is not None

    # -- object-store addressing --------------------------------------------------------

    def _key(self, path: Path | str) -> str:
        """The filesystem's own name for a registered path, URL or key."""
        s = os.fspath(path)
        m = _URL.match(s)
        if m:
            s = self._fs._strip_protocol(f"{m[1]}://{m[2]}")
        return s

    def _url(self, key: str) -> str:
        return f"{self._scheme}://{key.lstrip('/')}"

    def _staged(self, key: str) -> str:
        if key.startswith(self._root + "/"):
            return f"{self._root}/{STAGING}/{key[len(self._root) + 1:]}{INPROGRESS}"
        # A path registered under another root (a changed store_url): it can only have
        # been staged beside itself, and `recover` will not look for it there.
        return key + INPROGRESS

    def _ls(self, key: str, kind: str) -> list[str]:
        try:
            entries = self._fs.ls(key, detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/") for e in entries if e.get("type") == kind)

    @property
    def _pafs(self) -> Any:
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return PyFileSystem(FSSpecHandler(self._fs))

    # -- writing ----------------------------------------------------------------------

    def segment_path(self, kind: str, window_start_ms: int, instance: str, seq: int) -> Path | str:
        hour = dt.datetime.fromtimestamp(window_start_ms / 1000, tz=dt.UTC)
        name = f"w{window_start_ms}--{instance}--{seq:012d}.parquet"
        if self._fs is not None:
            return self._url(f"{self._root}/{kind}/hour={hour:%Y-%m-%dT%H}/{name}")
        part = self._dir / kind / f"hour={hour:%Y-%m-%dT%H}"
        return part / name

    def write(self, path: Path | str, schema: pa.Schema, tables: Iterable[pa.Table]) -> int:
        """Write ``tables`` (conformed to ``schema``) under the segment's unpublished
        ``.inprogress`` name, durably: registering it may follow at once.

        Returns the number of rows written. Each input table becomes a row group, so a
        window made of many spills is streamed, never held whole in memory (on an object
        store the upload goes out in parts as the file grows).
        """
        # Dictionary encoding only where values repeat (model names, categorical
        # features): on unique ids it is tried and abandoned at a cost that halved
        # the write speed in bench/ingest. Statistics only on event time, the column
        # readers filter on.
        dictionary = [f.name for f in schema
                      if f.name in _DICTIONARY_COLUMNS
                      or (f.name.startswith("f.") and pa.types.is_string(f.type))]
        if self._fs is not None:
            return self._write_object(self._staged(self._key(path)), schema, tables, dictionary)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + INPROGRESS)
        rows = 0
        with pq.ParquetWriter(tmp, schema, compression="zstd", use_dictionary=dictionary,
                              write_statistics=["ts"]) as writer:
            for table in tables:
                if table.num_rows:
                    writer.write_table(conform(table, schema))
                    rows += table.num_rows
        _fsync_file(tmp)
        return rows

    def _write_object(self, tmp: str, schema: pa.Schema, tables: Iterable[pa.Table],
                      dictionary: list[str]) -> int:
        rows = 0
        try:
            # The object exists once the upload completes (close): a PUT, or the
            # completion of a multipart upload, is atomic, and that is the durability
            # the local store gets from fsync.
            with self._fs.open(tmp, "wb") as fh, pq.ParquetWriter(
                    fh, schema, compression="zstd", use_dictionary=dictionary,
                    write_statistics=["ts"]) as writer:
                for table in tables:
                    if table.num_rows:
                        writer.write_table(conform(table, schema))
                        rows += table.num_rows
        except BaseException:
            # Closing the file on the way out may have uploaded a truncated object; it
            # is unregistered either way, and `recover` deletes whatever this leaves.
            with contextlib.suppress(Exception):
                self._fs.rm_file(tmp)
            raise
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

    def publish(self, path: Path | str) -> None:
        """Move a registered segment into place (idempotent).

        On an object store: a server-side copy of the ``.inprogress`` object to the final
        key, then its deletion. The copy is atomic (a reader never sees part of it), and
        a crash between the two only means the next `recover` copies the same bytes again.
        """
        if self._fs is not None:
            key = self._key(path)
            staged = self._staged(key)
            try:
                self._fs.cp_file(staged, key)
            except FileNotFoundError:
                return  # published already
            with contextlib.suppress(FileNotFoundError):
                self._fs.rm_file(staged)
            return
        path = Path(path)
        tmp = path.with_name(path.name + INPROGRESS)
        if tmp.exists():
            os.replace(tmp, path)
            _fsync_dir(path.parent)

    def discard(self, path: Path | str) -> None:
        if self._fs is not None:
            with contextlib.suppress(FileNotFoundError):
                self._fs.rm_file(self._staged(self._key(path)))
            return
        path = Path(path)
        path.with_name(path.name + INPROGRESS).unlink(missing_ok=True)

    def recover(self, registered: set[str], instance: str) -> tuple[int, int]:
        """Finish what a crash of ``instance`` interrupted: publish its registered
        segments, delete its unregistered ones.

        Only this instance's unregistered files are deleted: another process sharing
        the store may be between writing a file and registering it. On an object store
        the registered staged segments of every instance are published: publishing what
        the registry vouches for is safe from any process (the copy is idempotent), and
        it is how the segments committed by a replica that never comes back reach the
        readers.

        Returns (published, deleted).
        """
        published = deleted = 0
        if self._fs is not None:
            keys = {self._key(p) for p in registered}
            marker = f"--{instance}--"
            staging = f"{self._root}/{STAGING}/"
            for tmp in sorted(self._fs.find(staging)):
                name = tmp.rsplit("/", 1)[-1]
                if not (name.endswith(INPROGRESS) and tmp.startswith(staging)):
                    continue
                final = f"{self._root}/{tmp[len(staging):-len(INPROGRESS)]}"
                if final in keys:
                    self.publish(final)
                    published += 1
                elif marker in name:
                    with contextlib.suppress(FileNotFoundError):
                        self._fs.rm_file(tmp)
                    deleted += 1
            return published, deleted
        for tmp in self._dir.rglob(f"*--{instance}--*" + INPROGRESS):
            final = tmp.with_name(tmp.name[: -len(INPROGRESS)])
            if str(final) in registered:
                self.publish(final)
                published += 1
            else:
                tmp.unlink(missing_ok=True)
                deleted += 1
        return published, deleted

    # -- reading ----------------------------------------------------------------------

    def exists(self, path: Path | str) -> bool:
        """Whether a registered segment is published (readable under its final name)."""
        if self._fs is not None:
            return bool(self._fs.isfile(self._key(path)))
        return Path(path).exists()

    def open_parquet(self, path: Path | str) -> pq.ParquetFile:
        """A registered segment for reading row group by row group, on either backend.

        Use it as a context manager (``with store.open_parquet(p) as f``): on an object
        store it holds an open HTTP-backed file until closed.
        """
        if self._fs is not None:
            return pq.ParquetFile(self._key(path), filesystem=self._pafs)
        return pq.ParquetFile(path)

    def _read_table(self, path: Path | str, **kwargs: Any) -> pa.Table:
        if self._fs is not None:
            return pq.read_table(self._key(path), filesystem=self._pafs, **kwargs)
        return pq.read_table(path, **kwargs)

    def files(self, kind: str) -> list[Path] | list[str]:
        if self._fs is not None:
            base = f"{self._root}/{kind}"
            return [self._url(k) for k in sorted(self._fs.find(base)) if k.endswith(".parquet")]
        return sorted((self._dir / kind).rglob("*.parquet"))

    def files_between(self, kind: str, start_ms: int, end_ms: int) -> list[Path] | list[str]:
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

        def wanted(name: str) -> bool:
            try:
                w = int(name.split("--", 1)[0][1:])
            except ValueError:
                return False  # not a segment of ours
            return start_ms - hour <= w < end_ms

        if self._fs is not None:
            found: list[str] = []
            for part in self._ls(f"{self._root}/{kind}", "directory"):
                if lo <= part.rsplit("/", 1)[-1] <= hi:
                    found.extend(self._url(k) for k in self._ls(part, "file")
                                 if k.endswith(".parquet") and wanted(k.rsplit("/", 1)[-1]))
            return found
        base = self._dir / kind
        if not base.is_dir():
            return []
        out = []
        for part in sorted(p for p in base.iterdir() if p.is_dir() and lo <= p.name <= hi):
            for f in sorted(part.glob("*.parquet")):
                if wanted(f.name):
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
            t = self._read_table(f, columns=columns, filters=[("ts", ">=", lo), ("ts", "<", hi)])
            if t.num_rows:
                tables.append(t)
        if not tables:
            return pa.table({})
        schema = unified_schema(t.schema for t in tables)
        return pa.concat_tables([conform(t, schema) for t in tables])

    def read(self, kind: str, columns: list[str] | None = None) -> pa.Table:
        """All published rows of one kind, with feature columns unified across files."""
        tables = [self._read_table(f, columns=columns) for f in self.files(kind)]
        if not tables:
            return pa.table({})
        schema = unified_schema(t.schema for t in tables)
        return pa.concat_tables([conform(t, schema) for t in tables])


class _StorageLocation(Protocol):
    """What `open_feedback_store` needs of monitor.config.StorageConfig (connectors do
    not import monitor)."""

    @property
    def store_url(self) -> str | None: ...

    @property
    def store_path(self) -> Path: ...


def open_feedback_store(storage: _StorageLocation, *,
                        storage_options: Mapping[str, Any] | None = None) -> FeedbackStore:
    """The configured feedback store: ``storage.store_url`` when set, else the directory
    ``storage.store_path``."""
    if storage.store_url:
        return FeedbackStore(storage.store_url, storage_options=storage_options)
    return FeedbackStore(storage.store_path)


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
