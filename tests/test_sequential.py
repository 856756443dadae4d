"""Tests of monitor.sequential: exact ARL, vectorised updates, delays, state."""

from __future__ import annotations

import doctest
import math
import time

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import monitor.sequential
from monitor.sequential import AdaptiveBernoulliCUSUM, BernoulliCUSUM, lattice_arl


def test_docstring_examples_run() -> None:
    result = doctest.testmod(monitor.sequential)
    assert result.attempted > 0
    assert result.failed == 0


# ------------------------------------------------------------ the ARL solve


def dense_arl(up: int, down: int, threshold: int, p_up: float) -> float:
    """The same Markov chain solved with a dense matrix: an independent check."""
    q = np.zeros((threshold, threshold))
    for i in range(threshold):
        if i + up < threshold:
            q[i, i + up] += p_up
        q[i, max(0, i - down)] += 1.0 - p_up
    return float(np.linalg.solve(np.eye(threshold) - q, np.ones(threshold))[0])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 25), st.integers(1, 120), st.floats(0.05, 0.95))
def test_banded_arl_solve_agrees_with_a_dense_solve(up: int, down: int, threshold: int,
                                                    p_up: float) -> None:
    dense = dense_arl(up, down, threshold, p_up)
    assume(0 < dense < 1e12)
    # Both solves lose about ARL * 1e-16 relative accuracy (the system's
    # condition grows with the ARL); arl0 is capped at 1e12 for that reason.
    assert lattice_arl(up, down, threshold, p_up) == pytest.approx(
        dense, rel=max(1e-9, 1e-14 * dense))


def test_arl_of_a_one_step_threshold_is_geometric() -> None:
    assert lattice_arl(1, 3, 1, 0.2) == pytest.approx(5.0)


@pytest.mark.parametrize(("p0", "p1", "arl0"), [(0.05, 0.045, 1e6), (0.05, 0.03, 5e4),
                                                (0.3, 0.33, 1e5), (0.5, 0.45, 2e3)])
def test_threshold_is_the_smallest_meeting_the_configured_arl(p0: float, p1: float,
                                                              arl0: float) -> None:
    det = BernoulliCUSUM(p0, p1, arl0)
    up, down = det.steps
    p_up = p0 if p1 > p0 else 1.0 - p0
    assert det.arl0_exact == pytest.approx(lattice_arl(up, down, det.h_steps, p_up))
    assert det.arl0_exact >= arl0
    assert lattice_arl(up, down, det.h_steps - 1, p_up) < arl0
    # The integer steps keep the log-likelihood ratios' ratio within 1%.
    llr_up = math.log(p1 / p0) if p1 > p0 else math.log((1 - p1) / (1 - p0))
    llr_down = -math.log((1 - p1) / (1 - p0)) if p1 > p0 else -math.log(p1 / p0)
    assert up / down == pytest.approx(llr_up / llr_down, rel=0.01)


# ---------------------------------------------------- false alarms and delay


def run_lengths(det: BernoulliCUSUM | AdaptiveBernoulliCUSUM, p: float, runs: int,
                seed: int, chunk: int) -> np.ndarray:
    """Run lengths of ``runs`` independent runs (restart on the event after each alarm)."""
    rng = np.random.default_rng(seed)
    lengths, since = [], 0
    det.reset()
    while len(lengths) < runs:
        xs = rng.random(chunk) < p
        while xs.size:
            i = det.update_many(xs)
            if i < 0:
                since += xs.size
                break
            lengths.append(since + i + 1)
            since = 0
            det.reset()
            xs = xs[i + 1:]
    return np.array(lengths[:runs], dtype=np.float64)


@pytest.mark.parametrize(("p0", "p1", "arl0"), [(0.05, 0.045, 3_000), (0.3, 0.33, 2_000)])
def test_measured_arl_under_no_change_matches_the_exact_arl(p0: float, p1: float,
                                                            arl0: float) -> None:
    det = BernoulliCUSUM(p0, p1, arl0)
    lengths = run_lengths(det, p0, runs=3_000, seed=1, chunk=20_000)
    se = lengths.std(ddof=1) / math.sqrt(lengths.size)
    assert abs(lengths.mean() - det.arl0_exact) <= 3 * se
    # The configured value is met up to one lattice step (under 6% here).
    assert arl0 <= det.arl0_exact <= 1.06 * arl0


def test_measured_delay_matches_the_exact_zero_state_arl_after_a_change() -> None:
    det = BernoulliCUSUM(0.05, 0.03, 5_000)
    lengths = run_lengths(det, 0.03, runs=2_000, seed=2, chunk=5_000)
    se = lengths.std(ddof=1) / math.sqrt(lengths.size)
    assert abs(lengths.mean() - det.arl(0.03)) <= 3 * se


def delays_after_change(det: BernoulliCUSUM | AdaptiveBernoulliCUSUM, p0: float, p1: float,
                        seeds: int, warmup: int) -> tuple[np.ndarray, int]:
    """Events from the change to the alarm, and how many runs false-alarmed before it.

    With ``warmup`` events at ``p0`` first the change meets the detector in
    its steady state, as in production; runs that alarm during the warm-up
    are dropped (the conditional delay of Pollak & Siegmund 1985).
    """
    out, false_alarms = [], 0
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        det.reset()
        if warmup:
            det.update_many(rng.random(warmup) < p0)
            if det.drift_detected:
                false_alarms += 1
                continue
        seen = 0
        while True:
            i = det.update_many(rng.random(20_000) < p1)
            if i >= 0:
                out.append(seen + i + 1)
                break
            seen += 20_000
    return np.array(out, dtype=np.float64), false_alarms


def test_a_drop_from_5_to_4_5_percent_is_detected_within_15k_events_median() -> None:
    """Target: median delay < 15,000 events at one false alarm per million events."""
    det = BernoulliCUSUM(0.05, 0.045, 1e6)
    steady, false_alarms = delays_after_change(det, 0.05, 0.045, seeds=1_000, warmup=50_000)
    assert np.median(steady) < 15_000
    # 50k warm-up events at ARL 1e6 false-alarm in about 5% of runs.
    assert false_alarms <= 80
    # From a fresh start (statistic 0 at the change, Lorden's worst case) the
    # median is just above the target; the exact mean delay is 17.2k events.
    fresh, _ = delays_after_change(det, 0.05, 0.045, seeds=600, warmup=0)
    assert np.median(fresh) < 16_500
    assert det.arl(0.045) == pytest.approx(17_191, rel=1e-3)


def test_the_bank_keeps_its_configured_false_alarm_rate() -> None:
    bank = AdaptiveBernoulliCUSUM(0.05, arl0=2_000)
    lengths = run_lengths(bank, 0.05, runs=1_500, seed=3, chunk=20_000)
    se = lengths.std(ddof=1) / math.sqrt(lengths.size)
    # Bonferroni over 4 members: at least arl0, at most 4 * arl0.
    assert lengths.mean() >= 2_000 - 3 * se
    assert lengths.mean() <= 4 * 2_000


def test_the_bank_catches_large_drops_sooner_than_a_cusum_tuned_to_a_small_one() -> None:
    single = BernoulliCUSUM(0.05, 0.0475, 1e6)  # tuned to a 5% relative drop
    bank = AdaptiveBernoulliCUSUM(0.05, 1e6)
    d_single, _ = delays_after_change(single, 0.05, 0.035, seeds=200, warmup=0)
    d_bank, _ = delays_after_change(bank, 0.05, 0.035, seeds=200, warmup=0)
    assert np.median(d_bank) < 0.7 * np.median(d_single)


# -------------------------------------------------------- vectorised updates


def scalar_copy(det: BernoulliCUSUM | AdaptiveBernoulliCUSUM,
                ) -> BernoulliCUSUM | AdaptiveBernoulliCUSUM:
    if isinstance(det, BernoulliCUSUM):
        twin: BernoulliCUSUM | AdaptiveBernoulliCUSUM = BernoulliCUSUM(det.p0, det.p1, det.arl0)
    else:
        twin = AdaptiveBernoulliCUSUM(det.p0, det.arl0, det.drops)
    twin.load_state_dict(det.state_dict())
    return twin


detectors = st.one_of(
    st.builds(BernoulliCUSUM, st.sampled_from([0.02, 0.05, 0.3, 0.6]),
              st.sampled_from([0.01, 0.04, 0.25, 0.7]), st.sampled_from([20.0, 200.0, 5e3])
              ).filter(lambda d: d.p0 != d.p1),
    st.builds(AdaptiveBernoulliCUSUM, st.sampled_from([0.05, 0.3]),
              st.sampled_from([30.0, 500.0]), st.just((0.1, 0.3, 0.6))),
)


@settings(max_examples=150, deadline=None)
@given(detectors, st.lists(st.lists(st.integers(0, 1), max_size=300), max_size=5))
def test_update_many_equals_repeated_update(det: BernoulliCUSUM | AdaptiveBernoulliCUSUM,
                                            chunks: list[list[int]]) -> None:
    twin = scalar_copy(det)
    for chunk in chunks:
        already = det.drift_detected
        first = det.update_many(np.array(chunk, dtype=np.int64))
        expected = -1
        for i, x in enumerate(chunk):
            twin.update(x)
            if expected < 0 and not already and twin.drift_detected:
                expected = i
        assert first == expected
        assert det.state_dict() == twin.state_dict()
        assert det.drift_detected == twin.drift_detected


def test_update_many_carries_state_across_blocks() -> None:
    # Longer than the internal block of 32768 events, so the carried-in
    # statistic between blocks is exercised.
    rng = np.random.default_rng(4)
    xs = rng.random(100_000) < 0.05
    det = BernoulliCUSUM(0.05, 0.04, 1e9)
    twin = BernoulliCUSUM(0.05, 0.04, 1e9)
    det.update_many(xs)
    for x in xs.tolist():
        twin.update(int(x))
    assert det.state_dict() == twin.state_dict()


@settings(max_examples=80, deadline=None)
@given(detectors, st.lists(st.integers(0, 1), max_size=400), st.lists(st.integers(0, 1),
                                                                     max_size=400))
def test_state_dict_round_trip_gives_identical_behaviour(
        det: BernoulliCUSUM | AdaptiveBernoulliCUSUM, before: list[int],
        after: list[int]) -> None:
    det.update_many(np.array(before, dtype=np.int64))
    restored = scalar_copy(det)
    for x in after:
        det.update(x)
        restored.update(x)
        assert det.drift_detected == restored.drift_detected
    assert det.state_dict() == restored.state_dict()


def test_update_many_runs_well_under_200_ns_per_event() -> None:
    xs = np.random.default_rng(5).random(2_000_000) < 0.05
    det = BernoulliCUSUM(0.05, 0.045, 1e6)
    det.update_many(xs[:1000])
    start = time.perf_counter()
    det.update_many(xs)
    per_event = (time.perf_counter() - start) / xs.size
    assert per_event < 200e-9


# ---------------------------------------------------------------- contract


def test_alarm_latches_until_reset_and_the_detector_never_resets_itself() -> None:
    det = BernoulliCUSUM(0.05, 0.04, 1_000)
    first = det.update_many(np.zeros(10_000, dtype=np.int64))
    # From zero the fastest alarm takes ceil(h_steps / up) "no click" events.
    assert first == math.ceil(det.h_steps / det.steps[0]) - 1
    assert det.alarm_at == first + 1
    det.update_many(np.ones(10_000, dtype=np.int64))  # the statistic falls back to 0
    assert det.statistic == 0.0
    assert det.drift_detected
    assert det.update_many(np.zeros(10_000, dtype=np.int64)) == -1  # already up
    det.reset()
    assert (det.drift_detected, det.n_seen, det.alarm_at) == (False, 0, None)


def test_nothing_is_detected_on_a_pinned_seeded_stream_before_the_change() -> None:
    rng = np.random.default_rng(2024)
    det = BernoulliCUSUM(0.05, 0.045, 1e6)
    assert det.update_many(rng.random(100_000) < 0.05) == -1
    at = det.update_many(rng.random(100_000) < 0.045)
    assert at == 17_838  # pinned: a change of the code that moves this is a behaviour change


def test_a_rise_detector_alarms_on_rises_only() -> None:
    rng = np.random.default_rng(6)
    det = BernoulliCUSUM(0.05, 0.06, 1e5)
    assert det.update_many(rng.random(200_000) < 0.04) == -1
    assert det.update_many(rng.random(200_000) < 0.07) >= 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"p0": 0.0, "p1": 0.1}, "p0 must be in"),
    ({"p0": 0.1, "p1": 1.0}, "p1 must be in"),
    ({"p0": 0.1, "p1": 0.1}, "p1 must differ from p0, got both 0.1"),
    ({"p0": 0.1, "p1": 0.09, "arl0": 1.0}, r"arl0 must be in \(1, 1e12\], got 1.0"),
])
def test_bad_parameters_are_rejected_naming_them(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BernoulliCUSUM(**kwargs)


def test_bad_events_are_rejected_naming_them() -> None:
    det = BernoulliCUSUM(0.05, 0.04)
    with pytest.raises(ValueError, match="events must be 0 or 1, got 2"):
        det.update(2)
    with pytest.raises(ValueError, match="events must be 0 or 1, got 3"):
        det.update_many(np.array([0, 1, 3]))
    with pytest.raises(ValueError, match="integer or boolean array, got dtype float64"):
        det.update_many(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="drops must be distinct"):
        AdaptiveBernoulliCUSUM(0.05, drops=(0.1, 0.1))


def test_state_of_another_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="state is for"):
        BernoulliCUSUM(0.05, 0.04).load_state_dict(BernoulliCUSUM(0.05, 0.03).state_dict())
