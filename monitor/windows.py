"""Event-time tumbling windows: assignment, watermarks and lateness.

Pure logic: no I/O, no clock of its own (callers pass ``now_ms``), so every rule here
is tested with injected time.

The watermark of a topic is the minimum, over the partitions that are *live*, of the
largest event time seen on each, minus the allowed lateness (Flink's bounded
out-of-orderness per partition). Taking the minimum across partitions matters when a
backlog is replayed: kafka-python fetches partitions unevenly, and a global maximum
would declare a slow partition's perfectly punctual events late.

A partition stops holding the watermark back when it goes idle (no record for
``idle_timeout_ms`` of wall time), or when it has never produced a record and the
consumer knows it is caught up with its high watermark. Without that rule one empty
partition would keep every window open forever.

A partition the consumer knows to be *behind* (its position below the high watermark,
or a high watermark not fetched yet) is never idle, however long it has been quiet:
its records exist and are merely slow to arrive (a restart, a rebalance, a busy
process, kafka-python fetching partitions unevenly). Treating it as idle would move
the watermark past its events and turn them into late events. Only a caller that says
nothing about lag (``caught_up`` never set, as in tests without Kafka) gets the pure
wall-clock rule.

An event is *late* only when its window has already been finalised, i.e. its end is at
or before ``closed_upto``; windows are finalised by the daemon at checkpoints, which
is why the watermark and the closing point are separate numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

__all__ = ["PartitionClock", "TopicClock", "WindowSpec"]

HOUR_MS = 3_600_000


@dataclasses.dataclass(frozen=True)
class WindowSpec:
    """How events are cut into windows.

    Args:
        size_ms: window length; must divide one hour so that a window never straddles
            the feedback store's hourly partitions.
        allowed_lateness_ms: how far behind the newest event of a partition an event
            may be and still count in its window.
        idle_timeout_ms: wall time without records after which a partition no longer
            holds the watermark back.

    Example:
        >>> spec = WindowSpec(size_ms=60_000)
        >>> int(spec.window_start(np.array([61_500]))[0])
        60000
    """

    size_ms: int = 60_000
    allowed_lateness_ms: int = 30_000
    idle_timeout_ms: int = 60_000

    def __post_init__(self) -> None:
        if self.size_ms <= 0 or HOUR_MS % self.size_ms != 0:
            msg = f"window size {self.size_ms} ms must be positive and divide one hour (3600000 ms)"
            raise ValueError(msg)
        if self.allowed_lateness_ms < 0:
            msg = f"allowed lateness {self.allowed_lateness_ms} ms must be >= 0"
            raise ValueError(msg)
        if self.idle_timeout_ms <= 0:
            msg = f"idle timeout {self.idle_timeout_ms} ms must be > 0"
            raise ValueError(msg)

    def window_start(self, ts_ms: np.ndarray) -> np.ndarray:
        return ts_ms - ts_ms % self.size_ms


@dataclasses.dataclass
class PartitionClock:
    """What the watermark needs to know about one partition."""

    max_ts_ms: int | None = None
    last_record_wall_ms: int | None = None
    assigned_wall_ms: int = 0
    #: True: nothing left to read; False: behind (or lag unknown yet); None: not told.
    caught_up: bool | None = None


class TopicClock:
    """Watermark and closing point of one topic over the partitions this process owns.

    Example:
        >>> clock = TopicClock(WindowSpec(size_ms=60_000, allowed_lateness_ms=10_000))
        >>> clock.assign([0, 1], now_ms=0)
        >>> clock.observe(0, max_ts_ms=200_000, now_ms=1)
        >>> clock.observe(1, max_ts_ms=130_000, now_ms=1)
        >>> clock.watermark(now_ms=2)
        120000
        >>> clock.closable_upto(now_ms=2)
        120000
    """

    def __init__(self, spec: WindowSpec, closed_upto_ms: int | None = None) -> None:
        self.spec = spec
        self._partitions: dict[int, PartitionClock] = {}
        self._closed_upto = closed_upto_ms
        #: The event time other consumers' partitions have passed (`set_group_floor`).
        self._floor: int | None = None
        self._floor_blocks = False

    @property
    def closed_upto_ms(self) -> int | None:
        """Every window ending at or before this time has been finalised."""
        return self._closed_upto

    @property
    def partitions(self) -> dict[int, PartitionClock]:
        return self._partitions

    def assign(self, partitions: Iterable[int], now_ms: int,
               max_ts_ms: dict[int, int | None] | None = None) -> None:
        for p in partitions:
            known = (max_ts_ms or {}).get(p)
            self._partitions[p] = PartitionClock(max_ts_ms=known, assigned_wall_ms=now_ms)

    def revoke(self, partitions: Iterable[int]) -> None:
        for p in partitions:
            self._partitions.pop(p, None)

    def observe(self, partition: int, max_ts_ms: int, now_ms: int) -> None:
        """Record that ``partition`` delivered records up to event time ``max_ts_ms``."""
        pc = self._partitions.setdefault(partition, PartitionClock(assigned_wall_ms=now_ms))
        if pc.max_ts_ms is None or max_ts_ms > pc.max_ts_ms:
            pc.max_ts_ms = max_ts_ms
        pc.last_record_wall_ms = now_ms

    def set_caught_up(self, partition: int, caught_up: bool) -> None:
        pc = self._partitions.get(partition)
        if pc is not None:
            pc.caught_up = caught_up

    def _holds_back(self, pc: PartitionClock, now_ms: int) -> bool:
        if pc.caught_up is False:
            return True
        idle = self.spec.idle_timeout_ms
        if pc.last_record_wall_ms is not None:
            return now_ms - pc.last_record_wall_ms < idle
        if pc.max_ts_ms is not None:
            # Resumed from a stored position (a restart, or a partition moved from
            # another replica): it was live a moment ago, so it is idle only once it
            # has been quiet here for the idle timeout. Counting it idle at once would
            # close its open windows early and make its next events late.
            return now_ms - pc.assigned_wall_ms < idle
        # Never delivered anything since assignment: wait for its backlog unless the
        # consumer already knows there is none.
        return not pc.caught_up and now_ms - pc.assigned_wall_ms < idle

    def watermark(self, now_ms: int) -> int | None:
        """The event time up to which this topic's data is considered complete.

        ``None`` while a live partition has not delivered anything yet.
        """
        live = [pc for pc in self._partitions.values() if self._holds_back(pc, now_ms)]
        if live:
            if any(pc.max_ts_ms is None for pc in live):
                return None
            return min(pc.max_ts_ms for pc in live) - self.spec.allowed_lateness_ms  # type: ignore[type-var,operator]
        seen = [pc.max_ts_ms for pc in self._partitions.values() if pc.max_ts_ms is not None]
        if not seen:
            return None
        # Everything is idle: the stream paused, so finalise up to the end of the
        # window holding the newest event instead of waiting for traffic to resume.
        newest = max(seen)
        return newest - newest % self.spec.size_ms + self.spec.size_ms

    def set_group_floor(self, floor_ms: int | None, *, blocks: bool = False) -> None:
        """Bound this clock by the partitions other consumers of the group hold.

        A partition that moves here resumes where its last owner left it; windows this
        clock had closed by then would make its next events late, where one consumer of
        all partitions would have waited for them. Several replicas therefore close no
        further than the slowest partition of the whole group (``floor_ms``: its event
        time less the allowed lateness), exactly as one consumer would. ``blocks``: some
        partition has data nobody has read yet, so nothing may close.
        """
        self._floor, self._floor_blocks = floor_ms, blocks

    def closable_upto(self, now_ms: int) -> int | None:
        """Window-aligned point up to which windows may be finalised now (monotone)."""
        if self._floor_blocks:
            return self._closed_upto
        wm = self.watermark(now_ms)
        if wm is not None and self._floor is not None:
            wm = min(wm, self._floor)
        if wm is None:
            return self._closed_upto
        aligned = wm - wm % self.spec.size_ms
        if self._closed_upto is not None and aligned < self._closed_upto:
            return self._closed_upto
        return aligned

    def mark_closed(self, upto_ms: int) -> None:
        """Record that windows ending at or before ``upto_ms`` are final."""
        if self._closed_upto is None or upto_ms > self._closed_upto:
            self._closed_upto = upto_ms

    def late_mask(self, window_start_ms: np.ndarray) -> np.ndarray:
        """Which events fall into windows that are already final."""
        if self._closed_upto is None:
            return np.zeros(window_start_ms.shape, dtype=bool)
        result: np.ndarray = window_start_ms + self.spec.size_ms <= self._closed_upto
        return result
