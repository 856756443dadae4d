"""The job tracker: starts training jobs, watches them, times them out, survives restarts.

The daemon runs one :class:`JobTracker` (docs/retraining.md), on the leader when
several replicas run. :meth:`JobTracker.start` writes the spec where the job will
read it, launches it and persists what is needed to find it again;
:meth:`JobTracker.poll`, called every few seconds, polls every unfinished job,
cancels one that overran its budget, and hands out each job that ended as a
:class:`JobEvent` (the daemon raises an incident for a failure).

What is persisted is the truth, not what is in memory: a job's final state is
written once, by compare-and-set from an unfinished state. An ended job stays
*unreported* until whoever handled its event says the outcome is durable
(:meth:`JobTracker.reported`, once the incident is committed): a daemon that
crashes, or a leader that dies, anywhere between a job's end and that point hands the
event out again after the restart or on the next leader, and handling it twice is
harmless (the incident is already firing, or already resolved). A succeeded job
also waits, in the store, for the promotion gate (:meth:`SqlJobStore.ungated`), so a
challenger is gated even when the process that saw its job end is gone. After a
restart, :meth:`JobTracker.resume` re-attaches every unfinished job through the
launcher; one that cannot be found any more is ``lost`` (a failure too: nobody
knows what it did).

:class:`SqlJobStore` keeps the jobs and the policy's decisions on the state store's
database: the SQLite file of a single daemon, or the PostgreSQL database a cluster
shares, so that the next leader sees every job the last one started.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from connectors.sql import SqlDb
from retrain.launch import FINAL_STATES, JOB_STATES, JobHandle, JobStatus, Launcher, log_tail
from retrain.policy import Decision
from retrain.spec import JobSpec, Trigger

__all__ = ["DecisionRow", "JobEvent", "JobRecord", "JobStore", "JobTracker", "SqlJobStore",
           "SqliteJobStore"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class JobRecord:
    """One job as persisted.

    Args:
        job_id, model: from the spec.
        state: one of :data:`retrain.launch.JOB_STATES`.
        spec: what was run.
        handle: the launcher's record (None until the launch returned).
        started_ms: when the tracker started it (its clock); the budget counts from here.
        finished_ms, reason, exit_code, result: once it ended.
    """

    job_id: str
    model: str
    state: str
    spec: JobSpec
    handle: Mapping[str, Any] | None
    started_ms: int
    finished_ms: int | None = None
    reason: str = ""
    exit_code: int | None = None
    result: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.state not in JOB_STATES:
            msg = f"job {self.job_id}: state must be one of {JOB_STATES}, got {self.state!r}"
            raise ValueError(msg)
        if self.job_id != self.spec.job_id or self.model != self.spec.model:
            msg = (f"job record {self.job_id}/{self.model} does not match its spec "
                   f"{self.spec.job_id}/{self.spec.model}")
            raise ValueError(msg)

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


@dataclasses.dataclass(frozen=True)
class JobEvent:
    """A job that ended, reported once: what the daemon turns into an incident or a log line."""

    job_id: str
    model: str
    state: str
    reason: str
    started_ms: int
    finished_ms: int | None
    exit_code: int | None
    result: Mapping[str, Any] | None
    trigger: Trigger

    @property
    def failed(self) -> bool:
        """Anything but success: failed, timed out and lost all need a person to look."""
        return self.state != "succeeded"

    @classmethod
    def of(cls, r: JobRecord) -> JobEvent:
        return cls(job_id=r.job_id, model=r.model, state=r.state, reason=r.reason,
                   started_ms=r.started_ms, finished_ms=r.finished_ms, exit_code=r.exit_code,
                   result=r.result, trigger=r.spec.trigger)


@dataclasses.dataclass(frozen=True)
class DecisionRow:
    """A stored policy decision: its row id, the decision and the job it started, if any."""

    id: int
    decision: Decision
    job_id: str | None


class JobStore(Protocol):
    """The persistence the tracker needs (implemented by :class:`SqlJobStore`)."""

    def insert(self, record: JobRecord) -> None:
        """Add a new job; ValueError when its id exists."""
        ...

    def update(self, job_id: str, *, state: str, handle: Mapping[str, Any] | None = None) -> None:
        """Move an unfinished job to ``state`` (pending or running), setting its handle if given."""
        ...

    def finish(self, job_id: str, *, state: str, finished_ms: int, reason: str,
               exit_code: int | None = None, result: Mapping[str, Any] | None = None) -> bool:
        """Record the final state, only if the job is unfinished; True when this call did."""
        ...

    def unreported(self) -> list[JobRecord]:
        """Finished jobs whose outcome nobody has made durable yet, oldest first."""
        ...

    def mark_reported(self, job_ids: Iterable[str]) -> None:
        """Their outcomes are durable: never hand them out again."""
        ...

    def get(self, job_id: str) -> JobRecord | None: ...

    def active(self) -> list[JobRecord]:
        """Unfinished (pending or running) jobs, oldest first."""
        ...

    def jobs(self, *, model: str | None = None, since_ms: int | None = None,
             limit: int | None = None) -> list[JobRecord]:
        """Jobs started at or after ``since_ms``, newest first."""
        ...

    def last_started_ms(self, model: str) -> int | None: ...


_TABLES = """
CREATE TABLE IF NOT EXISTS retrain_jobs (
    job_id TEXT PRIMARY KEY,
    group_id TEXT NOT NULL,
    model TEXT NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    handle TEXT,
    started_ms {int} NOT NULL,
    finished_ms {int},
    reason TEXT NOT NULL DEFAULT '',
    exit_code INTEGER,
    result TEXT,
    reported INTEGER NOT NULL DEFAULT 0,
    gated INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS retrain_jobs_state ON retrain_jobs (group_id, state);
CREATE INDEX IF NOT EXISTS retrain_jobs_model ON retrain_jobs (group_id, model, started_ms);
CREATE TABLE IF NOT EXISTS retrain_decisions (
    id {serial},
    group_id TEXT NOT NULL,
    at_ms {int} NOT NULL,
    model TEXT NOT NULL,
    launch INTEGER NOT NULL,
    code TEXT NOT NULL,
    reason TEXT NOT NULL,
    trigger TEXT NOT NULL,
    job_id TEXT
);
CREATE INDEX IF NOT EXISTS retrain_decisions_at ON retrain_decisions (group_id, at_ms);
"""
_SQLITE = _TABLES.format(int="INTEGER", serial="INTEGER PRIMARY KEY AUTOINCREMENT")
_POSTGRES = _TABLES.format(int="BIGINT", serial="BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")

_COLUMNS = "job_id, model, state, spec, handle, started_ms, finished_ms, reason, exit_code, result"
_UNFINISHED = ("pending", "running")


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _dumps(value: Mapping[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(dict(value), sort_keys=True, default=str)


class SqlJobStore:
    """Jobs and decisions on the state store's database.

    Args:
        location: the SQLite file (created with its tables when missing), or the
            ``postgresql://`` URL of the database every replica of a cluster shares.
        group_id: the daemon deployment these jobs belong to (the Kafka consumer group):
            two deployments sharing a database never see each other's jobs.

    Example:
        >>> import tempfile, pathlib
        >>> s = SqlJobStore(pathlib.Path(tempfile.mkdtemp()) / "jobs.db")
        >>> s.active()
        []
    """

    def __init__(self, location: str | Path, *, group_id: str = "driftloop") -> None:
        self.location = location
        self.group_id = group_id
        self._db = SqlDb(location, sqlite_schema=_SQLITE, postgres_schema=_POSTGRES,
                         name="driftloop-jobs")
        if not self._db.postgres:
            self._migrate_sqlite()

    def _migrate_sqlite(self) -> None:
        # Files from before the gate queue: their succeeded jobs were gated in memory
        # by the process that saw them end, so they count as gated.
        columns = {r[1] for r in self._db.rows("PRAGMA table_info(retrain_jobs)")}
        if "gated" not in columns:
            self._db.execute("ALTER TABLE retrain_jobs ADD COLUMN gated INTEGER NOT NULL DEFAULT 1")

    @property
    def path(self) -> Path | None:
        """The SQLite file, None on PostgreSQL."""
        return None if self._db.postgres else Path(self.location)

    def close(self) -> None:
        self._db.close()

    # -- jobs ----------------------------------------------------------------------------

    def _record(self, row: tuple[Any, ...]) -> JobRecord:
        job_id, model, state, spec, handle, started, finished, reason, exit_code, result = row
        return JobRecord(job_id=job_id, model=model, state=state, spec=JobSpec.from_json(spec),
                         handle=_loads(handle), started_ms=int(started),
                         finished_ms=None if finished is None else int(finished), reason=reason,
                         exit_code=exit_code, result=_loads(result))

    def insert(self, record: JobRecord) -> None:
        # ON CONFLICT DO NOTHING and a row count, not the driver's integrity error:
        # both dialects say the same thing the same way.
        added = self._db.execute(
            "INSERT INTO retrain_jobs (job_id, group_id, model, state, spec, handle, started_ms, "
            "finished_ms, reason, exit_code, result, gated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0) "
            "ON CONFLICT (job_id) DO NOTHING",
            (record.job_id, self.group_id, record.model, record.state, record.spec.to_json(),
             _dumps(record.handle), record.started_ms, record.finished_ms, record.reason,
             record.exit_code, _dumps(record.result)))
        if added != 1:
            msg = f"job {record.job_id!r} already exists"
            raise ValueError(msg)

    def update(self, job_id: str, *, state: str, handle: Mapping[str, Any] | None = None) -> None:
        if state not in _UNFINISHED:
            msg = f"update moves a job to pending or running, got {state!r}: use finish()"
            raise ValueError(msg)
        self._db.execute(
            "UPDATE retrain_jobs SET state = ?, handle = coalesce(?, handle) WHERE group_id = ? "
            "AND job_id = ? AND state IN ('pending', 'running')",
            (state, _dumps(handle), self.group_id, job_id))

    def finish(self, job_id: str, *, state: str, finished_ms: int, reason: str,
               exit_code: int | None = None, result: Mapping[str, Any] | None = None) -> bool:
        if state not in FINAL_STATES:
            msg = f"finish needs a final state ({sorted(FINAL_STATES)}), got {state!r}"
            raise ValueError(msg)
        # Compare-and-set from an unfinished state: the first writer wins, so a final
        # state is written once however many pollers saw the job end.
        return self._db.execute(
            "UPDATE retrain_jobs SET state = ?, finished_ms = ?, reason = ?, exit_code = ?, result = ? "
            "WHERE group_id = ? AND job_id = ? AND state IN ('pending', 'running')",
            (state, finished_ms, reason, exit_code, _dumps(result), self.group_id, job_id)) == 1

    def unreported(self) -> list[JobRecord]:
        return [self._record(r) for r in self._db.rows(
            f"SELECT {_COLUMNS} FROM retrain_jobs WHERE group_id = ? AND reported = 0 AND "
            "state NOT IN ('pending', 'running') ORDER BY finished_ms, job_id", (self.group_id,))]

    def mark_reported(self, job_ids: Iterable[str]) -> None:
        self._db.executemany("UPDATE retrain_jobs SET reported = 1 WHERE group_id = ? AND job_id = ?",
                             [(self.group_id, j) for j in job_ids])

    def ungated(self) -> list[JobRecord]:
        """Succeeded jobs whose challenger the promotion gate has not decided on, oldest first."""
        return [self._record(r) for r in self._db.rows(
            f"SELECT {_COLUMNS} FROM retrain_jobs WHERE group_id = ? AND gated = 0 AND "
            "state = 'succeeded' ORDER BY finished_ms, job_id", (self.group_id,))]

    def mark_gated(self, job_id: str) -> None:
        self._db.execute("UPDATE retrain_jobs SET gated = 1 WHERE group_id = ? AND job_id = ?",
                         (self.group_id, job_id))

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._db.rows(f"SELECT {_COLUMNS} FROM retrain_jobs WHERE group_id = ? AND job_id = ?",
                             (self.group_id, job_id))
        return self._record(rows[0]) if rows else None

    def active(self) -> list[JobRecord]:
        return [self._record(r) for r in self._db.rows(
            f"SELECT {_COLUMNS} FROM retrain_jobs WHERE group_id = ? AND state IN ('pending', 'running') "
            "ORDER BY started_ms, job_id", (self.group_id,))]

    def jobs(self, *, model: str | None = None, since_ms: int | None = None,
             limit: int | None = None) -> list[JobRecord]:
        sql = f"SELECT {_COLUMNS} FROM retrain_jobs WHERE group_id = ?"
        args: list[object] = [self.group_id]
        if model is not None:
            sql += " AND model = ?"
            args.append(model)
        if since_ms is not None:
            sql += " AND started_ms >= ?"
            args.append(since_ms)
        sql += " ORDER BY started_ms DESC, job_id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [self._record(r) for r in self._db.rows(sql, args)]

    def last_started_ms(self, model: str) -> int | None:
        rows = self._db.rows("SELECT max(started_ms) FROM retrain_jobs WHERE group_id = ? AND model = ?",
                             (self.group_id, model))
        return None if not rows or rows[0][0] is None else int(rows[0][0])

    # -- decisions -------------------------------------------------------------------------

    def record_decision(self, decision: Decision, *, job_id: str | None = None) -> int:
        """Keep one policy decision, "no" included, for /status and audits; returns its id."""
        rows = self._db.rows(
            "INSERT INTO retrain_decisions (group_id, at_ms, model, launch, code, reason, trigger, job_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (self.group_id, decision.at_ms, decision.trigger.model, int(decision.launch), decision.code,
             decision.reason, json.dumps(decision.trigger.to_dict(), sort_keys=True), job_id))
        return int(rows[0][0])

    def decisions(self, limit: int = 100, *, model: str | None = None) -> list[DecisionRow]:
        """The latest decisions, newest first."""
        sql = ("SELECT id, at_ms, launch, code, reason, trigger, job_id FROM retrain_decisions "
               "WHERE group_id = ?")
        args: list[object] = [self.group_id]
        if model is not None:
            sql += " AND model = ?"
            args.append(model)
        sql += " ORDER BY at_ms DESC, id DESC LIMIT ?"
        args.append(limit)
        return [DecisionRow(id=int(i), job_id=job_id, decision=Decision(
            launch=bool(launch), code=code, reason=reason, at_ms=int(at),
            trigger=Trigger.from_dict(json.loads(trigger))))
            for i, at, launch, code, reason, trigger, job_id in self._db.rows(sql, args)]

    def prune_decisions(self, before_ms: int) -> int:
        """Forget decisions older than ``before_ms`` (an incident storm writes one per window)."""
        return self._db.execute("DELETE FROM retrain_decisions WHERE group_id = ? AND at_ms < ?",
                                (self.group_id, before_ms))


#: The name the store had while it was SQLite only.
SqliteJobStore = SqlJobStore


class _Unattachable:
    """Stands in for a handle the launcher could not re-attach: it polls as lost."""

    def __init__(self, job_id: str, reason: str) -> None:
        self._job_id = job_id
        self._reason = reason

    @property
    def job_id(self) -> str:
        return self._job_id

    def poll(self) -> JobStatus:
        return JobStatus(state="lost", reason=self._reason)

    def cancel(self, reason: str) -> None:
        return None

    def record(self) -> dict[str, Any]:
        return {}


class JobTracker:
    """Starts, watches and times out training jobs; one per daemon, used from one thread.

    Args:
        store: where jobs are persisted.
        launcher: how they run.
        workdir: a directory per job (``<job_id>/spec.json``, ``job.log``,
            ``result.json``); on shared storage when the launcher runs jobs elsewhere.
        clock: seconds since the epoch (``time.time``; tests pass a fake).
        timeout_margin_s: a job is cancelled ``budget_s + timeout_margin_s`` after it
            started. The job watches its own budget (it stops training at 80 % of it to
            leave time to register); the margin is for it to finish that cleanly.

    Example:
        >>> import tempfile, pathlib, time
        >>> from retrain.launch import LocalLauncher
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> t = JobTracker(SqliteJobStore(d / "jobs.db"), LocalLauncher(), workdir=d, clock=time.time)
        >>> t.poll(), t.running("ctr"), t.jobs_since(0)
        ([], 0, (0, 0.0))
    """

    def __init__(self, store: JobStore, launcher: Launcher, *, workdir: Path,
                 clock: Callable[[], float], timeout_margin_s: float = 60.0) -> None:
        if timeout_margin_s < 0:
            msg = f"timeout_margin_s must be >= 0, got {timeout_margin_s}"
            raise ValueError(msg)
        self.store = store
        self.launcher = launcher
        self.workdir = Path(workdir)
        self.clock = clock
        self.timeout_margin_s = timeout_margin_s
        self._handles: dict[str, JobHandle] = {}
        #: Events handed out by this tracker and not yet acknowledged (`reported`).
        self._handed: set[str] = set()

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def job_dir(self, job_id: str) -> Path:
        return self.workdir / job_id

    def start(self, spec: JobSpec) -> JobRecord:
        """Write the spec, launch the job, persist it; returns the record.

        The record is persisted (pending) before the launch, so a daemon that dies
        during the launch leaves a trace that :meth:`resume` reports as lost instead of
        a job nobody knows about. A launch that fails makes the job ``failed`` at once
        (reported by the next :meth:`poll`, like any failure); it still counts as a
        start for the cooldown and the budget, which keeps a broken launcher from
        being retried on every trigger.

        Raises:
            ValueError: a job with this id exists.
        """
        if self.store.get(spec.job_id) is not None:
            msg = f"job {spec.job_id!r} already exists"
            raise ValueError(msg)
        job_dir = self.job_dir(spec.job_id)
        job_dir.mkdir(parents=True, exist_ok=True)
        spec_path = job_dir / "spec.json"
        tmp = spec_path.with_name("spec.json.tmp")
        tmp.write_text(spec.to_json())
        os.replace(tmp, spec_path)
        log_path = job_dir / "job.log"
        record = JobRecord(job_id=spec.job_id, model=spec.model, state="pending", spec=spec,
                           handle=None, started_ms=self._now_ms())
        self.store.insert(record)
        try:
            handle = self.launcher.launch(spec, spec_path, log_path)
        except Exception as exc:
            reason = f"launch failed: {exc}"
            log.error("job launch failed", extra={"fields": {"job_id": spec.job_id, "error": str(exc)}})
            now = self._now_ms()
            self.store.finish(spec.job_id, state="failed", finished_ms=now, reason=reason)
            return dataclasses.replace(record, state="failed", reason=reason, finished_ms=now)
        self._handles[spec.job_id] = handle
        self.store.update(spec.job_id, state="running", handle=handle.record())
        log.info("job launched", extra={"fields": {"job_id": spec.job_id, "model": spec.model,
                                                   "trigger": spec.trigger.kind}})
        return dataclasses.replace(record, state="running", handle=handle.record())

    def _handle(self, record: JobRecord) -> JobHandle:
        handle = self._handles.get(record.job_id)
        if handle is None:
            if record.handle is None:
                handle = _Unattachable(record.job_id, "the daemon stopped while launching the job; "
                                                      "nothing was recorded to find it by")
            else:
                try:
                    handle = self.launcher.attach(record.job_id, record.handle)
                except (LookupError, ValueError) as exc:
                    handle = _Unattachable(record.job_id, f"cannot re-attach: {exc}")
            self._handles[record.job_id] = handle
        return handle

    def resume(self) -> list[JobRecord]:
        """Re-attach every unfinished job (call once after the daemon starts); returns them.

        Attaching only rebuilds handles; whether each job still runs, ended while the
        daemon was away, or is lost is found by the next :meth:`poll`.
        """
        active = self.store.active()
        for record in active:
            self._handle(record)
        if active:
            log.info("jobs re-attached", extra={"fields": {"jobs": [r.job_id for r in active]}})
        return active

    def poll(self) -> list[JobEvent]:
        """Poll every unfinished job; return the ended jobs this tracker has not handed
        out yet (each once per tracker: until `reported`, the next leader's tracker hands
        it out again)."""
        for record in self.store.active():
            handle = self._handle(record)
            try:
                status = handle.poll()
            except Exception as exc:
                # A transient failure (the cluster API away): try again next time. The
                # timeout still applies once polling works again.
                log.warning("cannot poll job", extra={"fields": {"job_id": record.job_id,
                                                                 "error": repr(exc)}})
                continue
            now = self._now_ms()
            if status.finished:
                self._finish(record, status.state, status.reason, now, status)
                continue
            limit_s = record.spec.budget_s + self.timeout_margin_s
            elapsed_s = (now - record.started_ms) / 1000
            if elapsed_s >= limit_s:
                reason = (f"ran {elapsed_s:.0f} s, past its budget of {record.spec.budget_s:g} s + "
                          f"{self.timeout_margin_s:g} s margin: cancelled")
                try:
                    handle.cancel(reason)
                except Exception as exc:
                    # Not marked timed out while it may still hold the GPU: the policy
                    # would start another job beside it.
                    log.error("cannot cancel job past its budget", extra={"fields": {
                        "job_id": record.job_id, "error": repr(exc)}})
                    continue
                tail = log_tail(self.job_dir(record.job_id) / "job.log")
                self._finish(record, "timed_out", f"{reason}; log tail:\n{tail}" if tail else reason,
                             self._now_ms(), status)
                continue
            if status.state != record.state:
                self.store.update(record.job_id, state=status.state)
        events = []
        for r in self.store.unreported():
            if r.job_id not in self._handed:
                self._handed.add(r.job_id)
                events.append(JobEvent.of(r))
        return events

    def reported(self, job_ids: Iterable[str]) -> None:
        """The outcomes of these handed-out events are durable (the incident committed):
        the store never hands them out again, to this tracker or the next leader's."""
        ids = list(job_ids)
        self.store.mark_reported(ids)
        self._handed.difference_update(ids)

    def _finish(self, record: JobRecord, state: str, reason: str, now: int, status: JobStatus) -> None:
        self._handles.pop(record.job_id, None)
        if self.store.finish(record.job_id, state=state, finished_ms=now, reason=reason,
                             exit_code=status.exit_code, result=status.result):
            level = logging.INFO if state == "succeeded" else logging.WARNING
            log.log(level, "job finished", extra={"fields": {"job_id": record.job_id, "state": state,
                                                             "reason": reason.splitlines()[0]}})

    def cancel(self, job_id: str, reason: str) -> bool:
        """Stop a job at a person's request; it ends ``failed``. False if it was not running."""
        record = self.store.get(job_id)
        if record is None or record.finished:
            return False
        self._handle(record).cancel(reason)
        self._finish(record, "failed", f"cancelled: {reason}", self._now_ms(), JobStatus(state="failed"))
        return True

    def running(self, model: str) -> int:
        """Unfinished (pending or running) jobs of ``model``: the policy's ``running``."""
        return sum(1 for r in self.store.active() if r.model == model)

    def last_started_ms(self, model: str) -> int | None:
        """When the model's latest job started, whatever became of it (the cooldown's anchor)."""
        return self.store.last_started_ms(model)

    def jobs_since(self, since_ms: int, *, model: str | None = None) -> tuple[int, float]:
        """Jobs started at or after ``since_ms`` and their wall time in seconds (running: so far).

        The policy's budget inputs; ``model`` None counts every model, the shared GPU pool.
        """
        now = self._now_ms()
        jobs = self.store.jobs(model=model, since_ms=since_ms)
        seconds = sum(max(0, (r.finished_ms if r.finished_ms is not None else now) - r.started_ms)
                      for r in jobs) / 1000
        return len(jobs), float(seconds)
