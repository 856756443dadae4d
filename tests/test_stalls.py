"""The stall rule on plain numbers: a pass that moves, or has nothing waiting, never
fires; one that stands still with windows waiting fires after stall_ms and clears the
moment it moves."""

from __future__ import annotations

from monitor.stalls import ProgressWatch, Stage


def _iso(ms: int) -> str:
    return f"t{ms}"


def test_a_pass_working_through_a_backlog_or_with_nothing_waiting_never_stalls() -> None:
    watch = ProgressWatch(stall_ms=3_000)
    for t in range(100):  # 100 s: the pointer moves every second, a backlog always waits
        stage = Stage("drift", pointer=t * 1000, bound=10**9, waiting=[t * 1000, t * 1000 + 1000])
        assert not watch.stalled(watch.idle_s(stage, float(t)))
    for t in range(100, 200):  # 100 s of quiet: the pointer stands, but nothing waits
        stage = Stage("drift", pointer=99_000, bound=99_000, waiting=[])
        assert watch.idle_s(stage, float(t)) == 0


def test_a_pass_standing_still_with_windows_waiting_stalls_then_clears_when_it_moves() -> None:
    watch = ProgressWatch(stall_ms=3_000)
    stuck = Stage("join", pointer=17_000, bound=40_000, waiting=[17_000, 18_000],
                  waiting_for=["r2"], window="w17")
    idles = [watch.idle_s(stuck, float(t)) for t in range(6)]
    assert idles == [0, 1, 2, 3, 4, 5]
    assert [watch.stalled(i) for i in idles] == [False, False, False, False, True, True]
    signal = watch.signal(stuck, idles[-1], last_error="NotYet('segment x')", iso=_iso)
    assert signal.firing and signal.fingerprint == "monitor_stalled/*/join"
    assert signal.severity.label == "critical"
    assert "no progress for 5 s with 2 closed window(s) waiting, from t17000" in signal.summary
    assert "summaries of r2 for window w17" in signal.summary and "NotYet" in signal.summary
    moved = Stage("join", pointer=18_000, bound=40_000, waiting=[18_000])
    idle = watch.idle_s(moved, 6.0)
    assert idle == 0 and not watch.signal(moved, idle, last_error=None, iso=_iso).firing
