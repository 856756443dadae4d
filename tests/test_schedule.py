"""Cron schedules (retrain/schedule.py): a real BackgroundScheduler over a SQLite job store."""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from retrain import schedule as schedule_mod
from retrain.schedule import FIRE_REF, RetrainSchedule, cron_trigger, fire
from retrain.spec import Trigger
from tests.pg_fixtures import fresh_database

JAN_1 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)  # a Thursday


class Collector:
    def __init__(self) -> None:
        self.triggers: list[Trigger] = []
        self.event = threading.Event()

    def __call__(self, trigger: Trigger) -> None:
        self.triggers.append(trigger)
        self.event.set()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A file for one daemon; the cluster's PostgreSQL database, as
    `monitor.retraining.schedule_store_url` gives it, for several replicas."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'var' / 'schedule.sqlite'}"
        return
    with fresh_database(request.getfixturevalue("postgres_uri")) as pg:
        yield "postgresql+psycopg://" + pg.split("://", 1)[1]


@pytest.fixture
def opened() -> Iterator[list[RetrainSchedule]]:
    schedules: list[RetrainSchedule] = []
    yield schedules
    for s in schedules:
        s.shutdown(wait=False)


def make(url: str, opened: list[RetrainSchedule], on_trigger: Collector | None = None,
         **kw: object) -> RetrainSchedule:
    s = RetrainSchedule(url, on_trigger or Collector(), clock=lambda: 1_767_225_600.0, **kw)  # type: ignore[arg-type]
    opened.append(s)
    return s


def next_fires(expression: str, n: int = 4, timezone: str = "UTC") -> list[str]:
    t = cron_trigger(expression, timezone)
    out, now = [], JAN_1
    for _ in range(n):
        now = t.get_next_fire_time(None, now + dt.timedelta(seconds=1))
        out.append(now.strftime("%a %d %H:%M"))
    return out


def test_a_schedule_survives_a_restart_with_its_next_run(url: str, opened: list[RetrainSchedule]) -> None:
    first = make(url, opened)
    first.set_cron("ctr", "0 3 * * *")
    first.set_cron("news", "30 4 * * 1-5", timezone="Europe/Berlin")
    nxt = first.next_run_ms("ctr")
    assert nxt is not None and dt.datetime.fromtimestamp(nxt / 1000, dt.UTC).strftime("%H:%M") == "03:00"
    first.shutdown()
    second = make(url, opened)
    assert second.next_run_ms("ctr") == nxt
    assert second.crons() == {"ctr": ("0 3 * * *", "UTC"), "news": ("30 4 * * 1-5", "Europe/Berlin")}
    job = second._scheduler.get_job("retrain:ctr")
    assert job is not None and job.func_ref == FIRE_REF  # a textual reference, not a pickled object
    assert (job.coalesce, job.max_instances, job.misfire_grace_time) == (True, 1, 3600)


def test_set_cron_replaces_and_remove_drops(url: str, opened: list[RetrainSchedule]) -> None:
    s = make(url, opened)
    s.set_cron("ctr", "0 3 * * *")
    s.set_cron("ctr", "0 5 * * *")
    assert s.crons() == {"ctr": ("0 5 * * *", "UTC")}
    assert s.remove("ctr") and not s.remove("ctr")
    assert s.next_run_ms("ctr") is None and s.crons() == {}


def test_a_seconds_cron_really_fires_a_schedule_trigger(url: str, opened: list[RetrainSchedule]) -> None:
    got = Collector()
    s = make(url, opened, got)
    s.set_cron("ctr", "* * * * * *")  # six fields: every second
    s.start()
    assert got.event.wait(5), "the schedule did not fire"
    t = got.triggers[0]
    assert (t.kind, t.model, t.reason, t.at_ms) == ("schedule", "ctr", "cron * * * * * *", 1_767_225_600_000)


def test_a_run_missed_while_down_fires_once_on_start(url: str, opened: list[RetrainSchedule]) -> None:
    first = make(url, opened)
    first.set_cron("ctr", "0 3 * * *")
    # As if the daemon had been down over several due times: the stored next run is past.
    # The first schedule is shut down without ever starting: APScheduler 3 alone would
    # consume the due run in its last round after shutdown (retrain/schedule.py, _Scheduler).
    past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=20)
    first._scheduler.modify_job("retrain:ctr", next_run_time=past)
    first.shutdown()
    got = Collector()
    second = make(url, opened, got)
    second.start()
    assert got.event.wait(5), "the missed run did not fire"
    time.sleep(0.3)
    assert len(got.triggers) == 1  # coalesced
    nxt = second.next_run_ms("ctr")
    assert nxt is not None and nxt > time.time() * 1000


def test_a_run_missed_beyond_the_grace_time_is_skipped(url: str, opened: list[RetrainSchedule]) -> None:
    first = make(url, opened, misfire_grace_time=60)
    first.set_cron("ctr", "0 3 * * *")
    first._scheduler.modify_job("retrain:ctr", next_run_time=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))
    first.shutdown()
    got = Collector()
    second = make(url, opened, got, misfire_grace_time=60)
    second.start()
    time.sleep(0.5)
    assert got.triggers == []
    nxt = second.next_run_ms("ctr")
    assert nxt is not None and nxt > time.time() * 1000


@pytest.mark.parametrize("expression, needle", [
    ("61 * * * *", "61"),
    ("* * *", "got 3"),
    ("every day", "got 2"),
    ("0 3 * * 8", "'8'"),
    ("0 3 * * 5-1", "backwards"),
])
def test_invalid_expressions_name_the_model_and_the_expression(url: str, opened: list[RetrainSchedule],
                                                               expression: str, needle: str) -> None:
    s = make(url, opened)
    expected = re.escape(f"invalid cron expression '{expression}' for model 'ctr'")
    with pytest.raises(ValueError, match=expected) as info:
        s.set_cron("ctr", expression)
    assert needle in str(info.value)
    assert s.crons() == {}


def test_an_unknown_time_zone_is_refused(url: str, opened: list[RetrainSchedule]) -> None:
    with pytest.raises(ValueError, match="'Mars/Olympus'"):
        make(url, opened).set_cron("ctr", "0 3 * * *", timezone="Mars/Olympus")


def test_the_module_level_callable_routes_to_the_live_schedule(url: str,
                                                                opened: list[RetrainSchedule]) -> None:
    got = Collector()
    make(url, opened, got, name="route-test")
    fire("route-test", "ctr", "0 3 * * *", "Europe/Berlin")
    assert got.triggers[0].reason == "cron 0 3 * * * (Europe/Berlin)"
    fire("nobody", "ctr", "0 3 * * *")  # logged and dropped
    assert len(got.triggers) == 1
    opened[-1].shutdown()
    assert "route-test" not in schedule_mod._TARGETS


@pytest.mark.parametrize("expression, expected", [
    # crontab's Sunday is 0 (and 7); APScheduler's from_crontab would read Monday.
    ("0 3 * * 0", ["Sun 04 03:00", "Sun 11 03:00", "Sun 18 03:00", "Sun 25 03:00"]),
    ("0 3 * * 7", ["Sun 04 03:00", "Sun 11 03:00", "Sun 18 03:00", "Sun 25 03:00"]),
    ("0 3 * * 1-5", ["Thu 01 03:00", "Fri 02 03:00", "Mon 05 03:00", "Tue 06 03:00"]),
    ("0 3 * * */2", ["Thu 01 03:00", "Sat 03 03:00", "Sun 04 03:00", "Tue 06 03:00"]),
    ("0 3 * * fri-7", ["Fri 02 03:00", "Sat 03 03:00", "Sun 04 03:00", "Fri 09 03:00"]),
    # Day of month and weekday both restricted: either matches, as in cron.
    ("0 3 2 * 1", ["Fri 02 03:00", "Mon 05 03:00", "Mon 12 03:00", "Mon 19 03:00"]),
    ("@daily", ["Fri 02 00:00", "Sat 03 00:00", "Sun 04 00:00", "Mon 05 00:00"]),
    ("*/30 3 1 1 *", ["Thu 01 03:00", "Thu 01 03:30"]),
])
def test_cron_expressions_mean_what_they_mean_in_crontab(expression: str, expected: list[str]) -> None:
    assert next_fires(expression, len(expected)) == expected


def test_time_zones_shift_the_fire_time() -> None:
    t = cron_trigger("0 3 * * *", "America/New_York")
    n = t.get_next_fire_time(None, JAN_1)
    assert n.astimezone(dt.UTC).strftime("%H:%M") == "08:00"
