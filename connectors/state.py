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
    "IncidentRow",
    "MonitorCommit",
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
CREATE TABLE IF NOT EXISTS monitor_state (
    group_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (group_id, key)
);
CREATE TABLE IF NOT EXISTS incidents (
    id TEXT PRIMARY KEY,
    group_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status TEXT NOT NULL,
    opened_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS incidents_status ON incidents (group_id, status, updated_ms);
CREATE TABLE IF NOT EXISTS incident_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    group_id TEXT NOT NULL,
    incident_id TEXT NOT NULL,
    transition TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    body TEXT NOT NULL
);
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


@dataclasses.dataclass(frozen=True)
class IncidentRow:
    """An incident as stored: the body is the JSON the monitor wrote (monitor/incidents.py)."""

    id: str
    fingerprint: str
    status: str
    opened_ms: int
    updated_ms: int
    body: str


@dataclasses.dataclass(frozen=True)
class MonitorCommit:
    """One step of the monitor's analysis, made durable as a whole.

    ``values`` are JSON documents by key (progress pointers, detector states,
    references); ``incidents`` are upserted by id; ``events`` (incident id, transition,
    JSON body) are appended to the incident log that alert delivery reads.
    """

    values: dict[str, str] = dataclasses.field(default_factory=dict)
    incidents: tuple[IncidentRow, ...] = ()
    events: tuple[tuple[str, str, str], ...] = ()


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

    # -- the monitor's durable state -------------------------------------------------

    def segments_of_window(self, topic: str, window_start_ms: int) -> list[SegmentRecord]:
        """Every segment (final or partial, any instance) holding rows of one window."""
        rows = self._db.execute(
            "SELECT path, topic, kind, window_start_ms, rows, final FROM segments "
            "WHERE group_id = ? AND topic = ? AND window_start_ms = ? ORDER BY path",
            (self.group_id, topic, window_start_ms),
        ).fetchall()
        return [SegmentRecord(p, t, k, w, r, bool(f)) for p, t, k, w, r, f in rows]

    def segment_windows(self, topic: str, after_ms: int | None, before_ms: int) -> list[int]:
        """Window starts with segments in ``(after_ms, before_ms)``, ascending."""
        rows = self._db.execute(
            "SELECT DISTINCT window_start_ms FROM segments WHERE group_id = ? AND topic = ? "
            "AND window_start_ms > ? AND window_start_ms < ? ORDER BY window_start_ms",
            (self.group_id, topic, -1 if after_ms is None else after_ms, before_ms),
        ).fetchall()
        return [int(r[0]) for r in rows]

    def monitor_value(self, key: str) -> str | None:
        row = self._db.execute(
            "SELECT value FROM monitor_state WHERE group_id = ? AND key = ?",
            (self.group_id, key),
        ).fetchone()
        return None if row is None else str(row[0])

    def incidents(self, *, status: str | None = None, limit: int = 100) -> list[IncidentRow]:
        """Incidents, newest first (``status``: "firing" or "resolved" to filter)."""
        sql = ("SELECT id, fingerprint, status, opened_ms, updated_ms, body FROM incidents "
               "WHERE group_id = ?")
        args: list[object] = [self.group_id]
        if status is not None:
            sql += " AND status = ?"
            args.append(status)
        sql += " ORDER BY updated_ms DESC, id LIMIT ?"
        args.append(limit)
        return [IncidentRow(*r) for r in self._db.execute(sql, args)]

    def incident_events(self, after_seq: int = 0, limit: int = 1000) -> list[tuple[int, str, str, int, str]]:
        """The incident log in order: (seq, incident id, transition, at_ms, body)."""
        return [tuple(r) for r in self._db.execute(  # type: ignore[misc]
            "SELECT seq, incident_id, transition, at_ms, body FROM incident_events "
            "WHERE group_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (self.group_id, after_seq, limit))]

    def commit_monitor(self, step: MonitorCommit) -> None:
        """Make one analysis step durable atomically: progress, detector state and the
        incidents it changed move together, so a crash repeats the step or not at all."""
        now = int(time.time() * 1000)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT INTO monitor_state VALUES (?, ?, ?, ?) ON CONFLICT (group_id, key) "
                "DO UPDATE SET value = excluded.value, updated_ms = excluded.updated_ms",
                [(self.group_id, k, v, now) for k, v in step.values.items()],
            )
            db.executemany(
                "INSERT INTO incidents VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "status = excluded.status, updated_ms = excluded.updated_ms, body = excluded.body",
                [(i.id, self.group_id, i.fingerprint, i.status, i.opened_ms, i.updated_ms, i.body)
                 for i in step.incidents],
            )
            db.executemany(
                "INSERT INTO incident_events (group_id, incident_id, transition, at_ms, body) "
                "VALUES (?, ?, ?, ?, ?)",
                [(self.group_id, iid, tr, now, body) for iid, tr, body in step.events],
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
