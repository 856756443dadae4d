"""The job tracker and its SQLite store (retrain/jobs.py), over real processes."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from retrain.jobs import JobEvent, JobRecord, JobTracker, SqliteJobStore, SqlJobStore
from retrain.launch import JobStatus, LaunchError, LocalLauncher, _group_alive, _proc_info
from retrain.policy import PolicySpec, RetrainPolicy
from retrain.spec import JobSpec, Trigger
from tests.pg_fixtures import fresh_database, terminate_sessions

REPO = Path(__file__).resolve().parents[1]


def make_spec(job_id: str = "job-1", *, budget_s: float = 1800.0, model: str = "ctr",
              **params: object) -> JobSpec:
    trigger = Trigger(kind="incident", model=model, reason="AUC dropped", at_ms=0,
                      incident_id="performance_drop/ctr/auc@0", incident_kind="performance_drop")
    return JobSpec(job_id=job_id, model=model, base_version="3", data_start_ms=0, data_end_ms=3_600_000,
                   store="/data/feedback", tracking_uri="http://mlflow:5000", trigger=trigger,
                   params=params, budget_s=budget_s)


class FakeClock:
    def __init__(self, t: float = 1_767_225_600.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def tracker(tmp_path: Path, clock: Callable[[], float] = time.time, *, launcher: Any = None,
            margin: float = 60.0, store: SqliteJobStore | None = None) -> JobTracker:
    return JobTracker(store or SqliteJobStore(tmp_path / "state.db"),
                      launcher or LocalLauncher(module="tests.fake_jobs", cwd=REPO, grace_s=0.3),
                      workdir=tmp_path / "jobs", clock=clock, timeout_margin_s=margin)


def poll_until_event(t: JobTracker, timeout_s: float = 15.0) -> list[JobEvent]:
    deadline = time.monotonic() + timeout_s
    while True:
        events = t.poll()
        if events:
            return events
        assert time.monotonic() < deadline, "no job finished in time"
        time.sleep(0.05)


def test_success_is_recorded_with_its_result_and_reported_once(tmp_path: Path) -> None:
    t = tracker(tmp_path)
    rec = t.start(make_spec(behaviour="succeed", sleep_s=0.2, model_version="8"))
    assert rec.state == "running" and rec.handle is not None and rec.handle["launcher"] == "local"
    assert JobSpec.from_json((tmp_path / "jobs" / "job-1" / "spec.json").read_text()) == rec.spec
    assert t.running("ctr") == 1 and t.running("other") == 0
    (event,) = poll_until_event(t)
    assert (event.job_id, event.state, event.failed) == ("job-1", "succeeded", False)
    assert event.result is not None and event.result["model_version"] == "8"
    assert event.trigger.incident_id == "performance_drop/ctr/auc@0"
    assert t.poll() == []
    stored = t.store.get("job-1")
    assert stored is not None and stored.state == "succeeded" and stored.exit_code == 0
    assert stored.result == event.result and stored.finished_ms is not None
    assert t.running("ctr") == 0


def test_a_crash_is_reported_failed_with_the_log_tail(tmp_path: Path) -> None:
    t = tracker(tmp_path)
    t.start(make_spec(behaviour="crash"))
    (event,) = poll_until_event(t)
    assert event.failed and event.state == "failed"
    assert "killed by SIGKILL" in event.reason and "about to be killed" in event.reason


def test_a_hang_past_its_budget_is_cancelled_and_timed_out(tmp_path: Path) -> None:
    clock = FakeClock()
    t = tracker(tmp_path, clock, margin=5.0)
    rec = t.start(make_spec(behaviour="hang", ignore_term=True, budget_s=10.0))
    child_file = tmp_path / "jobs" / "job-1" / "child.pid"
    deadline = time.monotonic() + 10
    while not child_file.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pgid = rec.handle["pgid"] if rec.handle else None
    assert isinstance(pgid, int) and _group_alive(pgid)
    clock.t += 14.9
    assert t.poll() == [] and _group_alive(pgid)
    clock.t += 0.2
    (event,) = t.poll()
    assert event.state == "timed_out" and event.failed
    assert event.reason.startswith("ran 15 s, past its budget of 10 s + 5 s margin: cancelled")
    assert "hanging with child" in event.reason  # the log tail
    assert not _group_alive(pgid)
    child = _proc_info(int(child_file.read_text()))
    assert child is None or child.state == "Z"  # a zombie until init reaps it
    stored = t.store.get("job-1")
    assert stored is not None and stored.state == "timed_out"


def test_a_restarted_daemon_reattaches_a_running_job_and_sees_it_finish(tmp_path: Path) -> None:
    # The "daemon" is a separate process that starts the job and exits: the job is
    # then nobody's child here, as after a real restart.
    daemon = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from retrain.jobs import JobTracker, SqliteJobStore
        from retrain.launch import LocalLauncher
        from tests.test_jobs import make_spec
        t = JobTracker(SqliteJobStore(Path({str(tmp_path / "state.db")!r})),
                       LocalLauncher(module="tests.fake_jobs", cwd=Path({str(REPO)!r})),
                       workdir=Path({str(tmp_path / "jobs")!r}), clock=time.time)
        print(t.start(make_spec(behaviour="succeed", sleep_s=1.5, model_version="21")).handle["pid"])
    """)
    out = subprocess.run([sys.executable, "-c", daemon], cwd=REPO, capture_output=True, text=True,
                         timeout=30, check=True)
    pid = int(out.stdout.split()[-1])
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # not our child
    t = tracker(tmp_path)
    (resumed,) = t.resume()
    assert resumed.job_id == "job-1" and resumed.state == "running"
    assert t.poll() == []  # still running
    assert t.running("ctr") == 1
    (event,) = poll_until_event(t)
    assert event.state == "succeeded" and event.result is not None and event.result["model_version"] == "21"
    assert event.exit_code is None  # nobody's child: the result is the evidence


def test_a_restart_within_the_same_process_also_reattaches(tmp_path: Path) -> None:
    store_path = tmp_path / "state.db"
    first = tracker(tmp_path, store=SqliteJobStore(store_path))
    first.start(make_spec(behaviour="succeed", sleep_s=0.5))
    second = tracker(tmp_path, store=SqliteJobStore(store_path))
    assert [r.job_id for r in second.resume()] == ["job-1"]
    (event,) = poll_until_event(second)
    assert event.state == "succeeded" and event.exit_code == 0  # reaped by waitpid
    assert second.poll() == []  # handed out once per tracker
    # Until its outcome is durable, the job's end is anybody's to report (a leader that
    # died holding the event): then nobody's.
    assert [e.job_id for e in first.poll()] == ["job-1"]
    second.reported(["job-1"])
    assert first.poll() == [] and tracker(tmp_path, store=SqliteJobStore(store_path)).poll() == []
    first._handles["job-1"].poll()  # let the first tracker's Popen learn its child was reaped


def test_a_recycled_pid_after_restart_is_lost_not_running(tmp_path: Path) -> None:
    t = tracker(tmp_path)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                                start_new_session=True)
    try:
        spec = make_spec()
        handle = {"launcher": "local", "job_id": "job-1", "pid": stranger.pid, "pgid": stranger.pid,
                  "start_ticks": 12345, "boot_id": None, "started_ms": 0,
                  "result_path": str(tmp_path / "jobs" / "job-1" / "result.json"),
                  "log_path": str(tmp_path / "jobs" / "job-1" / "job.log")}
        t.store.insert(JobRecord(job_id="job-1", model="ctr", state="running", spec=spec, handle=handle,
                                 started_ms=int(time.time() * 1000)))
        t.resume()
        (event,) = t.poll()
        assert event.state == "lost" and event.failed
        assert f"process {stranger.pid} is gone" in event.reason
        assert stranger.poll() is None  # the stranger was not signalled
    finally:
        stranger.kill()
        stranger.wait()


def test_a_job_recorded_but_never_launched_is_lost(tmp_path: Path) -> None:
    t = tracker(tmp_path)
    t.store.insert(JobRecord(job_id="job-1", model="ctr", state="pending", spec=make_spec(), handle=None,
                             started_ms=0))
    (event,) = t.poll()
    assert event.state == "lost" and "while launching" in event.reason


class BrokenLauncher:
    def launch(self, spec: JobSpec, spec_path: Path, log_path: Path) -> Any:
        msg = "the cluster said 403 Forbidden"
        raise LaunchError(msg)

    def attach(self, job_id: str, record: Any) -> Any:
        raise AssertionError


def test_a_failed_launch_is_a_failed_job_that_counts_for_the_cooldown(tmp_path: Path) -> None:
    clock = FakeClock()
    t = tracker(tmp_path, clock, launcher=BrokenLauncher())
    rec = t.start(make_spec())
    assert rec.state == "failed" and "403 Forbidden" in rec.reason
    (event,) = t.poll()
    assert event.state == "failed" and event.reason == "launch failed: the cluster said 403 Forbidden"
    assert t.last_started_ms("ctr") == int(clock.t * 1000)
    assert t.jobs_since(0) == (1, 0.0)


class FlakyHandle:
    """A handle whose poll and cancel fail like an unreachable cluster API."""

    def __init__(self) -> None:
        self.polls = 0
        self.fail_poll = True
        self.fail_cancel = True
        self.cancelled: str | None = None

    @property
    def job_id(self) -> str:
        return "job-1"

    def poll(self) -> JobStatus:
        self.polls += 1
        if self.fail_poll:
            raise ConnectionError("API server unreachable")
        return JobStatus(state="running")

    def cancel(self, reason: str) -> None:
        if self.fail_cancel:
            raise ConnectionError("API server unreachable")
        self.cancelled = reason

    def record(self) -> dict[str, Any]:
        return {"launcher": "flaky"}


class FlakyLauncher:
    def __init__(self) -> None:
        self.handle = FlakyHandle()

    def launch(self, spec: JobSpec, spec_path: Path, log_path: Path) -> FlakyHandle:
        return self.handle

    def attach(self, job_id: str, record: Any) -> FlakyHandle:
        return self.handle


def test_transient_poll_and_cancel_failures_keep_the_job_running(tmp_path: Path) -> None:
    clock = FakeClock()
    launcher = FlakyLauncher()
    t = tracker(tmp_path, clock, launcher=launcher, margin=0)
    t.start(make_spec(budget_s=10))
    clock.t += 60
    assert t.poll() == [] and t.running("ctr") == 1  # poll failed: nothing decided
    launcher.handle.fail_poll = False
    assert t.poll() == [] and t.running("ctr") == 1  # cancel failed: it may still run
    launcher.handle.fail_cancel = False
    (event,) = t.poll()
    assert event.state == "timed_out" and launcher.handle.cancelled is not None


def test_operator_cancel(tmp_path: Path) -> None:
    t = tracker(tmp_path)
    t.start(make_spec(behaviour="hang"))
    assert t.cancel("job-1", "wrong data window, by ana")
    assert not t.cancel("job-1", "again")
    (event,) = t.poll()
    assert event.state == "failed" and event.reason == "cancelled: wrong data window, by ana"


def test_duplicate_job_ids_are_refused(tmp_path: Path) -> None:
    t = tracker(tmp_path, launcher=BrokenLauncher())
    t.start(make_spec())
    with pytest.raises(ValueError, match="'job-1' already exists"):
        t.start(make_spec())


def test_running_last_started_and_budget_usage(tmp_path: Path) -> None:
    clock = FakeClock(1000.0)
    launcher = FlakyLauncher()
    launcher.handle.fail_poll = False
    t = tracker(tmp_path, clock, launcher=launcher)
    assert t.last_started_ms("ctr") is None and t.jobs_since(0) == (0, 0.0)
    t.start(make_spec("a"))
    clock.t += 100
    t.store.finish("a", state="succeeded", finished_ms=int(clock.t * 1000), reason="ok")
    clock.t += 50
    t.start(make_spec("b"))
    t.start(make_spec("c", model="other"))
    clock.t += 30
    assert t.running("ctr") == 1 and t.running("other") == 1
    assert t.last_started_ms("ctr") == 1_150_000
    assert t.jobs_since(0) == (3, 100.0 + 30 + 30)
    assert t.jobs_since(0, model="ctr") == (2, 130.0)
    assert t.jobs_since(1_150_000) == (2, 60.0)


def test_the_tracker_feeds_the_policy(tmp_path: Path) -> None:
    clock = FakeClock()
    launcher = FlakyLauncher()
    launcher.handle.fail_poll = False
    t = tracker(tmp_path, clock, launcher=launcher)
    policy = RetrainPolicy(PolicySpec())
    trigger = make_spec().trigger

    def decide() -> str:
        now = int(clock.t * 1000)
        jobs, seconds = t.jobs_since(policy.budget_since_ms(now))
        d = policy.decide(trigger, now_ms=now, severity="critical", running=t.running("ctr"),
                          last_started_ms=t.last_started_ms("ctr"), fresh_labels=9000,
                          jobs_today=jobs, seconds_today=seconds)
        t.store.record_decision(d, job_id="job-1" if d.launch else None)  # type: ignore[attr-defined]
        if d.launch:
            t.start(make_spec())
        return d.code

    assert decide() == "launched"
    clock.t += 60
    assert decide() == "running"
    store = t.store
    assert isinstance(store, SqliteJobStore)
    rows = store.decisions(10)
    assert [r.decision.code for r in rows] == ["running", "launched"]
    assert rows[1].job_id == "job-1" and rows[0].job_id is None
    assert rows[0].decision.trigger == trigger


def test_decisions_keep_every_answer_newest_first_and_prune(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "state.db")
    policy = RetrainPolicy(PolicySpec())
    trig = Trigger(kind="manual", model="ctr", reason="r", at_ms=0, who="ana")
    for i, labels in enumerate([10, 9000, 20]):
        store.record_decision(policy.decide(trig, now_ms=i * 1000, severity=None, running=0,
                                            last_started_ms=None, fresh_labels=labels, jobs_today=0,
                                            seconds_today=0.0))
    rows = store.decisions(2)
    assert [r.decision.at_ms for r in rows] == [2000, 1000]
    assert [r.decision.code for r in rows] == ["too_few_labels", "launched"]
    assert rows[0].decision.reason.startswith("too_few_labels: 20 fresh")
    assert store.decisions(10, model="other") == []
    assert store.prune_decisions(1000) == 1 and len(store.decisions(10)) == 2
    # Another deployment on the same file sees none of it.
    assert SqliteJobStore(tmp_path / "state.db", group_id="other").decisions(10) == []


def test_store_round_trips_records_and_finishes_once(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "state.db")
    rec = JobRecord(job_id="j", model="ctr", state="running", spec=make_spec("j"), handle={"pid": 1},
                    started_ms=5)
    store.insert(rec)
    assert store.get("j") == rec and store.active() == [rec]
    assert store.finish("j", state="failed", finished_ms=9, reason="x", exit_code=2, result={"a": 1})
    assert not store.finish("j", state="succeeded", finished_ms=10, reason="y")
    got = store.get("j")
    assert got is not None and (got.state, got.reason, got.exit_code, got.result) == ("failed", "x", 2,
                                                                                         {"a": 1})
    assert [r.job_id for r in store.unreported()] == ["j"]
    assert [r.job_id for r in store.unreported()] == ["j"]  # until marked
    store.mark_reported(["j"])
    assert store.unreported() == []
    with pytest.raises(ValueError, match="'done'"):
        store.finish("j", state="done", finished_ms=1, reason="")
    with pytest.raises(ValueError, match="finish"):
        store.update("j", state="failed")
    with pytest.raises(ValueError, match="does not match its spec"):
        JobRecord(job_id="k", model="ctr", state="running", spec=make_spec("j"), handle=None, started_ms=0)


def _store_contract(store: SqlJobStore) -> None:
    """What the tracker and the promotion gate rely on, on either database."""
    a = JobRecord(job_id="a", model="ctr", state="pending", spec=make_spec("a"), handle=None,
                  started_ms=1_800_000_000_000)  # a millisecond time: past 32 bits
    store.insert(a)
    with pytest.raises(ValueError, match="already exists"):
        store.insert(a)
    store.update("a", state="running", handle={"pid": 7})
    got = store.get("a")
    assert got is not None and got.state == "running" and got.handle == {"pid": 7}
    b = dataclasses.replace(a, job_id="b", state="running", spec=make_spec("b"), started_ms=a.started_ms + 1)
    store.insert(b)
    assert [r.job_id for r in store.active()] == ["a", "b"]
    assert [r.job_id for r in store.jobs(limit=1)] == ["b"] and len(store.jobs()) == 2
    assert store.last_started_ms("ctr") == b.started_ms and store.last_started_ms("other") is None
    assert store.finish("a", state="succeeded", finished_ms=a.started_ms + 5, reason="ok",
                        result={"model_version": "3"})
    assert store.finish("b", state="failed", finished_ms=a.started_ms + 9, reason="boom")
    assert [r.job_id for r in store.unreported()] == ["a", "b"]  # in the order they ended
    store.mark_reported(["a"])
    assert [r.job_id for r in store.unreported()] == ["b"]
    # Only a success waits for the gate, reported or not.
    assert [r.job_id for r in store.ungated()] == ["a"]
    store.mark_gated("a")
    assert store.ungated() == []
    policy = RetrainPolicy(PolicySpec())
    trig = Trigger(kind="manual", model="ctr", reason="r", at_ms=0, who="ana")
    ids = [store.record_decision(policy.decide(trig, now_ms=a.started_ms + i, severity=None, running=0,
                                               last_started_ms=None, fresh_labels=9000, jobs_today=0,
                                               seconds_today=0.0), job_id="a")
           for i in range(2)]
    assert ids[1] > ids[0] and [r.id for r in store.decisions(5)] == ids[::-1]


def test_the_store_on_sqlite(tmp_path: Path) -> None:
    store = SqlJobStore(tmp_path / "jobs.db")
    _store_contract(store)
    assert store.path == tmp_path / "jobs.db"


@pytest.mark.mlflow  # the PostgreSQL fixture
def test_the_store_on_postgresql_is_shared_by_every_replica(postgres_uri: str) -> None:
    with fresh_database(postgres_uri) as url:
        store = SqlJobStore(url, group_id="g")
        _store_contract(store)
        other = SqlJobStore(url, group_id="g")  # the next leader's connection
        assert [r.job_id for r in other.unreported()] == ["b"] and store.path is None
        assert SqlJobStore(url, group_id="another").jobs() == []
        for s in (store, other):
            s.close()


def test_a_file_from_before_the_gate_queue_counts_its_old_jobs_as_gated(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE retrain_jobs (job_id TEXT PRIMARY KEY, group_id TEXT NOT NULL, model TEXT NOT NULL,
            state TEXT NOT NULL, spec TEXT NOT NULL, handle TEXT, started_ms INTEGER NOT NULL,
            finished_ms INTEGER, reason TEXT NOT NULL DEFAULT '', exit_code INTEGER, result TEXT,
            reported INTEGER NOT NULL DEFAULT 0);
    """)
    db.execute("INSERT INTO retrain_jobs VALUES ('old', 'driftloop', 'ctr', 'succeeded', ?, NULL, 1, 2, "
               "'', 0, ?, 1)", (make_spec("old").to_json(), '{"model_version": "1"}'))
    db.commit()
    db.close()
    store = SqlJobStore(path)
    assert store.ungated() == [] and store.get("old") is not None
    store.insert(JobRecord(job_id="new", model="ctr", state="running", spec=make_spec("new"), handle=None,
                           started_ms=3))
    store.finish("new", state="succeeded", finished_ms=4, reason="", result={"model_version": "2"})
    assert [r.job_id for r in store.ungated()] == ["new"]


@pytest.mark.mlflow  # the PostgreSQL fixture
def test_the_store_reconnects_after_postgresql_dropped_its_connection(postgres_uri: str) -> None:
    """A restart or failover of PostgreSQL between two retraining steps costs nothing."""
    with fresh_database(postgres_uri) as url:
        store = SqlJobStore(url, group_id="g")
        store.insert(JobRecord(job_id="a", model="ctr", state="running", spec=make_spec("a"),
                               handle=None, started_ms=1))
        terminate_sessions(url, application_name="driftloop-jobs")
        assert [r.job_id for r in store.active()] == ["a"]  # a fresh connection
        store.mark_reported(["a"])  # a transaction on it too
        store.close()
