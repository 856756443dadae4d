"""Checkpointed ingestion without Kafka: records in, durable windows out.

The Kafka edge is covered against a real broker in test_daemon_kafka.py; here the
records are plain objects so that crashes can be placed at exact points.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow.compute as pc
import pytest

from connectors.events import EventKind, Reason
from connectors.state import PositionConflict, PositionUpdate, StateStore
from connectors.store import FeedbackStore, SpillFiles
from monitor.ingest import Ingestor
from monitor.metrics import Metrics
from monitor.windows import WindowSpec
from tests.events_gen import BASE_TS_MS, encode, feedback, prediction

P, F = "predictions", "feedback"
SPEC = WindowSpec(size_ms=60_000, allowed_lateness_ms=5_000, idle_timeout_ms=10_000)


@dataclasses.dataclass(frozen=True)
class Rec:
    offset: int
    value: bytes | None
    key: bytes | None = None


class MemoryDeadLetters:
    """In-memory stand-in for the dead-letter producer (the real one is tested with Kafka)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, int, Reason]] = []
        self.pending: list[tuple[str, int, int, Reason]] = []
        self.fail_next_flush = False

    def send(self, topic, partition, record, reason, detail):
        self.pending.append((topic, partition, record.offset, reason))

    def flush(self):
        if self.fail_next_flush:
            self.fail_next_flush = False
            self.pending.clear()
            raise RuntimeError("dead-letter topic unavailable")
        self.sent.extend(self.pending)
        self.pending.clear()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


def make(tmp: Path, dlq: MemoryDeadLetters, clock: Clock, instance: str = "a") -> Ingestor:
    state = StateStore(tmp / "state.db", group_id="g", instance=instance)
    return Ingestor({P: EventKind.PREDICTION, F: EventKind.FEEDBACK}, SPEC, state=state,
                    store=FeedbackStore(tmp / "store"), spills=SpillFiles(tmp / "spill"),
                    dead_letters=dlq, metrics=Metrics(), max_message_bytes=65536,
                    clock_ms=clock)


def stream(n: int, step_ms: int = 100) -> list[Rec]:
    return [Rec(i, encode(prediction(i, BASE_TS_MS + i * step_ms))) for i in range(n)]


def stored_ids(tmp: Path) -> list[str]:
    table = FeedbackStore(tmp / "store").read("predictions", columns=["prediction_id"])
    return table.column("prediction_id").to_pylist() if table.num_rows else []


def test_windows_close_by_watermark_and_land_in_the_store_once(tmp_path: Path) -> None:
    clock, dlq = Clock(), MemoryDeadLetters()
    ing = make(tmp_path, dlq, clock)
    ing.assign([(P, 0)])
    recs = stream(3_000)  # 300 s of event time: 5 windows
    for i in range(0, 3_000, 500):
        ing.ingest(P, [(0, recs[i:i + 500])])
        ing.checkpoint()
    # watermark = newest - 5 s: the windows before the last are final
    assert len(stored_ids(tmp_path)) == 240_000 // 100
    segments = ing.state.segments(P)
    assert all(s.final for s in segments) and len(segments) == 4
    clock.now += SPEC.idle_timeout_ms  # stream paused: the last window closes too
    ing.checkpoint()
    ids = stored_ids(tmp_path)
    assert sorted(ids) == sorted(f"p-{i}" for i in range(3_000))
    assert ing.state.positions(P)[0].next_offset == 3_000
    assert not list((tmp_path / "spill").iterdir())


def test_crash_between_checkpoints_replays_from_the_stored_position(tmp_path: Path) -> None:
    clock, dlq = Clock(), MemoryDeadLetters()
    recs = stream(2_000)
    ing = make(tmp_path, dlq, clock)
    ing.assign([(P, 0)])
    ing.ingest(P, [(0, recs[:700])])
    ing.checkpoint()
    ing.ingest(P, [(0, recs[700:1_300])])  # never checkpointed: the process "dies"
    ing.state.close()

    ing2 = make(tmp_path, dlq, clock)
    seeks = ing2.assign([(P, 0)])
    assert seeks == {(P, 0): 700}
    ing2.ingest(P, [(0, recs[700:])])
    clock.now += SPEC.idle_timeout_ms
    ing2.checkpoint()
    ids = stored_ids(tmp_path)
    assert len(ids) == 2_000 and len(set(ids)) == 2_000


def test_files_written_before_a_crash_in_the_commit_are_removed_on_restart(tmp_path: Path) -> None:
    clock, dlq = Clock(), MemoryDeadLetters()
    recs = stream(1_500)
    ing = make(tmp_path, dlq, clock)
    ing.assign([(P, 0)])
    ing.ingest(P, [(0, recs)])

    def die(*args, **kwargs):
        raise KeyboardInterrupt("kill -9 during the state-store transaction")

    ing.state.checkpoint = die  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        ing.checkpoint()
    # simulate the crash leaving files behind: write them again without cleanup
    leftover = tmp_path / "spill" / "predictions--w0--a--000000000001.arrow"
    leftover.write_bytes(b"partial")
    ing2 = make(tmp_path, dlq, clock)
    assert not leftover.exists()
    assert ing2.assign([(P, 0)]) == {}
    assert stored_ids(tmp_path) == []


def test_failed_checkpoint_rewinds_to_the_last_durable_position(tmp_path: Path) -> None:
    clock, dlq = Clock(), MemoryDeadLetters()
    recs = stream(1_000)
    recs[600] = Rec(600, b"{not json")
    ing = make(tmp_path, dlq, clock)
    ing.assign([(P, 0)])
    ing.ingest(P, [(0, recs[:500])])
    ing.checkpoint()
    ing.ingest(P, [(0, recs[500:])])
    dlq.fail_next_flush = True
    with pytest.raises(RuntimeError, match="dead-letter"):
        ing.checkpoint()
    assert ing.recover() == {(P, 0): 500}
    ing.ingest(P, [(0, recs[500:])])
    clock.now += SPEC.idle_timeout_ms
    ing.checkpoint()
    ids = stored_ids(tmp_path)
    assert len(ids) == 999 and len(set(ids)) == 999
    assert dlq.sent == [(P, 0, 600, Reason.MALFORMED_JSON)]


class UnreachableDeadLetters(MemoryDeadLetters):
    """A dead-letter topic that was deleted: every send raises (the producer's metadata wait)."""

    def send(self, topic, partition, record, reason, detail):
        raise RuntimeError("cannot send to the dead-letter topic")


@pytest.mark.parametrize("checkpointed_first", [False, True])
def test_a_batch_whose_dead_letter_cannot_be_sent_is_rewound_and_read_again(
        tmp_path: Path, checkpointed_first: bool) -> None:
    """The sink failing half-way through a batch leaves rows appended and no position
    moved: `recover` must say where to read again, even for a partition that has no
    stored position yet (which used to be skipped: the batch was lost)."""
    clock = Clock()
    recs = stream(1_000)
    recs[600] = Rec(600, b"{not json")
    ing = make(tmp_path, UnreachableDeadLetters(), clock)
    ing.assign([(P, 0)])
    start = 0
    if checkpointed_first:
        ing.ingest(P, [(0, recs[:500])])
        ing.checkpoint()
        start = 500
    with pytest.raises(RuntimeError, match="dead-letter"):
        ing.ingest(P, [(0, recs[start:])])
    assert ing.consecutive_failures == 1
    assert ing.recover() == {(P, 0): start}
    dlq = MemoryDeadLetters()
    ing.dead_letters = dlq
    ing.ingest(P, [(0, recs[start:])])
    clock.now += SPEC.idle_timeout_ms
    ing.checkpoint()
    ids = stored_ids(tmp_path)
    assert len(ids) == 999 and len(set(ids)) == 999
    assert dlq.sent == [(P, 0, 600, Reason.MALFORMED_JSON)]


def test_late_events_go_to_the_dead_letter_topic_not_to_a_closed_window(tmp_path: Path) -> None:
    clock, dlq = Clock(), MemoryDeadLetters()
    ing = make(tmp_path, dlq, clock)
    ing.assign([(P, 0)])
    ing.ingest(P, [(0, stream(1_500))])  # up to 150 s
    ing.checkpoint()  # closes [0, 60 s) and [60, 120 s)
    late = Rec(1_500, encode(prediction(99_999, BASE_TS_MS + 30_000)))
    ing.ingest(P, [(0, [late])])
    ing.checkpoint()
    assert dlq.sent == [(P, 0, 1_500, Reason.LATE)]
    assert "p-99999" not in stored_ids(tmp_path)


def test_zombie_checkpoint_is_refused_when_another_process_moved_the_partition(tmp_path: Path) -> None:
    clock = Clock()
    a = make(tmp_path, MemoryDeadLetters(), clock, instance="a")
    b = make(tmp_path, MemoryDeadLetters(), clock, instance="b")
    recs = stream(1_000)
    a.assign([(P, 0)])
    a.ingest(P, [(0, recs[:400])])
    a.checkpoint()
    a.ingest(P, [(0, recs[400:])])
    # a stalls; the group gives partition 0 to b, which reads on from 400
    assert b.assign([(P, 0)]) == {(P, 0): 400}
    b.ingest(P, [(0, recs[400:])])
    b.checkpoint()
    with pytest.raises(PositionConflict):
        a.checkpoint()
    a.recover()
    a.revoke([(P, 0)])
    a.checkpoint()
    assert len(stored_ids(tmp_path)) < 1_000  # a's first 400 rows wait in its spill
    clock.now += SPEC.idle_timeout_ms
    a.checkpoint()  # unowned for an idle timeout: a's open windows are written out
    b.checkpoint()
    ids = stored_ids(tmp_path)
    assert len(ids) == 1_000 and len(set(ids)) == 1_000


def test_state_store_compare_and_set(tmp_path: Path) -> None:
    s = StateStore(tmp_path / "s.db", group_id="g", instance="a")
    s.checkpoint([PositionUpdate("t", 0, None, 10, None)])
    with pytest.raises(PositionConflict):
        s.checkpoint([PositionUpdate("t", 0, None, 20, None)])
    with pytest.raises(PositionConflict):
        s.checkpoint([PositionUpdate("t", 0, 5, 20, None), PositionUpdate("t", 1, None, 3, None)])
    assert 1 not in s.positions("t")  # the whole transaction rolled back
    s.checkpoint([PositionUpdate("t", 0, 10, 20, 7)])
    assert s.positions("t")[0].next_offset == 20


def test_feedback_and_predictions_are_stored_separately(tmp_path: Path) -> None:
    clock, dlq = Clock(), MemoryDeadLetters()
    ing = make(tmp_path, dlq, clock)
    ing.assign([(P, 0), (F, 0)])
    ing.ingest(P, [(0, stream(100))])
    ing.ingest(F, [(0, [Rec(i, encode(feedback(i, BASE_TS_MS + i * 100 + 50))) for i in range(30)])])
    clock.now += SPEC.idle_timeout_ms
    ing.checkpoint()
    fb = FeedbackStore(tmp_path / "store").read("feedbacks")
    assert fb.num_rows == 30
    assert pc.all(pc.equal(fb.column("type"), "click")).as_py()


def _moved_partition_run(tmp: Path, *, bounded: bool) -> tuple[MemoryDeadLetters, list[str]]:
    """Replica ``b`` reads the first 120 s of partition 1, makes them durable and dies;
    replica ``a`` reads partition 0 to the end; partition 1 moves to ``a``, which reads
    the rest of it."""
    clock, dlq = Clock(), MemoryDeadLetters()
    a, b = make(tmp, dlq, clock, "a"), make(tmp, dlq, clock, "b")
    p0 = stream(3_000)
    p1 = [Rec(i, encode(prediction(10_000 + i, BASE_TS_MS + i * 100))) for i in range(3_000)]
    a.assign([(P, 0)])
    b.assign([(P, 1)])
    b.ingest(P, [(1, p1[:1_200])])
    clock.now += SPEC.idle_timeout_ms  # quiet: b closes its windows, nothing is left open
    b.checkpoint()  # b's position: offset 1200, event time 119.9 s; then b dies
    for i in range(0, 3_000, 500):
        if bounded:
            a.set_group_floor(P, {1: len(p1)})
        a.ingest(P, [(0, p0[i:i + 500])])
        a.checkpoint()
    seeks = a.assign([(P, 1)])
    assert seeks == {(P, 1): 1_200}
    if bounded:
        a.set_group_floor(P, {})  # every partition is a's now
    a.ingest(P, [(1, p1[1_200:])])
    a.checkpoint()
    clock.now += SPEC.idle_timeout_ms
    a.checkpoint()
    return dlq, stored_ids(tmp)


def test_a_replica_closes_no_further_than_a_partition_another_replica_holds(tmp_path: Path) -> None:
    dlq, ids = _moved_partition_run(tmp_path / "bounded", bounded=True)
    assert not dlq.sent
    assert sorted(ids) == sorted([f"p-{i}" for i in range(3_000)] + [f"p-{10_000 + i}" for i in range(3_000)])
    # Without the bound the moved partition's backlog is late where it lands: what the
    # bound is for.
    dlq, ids = _moved_partition_run(tmp_path / "unbounded", bounded=False)
    assert dlq.sent and all(r == Reason.LATE for *_, r in dlq.sent)
    assert len(ids) + len(dlq.sent) == 6_000


def test_a_partition_nobody_has_read_holds_every_window_open(tmp_path: Path) -> None:
    clock, dlq = Clock(), MemoryDeadLetters()
    a = make(tmp_path, dlq, clock)
    a.assign([(P, 0)])
    a.set_group_floor(P, {1: 42})  # partition 1 has data and no stored position
    a.ingest(P, [(0, stream(3_000))])
    a.checkpoint()
    assert stored_ids(tmp_path) == []
    a.set_group_floor(P, {1: 0})  # ... an empty one does not count
    a.checkpoint()
    assert len(stored_ids(tmp_path)) == 240_000 // 100
