"""The state store: where ingestion progress becomes durable (SQLite, or PostgreSQL).

Kafka's committed offsets are not the source of truth: they cannot be written in the
same transaction as the data they cover. The ``positions`` table is. One checkpoint is
one transaction that records, together, the next offset of every partition it covers,
the spill files that hold still-open windows, and the feedback-store segments that
finished windows were written to. Kafka offsets are committed afterwards as a courtesy
(for lag tooling and for a first start without state).

Two processes may share the store (one consumer group, one machine; PostgreSQL takes
this role across machines: connectors/state_pg.py, docs/storage.md). Positions are advanced by
compare-and-set: a checkpoint names the offset it started from, and if another process
moved that partition in the meantime, the whole checkpoint is refused with
`PositionConflict` and its files are discarded. That is what keeps a zombie consumer,
one that has lost its partitions without noticing, from writing a duplicate.

Both backends run the same statements (written with ``?`` placeholders and the upsert
syntax SQLite and PostgreSQL share); what differs, the schema's types, how a
transaction begins and how concurrent writers are serialised, is in the small
connection classes (`_SqliteConnection` here, ``_PostgresConnection`` there).
`open_state_store` picks one from the configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "CommitOutcomeUnknown",
    "FencedOut",
    "IncidentRow",
    "MonitorCommit",
    "OutboxRow",
    "PositionConflict",
    "PositionUpdate",
    "SegmentRecord",
    "SpillRecord",
    "StateLocation",
    "StateStore",
    "StateStoreUnavailable",
    "StoredPosition",
    "is_postgres_url",
    "open_sqlite",
    "open_state_store",
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
CREATE TABLE IF NOT EXISTS alert_outbox (
    id TEXT PRIMARY KEY,
    group_id TEXT NOT NULL,
    sink TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    payload TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    delivered_ms INTEGER,
    gave_up_ms INTEGER,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS alert_outbox_pending ON alert_outbox (group_id, sink, delivered_ms,
                                                                 gave_up_ms, first_seq);
CREATE TABLE IF NOT EXISTS leader_fence (
    group_id TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    holder TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
"""


class PositionConflict(RuntimeError):
    """Another process advanced a partition this checkpoint meant to advance."""


class StateStoreUnavailable(RuntimeError):
    """The store's server cannot be reached (PostgreSQL only); nothing was changed.

    Raised by the call that found the connection gone; the next call connects afresh,
    so a caller's ordinary retry (a failed checkpoint rewinds and tries again) is all
    the handling it needs.
    """


class CommitOutcomeUnknown(StateStoreUnavailable):
    """The connection was lost while a transaction committed, and the server could not
    be asked afterwards whether it did.

    Unlike its base class, the change may be durable: a caller must not delete files
    the transaction registered, but reconcile them with the store once it is back
    (`monitor.ingest.Ingestor.recover` does exactly that for a checkpoint's files).
    """


class FencedOut(RuntimeError):
    """A leader's write refused: another replica has taken leadership since this one
    did (a higher epoch in ``leader_fence``). Nothing of the write happened; the
    process must stop deciding (the daemon exits with code 3)."""


class _Refused(Exception):
    """A compare-and-set inside a transaction failed: roll back, report False."""


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
class OutboxRow:
    """One alert message for one sink (monitor/alerting.py): ``id`` is its idempotency key.

    Pending while neither ``delivered_ms`` nor ``gave_up_ms`` is set; ``first_seq`` (the
    first incident event it carries) orders a sink's messages.
    """

    id: str
    sink: str
    first_seq: int
    payload: str
    created_ms: int
    attempts: int = 0
    next_attempt_ms: int = 0
    delivered_ms: int | None = None
    gave_up_ms: int | None = None
    last_error: str | None = None


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


def open_sqlite(path: Path, schema: str, *, timeout_s: float = 30.0) -> sqlite3.Connection:
    """A durable SQLite connection of the kind every store of driftloop uses.

    ``isolation_level=None``: callers issue ``BEGIN IMMEDIATE`` themselves, so the write
    lock is taken up front and two processes never deadlock upgrading read locks.
    ``synchronous=FULL``: a transaction that returned is on disk across a power loss.
    WAL, with ``schema`` applied. Switching a new database to WAL takes an exclusive lock
    that does not wait on the busy timeout: two processes starting together on a fresh
    file see "database is locked" (seen in the two-daemon test), so it retries a while.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, timeout=timeout_s, check_same_thread=False)
    db.execute("PRAGMA synchronous=FULL")
    deadline = time.monotonic() + 30.0
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(schema)
            return db
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class _Connection(Protocol):
    """What `StateStore` needs of a database: the dialect differences stop here."""

    def execute(self, sql: str, args: Sequence[object] = ()) -> Any: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None: ...

    def transaction(self) -> contextlib.AbstractContextManager[None]: ...

    def serialize_incident_log(self, group_id: str) -> None: ...

    def close(self) -> None: ...


class _SqliteConnection:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def execute(self, sql: str, args: Sequence[object] = ()) -> sqlite3.Cursor:
        return self.db.execute(sql, args)

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self.db.executemany(sql, rows)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def serialize_incident_log(self, group_id: str) -> None:
        """Nothing to do: ``BEGIN IMMEDIATE`` already makes writers take turns, so
        sequence numbers become visible in the order they were drawn."""

    def close(self) -> None:
        self.db.close()


class StateStore:
    """The checkpoint store; this class opens SQLite, `open_state_store` either backend.

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

    path: Path | None
    _db: _Connection
    #: The leadership epoch this connection writes under (`fence`); None: unfenced.
    _fence: int | None = None

    def __init__(self, path: Path, *, group_id: str, instance: str) -> None:
        self.path = Path(path)
        self.group_id = group_id
        self.instance = instance
        # A checkpoint that returned is on disk even across a power loss; the files it
        # names are renamed into place only after it returns.
        self._db = _SqliteConnection(open_sqlite(self.path, _SCHEMA))

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
        with db.transaction():
            # In a fixed order: two PostgreSQL writers locking the same rows in opposite
            # orders would deadlock (SQLite serialises them anyway).
            for u in sorted(positions, key=lambda u: (u.topic, u.partition)):
                if u.expected is None:
                    cur = db.execute(
                        "INSERT INTO positions VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
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
                # The closing point only moves forward.
                db.execute(
                    "INSERT INTO topic_clocks VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (group_id, instance, topic) DO UPDATE SET "
                    "closed_upto_ms = excluded.closed_upto_ms "
                    "WHERE excluded.closed_upto_ms > topic_clocks.closed_upto_ms",
                    (self.group_id, self.instance, topic, upto),
                )

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

    # -- leadership epochs (fencing) ----------------------------------------------

    def take_leadership(self, holder: str) -> int:
        """Start a new leadership epoch for the group and return it (1, 2, ...).

        Called by a replica that has just taken the leader lock, before it decides
        anything. Every connection it then writes decisions through is `fence`d with
        the epoch, so a leader that was paused past its lock's timeout and wakes up
        cannot commit once its successor has started: the lock says who may decide
        now, the epoch refuses what an earlier holder still tries.
        """
        now = int(time.time() * 1000)
        with self._db.transaction():
            row = self._db.execute(
                "INSERT INTO leader_fence (group_id, epoch, holder, at_ms) VALUES (?, 1, ?, ?) "
                "ON CONFLICT (group_id) DO UPDATE SET epoch = leader_fence.epoch + 1, "
                "holder = excluded.holder, at_ms = excluded.at_ms RETURNING epoch",
                (self.group_id, holder, now)).fetchone()
        assert row is not None
        return int(row[0])

    def fence(self, epoch: int | None) -> None:
        """Refuse this connection's decision writes (`commit_monitor`) unless ``epoch`` is
        still the group's newest; None lifts the fence."""
        self._fence = epoch

    def leader_epoch(self) -> tuple[int, str] | None:
        """The group's newest epoch and who took it, None before any leader."""
        row = self._db.execute("SELECT epoch, holder FROM leader_fence WHERE group_id = ?",
                               (self.group_id,)).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def check_fence(self) -> None:
        """Raise `FencedOut` now if the fence no longer holds (before an action outside
        the database, a job launch, which no transaction can take back)."""
        if self._fence is None:
            return
        with self._db.transaction():
            self._hold_fence()

    def _hold_fence(self) -> None:
        """Inside a transaction: confirm the epoch and keep it for the transaction.

        An UPDATE rather than a SELECT: on PostgreSQL the row lock it takes makes a
        successor's `take_leadership` wait for this commit, so no write of the old
        epoch lands after the new one began (SQLite's writers take turns anyway).
        """
        if self._fence is None:
            return
        changed = self._db.execute(
            "UPDATE leader_fence SET at_ms = at_ms WHERE group_id = ? AND epoch = ?",
            (self.group_id, self._fence)).rowcount
        if changed != 1:
            newest = self._db.execute("SELECT epoch, holder FROM leader_fence WHERE group_id = ?",
                                      (self.group_id,)).fetchone()
            now = f"epoch {newest[0]} was taken by {newest[1]}" if newest else "no epoch is recorded"
            msg = (f"leadership epoch {self._fence} of group {self.group_id!r} is over: {now}; "
                   "this replica's write was refused")
            raise FencedOut(msg)

    def commit_monitor(self, step: MonitorCommit) -> None:
        """Make one analysis step durable atomically: progress, detector state and the
        incidents it changed move together, so a crash repeats the step or not at all.

        Raises:
            FencedOut: the connection is fenced and a newer leader has started.
        """
        now = int(time.time() * 1000)
        db = self._db
        with db.transaction():
            self._hold_fence()
            if step.events:
                db.serialize_incident_log(self.group_id)
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

    def incident(self, incident_id: str) -> IncidentRow | None:
        row = self._db.execute(
            "SELECT id, fingerprint, status, opened_ms, updated_ms, body FROM incidents "
            "WHERE group_id = ? AND id = ?", (self.group_id, incident_id)).fetchone()
        return None if row is None else IncidentRow(*row)

    # -- the alert outbox (monitor/alerting.py, docs/alerts.md) ---------------------------

    def outbox_fill(self, rows: Iterable[OutboxRow], *, cursor_key: str, expected: int | None,
                    upto: int) -> bool:
        """Enqueue alert messages and move the incident-log cursor, atomically.

        The cursor (a ``monitor_state`` value) moves by compare-and-set from
        ``expected``: a second dispatcher on the same store that filled first makes
        this return False and change nothing. Rows already present (same id) are kept
        as they are, so filling the same events twice enqueues nothing new.
        """
        db = self._db
        now = int(time.time() * 1000)
        try:
            with db.transaction():
                # The compare-and-set is the write itself, so that two PostgreSQL
                # transactions reading the same cursor cannot both go on.
                if expected is None:
                    cur = db.execute(
                        "INSERT INTO monitor_state VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                        (self.group_id, cursor_key, str(upto), now))
                else:
                    cur = db.execute(
                        "UPDATE monitor_state SET value = ?, updated_ms = ? "
                        "WHERE group_id = ? AND key = ? AND value = ?",
                        (str(upto), now, self.group_id, cursor_key, str(expected)))
                if cur.rowcount != 1:
                    raise _Refused
                db.executemany(
                    "INSERT INTO alert_outbox (id, group_id, sink, first_seq, payload, "
                    "created_ms, attempts, next_attempt_ms) VALUES (?, ?, ?, ?, ?, ?, 0, ?) "
                    "ON CONFLICT DO NOTHING",
                    [(r.id, self.group_id, r.sink, r.first_seq, r.payload, r.created_ms,
                      r.next_attempt_ms) for r in rows])
        except _Refused:
            return False
        return True

    def outbox_pending(self, sink: str, limit: int = 1) -> list[OutboxRow]:
        """A sink's undelivered messages in order (oldest incident event first)."""
        return [OutboxRow(*r) for r in self._db.execute(
            "SELECT id, sink, first_seq, payload, created_ms, attempts, next_attempt_ms, "
            "delivered_ms, gave_up_ms, last_error FROM alert_outbox WHERE group_id = ? AND "
            "sink = ? AND delivered_ms IS NULL AND gave_up_ms IS NULL ORDER BY first_seq, id "
            "LIMIT ?", (self.group_id, sink, limit))]

    def outbox_rows(self, sink: str | None = None) -> list[OutboxRow]:
        """Every message, delivered or not (for /status, audits and tests)."""
        sql = ("SELECT id, sink, first_seq, payload, created_ms, attempts, next_attempt_ms, "
               "delivered_ms, gave_up_ms, last_error FROM alert_outbox WHERE group_id = ?")
        args: list[object] = [self.group_id]
        if sink is not None:
            sql += " AND sink = ?"
            args.append(sink)
        return [OutboxRow(*r) for r in self._db.execute(sql + " ORDER BY first_seq, sink", args)]

    def outbox_update(self, message_id: str, *, attempts: int, next_attempt_ms: int | None = None,
                      delivered_ms: int | None = None, gave_up_ms: int | None = None,
                      last_error: str | None = None) -> None:
        """Record one attempt's outcome (a single-row write, durable on return)."""
        self._db.execute(
            "UPDATE alert_outbox SET attempts = ?, next_attempt_ms = coalesce(?, next_attempt_ms), "
            "delivered_ms = coalesce(?, delivered_ms), gave_up_ms = coalesce(?, gave_up_ms), "
            "last_error = coalesce(?, last_error) WHERE group_id = ? AND id = ?",
            (attempts, next_attempt_ms, delivered_ms, gave_up_ms, last_error, self.group_id,
             message_id))

    def outbox_depth(self) -> dict[str, tuple[int, int | None]]:
        """Pending messages per sink: (count, created_ms of the oldest)."""
        return {s: (int(n), None if oldest is None else int(oldest)) for s, n, oldest in self._db.execute(
            "SELECT sink, count(*), min(created_ms) FROM alert_outbox WHERE group_id = ? AND "
            "delivered_ms IS NULL AND gave_up_ms IS NULL GROUP BY sink", (self.group_id,))}

    def outbox_prune(self, before_ms: int) -> int:
        """Forget delivered and given-up messages finished before ``before_ms``."""
        cur = self._db.execute(
            "DELETE FROM alert_outbox WHERE group_id = ? AND coalesce(delivered_ms, gave_up_ms) < ?",
            (self.group_id, before_ms))
        return int(cur.rowcount)


# -- choosing a backend ---------------------------------------------------------------

#: What configuration spells a PostgreSQL state store with (monitor/config.py checks the
#: same shape): libpq's two schemes, optionally with SQLAlchemy's ``+driver``.
_POSTGRES_URL = re.compile(r"^postgres(?:ql)?(?:\+\w+)?://", re.IGNORECASE)


def is_postgres_url(location: object) -> bool:
    """Whether ``location`` spells a PostgreSQL database rather than a SQLite file."""
    return isinstance(location, str) and bool(_POSTGRES_URL.match(location))


class _StorageLike(Protocol):
    """monitor.config.StorageConfig, as far as this module reads it (connectors must not
    import monitor: tests/test_layering.py)."""

    @property
    def state_url(self) -> str | None: ...

    @property
    def state_path(self) -> Path: ...


#: Where a state store is: the ``storage`` config section, a ``postgresql://`` URL, or a path.
StateLocation = _StorageLike | str | os.PathLike[str]


def open_state_store(where: StateLocation, *, group_id: str, instance: str, **options: Any) -> StateStore:
    """The state store that ``where`` names: SQLite for a path, PostgreSQL for a URL.

    Args:
        where: the ``storage`` config section (its ``state_url`` when set, else its
            ``state_path``), a ``postgresql://`` URL, or the SQLite file's path.
        group_id: the Kafka consumer group whose progress this is.
        instance: this process's stable name, unique across every replica.
        options: for PostgreSQL only, passed to `connectors.state_pg.PostgresStateStore`
            (``statement_timeout_s``, ``connect_timeout_s``, ``application_name``, ...).

    Raises:
        StateStoreUnavailable: PostgreSQL cannot be reached.
        ImportError: a URL is given but psycopg is not installed (``driftloop[postgres]``).

    Example:
        >>> import tempfile, pathlib
        >>> s = open_state_store(pathlib.Path(tempfile.mkdtemp()) / "state.db", group_id="g",
        ...                      instance="a")
        >>> type(s).__name__
        'StateStore'
    """
    if not isinstance(where, str | os.PathLike):
        url = where.state_url
        where = url if url else where.state_path
    if isinstance(where, str) and _POSTGRES_URL.match(where):
        from connectors.state_pg import PostgresStateStore

        return PostgresStateStore(where, group_id=group_id, instance=instance, **options)
    if options:
        msg = f"options {sorted(options)} apply to a PostgreSQL state store only"
        raise TypeError(msg)
    return StateStore(Path(where), group_id=group_id, instance=instance)
