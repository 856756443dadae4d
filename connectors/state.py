"""The state store: where ingestion progress becomes durable (SQLite by default).

Kafka's committed offsets are not the source of truth: they cannot be written in the
same transaction as the data they cover. The ``positions`` table is. One checkpoint is
one transaction that records, together, the next offset of every partition it covers,
the spill files that hold still-open windows, and the feedback-store segments that
finished windows were written to. Kafka offsets are committed afterwards as a courtesy
(for lag tooling and for a first start without state).

Two processes may share the store (one consumer group, one machine; PostgreSQL takes
this role across machines, see docs/delivery.md). Positions are advanced by
compare-and-set: a checkpoint names the offset it started from, and if another process
moved that partition in the meantime, the whole checkpoint is refused with
`PositionConflict` and its files are discarded. That is what keeps a zombie consumer,
one that has lost its partitions without noticing, from writing a duplicate.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "PositionConflict",
    "PositionUpdate",
    "SegmentRecord",
    "SpillRecord",
    "StateStore",
    "StoredPosition",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS positions (
    group_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    max_ts_ms INTEGER,
    owner TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (group_id, topic, partition)
);
CREATE TABLE IF NOT EXISTS topic_clocks (
    group_id TEXT NOT NULL,
    instance TEXT NOT NULL,
    topic TEXT NOT NULL,
    closed_upto_ms INTEGER NOT NULL,
    PRIMARY KEY (group_id, instance, topic)
);
CREATE TABLE IF NOT EXISTS spills (
    path TEXT PRIMARY KEY,
    group_id TEXT NOT NULL,
    instance TEXT NOT NULL,
    topic TEXT NOT NULL,
    window_start_ms INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS segments (
    path TEXT PRIMARY KEY,
    group_id TEXT NOT NULL,
    instance TEXT NOT NULL,
    topic TEXT NOT NULL,
    kind TEXT NOT NULL,
    window_start_ms INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    final INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS segments_window ON segments (topic, window_start_ms);
"""


class PositionConflict(RuntimeError):
    """Another process advanced a partition this checkpoint meant to advance."""


@dataclasses.dataclass(frozen=True)
class StoredPosition:
    next_offset: int
    max_ts_ms: int | None
    owner: str


@dataclasses.dataclass(frozen=True)
class PositionUpdate:
    """Advance ``topic``/``partition`` from ``expected`` (None: no row yet) to ``next_offset``."""

    topic: str
    partition: int
    expected: int | None
    next_offset: int
    max_ts_ms: int | None


@dataclasses.dataclass(frozen=True)
class SpillRecord:
    path: str
    topic: str
    window_start_ms: int
    rows: int


@dataclasses.dataclass(frozen=True)
class SegmentRecord:
    path: str
    topic: str
    kind: str
    window_start_ms: int
    rows: int
    final: bool


class StateStore:
    """SQLite-backed checkpoint store.

    Args:
        path: the database file; created with its tables when missing.
        group_id: the Kafka consumer group whose progress this is.
        instance: this process's stable name (spills are owned per instance, so a
            restarted process finds its own).

    Example:
        >>> import tempfile, pathlib
        >>> db = pathlib.Path(tempfile.mkdtemp()) / "state.db"
        >>> s = StateStore(db, group_id="g", instance="a")
        >>> s.checkpoint([PositionUpdate("t", 0, None, 10, 5)])
        >>> s.positions("t")[0].next_offset
        10
    """

    def __init__(self, path: Path, *, group_id: str, instance: str) -> None:
        self.path = Path(path)
        self.group_id = group_id
        self.instance = instance
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so the write lock
        # is taken up front and two processes never deadlock upgrading read locks.
        self._db = sqlite3.connect(
            self.path, isolation_level=None, timeout=30.0, check_same_thread=False
        )
        # FULL: a checkpoint that returned is on disk even across a power loss; the
        # files it names are renamed into place only after it returns.
        self._db.execute("PRAGMA synchronous=FULL")
        # Switching a new database to WAL takes an exclusive lock that does not wait
        # on the busy timeout: two processes starting together on a fresh file see
        # "database is locked" (seen in the two-daemon test), so retry for a while.
        deadline = time.monotonic() + 30.0
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.executescript(_SCHEMA)
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self._db.close()

    # -- reads -------------------------------------------------------------------

    def positions(self, topic: str) -> dict[int, StoredPosition]:
        rows = self._db.execute(
            "SELECT partition, next_offset, max_ts_ms, owner FROM positions "
            "WHERE group_id = ? AND topic = ?",
            (self.group_id, topic),
        ).fetchall()
        return {p: StoredPosition(o, ts, owner) for p, o, ts, owner in rows}

    def closed_upto(self, topic: str) -> int | None:
        row = self._db.execute(
            "SELECT closed_upto_ms FROM topic_clocks WHERE group_id=? AND instance=? AND topic=?",
            (self.group_id, self.instance, topic),
        ).fetchone()
        return None if row is None else int(row[0])

    def spills(self) -> list[SpillRecord]:
        rows = self._db.execute(
            "SELECT path, topic, window_start_ms, rows FROM spills "
            "WHERE group_id = ? AND instance = ? ORDER BY created_ms, path",
            (self.group_id, self.instance),
        ).fetchall()
        return [SpillRecord(*r) for r in rows]

    def all_spill_paths(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT path FROM spills")}

    def segment_paths(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT path FROM segments")}

    def segments(self, topic: str | None = None) -> list[SegmentRecord]:
        sql = "SELECT path, topic, kind, window_start_ms, rows, final FROM segments"
        args: tuple[str, ...] = ()
        if topic is not None:
            sql += " WHERE topic = ?"
            args = (topic,)
        return [
            SegmentRecord(p, t, k, w, r, bool(f))
            for p, t, k, w, r, f in self._db.execute(sql + " ORDER BY created_ms, path", args)
        ]

    # -- the checkpoint ------------------------------------------------------------

    def checkpoint(
        self,
        positions: Sequence[PositionUpdate],
        *,
        new_spills: Iterable[SpillRecord] = (),
        dropped_spills: Iterable[str] = (),
        new_segments: Iterable[SegmentRecord] = (),
        closed_upto: dict[str, int] | None = None,
    ) -> None:
        """Make one checkpoint durable, atomically, or raise and change nothing.

        Raises:
            PositionConflict: a partition's stored offset is not the ``expected`` one.
        """
        now = int(time.time() * 1000)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for u in positions:
                if u.expected is None:
                    cur = db.execute(
                        "INSERT OR IGNORE INTO positions VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (self.group_id, u.topic, u.partition, u.next_offset, u.max_ts_ms,
                         self.instance, now),
                    )
                else:
                    cur = db.execute(
                        "UPDATE positions SET next_offset=?, max_ts_ms=?, owner=?, updated_ms=? "
                        "WHERE group_id=? AND topic=? AND partition=? AND next_offset=?",
                        (u.next_offset, u.max_ts_ms, self.instance, now, self.group_id,
                         u.topic, u.partition, u.expected),
                    )
                if cur.rowcount != 1:
                    msg = (
                        f"partition {u.topic}[{u.partition}] is no longer at offset "
                        f"{u.expected}: another consumer advanced it"
                    )
                    raise PositionConflict(msg)
            db.executemany(
                "INSERT INTO spills VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(s.path, self.group_id, self.instance, s.topic, s.window_start_ms, s.rows, now)
                 for s in new_spills],
            )
            db.executemany("DELETE FROM spills WHERE path = ?", [(p,) for p in dropped_spills])
            db.executemany(
                "INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(s.path, self.group_id, self.instance, s.topic, s.kind, s.window_start_ms,
                  s.rows, int(s.final), now) for s in new_segments],
            )
            for topic, upto in (closed_upto or {}).items():
                db.execute(
                    "INSERT INTO topic_clocks VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (group_id, instance, topic) DO UPDATE SET "
                    "closed_upto_ms = max(closed_upto_ms, excluded.closed_upto_ms)",
                    (self.group_id, self.instance, topic, upto),
                )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
