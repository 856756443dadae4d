"""Structured logs: kafka-python's repeated lines are held back, driftloop's never."""

from __future__ import annotations

import logging

from connectors.logs import RepeatFilter


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _record(name: str, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)


def test_a_missing_topic_logged_18_times_a_second_becomes_one_line_a_minute() -> None:
    clock = _Clock()
    f = RepeatFilter(interval_s=60.0, clock=clock)
    passed = []
    for i in range(18 * 120):  # two minutes of kafka-python's metadata refreshes
        clock.now = i / 18
        rec = _record("kafka.cluster", "Topic %s not found in cluster metadata", "pred")
        if f.filter(rec):
            passed.append(rec)
    assert len(passed) == 2
    assert getattr(passed[1], "fields", {})["repeated"] == 18 * 60 - 1
    # Another topic is another line.
    assert f.filter(_record("kafka.cluster", "Topic %s not found in cluster metadata", "fb"))


def test_driftloop_lines_are_never_held_back() -> None:
    f = RepeatFilter(interval_s=60.0, clock=_Clock())
    assert all(f.filter(_record("monitor.service.daemon", "ingestion failed")) for _ in range(100))
