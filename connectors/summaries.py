"""Window summaries of several replicas, and the group's view of who has closed what.

Every replica of a consumer group summarises the windows *it* stored (mergeable
counts: profile bins, label histograms; never rows) into ``window_summaries``; the
leader merges a window's summaries once every replica with a stake in the window has
closed it (docs/scale-out.md). Both sides live in the state store's database (SQLite
for replicas on one host, PostgreSQL across hosts), so a summary, the segments it
describes and the positions that produced them are in one place, and the view below
reads the ingestion tables (segments, topic_clocks, positions, spills) as they are.

A summary is a pure function of a replica's published segments of a window, so
writing one twice (a replica restarted after writing but before remembering it) is
harmless: the first copy is kept (``ON CONFLICT DO NOTHING``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from connectors.sql import SqlDb

__all__ = ["GroupView", "SummaryStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS window_summaries (
    group_id TEXT NOT NULL,
    stage TEXT NOT NULL,
    window_start_ms BIGINT NOT NULL,
    instance TEXT NOT NULL,
    body TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (group_id, stage, window_start_ms, instance)
);
"""


@dataclasses.dataclass(frozen=True)
class GroupView:
    """Who has a stake in a topic's windows, and how far each has closed them."""

    #: instance -> closed_upto_ms (windows starting before it are final there).
    closed: dict[str, int]
    #: Instances that own partitions of the topic now (per the positions table).
    owners: frozenset[str]
    #: instance -> earliest window it still holds open rows of (spill files).
    spilling: dict[str, int]

    def stakeholders(self) -> frozenset[str]:
        return self.owners | frozenset(self.spilling)

    def closed_upto(self) -> int | None:
        """The group's closing point: the least of its stakeholders'. None until every
        stakeholder has closed something (a new owner's backlog may still hold rows
        of any window)."""
        stake = self.stakeholders()
        if not stake:
            return min(self.closed.values()) if self.closed else None
        points = [self.closed.get(i) for i in stake]
        if any(p is None for p in points):
            return None
        return min(p for p in points if p is not None)

    def closed_for(self, instance: str, window_start_ms: int) -> bool:
        """Whether ``instance`` will write no more rows of this window: it has closed
        it, or it owns no partition of the topic and holds no open rows of it (its
        orphaned windows were written out as partial segments)."""
        upto = self.closed.get(instance)
        if upto is not None and window_start_ms < upto:
            return True
        if instance in self.owners:
            return False
        first_open = self.spilling.get(instance)
        return first_open is None or first_open > window_start_ms


class SummaryStore:
    """``window_summaries`` and the group view, on the state store's database.

    Args:
        location: the SQLite state file, or a ``postgresql://`` URL.
        group_id: the consumer group.
    """

    def __init__(self, location: str | Path, *, group_id: str) -> None:
        self.group_id = group_id
        self._db = SqlDb(location, sqlite_schema=_SCHEMA, postgres_schema=_SCHEMA,
                         name="driftloop-summaries")

    def close(self) -> None:
        self._db.close()

    def _rows(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return self._db.rows(sql, args)

    def _write(self, sql: str, rows: Iterable[tuple[Any, ...]]) -> None:
        self._db.executemany(sql, rows)

    # -- summaries -------------------------------------------------------------------

    def put(self, stage: str, window_start_ms: int, instance: str, body: str) -> None:
        self._write(
            "INSERT INTO window_summaries VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (group_id, stage, window_start_ms, instance) DO NOTHING",
            [(self.group_id, stage, window_start_ms, instance, body, int(time.time() * 1000))])

    def get(self, stage: str, window_start_ms: int) -> dict[str, str]:
        rows = self._rows("SELECT instance, body FROM window_summaries WHERE group_id = ? AND stage = ? "
                          "AND window_start_ms = ?", (self.group_id, stage, window_start_ms))
        return {str(i): str(b) for i, b in rows}

    def summarised(self, stage: str, instance: str, from_ms: int) -> set[int]:
        rows = self._rows("SELECT window_start_ms FROM window_summaries WHERE group_id = ? AND stage = ? "
                          "AND instance = ? AND window_start_ms >= ?",
                          (self.group_id, stage, instance, from_ms))
        return {int(r[0]) for r in rows}

    def prune(self, before_ms: int) -> None:
        """Summaries of windows the leader decided long ago are history, not state."""
        self._write("DELETE FROM window_summaries WHERE group_id = ? AND window_start_ms < ?",
                    [(self.group_id, before_ms)])

    # -- the ingestion tables ----------------------------------------------------------

    def view(self, topic: str) -> GroupView:
        closed = {str(i): int(c) for i, c in self._rows(
            "SELECT instance, closed_upto_ms FROM topic_clocks WHERE group_id = ? AND topic = ?",
            (self.group_id, topic))}
        owners = frozenset(str(r[0]) for r in self._rows(
            "SELECT DISTINCT owner FROM positions WHERE group_id = ? AND topic = ?", (self.group_id, topic)))
        spilling = {str(i): int(w) for i, w in self._rows(
            "SELECT instance, MIN(window_start_ms) FROM spills WHERE group_id = ? AND topic = ? "
            "GROUP BY instance", (self.group_id, topic))}
        return GroupView(closed, owners, spilling)

    def segment_instances(self, topic: str, window_start_ms: int) -> set[str]:
        """Instances that stored rows of the window: each owes the leader a summary."""
        return {str(r[0]) for r in self._rows(
            "SELECT DISTINCT instance FROM segments WHERE group_id = ? AND topic = ? "
            "AND window_start_ms = ?", (self.group_id, topic, window_start_ms))}

    def first_window(self, topic: str) -> int | None:
        rows = self._rows("SELECT MIN(window_start_ms) FROM segments WHERE group_id = ? AND topic = ?",
                          (self.group_id, topic))
        return None if not rows or rows[0][0] is None else int(rows[0][0])

    def own_windows(self, topic: str, instance: str, after_ms: int | None, before_ms: int) -> list[int]:
        """Windows in ``(after_ms, before_ms)`` that ``instance`` stored rows of, ascending."""
        rows = self._rows(
            "SELECT DISTINCT window_start_ms FROM segments WHERE group_id = ? AND topic = ? "
            "AND instance = ? AND window_start_ms > ? AND window_start_ms < ? ORDER BY window_start_ms",
            (self.group_id, topic, instance, -1 if after_ms is None else after_ms, before_ms))
        return [int(r[0]) for r in rows]

    def own_segments(self, topic: str, instance: str, window_start_ms: int) -> list[str]:
        rows = self._rows(
            "SELECT path FROM segments WHERE group_id = ? AND topic = ? AND instance = ? "
            "AND window_start_ms = ? ORDER BY path", (self.group_id, topic, instance, window_start_ms))
        return [str(r[0]) for r in rows]
