"""Watermarks and lateness, with injected wall time."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.windows import TopicClock, WindowSpec

SPEC = WindowSpec(size_ms=60_000, allowed_lateness_ms=10_000, idle_timeout_ms=5_000)


def test_window_size_must_divide_an_hour() -> None:
    with pytest.raises(ValueError, match="7000 ms must be positive and divide one hour"):
        WindowSpec(size_ms=7_000)


def test_watermark_is_the_slowest_live_partition_minus_lateness() -> None:
    clock = TopicClock(SPEC)
    clock.assign([0, 1], now_ms=0)
    clock.observe(0, 500_000, now_ms=1)
    clock.observe(1, 200_000, now_ms=1)
    assert clock.watermark(now_ms=2) == 190_000
    assert clock.closable_upto(now_ms=2) == 180_000


def test_window_does_not_close_before_a_silent_partition_times_out() -> None:
    clock = TopicClock(SPEC)
    clock.assign([0, 1], now_ms=0)
    clock.observe(0, 500_000, now_ms=1)
    assert clock.watermark(now_ms=4_999) is None  # partition 1 may still hold a backlog
    assert clock.watermark(now_ms=5_000) == 490_000


def test_partition_known_to_be_caught_up_does_not_hold_the_watermark() -> None:
    clock = TopicClock(SPEC)
    clock.assign([0, 1], now_ms=0)
    clock.observe(0, 500_000, now_ms=1)
    clock.set_caught_up(1, True)
    assert clock.watermark(now_ms=2) == 490_000


def test_partition_known_to_be_behind_is_never_idle() -> None:
    """A restart or a slow fetch must not turn a backlog into late events."""
    clock = TopicClock(SPEC)
    clock.assign([0, 1], now_ms=0)
    clock.observe(0, 500_000, now_ms=1)
    clock.set_caught_up(1, False)
    assert clock.watermark(now_ms=60_000) is None  # a minute of silence: still waiting
    clock.observe(1, 200_000, now_ms=60_001)
    assert clock.watermark(now_ms=60_002) == 190_000
    clock.set_caught_up(1, True)
    clock.observe(0, 510_000, now_ms=64_000)
    assert clock.watermark(now_ms=60_002 + SPEC.idle_timeout_ms) == 500_000  # 1 idle now


def test_idle_partition_stops_holding_back_and_all_idle_closes_the_newest_window() -> None:
    clock = TopicClock(SPEC)
    clock.assign([0, 1], now_ms=0)
    clock.observe(0, 500_000, now_ms=1_000)
    clock.observe(1, 130_000, now_ms=0)
    assert clock.watermark(now_ms=4_000) == 120_000
    assert clock.watermark(now_ms=5_500) == 490_000  # partition 1 idle
    assert clock.watermark(now_ms=6_500) == 540_000  # all idle: end of the newest window
    assert clock.closable_upto(now_ms=6_500) == 540_000


def test_closing_point_never_moves_back() -> None:
    clock = TopicClock(SPEC)
    clock.assign([0], now_ms=0)
    clock.observe(0, 500_000, now_ms=0)
    clock.mark_closed(480_000)
    clock.revoke([0])
    clock.assign([0], now_ms=10, max_ts_ms={0: 100_000})
    clock.observe(0, 100_000, now_ms=10)
    assert clock.closable_upto(now_ms=11) == 480_000


def test_event_is_late_only_once_its_window_is_final() -> None:
    clock = TopicClock(SPEC, closed_upto_ms=120_000)
    starts = SPEC.window_start(np.array([59_999, 60_000, 119_999, 120_000, 500_000]))
    assert clock.late_mask(starts).tolist() == [True, True, True, False, False]


def test_restored_max_event_time_holds_the_watermark_after_restart() -> None:
    clock = TopicClock(SPEC)
    clock.assign([0, 1], now_ms=0, max_ts_ms={0: 300_000, 1: 250_000})
    clock.observe(0, 310_000, now_ms=1)
    clock.observe(1, 251_000, now_ms=1)
    assert clock.watermark(now_ms=2) == 241_000


def test_a_resumed_partition_counts_idle_from_its_assignment_not_at_once() -> None:
    # Moved here (or restarted) caught up: it was live a moment ago elsewhere.
    clock = TopicClock(SPEC)
    clock.assign([0, 1], now_ms=0, max_ts_ms={1: 200_000})
    clock.set_caught_up(1, True)
    clock.observe(0, 500_000, now_ms=1)
    assert clock.closable_upto(now_ms=4_999) == 180_000  # partition 1 still holds back
    assert clock.closable_upto(now_ms=5_000) == 480_000  # ... until quiet for the idle timeout


def test_the_group_floor_bounds_what_closes_and_a_blocking_floor_closes_nothing() -> None:
    clock = TopicClock(SPEC)
    clock.assign([0], now_ms=0)
    clock.observe(0, 500_000, now_ms=1)
    clock.set_group_floor(250_000)  # another replica's partition is at 260 s (less lateness)
    assert clock.closable_upto(now_ms=2) == 240_000
    clock.mark_closed(240_000)
    clock.set_group_floor(None, blocks=True)  # a partition nobody has read yet
    assert clock.closable_upto(now_ms=3) == 240_000
    clock.set_group_floor(None)
    assert clock.closable_upto(now_ms=4) == 480_000
