"""monitor/detectors/live.py: the post-promotion watch and the canary, on seeded simulated streams."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.detectors.live import CanaryTest, PromotionWatch


def canary_run(seed: int, pa: float, pb: float, windows: int = 40, per: int = 2000) -> str | None:
    rng = np.random.default_rng(seed)
    t = CanaryTest(("7", "8"), alpha=0.05, tau2=1e-4)
    for _ in range(windows):
        r = t.update({"7": rng.random(per) < pa, "8": rng.random(per) < pb})
    return r.winner


def test_canary_false_positive_rate_stays_under_alpha_although_it_peeks_every_window() -> None:
    # 300 A/A streams of 40 windows: a plain z-test checked 40 times would exceed 5% badly.
    winners = [canary_run(seed, 0.05, 0.05) for seed in range(300)]
    rate = sum(w is not None for w in winners) / len(winners)
    assert rate <= 0.05, rate


def test_canary_finds_the_better_version() -> None:
    winners = [canary_run(10_000 + s, 0.05, 0.06) for s in range(40)]
    assert sum(w == "8" for w in winners) >= 38
    assert all(w != "7" for w in winners)  # never the worse one
    assert canary_run(5, 0.06, 0.05) == "7"


def test_canary_gives_no_verdict_before_min_events_and_ignores_unknown_arms() -> None:
    t = CanaryTest(("a", "b"), min_events=1000)
    r = t.update({"a": np.zeros(999, bool), "b": np.ones(999, bool), "c": np.ones(5, bool)})
    assert r.winner is None and r.events == {"a": 999, "b": 999}


def test_canary_state_round_trips() -> None:
    rng = np.random.default_rng(3)
    t = CanaryTest(("a", "b"))
    t.update({"a": rng.random(3000) < 0.05, "b": rng.random(3000) < 0.05})
    u = CanaryTest.from_state_dict(t.state_dict())
    batch = {"a": rng.random(3000) < 0.05, "b": rng.random(3000) < 0.07}
    assert t.update(batch) == u.update(batch)


def test_watch_holds_a_promotion_that_did_not_hurt() -> None:
    held = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        w = PromotionWatch(0.05, arl0=1e6, max_events=200_000)
        while w.result.state == "watching":
            w.update(rng.random(20_000) < 0.05)
        held += w.result.state == "held"
    # At most one false alarm per 1e6 events: 20 x 200k = 4M events, expect <= ~4.
    assert held >= 16


def test_watch_catches_a_regression_and_names_its_size() -> None:
    rng = np.random.default_rng(7)
    w = PromotionWatch(0.05, arl0=1e6, max_events=500_000)
    events = 0
    while w.result.state == "watching":
        w.update(rng.random(5_000) < 0.04)
        events += 5_000
    r = w.result
    assert r.state == "regressed" and events <= 60_000 and r.detected_drops
    assert r.observed_rate == pytest.approx(0.04, abs=0.005)


def test_watch_state_round_trips_and_rejects_bad_rates() -> None:
    rng = np.random.default_rng(1)
    w = PromotionWatch(0.05, max_events=10_000)
    w.update(rng.random(4000) < 0.05)
    u = PromotionWatch.from_state_dict(w.state_dict())
    y = rng.random(8000) < 0.05
    assert w.update(y) == u.update(y) and u.result.state == "held" and u.result.events == 10_000
    with pytest.raises(ValueError, match="baseline_rate"):
        PromotionWatch(0.0)
