"""The state store's contract, held to on both backends: SQLite and PostgreSQL.

Every behaviour test runs twice through the ``where`` fixture (a SQLite file, or a fresh
PostgreSQL database on the session's throwaway cluster). The PostgreSQL runs are skipped
where PostgreSQL cannot start, and fail instead under CI=true (tests/mlflow_fixtures.py).
At the end: what only PostgreSQL has (dropped connections, a commit whose answer was
lost, concurrent first opens, a role without CREATE), and ingestion's exactly-once
promise across a crash with the positions in PostgreSQL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connectors.state import (
    CommitOutcomeUnknown,
    FencedOut,
    IncidentRow,
    MonitorCommit,
    OutboxRow,
    PositionConflict,
    PositionUpdate,
    SegmentRecord,
    SpillRecord,
    StateStore,
    StateStoreUnavailable,
    open_state_store,
)
from connectors.store import FeedbackStore, SpillFiles
from monitor.config import StorageConfig
from monitor.ingest import Ingestor
from monitor.metrics import Metrics
from tests.pg_fixtures import fresh_database, psycopg_or_skip, terminate_sessions
from tests.test_ingest import SPEC, Clock, MemoryDeadLetters, P, stored_ids, stream

Where = Path | str


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.mlflow)])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Where]:
    """What `open_state_store` is given: a SQLite path or a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        yield tmp_path / "state.db"
        return
    with fresh_database(request.getfixturevalue("postgres_uri")) as url:
        yield url


@pytest.fixture
def pg_url(postgres_uri: str) -> Iterator[str]:
    with fresh_database(postgres_uri) as url:
        yield url


def opened(where: Where, instance: str = "a", group_id: str = "g", **options: Any) -> StateStore:
    return open_state_store(where, group_id=group_id, instance=instance, **options)


def incident(iid: str, status: str = "firing", updated_ms: int = 1) -> IncidentRow:
    return IncidentRow(iid, f"fp-{iid}", status, 1, updated_ms, f'{{"id": "{iid}"}}')


# -- positions: compare-and-set ----------------------------------------------------------


def test_a_stale_owner_cannot_move_a_partition_and_its_whole_checkpoint_is_refused(where: Where) -> None:
    a, b = opened(where, "a"), opened(where, "b")
    a.checkpoint([PositionUpdate("t", 0, None, 10, 5)])
    # b takes partition 0 over from the stored position and moves it on
    assert b.positions("t")[0].next_offset == 10
    b.checkpoint([PositionUpdate("t", 0, 10, 25, 9)])
    with pytest.raises(PositionConflict, match=r"t\[0\].*offset 10"):
        a.checkpoint([PositionUpdate("t", 1, None, 3, None), PositionUpdate("t", 0, 10, 15, 7)],
                     new_spills=[SpillRecord("/s/a-1", "t", 0, 5)],
                     new_segments=[SegmentRecord("/seg/a-1", "t", "prediction", 0, 5, True)],
                     closed_upto={"t": 60_000})
    # nothing of a's checkpoint is there: not the other partition, files or clock
    assert set(a.positions("t")) == {0}
    assert a.positions("t")[0].next_offset == 25 and a.positions("t")[0].owner == "b"
    assert a.spills() == [] and a.segment_paths() == set() and a.closed_upto("t") is None
    # "no row yet" is refused once a row exists, whoever wrote it
    with pytest.raises(PositionConflict):
        a.checkpoint([PositionUpdate("t", 0, None, 30, None)])
    b.checkpoint([PositionUpdate("t", 0, 25, 40, 11)])
    assert a.positions("t")[0] == b.positions("t")[0]
    assert b.positions("t")[0].next_offset == 40 and b.positions("t")[0].max_ts_ms == 11
    assert a.positions("other") == {}


def test_groups_do_not_see_each_others_positions(where: Where) -> None:
    g1, g2 = opened(where, group_id="g1"), opened(where, group_id="g2")
    g1.checkpoint([PositionUpdate("t", 0, None, 10, None)])
    g2.checkpoint([PositionUpdate("t", 0, None, 99, None)])
    assert g1.positions("t")[0].next_offset == 10 and g2.positions("t")[0].next_offset == 99


def test_offsets_and_times_beyond_32_bits_survive(where: Where) -> None:
    s = opened(where)
    big = 2**40 + 7
    s.checkpoint([PositionUpdate("t", 0, None, big, 1_700_000_000_000)],
                 closed_upto={"t": 1_700_000_060_000})
    assert s.positions("t")[0].next_offset == big
    assert s.positions("t")[0].max_ts_ms == 1_700_000_000_000
    assert s.closed_upto("t") == 1_700_000_060_000


# -- the file registry and the closing point ---------------------------------------------


def test_spills_and_segments_are_registered_with_the_checkpoint_and_listed(where: Where) -> None:
    a, b = opened(where, "a"), opened(where, "b")
    a.checkpoint([], new_spills=[SpillRecord("/s/a-2", "t", 60_000, 4), SpillRecord("/s/a-1", "t", 0, 3)])
    b.checkpoint([], new_spills=[SpillRecord("/s/b-1", "t", 0, 8)])
    assert a.spills() == [SpillRecord("/s/a-1", "t", 0, 3), SpillRecord("/s/a-2", "t", 60_000, 4)]
    assert b.spills() == [SpillRecord("/s/b-1", "t", 0, 8)]
    assert a.all_spill_paths() == {"/s/a-1", "/s/a-2", "/s/b-1"}
    # window 0 finishes: its spill is consumed by the segment, in the same transaction
    a.checkpoint([], dropped_spills=["/s/a-1"],
                 new_segments=[SegmentRecord("/seg/t/a-0", "t", "prediction", 0, 3, True)])
    b.checkpoint([], dropped_spills=["/s/b-1"],
                 new_segments=[SegmentRecord("/seg/t/b-0", "t", "prediction", 0, 8, False),
                               SegmentRecord("/seg/u/b-0", "u", "feedback", 120_000, 1, True)])
    assert [s.path for s in a.spills()] == ["/s/a-2"] and b.spills() == []
    assert a.segment_paths() == {"/seg/t/a-0", "/seg/t/b-0", "/seg/u/b-0"}
    assert {s.path for s in a.segments("t")} == {"/seg/t/a-0", "/seg/t/b-0"}
    assert a.segments_of_window("t", 0) == [
        SegmentRecord("/seg/t/a-0", "t", "prediction", 0, 3, True),
        SegmentRecord("/seg/t/b-0", "t", "prediction", 0, 8, False)]
    assert a.segments_of_window("t", 60_000) == []
    assert a.segment_windows("u", None, 10**12) == [120_000]
    assert a.segment_windows("t", None, 10**12) == [0]
    assert a.segment_windows("t", 0, 10**12) == [] and a.segment_windows("t", -5, 0) == []
    # a path registered twice is an error, and the checkpoint carrying it changes nothing
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        a.checkpoint([PositionUpdate("t", 0, None, 1, None)],
                     new_segments=[SegmentRecord("/seg/t/a-0", "t", "prediction", 0, 3, True)])
    assert a.positions("t") == {}


def test_the_closing_point_only_moves_forward_per_instance(where: Where) -> None:
    a, b = opened(where, "a"), opened(where, "b")
    a.checkpoint([], closed_upto={"t": 120_000, "u": 60_000})
    a.checkpoint([], closed_upto={"t": 60_000})
    assert a.closed_upto("t") == 120_000 and a.closed_upto("u") == 60_000
    a.checkpoint([], closed_upto={"t": 180_000})
    assert a.closed_upto("t") == 180_000
    assert b.closed_upto("t") is None
    b.checkpoint([], closed_upto={"t": 60_000})
    assert b.closed_upto("t") == 60_000 and a.closed_upto("t") == 180_000


# -- the monitor's state, incidents and their log ----------------------------------------


def test_monitor_commits_move_values_incidents_and_events_together(where: Where) -> None:
    s = opened(where)
    s.commit_monitor(MonitorCommit(values={"progress": "1", "detector": '{"n": 1}'},
                                   incidents=(incident("i1", updated_ms=10),),
                                   events=(("i1", "opened", '{"e": 1}'),)))
    s.commit_monitor(MonitorCommit(values={"progress": "2"},
                                   incidents=(incident("i1", "resolved", 30), incident("i2", updated_ms=20)),
                                   events=(("i1", "resolved", '{"e": 2}'), ("i2", "opened", '{"e": 3}'))))
    assert s.monitor_value("progress") == "2" and s.monitor_value("detector") == '{"n": 1}'
    assert s.monitor_value("missing") is None
    assert [r.id for r in s.incidents()] == ["i1", "i2"]  # newest first
    assert [r.id for r in s.incidents(status="firing")] == ["i2"]
    assert s.incident("i1") == IncidentRow("i1", "fp-i1", "resolved", 1, 30, '{"id": "i1"}')
    assert s.incident("nope") is None
    log = s.incident_events()
    assert [(iid, tr, body) for _, iid, tr, _, body in log] == [
        ("i1", "opened", '{"e": 1}'), ("i1", "resolved", '{"e": 2}'), ("i2", "opened", '{"e": 3}')]
    seqs = [e[0] for e in log]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert s.incident_events(after_seq=seqs[0]) == log[1:]
    assert s.incident_events(after_seq=seqs[0], limit=1) == log[1:2]
    assert opened(where, group_id="other").incident_events() == []
    # a step that fails half-way leaves nothing behind (here: a NULL body is refused)
    broken = IncidentRow("i3", "fp", "firing", 1, 40, None)  # type: ignore[arg-type]
    with pytest.raises(Exception, match=r"(?i)null"):
        s.commit_monitor(MonitorCommit(values={"progress": "3"}, incidents=(broken,),
                                       events=(("i3", "opened", "{}"),)))
    assert s.monitor_value("progress") == "2" and s.incident_events() == log
    assert s.incident("i3") is None


def test_incident_log_sequence_is_not_reused_after_a_rollback(where: Where) -> None:
    s = opened(where)
    s.commit_monitor(MonitorCommit(events=(("i1", "opened", "{}"),)))
    with pytest.raises(Exception, match=r"(?i)null"):
        s.commit_monitor(MonitorCommit(events=(("i1", "resolved", None),)))  # type: ignore[arg-type]
    s.commit_monitor(MonitorCommit(events=(("i1", "resolved", "{}"),)))
    first, second = (e[0] for e in s.incident_events())
    assert second > first


# -- the alert outbox ------------------------------------------------------------------


def row(mid: str, sink: str, seq: int, created: int = 100) -> OutboxRow:
    return OutboxRow(mid, sink, seq, f"payload-{mid}", created, next_attempt_ms=created)


def test_outbox_fill_pending_update_depth_and_prune(where: Where) -> None:
    s = opened(where, "alerts")
    assert s.outbox_fill([row("m2", "hook", 2), row("m1", "hook", 1), row("s1", "slack", 1, 50)],
                         cursor_key="cursor", expected=None, upto=2)
    assert s.monitor_value("cursor") == "2"
    # a second dispatcher that read the cursor before the first filled is refused
    assert not s.outbox_fill([row("m9", "hook", 9)], cursor_key="cursor", expected=None, upto=9)
    assert not s.outbox_fill([row("m9", "hook", 9)], cursor_key="cursor", expected=1, upto=9)
    assert s.monitor_value("cursor") == "2" and "m9" not in {r.id for r in s.outbox_rows()}
    # the same events again: ids already there are kept as they are
    assert s.outbox_fill([row("m2", "hook", 2, created=999), row("m3", "hook", 3)],
                         cursor_key="cursor", expected=2, upto=3)
    assert [r.id for r in s.outbox_pending("hook", 10)] == ["m1", "m2", "m3"]
    assert s.outbox_pending("hook")[0] == row("m1", "hook", 1)
    assert next(r for r in s.outbox_rows("hook") if r.id == "m2").created_ms == 100
    assert s.outbox_depth() == {"hook": (3, 100), "slack": (1, 50)}

    s.outbox_update("m1", attempts=1, next_attempt_ms=500, last_error="HTTP 503")
    m1 = s.outbox_pending("hook")[0]
    assert (m1.attempts, m1.next_attempt_ms, m1.last_error, m1.delivered_ms) == (1, 500, "HTTP 503", None)
    s.outbox_update("m1", attempts=2, delivered_ms=600)
    s.outbox_update("s1", attempts=5, gave_up_ms=700, last_error="HTTP 400")
    m1 = next(r for r in s.outbox_rows() if r.id == "m1")
    assert (m1.attempts, m1.next_attempt_ms, m1.delivered_ms, m1.last_error) == (2, 500, 600, "HTTP 503")
    assert [r.id for r in s.outbox_pending("hook", 10)] == ["m2", "m3"]
    assert s.outbox_pending("slack") == []
    assert s.outbox_depth() == {"hook": (2, 100)}
    assert [(r.first_seq, r.sink) for r in s.outbox_rows()] == [(1, "hook"), (1, "slack"), (2, "hook"),
                                                                (3, "hook")]

    assert s.outbox_prune(650) == 1  # m1 finished at 600; s1 (700) is kept
    assert {r.id for r in s.outbox_rows()} == {"s1", "m2", "m3"}
    assert s.outbox_prune(10**13) == 1
    assert opened(where, "alerts", group_id="other").outbox_rows() == []


# -- several connections at once -----------------------------------------------------------


def test_two_connections_racing_for_a_partition_never_both_win(where: Where) -> None:
    stores = [opened(where, "a"), opened(where, "b")]
    stores[0].checkpoint([PositionUpdate("t", 0, None, 0, None)])
    wins = [0, 0]
    rounds = 40

    def race(i: int, barrier: threading.Barrier) -> None:
        for r in range(rounds):
            barrier.wait()
            try:
                stores[i].checkpoint([PositionUpdate("t", 0, r, r + 1, None)])
                wins[i] += 1
            except PositionConflict:
                pass
            barrier.wait()
            if stores[i].positions("t")[0].next_offset == r:  # both lost: impossible
                raise AssertionError(f"round {r}: nobody advanced the partition")

    barrier = threading.Barrier(2, timeout=30)
    threads = [threading.Thread(target=race, args=(i, barrier)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(wins) == rounds
    assert stores[0].positions("t")[0].next_offset == rounds


def test_concurrent_fills_of_the_outbox_let_exactly_one_through(where: Where) -> None:
    a, b = opened(where, "alerts"), opened(where, "alerts")
    results: list[bool] = []
    barrier = threading.Barrier(2, timeout=30)

    def fill(s: StateStore, mid: str) -> None:
        barrier.wait()
        results.append(s.outbox_fill([row(mid, "hook", 1)], cursor_key="c", expected=None, upto=1))

    threads = [threading.Thread(target=fill, args=(s, m)) for s, m in ((a, "x"), (b, "y"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [False, True]
    assert len(a.outbox_rows()) == 1


def test_a_reader_following_the_incident_log_misses_nothing_while_two_write(where: Where) -> None:
    """Sequence numbers must become visible in order, or a cursor skips some for ever."""
    writers = [opened(where, "w1"), opened(where, "w2")]
    reader = opened(where, "r")
    per_writer = 60
    done = threading.Event()
    seen: list[tuple[int, str]] = []

    def write(i: int) -> None:
        for n in range(per_writer):
            writers[i].commit_monitor(MonitorCommit(
                values={f"w{i}": str(n)}, events=((f"i{i}", "opened", f"{i}-{n}"),)))

    def read() -> None:
        cursor = 0
        while True:
            finished = done.is_set()
            for seq, _, _, _, body in reader.incident_events(after_seq=cursor):
                seen.append((seq, body))
                cursor = seq
            if finished:
                return

    threads = [threading.Thread(target=write, args=(i,)) for i in (0, 1)]
    r = threading.Thread(target=read)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    done.set()
    r.join(60)
    assert len(seen) == 2 * per_writer, "the reader skipped events"
    assert {b for _, b in seen} == {f"{i}-{n}" for i in (0, 1) for n in range(per_writer)}


# -- choosing the backend ------------------------------------------------------------------


def test_the_factory_opens_sqlite_for_a_path_and_for_a_config_without_url(tmp_path: Path) -> None:
    s = open_state_store(tmp_path / "x.db", group_id="g", instance="a")
    assert type(s) is StateStore and (tmp_path / "x.db").exists()
    s = open_state_store(str(tmp_path / "y.db"), group_id="g", instance="a")
    assert type(s) is StateStore and (tmp_path / "y.db").exists()
    cfg = StorageConfig(data_dir=str(tmp_path / "data"))
    s = open_state_store(cfg, group_id="g", instance="a")
    assert type(s) is StateStore and s.path == tmp_path / "data" / "state.db"
    with pytest.raises(TypeError, match="PostgreSQL"):
        open_state_store(tmp_path / "z.db", group_id="g", instance="a", statement_timeout_s=1)


@pytest.mark.mlflow
def test_the_factory_opens_postgresql_for_a_url_and_for_a_config_with_one(pg_url: str,
                                                                          tmp_path: Path) -> None:
    from connectors.state_pg import PostgresStateStore

    cfg = StorageConfig(data_dir=str(tmp_path), state_url=pg_url.replace("postgresql://",
                                                                         "postgresql+psycopg://"))
    s = open_state_store(cfg, group_id="g", instance="a")
    assert isinstance(s, PostgresStateStore) and isinstance(s, StateStore)
    s.checkpoint([PositionUpdate("t", 0, None, 5, None)])
    again = open_state_store(pg_url.replace("postgresql://", "postgres://"), group_id="g", instance="b")
    assert again.positions("t")[0].next_offset == 5
    assert not (tmp_path / "state.db").exists()


# -- PostgreSQL only: the connection -------------------------------------------------------


def _app(store: StateStore) -> str:
    return f"driftloop/{store.instance}"


@pytest.mark.mlflow
def test_a_connection_dropped_while_idle_is_replaced_without_an_error(pg_url: str) -> None:
    s = opened(pg_url, "idle-drop")
    s.checkpoint([PositionUpdate("t", 0, None, 5, None)])
    assert terminate_sessions(pg_url, _app(s)) == 1
    assert s.positions("t")[0].next_offset == 5  # a read: retried on a fresh connection
    assert terminate_sessions(pg_url, _app(s)) == 1
    # a transaction is never retried: it raises, clearly, and the next call reconnects
    with pytest.raises(StateStoreUnavailable, match="next call reconnects"):
        s.checkpoint([PositionUpdate("t", 0, 5, 9, None)])
    s.checkpoint([PositionUpdate("t", 0, 5, 9, None)])
    assert s.positions("t")[0].next_offset == 9


@pytest.mark.mlflow
def test_a_connection_lost_inside_a_checkpoint_changes_nothing(pg_url: str) -> None:
    s = opened(pg_url, "mid-drop")
    s.checkpoint([PositionUpdate("t", 0, None, 5, None)])
    real = s._db.executemany  # type: ignore[attr-defined]

    def cut_then_write(sql: str, rows: Any) -> None:
        terminate_sessions(pg_url, _app(s))
        real(sql, rows)

    s._db.executemany = cut_then_write  # type: ignore[attr-defined]
    with pytest.raises(StateStoreUnavailable):
        s.checkpoint([PositionUpdate("t", 0, 5, 9, None)], new_spills=[SpillRecord("/s/1", "t", 0, 1)])
    s._db.executemany = real  # type: ignore[attr-defined]
    assert s.positions("t")[0].next_offset == 5 and s.spills() == []


@pytest.mark.mlflow
def test_a_commit_whose_answer_is_lost_is_resolved_by_asking_the_server(pg_url: str) -> None:
    psycopg = psycopg_or_skip()
    s = opened(pg_url, "commit-drop")
    db = s._db  # type: ignore[attr-defined]
    real = db._commit

    def committed_then_cut(conn: Any) -> None:
        real(conn)  # durable on the server ...
        conn.close()  # ... but the client never hears so
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    db._commit = committed_then_cut
    s.checkpoint([PositionUpdate("t", 0, None, 5, None)])  # returns: the server says committed
    assert s.positions("t")[0].next_offset == 5

    def cut_before_commit(conn: Any) -> None:
        terminate_sessions(pg_url, _app(s))
        real(conn)

    db._commit = cut_before_commit
    with pytest.raises(StateStoreUnavailable, match="rolled back") as info:
        s.checkpoint([PositionUpdate("t", 0, 5, 9, None)])
    assert not isinstance(info.value, CommitOutcomeUnknown)
    db._commit = real
    assert s.positions("t")[0].next_offset == 5


@pytest.mark.mlflow
def test_a_commit_that_cannot_be_resolved_says_its_outcome_is_unknown(pg_url: str) -> None:
    psycopg = psycopg_or_skip()
    s = opened(pg_url, "unknown", commit_resolve_s=0.5)
    db = s._db  # type: ignore[attr-defined]
    real_commit, real_params = db._commit, dict(db._params)

    def commit_then_server_gone(conn: Any) -> None:
        real_commit(conn)
        conn.close()
        db._params["port"] = "1"  # nothing listens there: the server cannot be asked
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    db._commit = commit_then_server_gone
    with pytest.raises(CommitOutcomeUnknown, match="could not learn"):
        s.checkpoint([PositionUpdate("t", 0, None, 5, None)])
    db._commit, db._params = real_commit, real_params
    assert s.positions("t")[0].next_offset == 5  # it had committed: hence "unknown", not "failed"


@pytest.mark.mlflow
def test_a_checkpoint_blocked_by_another_replica_times_out(pg_url: str) -> None:
    psycopg = psycopg_or_skip()
    s = opened(pg_url, "blocked", statement_timeout_s=0.5)
    s.checkpoint([PositionUpdate("t", 0, None, 5, None)])
    with psycopg.connect(pg_url) as other:  # holds the row locked in an open transaction
        other.execute("UPDATE positions SET owner = 'other' WHERE topic = 't'")
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            s.checkpoint([PositionUpdate("t", 0, 5, 9, None)])
        assert time.monotonic() - t0 < 5
        other.rollback()
    s.checkpoint([PositionUpdate("t", 0, 5, 9, None)])
    assert s.positions("t")[0].next_offset == 9


@pytest.mark.mlflow
def test_an_unreachable_server_is_a_clear_error_without_the_password(pg_url: str) -> None:
    from connectors.state_pg import redact_url

    url = "postgresql://bob:s3cret@127.0.0.1:1/db"
    assert "s3cret" not in redact_url(url) and redact_url(url) == "postgresql://bob@127.0.0.1:1/db"
    with pytest.raises(StateStoreUnavailable, match="cannot connect") as info:
        open_state_store(url, group_id="g", instance="a", connect_timeout_s=2)
    assert "s3cret" not in str(info.value)


@pytest.mark.mlflow
def test_sessions_carry_timeouts_keepalives_and_an_application_name(pg_url: str) -> None:
    psycopg = psycopg_or_skip()
    s = opened(pg_url, "named", statement_timeout_s=7)
    conn = s._db.connection()  # type: ignore[attr-defined]
    assert conn.execute("SHOW statement_timeout").fetchone()[0] == "7s"
    assert conn.execute("SHOW idle_in_transaction_session_timeout").fetchone()[0] == "10s"
    assert conn.info.get_parameters()["application_name"] == "driftloop/named"
    assert conn.info.get_parameters().get("keepalives", "1") == "1"
    with psycopg.connect(pg_url) as admin:
        names = {r[0] for r in admin.execute("SELECT application_name FROM pg_stat_activity")}
    assert "driftloop/named" in names
    mine = opened(pg_url + "?application_name=mine", "x")
    assert mine._db.connection().info.get_parameters()["application_name"] == "mine"  # type: ignore[attr-defined]


# -- PostgreSQL only: the schema -----------------------------------------------------------


@pytest.mark.mlflow
def test_replicas_opening_a_new_database_at_once_all_get_the_schema(pg_url: str) -> None:
    errors: list[BaseException] = []
    stores: list[StateStore] = []
    barrier = threading.Barrier(6, timeout=30)

    def open_one(i: int) -> None:
        barrier.wait()
        try:
            stores.append(opened(pg_url, f"r{i}"))
        except BaseException as exc:  # collected: a thread's exception would be lost
            errors.append(exc)

    threads = [threading.Thread(target=open_one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(stores) == 6
    stores[0].checkpoint([PositionUpdate("t", 0, None, 1, None)])
    assert all(s.positions("t")[0].next_offset == 1 for s in stores)


@pytest.mark.mlflow
def test_a_role_without_create_uses_a_database_initialised_by_another(pg_url: str) -> None:
    psycopg = psycopg_or_skip()
    opened(pg_url, "owner").close()  # the schema, created by the owner
    role = f"app_{abs(hash(pg_url)) % 10**8}"
    dbname = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"REVOKE CREATE ON SCHEMA public FROM PUBLIC, {role}")
        admin.execute(f'GRANT CONNECT ON DATABASE "{dbname}" TO {role}')
        admin.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
    try:
        url = pg_url.replace("://driftloop@", f"://{role}@")
        s = opened(url, "app")
        s.checkpoint([PositionUpdate("t", 0, None, 3, None)])
        s.commit_monitor(MonitorCommit(events=(("i", "opened", "{}"),)))
        assert s.outbox_fill([row("m", "hook", 1)], cursor_key="c", expected=None, upto=1)
        assert len(s.incident_events()) == 1
        s.close()
        denied = pytest.raises(psycopg.errors.InsufficientPrivilege)
        with psycopg.connect(url, autocommit=True) as app, denied:
            app.execute("CREATE TABLE nope (x int)")
    finally:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")


# -- ingestion's exactly-once promise, with the positions in PostgreSQL ----------------------


def ingestor(tmp: Path, where: Where, dlq: MemoryDeadLetters, clock: Clock, instance: str = "a") -> Ingestor:
    from connectors.events import EventKind

    return Ingestor({P: EventKind.PREDICTION}, SPEC, state=opened(where, instance),
                    store=FeedbackStore(tmp / "store"), spills=SpillFiles(tmp / "spill"),
                    dead_letters=dlq, metrics=Metrics(), max_message_bytes=65536, clock_ms=clock)


def test_a_crash_between_checkpoints_replays_and_stores_each_row_once(tmp_path: Path, where: Where) -> None:
    clock, dlq = Clock(), MemoryDeadLetters()
    recs = stream(2_000)
    ing = ingestor(tmp_path, where, dlq, clock)
    ing.assign([(P, 0)])
    ing.ingest(P, [(0, recs[:700])])
    ing.checkpoint()
    ing.ingest(P, [(0, recs[700:1_300])])  # never checkpointed: the process "dies"
    ing.state.close()

    ing2 = ingestor(tmp_path, where, dlq, clock)
    assert ing2.assign([(P, 0)]) == {(P, 0): 700}
    ing2.ingest(P, [(0, recs[700:])])
    clock.now += SPEC.idle_timeout_ms
    ing2.checkpoint()
    ids = stored_ids(tmp_path)
    assert len(ids) == 2_000 and len(set(ids)) == 2_000


def test_a_crash_inside_the_checkpoint_transaction_leaves_no_trace(tmp_path: Path, where: Where) -> None:
    clock, dlq = Clock(), MemoryDeadLetters()
    recs = stream(1_500)
    ing = ingestor(tmp_path, where, dlq, clock)
    ing.assign([(P, 0)])
    ing.ingest(P, [(0, recs[:500])])
    ing.checkpoint()
    ing.ingest(P, [(0, recs[500:])])
    real = ing.state._db.executemany  # type: ignore[attr-defined]

    def die(sql: str, rows: Any) -> None:
        real(sql, rows)
        if "segments" in sql:  # positions, spills and segments written, not committed
            raise KeyboardInterrupt("kill -9 inside the state-store transaction")

    ing.state._db.executemany = die  # type: ignore[attr-defined]
    clock.now += SPEC.idle_timeout_ms
    with pytest.raises(KeyboardInterrupt):
        ing.checkpoint()
    ing.state.close()

    ing2 = ingestor(tmp_path, where, dlq, clock)
    assert ing2.assign([(P, 0)]) == {(P, 0): 500}
    ing2.ingest(P, [(0, recs[500:])])
    clock.now += SPEC.idle_timeout_ms
    ing2.checkpoint()
    ids = stored_ids(tmp_path)
    assert len(ids) == 1_500 and len(set(ids)) == 1_500


def test_a_zombie_replica_cannot_write_a_duplicate(tmp_path: Path, where: Where) -> None:
    clock = Clock()
    a = ingestor(tmp_path, where, MemoryDeadLetters(), clock, "a")
    b = ingestor(tmp_path, where, MemoryDeadLetters(), clock, "b")
    recs = stream(1_000)
    a.assign([(P, 0)])
    a.ingest(P, [(0, recs[:400])])
    a.checkpoint()
    a.ingest(P, [(0, recs[400:])])
    assert b.assign([(P, 0)]) == {(P, 0): 400}  # a stalls; b gets the partition
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


# -- leadership epochs ------------------------------------------------------------------------


def test_a_leader_whose_epoch_is_over_cannot_commit_and_its_successor_can(where: Where) -> None:
    old, new, follower = opened(where, "r0"), opened(where, "r1"), opened(where, "r2")
    assert old.leader_epoch() is None
    first = old.take_leadership("r0")
    old.fence(first)
    old.commit_monitor(MonitorCommit(values={"drift_upto": "1"}, incidents=(incident("i1"),),
                                     events=(("i1", "firing", "{}"),)))
    old.check_fence()
    # r0 pauses past its lock's timeout; r1 takes the lock and a new epoch.
    second = new.take_leadership("r1")
    new.fence(second)
    assert second == first + 1 and follower.leader_epoch() == (second, "r1")
    with pytest.raises(FencedOut, match=rf"epoch {first} .* epoch {second} was taken by r1"):
        old.commit_monitor(MonitorCommit(values={"drift_upto": "2"}, incidents=(incident("i2"),),
                                         events=(("i2", "firing", "{}"),)))
    with pytest.raises(FencedOut):
        old.check_fence()
    # Nothing of the refused step landed: not its pointer, incident or event.
    assert follower.monitor_value("drift_upto") == "1"
    assert [r.id for r in follower.incidents()] == ["i1"] and len(follower.incident_events()) == 1
    new.commit_monitor(MonitorCommit(values={"drift_upto": "2"}))
    follower.commit_monitor(MonitorCommit(values={"ref/x": "y"}))  # unfenced: not a decision
    assert follower.monitor_value("drift_upto") == "2"
    # Another group's epochs are its own.
    other = opened(where, "r0", group_id="other")
    assert other.take_leadership("r0") == 1
    for s in (old, new, follower, other):
        s.close()
