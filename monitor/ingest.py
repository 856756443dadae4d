"""Windowed, checkpointed ingestion: decoded batches in, durable windows out.

This is where the delivery guarantee lives (docs/delivery.md):

* Rows are appended to in-memory *tails* of their event-time windows.
* A checkpoint (every few seconds, when too many rows are buffered, on rebalance and
  on shutdown) makes everything consumed so far durable in one step: windows the
  watermark has passed are streamed into feedback-store segments, the tails of open
  windows go to spill files, and one state-store transaction records the new
  partition positions together with those files. Only then are segments renamed
  into place and Kafka offsets committed.
* A crash anywhere loses nothing, because positions never run ahead of durable data,
  and counts nothing twice, because data never runs ahead of positions: on restart
  consumption resumes exactly at the stored positions, with the stored spills as the
  open windows.
* Any failed checkpoint is handled like a crash without the process exit:
  `recover` rebuilds the in-memory state from the state store and says where each
  partition must be re-read from.

Kafka itself stays outside this class; it receives records and returns offsets, so it
can be driven by the real consumer (monitor/service/daemon.py) and by tests alike.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from connectors.events import DecodeFailure, EventKind, Reason, decode_batch
from connectors.state import (
    CommitOutcomeUnknown,
    PositionUpdate,
    SegmentRecord,
    SpillRecord,
    StateStore,
)
from connectors.store import FEEDBACKS, PREDICTIONS, FeedbackStore, SpillFiles, conform, unified_schema
from monitor.metrics import Metrics
from monitor.windows import TopicClock, WindowSpec

__all__ = ["CheckpointResult", "DeadLetterSink", "Ingestor", "Record"]

log = logging.getLogger(__name__)


class Record(Protocol):
    """The parts of a Kafka record ingestion reads (kafka-python's ConsumerRecord fits)."""

    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


class DeadLetterSink(Protocol):
    """Where rejected records go (connectors.kafka.DeadLetterProducer in production)."""

    def send(self, topic: str, partition: int, record: Record, reason: Reason,
             detail: str) -> bool | None:
        """Queue the record; True when it went as a reference (too large for the sink).
        Raises when the sink is unreachable: ingestion then rewinds (see `ingest`)."""

    def flush(self) -> None:
        """Block until everything sent is acknowledged; raise if anything was not."""


@dataclasses.dataclass
class _Window:
    start_ms: int
    spills: list[SpillRecord] = dataclasses.field(default_factory=list)
    tail: list[pa.Table] = dataclasses.field(default_factory=list)
    tail_rows: int = 0


@dataclasses.dataclass
class _Topic:
    name: str
    kind: EventKind
    clock: TopicClock
    windows: dict[int, _Window] = dataclasses.field(default_factory=dict)
    #: Wall time since which this process owns no partition of the topic.
    unowned_since_ms: int | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointResult:
    """What a successful checkpoint made durable."""

    offsets: dict[tuple[str, int], int]
    rows_spilled: int
    rows_stored: int
    windows_closed: int
    seconds: float


class Ingestor:
    """Assign decoded events to windows and checkpoint them.

    Args:
        topics: topic name -> event kind.
        spec: window size, lateness and idle timeout.
        state: the state store (positions, spills, segments).
        store: the feedback store for finished windows.
        spills: where open windows' rows wait between checkpoints.
        dead_letters: sink for rejected records.
        metrics: counters and gauges to update.
        max_message_bytes: larger records are rejected unread.
        clock_ms: wall clock in epoch ms, injectable for tests.
    """

    def __init__(
        self,
        topics: dict[str, EventKind],
        spec: WindowSpec,
        *,
        state: StateStore,
        store: FeedbackStore,
        spills: SpillFiles,
        dead_letters: DeadLetterSink,
        metrics: Metrics,
        max_message_bytes: int,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.spec = spec
        self.state = state
        self.store = store
        self.spills = spills
        self.dead_letters = dead_letters
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes
        self.clock_ms = clock_ms
        self.instance = state.instance
        self._kinds = dict(topics)
        self._topics: dict[str, _Topic] = {}
        # (topic, partition) -> offset stored in the state store (None: no row yet);
        # the compare-and-set base of the next checkpoint.
        self._stored: dict[tuple[str, int], int | None] = {}
        # (topic, partition) -> next offset to consume, as far as rows in memory go.
        self._next: dict[tuple[str, int], int] = {}
        # Where a partition without a stored row was first read from, to rewind to.
        self._first: dict[tuple[str, int], int] = {}
        self._buffered = 0
        # File sequence numbers start from the clock in microseconds so that names
        # stay unique across restarts without reading anything back.
        self._seq = time.time_ns() // 1000
        self.last_checkpoint: CheckpointResult | None = None
        self.consecutive_failures = 0
        self._recover_from_state()

    # -- ownership -----------------------------------------------------------------

    def assign(self, partitions: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Take ownership of partitions; returns the offsets to seek them to.

        Partitions without a stored position are absent from the result: the consumer
        then starts from Kafka's committed offset or its reset policy.
        """
        now = self.clock_ms()
        seeks: dict[tuple[str, int], int] = {}
        by_topic: dict[str, list[int]] = {}
        for topic, p in partitions:
            by_topic.setdefault(topic, []).append(p)
        for topic, parts in by_topic.items():
            stored = self.state.positions(topic)
            t = self._topics[topic]
            t.clock.assign(parts, now, {p: stored[p].max_ts_ms for p in parts if p in stored})
            for p in parts:
                pos = stored.get(p)
                self._stored[(topic, p)] = None if pos is None else pos.next_offset
                self._next.pop((topic, p), None)
                self._first.pop((topic, p), None)
                if pos is not None:
                    seeks[(topic, p)] = pos.next_offset
        return seeks

    def revoke(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Forget partitions after their rows were checkpointed (or discarded)."""
        for topic, p in partitions:
            if topic in self._topics:
                self._topics[topic].clock.revoke([p])
            self._stored.pop((topic, p), None)
            self._next.pop((topic, p), None)
            self._first.pop((topic, p), None)

    def set_group_floor(self, topic: str, others: dict[int, int | None]) -> None:
        """Bound the topic's clock by partitions other replicas hold (cluster mode).

        ``others``: end offset of each partition of the topic this replica does not
        own. Their durable progress is in the state store; one that is behind its end
        holds the clock back to its event time, one that was never read blocks it, and
        one that is caught up does not count (as an idle partition here would not).
        """
        if topic not in self._topics:
            return
        stored = self.state.positions(topic)
        lateness = self.spec.allowed_lateness_ms
        floor: int | None = None
        blocks = False
        for p, end in others.items():
            pos = stored.get(p)
            if pos is None:
                blocks = blocks or bool(end)
                continue
            if end is not None and pos.next_offset >= end:
                continue
            if pos.max_ts_ms is None:
                blocks = True
                continue
            floor = pos.max_ts_ms - lateness if floor is None else min(floor, pos.max_ts_ms - lateness)
        self._topics[topic].clock.set_group_floor(floor, blocks=blocks)

    def hold_windows(self, topic: str) -> None:
        """Close no window of ``topic`` until the next `set_group_floor`."""
        if topic in self._topics:
            self._topics[topic].clock.set_group_floor(None, blocks=True)

    def set_caught_up(self, topic: str, partition: int, high_watermark: int | None) -> None:
        """Tell the watermark whether a partition has nothing left to read.

        A high watermark not known yet (no fetch answered since assignment) counts as
        behind: the partition may hold a backlog, and its events must not become late
        just because the first fetch was slow.
        """
        if topic not in self._topics:
            return
        clock = self._topics[topic].clock
        if high_watermark is None:
            clock.set_caught_up(partition, False)
            return
        key = (topic, partition)
        pos = self._next.get(key, self._stored.get(key))
        if pos is None:
            # Nothing read and no stored position: behind unless the partition is empty.
            clock.set_caught_up(partition, high_watermark == 0)
            return
        clock.set_caught_up(partition, pos >= high_watermark)
        self.metrics.consumer_lag.labels(topic, str(partition)).set(max(0, high_watermark - pos))

    @property
    def buffered_rows(self) -> int:
        return self._buffered

    # -- ingestion -----------------------------------------------------------------

    def ingest(self, topic: str, batches: Sequence[tuple[int, Sequence[Record]]]) -> None:
        """Decode and window the records of one topic, grouped by partition.

        Decoding all partitions of a topic in one call amortises the per-batch cost
        of building Arrow columns.

        No record can make this raise: one that decoding or windowing cannot handle is
        dead-lettered (``internal_error`` when that is a bug of ours). What may raise
        is the dead-letter sink itself (its broker or topic gone); the caller must then
        `recover` (rows of the batch may be half-appended) and read the batch again.
        """
        try:
            self._ingest(topic, batches)
        except BaseException:
            self.consecutive_failures += 1
            self.metrics.ingest_failures.inc()
            raise

    def _ingest(self, topic: str, batches: Sequence[tuple[int, Sequence[Record]]]) -> None:
        t = self._topics[topic]
        for partition, recs in batches:
            # Before anything can fail: `recover` rewinds a partition without a stored
            # position to here.
            key = (topic, partition)
            if recs and self._stored.get(key) is None and key not in self._first:
                self._first[key] = recs[0].offset
        records: list[Record] = []
        bounds = [0]
        for _, recs in batches:
            records.extend(recs)
            bounds.append(len(records))
        if not records:
            return
        values = [r.value for r in records]
        n = len(values)
        self.metrics.events_in.labels(topic).inc(n)
        decoded = decode_batch(t.kind, values, max_bytes=self.max_message_bytes)
        owner = np.searchsorted(np.asarray(bounds[1:]), np.arange(n), side="right")
        for f in decoded.failures:
            self._dead_letter(topic, batches[owner[f.index]][0], records[f.index], f)

        table = decoded.table
        if table.num_rows:
            try:
                starts = self.spec.window_start(decoded.ts_ms)
                late = t.clock.late_mask(starts)
            except Exception as exc:  # a bug of ours: no row may take the batch down with it
                log.exception("windowing failed; the batch's rows go to the dead-letter topic")
                for i in decoded.index.tolist():
                    failure = DecodeFailure(int(i), Reason.INTERNAL_ERROR,
                                            f"{type(exc).__name__} while windowing (a driftloop bug)")
                    self._dead_letter(topic, batches[owner[i]][0], records[i], failure)
                table = table.slice(0, 0)
        if table.num_rows:
            if late.any():
                closed = t.clock.closed_upto_ms
                for row in np.flatnonzero(late):
                    i = int(decoded.index[row])
                    detail = (f"event time {int(decoded.ts_ms[row])} ms is in a window that "
                              f"closed at {closed} ms")
                    failure = DecodeFailure(i, Reason.LATE, detail)
                    self._dead_letter(topic, batches[owner[i]][0], records[i], failure)
                keep = ~late
                table = table.filter(pa.array(keep))
                starts = starts[keep]
                row_owner = owner[decoded.index[keep]]
                ts_ms = decoded.ts_ms[keep]
            else:
                row_owner = owner[decoded.index]
                ts_ms = decoded.ts_ms
            self.metrics.events_valid.labels(topic).inc(table.num_rows)
            self._append(t, table, starts)
            if len(ts_ms):
                now = self.clock_ms()
                # Per-partition newest event time for the watermark.
                order = np.argsort(row_owner, kind="stable")
                uniq, first = np.unique(row_owner[order], return_index=True)
                maxima = np.maximum.reduceat(ts_ms[order], first)
                for b, mx in zip(uniq, maxima, strict=True):
                    t.clock.observe(batches[int(b)][0], int(mx), now)

        for partition, recs in batches:
            if recs:
                self._next[(topic, partition)] = recs[-1].offset + 1
        self.metrics.buffered_rows.set(self._buffered)

    def _append(self, t: _Topic, table: pa.Table, starts: np.ndarray) -> None:
        uniq = np.unique(starts)
        for w in uniq:
            part = table if len(uniq) == 1 else table.filter(pa.array(starts == w))
            win = t.windows.get(int(w))
            if win is None:
                win = t.windows[int(w)] = _Window(int(w))
            win.tail.append(part)
            win.tail_rows += part.num_rows
            self._buffered += part.num_rows

    def _dead_letter(self, topic: str, partition: int, record: Record,
                     failure: DecodeFailure) -> None:
        as_reference = self.dead_letters.send(topic, partition, record, failure.reason, failure.detail)
        self.metrics.dead_letters.labels(topic, failure.reason.value).inc()
        if as_reference:
            self.metrics.dead_letter_references.labels(topic).inc()

    # -- checkpoints ---------------------------------------------------------------

    def checkpoint(self) -> CheckpointResult:
        """Make everything consumed so far durable; see the module docstring.

        Raises whatever made it fail, after removing the files it wrote; the caller
        then calls `recover`.
        """
        t0 = time.perf_counter()
        now = self.clock_ms()
        self.dead_letters.flush()

        new_segments: list[SegmentRecord] = []
        new_spills: list[SpillRecord] = []
        dropped: list[str] = []
        closed_upto: dict[str, int] = {}
        closing: list[tuple[_Topic, _Window]] = []
        rows_stored = rows_spilled = 0
        written: list[Path] = []
        try:
            for t in self._topics.values():
                upto = t.clock.closable_upto(now)
                if upto is not None and upto != t.clock.closed_upto_ms:
                    closed_upto[t.name] = upto
                orphaned = self._orphaned(t, now)
                for w in sorted(t.windows.values(), key=lambda w: w.start_ms):
                    final = upto is not None and w.start_ms + self.spec.size_ms <= upto
                    if final or orphaned:
                        seg, rows = self._write_segment(t, w, final=final)
                        written.append(Path(seg.path))
                        new_segments.append(seg)
                        dropped.extend(s.path for s in w.spills)
                        closing.append((t, w))
                        rows_stored += rows
                    elif w.tail_rows:
                        spill = self._write_spill(t, w)
                        written.append(Path(spill.path))
                        new_spills.append(spill)
                        rows_spilled += spill.rows

            updates = []
            for key, nxt in self._next.items():
                if nxt != self._stored.get(key):
                    topic, p = key
                    pc = self._topics[topic].clock.partitions.get(p)
                    updates.append(PositionUpdate(topic, p, self._stored.get(key), nxt,
                                                  pc.max_ts_ms if pc else None))
            if updates or new_segments or new_spills or closed_upto:
                self.state.checkpoint(updates, new_spills=new_spills, dropped_spills=dropped,
                                      new_segments=new_segments, closed_upto=closed_upto)
        except BaseException as exc:
            # A commit whose outcome is unknown may have registered these files: keep
            # them, and let `recover` sort them out against the state store.
            if not isinstance(exc, CommitOutcomeUnknown):
                for path in written:
                    if path.suffix == ".parquet":
                        self.store.discard(path)
                    else:
                        path.unlink(missing_ok=True)
            self.consecutive_failures += 1
            self.metrics.checkpoints.labels("failed").inc()
            raise

        # Durable from here on: publish and update memory.
        for seg in new_segments:
            self.store.publish(Path(seg.path))
            self.metrics.events_stored.labels(seg.topic).inc(seg.rows)
        self.spills.remove(dropped)
        for t, w in closing:
            del t.windows[w.start_ms]
        for seg in new_segments:
            if seg.final:
                self.metrics.windows_closed.labels(seg.topic).inc()
        spill_of = {(s.topic, s.window_start_ms): s for s in new_spills}
        for t in self._topics.values():
            if t.name in closed_upto:
                t.clock.mark_closed(closed_upto[t.name])
            for w in t.windows.values():
                s = spill_of.get((t.name, w.start_ms))
                if s is not None:
                    w.spills.append(s)
                w.tail.clear()
                w.tail_rows = 0
            self.metrics.open_windows.labels(t.name).set(len(t.windows))
            wm = t.clock.watermark(now)
            if wm is not None:
                self.metrics.watermark.labels(t.name).set(wm / 1000)
        for key, nxt in self._next.items():
            self._stored[key] = nxt
        self._first.clear()
        self._buffered = 0
        self.metrics.buffered_rows.set(0)
        self.consecutive_failures = 0
        seconds = time.perf_counter() - t0
        self.metrics.checkpoints.labels("ok").inc()
        self.metrics.checkpoint_seconds.observe(seconds)
        result = CheckpointResult(
            offsets={k: v for k, v in self._stored.items() if v is not None},
            rows_spilled=rows_spilled, rows_stored=rows_stored,
            windows_closed=len(closing), seconds=seconds)
        self.last_checkpoint = result
        return result

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _orphaned(self, t: _Topic, now: int) -> bool:
        """Whether ``t``'s open windows have had no partition to close them for an idle
        timeout (all its partitions moved to other consumers, or a restart resumed
        spills of a topic it no longer reads). They are then written out as partial
        segments rather than waiting forever; the closing point does not move, so
        events of those windows that arrive later still count, in a segment of their
        own."""
        if t.clock.partitions:
            t.unowned_since_ms = None
            return False
        if t.unowned_since_ms is None:
            t.unowned_since_ms = now
        return now - t.unowned_since_ms >= self.spec.idle_timeout_ms

    def _write_segment(self, t: _Topic, w: _Window, *, final: bool
                       ) -> tuple[SegmentRecord, int]:
        paths = [Path(s.path) for s in w.spills]
        schema = unified_schema([*(self.spills.schema(p) for p in paths),
                                 *(x.schema for x in w.tail)])
        path = self.store.segment_path(PREDICTIONS if t.kind is EventKind.PREDICTION else FEEDBACKS,
                                       w.start_ms, self.instance,
                                       self._next_seq())
        rows = self.store.write(path, schema, [*self.spills.iter_read(paths), *w.tail])
        return SegmentRecord(str(path), t.name, t.kind.value, w.start_ms, rows, final), rows

    def _write_spill(self, t: _Topic, w: _Window) -> SpillRecord:
        schema = unified_schema(x.schema for x in w.tail)
        table = pa.concat_tables([conform(x, schema) for x in w.tail])
        path = self.spills.path(t.name, w.start_ms, self.instance, self._next_seq())
        self.spills.write(path, table)
        return SpillRecord(str(path), t.name, w.start_ms, table.num_rows)

    # -- recovery ------------------------------------------------------------------

    def recover(self) -> dict[tuple[str, int], int]:
        """Forget everything not checkpointed; returns where owned partitions must be
        re-read from (the stored position, or the first offset read when none)."""
        rewind: dict[tuple[str, int], int] = {}
        for key in {*self._next, *self._first}:
            stored = self._stored.get(key)
            start = stored if stored is not None else self._first.get(key)
            if start is not None:
                rewind[key] = start
        owned = {t: list(tc.clock.partitions) for t, tc in self._topics.items()}
        self._recover_from_state()
        now = self.clock_ms()
        for topic, parts in owned.items():
            stored = self.state.positions(topic)
            self._topics[topic].clock.assign(
                parts, now, {p: stored[p].max_ts_ms for p in parts if p in stored})
            for p in parts:
                pos = stored.get(p)
                self._stored[(topic, p)] = None if pos is None else pos.next_offset
                if pos is not None:
                    rewind[(topic, p)] = pos.next_offset
        return rewind

    def _recover_from_state(self) -> None:
        published, deleted = self.store.recover(self.state.segment_paths(), self.instance)
        removed = self.spills.remove_unregistered(self.state.all_spill_paths(), self.instance)
        self._topics = {
            name: _Topic(name, kind, TopicClock(self.spec, self.state.closed_upto(name)))
            for name, kind in self._kinds.items()
        }
        spills = self.state.spills()
        for s in spills:
            t = self._topics.get(s.topic)
            if t is None:
                continue
            w = t.windows.get(s.window_start_ms)
            if w is None:
                w = t.windows[s.window_start_ms] = _Window(s.window_start_ms)
            w.spills.append(s)
        self._stored.clear()
        self._next.clear()
        self._first.clear()
        self._buffered = 0
        if published or deleted or removed or spills:
            log.info("recovered ingestion state", extra={"fields": {
                "segments_published": published, "segments_deleted": deleted,
                "spills_removed": removed, "spills_resumed": len(spills)}})

    # -- introspection -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self.clock_ms()
        topics = {}
        for t in self._topics.values():
            topics[t.name] = {
                "kind": t.kind.value,
                "partitions": sorted(t.clock.partitions),
                "watermark_ms": t.clock.watermark(now),
                "closed_upto_ms": t.clock.closed_upto_ms,
                "open_windows": sorted(t.windows),
            }
        last = self.last_checkpoint
        return {
            "topics": topics,
            "buffered_rows": self._buffered,
            "consecutive_checkpoint_failures": self.consecutive_failures,
            "last_checkpoint": None if last is None else {
                "rows_spilled": last.rows_spilled, "rows_stored": last.rows_stored,
                "windows_closed": last.windows_closed, "seconds": round(last.seconds, 4)},
        }
