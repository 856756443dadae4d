"""Cron triggers for retraining, persisted so schedules and missed runs survive restarts.

:class:`RetrainSchedule` wraps an APScheduler 3.x ``BackgroundScheduler`` whose job
store is SQL (SQLite by default): each model's cron is one scheduler job, ``retrain:<model>``,
and the store keeps its expression and next run time. After a restart the scheduler
finds a run that fell due while the daemon was down and, if it is no later than
``misfire_grace_time``, fires it once (``coalesce``: one run for however many were
missed); older ones are skipped and the schedule carries on.

APScheduler pickles a job's callable into the store as a textual reference, so the
callable is the module-level :func:`fire`, not a bound method of a live object. It
finds the live ``on_trigger`` in a module-level registry keyed by the schedule's
name. A fire turns into ``on_trigger(Trigger(kind="schedule", ...))`` and goes
through the retraining policy like any trigger: the cron asks, the policy decides.

Cron expressions are crontab's, five fields (``minute hour day month weekday``),
``@daily``-style macros, or six with a leading seconds field (as Quartz and Spring
write it; the tests use it). Two places where APScheduler 3's ``CronTrigger`` differs
from cron are translated here, because an operator writes crontab and means crontab:

* weekdays: crontab's 0 (and 7) is Sunday, APScheduler's 0 is Monday, so ``0 3 * * 0``
  through ``CronTrigger.from_crontab`` runs on Mondays;
* day of month and weekday both restricted: cron runs when *either* matches,
  APScheduler when both do (an ``OrTrigger`` of the two restores cron's meaning).
"""

from __future__ import annotations

import logging
import threading
import time
import zoneinfo
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_STOPPED
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger

from retrain.spec import Trigger

__all__ = ["FIRE_REF", "RetrainSchedule", "cron_trigger", "fire"]

log = logging.getLogger(__name__)

#: What the job store records as the callable of every retraining schedule.
FIRE_REF = "retrain.schedule:fire"

_MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
           "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
           "@hourly": "0 * * * *"}
_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")

#: Live targets by schedule name: (on_trigger, clock). Guarded by _LOCK: fire() runs
#: on scheduler threads.
_TARGETS: dict[str, tuple[Callable[[Trigger], None], Callable[[], float]]] = {}
_LOCK = threading.Lock()


class _Scheduler(BackgroundScheduler):  # type: ignore[misc]
    """APScheduler's BackgroundScheduler minus one more round of job processing after shutdown.

    Its loop checks for shutdown only after processing: ``shutdown()`` wakes the thread,
    which then submits every due job to the executors just stopped (the submission
    fails) and moves the job's next run time on anyway. A run missed while the daemon
    was down and found at that moment (a daemon that stopped before :meth:`start`)
    would be lost without ever firing.
    """

    def _process_jobs(self) -> float | None:
        if self.state == STATE_STOPPED:
            return None
        result: float | None = super()._process_jobs()
        return result


def _job_id(model: str) -> str:
    return f"retrain:{model}"


def _day_number(token: str) -> int:
    t = token.lower()
    if t in _DAY_NAMES:
        return _DAY_NAMES.index(t)
    if not t.isdigit() or not 0 <= int(t) <= 7:
        msg = f"weekday {token!r} is not 0-7 or sun-sat"
        raise ValueError(msg)
    return int(t) % 7  # crontab: 7 is Sunday as well as 0


def _weekdays(field: str) -> str:
    """A crontab weekday field as APScheduler day names (``1-5`` -> ``mon,tue,wed,thu,fri``)."""
    if field in ("*", "?"):
        return "*"
    days: set[int] = set()
    for item in field.split(","):
        rng, _, step_s = item.partition("/")
        step = 1
        if step_s:
            if not step_s.isdigit() or int(step_s) < 1:
                msg = f"weekday step {step_s!r} is not a positive integer"
                raise ValueError(msg)
            step = int(step_s)
        if rng == "*":
            lo, hi = 0, 6
        elif "-" in rng:
            a, b = rng.split("-", 1)
            lo, hi = _day_number(a), _day_number(b)
            if b == "7":  # "5-7": Friday to Sunday
                hi = 7
            if hi < lo:
                msg = f"weekday range {rng!r} runs backwards"
                raise ValueError(msg)
        else:
            lo = hi = _day_number(rng)
            if step_s:  # "1/2": from Monday, every other day
                hi = 6
        days.update(d % 7 for d in range(lo, hi + 1, step))
    # APScheduler's own order (mon first) keeps the rendered field stable.
    return ",".join(_DAY_NAMES[d] for d in (1, 2, 3, 4, 5, 6, 0) if d in days)


def cron_trigger(expression: str, timezone: str = "UTC") -> BaseTrigger:
    """The APScheduler trigger for a crontab ``expression`` (crontab's meaning, see the module doc).

    Raises:
        ValueError: the expression or the time zone is invalid (APScheduler's message).

    Example:
        >>> import datetime as dt
        >>> t = cron_trigger("0 3 * * 0")  # Sundays at 03:00
        >>> t.get_next_fire_time(None, dt.datetime(2026, 1, 1, tzinfo=dt.UTC)).strftime("%a %H:%M")
        'Sun 03:00'
    """
    text = _MACROS.get(expression.strip().lower(), expression)
    fields = text.split()
    if len(fields) == 5:
        second = "0"
    elif len(fields) == 6:
        second, fields = fields[0], fields[1:]
    else:
        msg = (f"expected 5 fields (minute hour day month weekday) or 6 (with seconds first), "
               f"got {len(fields)}")
        raise ValueError(msg)
    minute, hour, day, month, weekday = fields
    try:
        tz = zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        msg = f"unknown time zone {timezone!r}"
        raise ValueError(msg) from exc

    def cron(day: str, day_of_week: str) -> CronTrigger:
        return CronTrigger(second=second, minute=minute, hour=hour, day=day, month=month,
                           day_of_week=day_of_week, timezone=tz)

    days = _weekdays(weekday)
    if day not in ("*", "?") and days != "*":
        return OrTrigger([cron(day, "*"), cron("*", days)])
    return cron(day, days)


def fire(schedule: str, model: str, expression: str, timezone: str = "UTC") -> None:
    """The scheduled callable (module level: the job store holds it as :data:`FIRE_REF`).

    Routes the run to the live ``on_trigger`` of the schedule named ``schedule``; a
    run for a schedule nobody in this process owns is logged and dropped.
    """
    with _LOCK:
        target = _TARGETS.get(schedule)
    if target is None:
        log.warning("cron fired for a schedule no one listens to", extra={"fields": {
            "schedule": schedule, "model": model, "expression": expression}})
        return
    on_trigger, clock = target
    reason = f"cron {expression}" if timezone == "UTC" else f"cron {expression} ({timezone})"
    trigger = Trigger(kind="schedule", model=model, reason=reason, at_ms=int(clock() * 1000))
    try:
        on_trigger(trigger)
    except Exception:
        # The scheduler would log it too, without the model; the schedule stays.
        log.exception("retraining trigger handler failed", extra={"fields": {"model": model}})


class RetrainSchedule:
    """Per-model cron schedules in a persistent job store.

    The job store is opened when the object is made (the scheduler starts paused), so
    :meth:`set_cron` is durable at once and :meth:`next_run_ms` reads what is stored;
    nothing fires before :meth:`start`.

    ``on_trigger`` runs on a scheduler thread: hand the trigger to the daemon's loop
    (a queue) rather than deciding there.

    Args:
        jobstore_url: a SQLAlchemy URL, e.g. ``sqlite:////var/lib/driftloop/schedule.sqlite``
            or the PostgreSQL state database.
        on_trigger: called with each schedule trigger.
        clock: seconds since the epoch, for the triggers' ``at_ms``.
        name: this schedule's key in the routing registry; one live schedule per name
            per process.
        misfire_grace_time: a run missed (the daemon was down) by at most this many
            seconds still happens once on start; older ones are skipped.
        tablename: the job store's table.

    Example:
        >>> import tempfile, pathlib
        >>> url = f"sqlite:///{pathlib.Path(tempfile.mkdtemp()) / 'schedule.sqlite'}"
        >>> s = RetrainSchedule(url, on_trigger=print)
        >>> s.set_cron("ctr", "0 3 * * *")
        >>> s.crons()
        {'ctr': ('0 3 * * *', 'UTC')}
        >>> s.shutdown()
    """

    def __init__(self, jobstore_url: str, on_trigger: Callable[[Trigger], None],
                 clock: Callable[[], float] = time.time, *, name: str = "default",
                 misfire_grace_time: int = 3600, tablename: str = "driftloop_schedule") -> None:
        if misfire_grace_time < 1:
            msg = f"misfire_grace_time must be >= 1 s, got {misfire_grace_time}"
            raise ValueError(msg)
        if not name:
            msg = "a schedule needs a non-empty name"
            raise ValueError(msg)
        self.name = name
        self.misfire_grace_time = misfire_grace_time
        self._on_trigger = on_trigger
        self._clock = clock
        _ensure_sqlite_dir(jobstore_url)
        self._scheduler = _Scheduler(
            jobstores={"default": SQLAlchemyJobStore(url=jobstore_url, tablename=tablename)},
            # One run at a time, and one thread is plenty: fire() only hands over a trigger.
            executors={"default": {"type": "threadpool", "max_workers": 1}},
            timezone="UTC")
        with _LOCK:
            _TARGETS[name] = (on_trigger, clock)
        self._scheduler.start(paused=True)
        self._started = False

    def set_cron(self, model: str, expression: str, timezone: str = "UTC") -> None:
        """Add or replace the model's schedule.

        Raises:
            ValueError: the expression or time zone is invalid; the message names the
                model and the expression.
        """
        if not model:
            msg = "set_cron needs a model name"
            raise ValueError(msg)
        try:
            trigger = cron_trigger(expression, timezone)
        except ValueError as exc:
            msg = f"invalid cron expression {expression!r} for model {model!r}: {exc}"
            raise ValueError(msg) from exc
        self._scheduler.add_job(
            FIRE_REF, trigger=trigger, args=[self.name, model, expression, timezone], id=_job_id(model),
            name=f"retrain {model}", replace_existing=True, coalesce=True,
            max_instances=1, misfire_grace_time=self.misfire_grace_time)
        log.info("retraining schedule set", extra={"fields": {"model": model, "cron": expression,
                                                              "timezone": timezone}})

    def remove(self, model: str) -> bool:
        """Drop the model's schedule; False when it had none."""
        if self._scheduler.get_job(_job_id(model)) is None:
            return False
        self._scheduler.remove_job(_job_id(model))
        return True

    def next_run_ms(self, model: str) -> int | None:
        """When the model's schedule fires next (epoch ms); None without one."""
        job = self._scheduler.get_job(_job_id(model))
        if job is None or job.next_run_time is None:
            return None
        return int(job.next_run_time.timestamp() * 1000)

    def crons(self) -> dict[str, tuple[str, str]]:
        """Every model's (expression, time zone), for /status."""
        out: dict[str, tuple[str, str]] = {}
        for job in self._scheduler.get_jobs():
            if job.id.startswith("retrain:") and job.func_ref == FIRE_REF:
                _, model, expression, timezone = job.args
                out[model] = (expression, timezone)
        return out

    def start(self) -> None:
        """Begin firing (missed runs within the grace time fire now, once each)."""
        if not self._started:
            self._scheduler.resume()
            self._started = True

    def shutdown(self, wait: bool = True) -> None:
        """Stop the scheduler (``wait``: let a running fire finish); the store keeps the schedules."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=wait)
        with _LOCK:
            if _TARGETS.get(self.name, (None, None))[0] is self._on_trigger:
                del _TARGETS[self.name]

    def __enter__(self) -> RetrainSchedule:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _ensure_sqlite_dir(url: str) -> None:
    # SQLite creates the file but not its directory; a fresh /var/lib/driftloop would
    # otherwise fail with "unable to open database file".
    if url.startswith("sqlite:///"):
        from sqlalchemy.engine import make_url

        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
