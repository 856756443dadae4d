"""retrain/evaluate.py: the paired statistics the promotion gate decides on.

DeLong's fast midrank algorithm is checked against the O(n^2) definition of its
structural components; its false-positive rate and power, and the paired bootstrap's,
on simulated scorers with fixed seeds.
"""

from __future__ import annotations

import dataclasses
import doctest
import itertools
import json
import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
from scipy.stats import poisson

import retrain.evaluate
from retrain.evaluate import (
    EvaluationReport,
    HoldoutWindow,
    ModelMetrics,
    ModelScores,
    PairedTest,
    _bootstrap_counts,
    _weighted_auc,
    auc,
    calibration,
    calibration_interval,
    compare,
    delong_test,
    holdout_metrics,
    latencies_ms_per_1000,
    latency_ms_per_1000,
    log_loss,
    model_size_bytes,
    ndcg_at_k,
    paired_bootstrap,
)


def brute_force_delong(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """DeLong et al. (1988) as written: psi over every (positive, negative) pair, the
    structural components as its row and column means; O(m n)."""
    y = y.astype(bool)
    comps = []
    for p in (a, b):
        x, z = p[y][:, None], p[~y][None, :]
        psi = (x > z) + 0.5 * (x == z)
        comps.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    m, n = int(y.sum()), int((~y).sum())
    s10 = np.cov(np.vstack([comps[0][1], comps[1][1]]))
    s01 = np.cov(np.vstack([comps[0][2], comps[1][2]]))
    s = s10 / m + s01 / n
    return comps[0][0], comps[1][0], float(s[0, 0] + s[1, 1] - 2 * s[0, 1])


def world(rng: np.random.Generator, n: int, noise_a: float, noise_b: float) -> tuple[np.ndarray, ...]:
    """A latent click propensity; two scorers that see it through their own noise.

    Equal noise: equally good scorers (the same true AUC); less noise: a better one.
    """
    s = rng.normal(size=n)
    y = rng.random(n) < 1.0 / (1.0 + np.exp(-(1.5 * s - 1.5)))
    return y, s + rng.normal(scale=noise_a, size=n), s + rng.normal(scale=noise_b, size=n)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def test_doctests() -> None:
    result = doctest.testmod(retrain.evaluate)
    assert result.failed == 0 and result.attempted > 5


# -- DeLong ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed, n, rate, decimals", [(0, 60, 0.3, None), (1, 200, 0.1, 1), (2, 150, 0.5, 2),
                                                     (3, 40, 0.2, 1)])
def test_delong_fast_midranks_match_the_brute_force_structural_components(
        seed: int, n: int, rate: float, decimals: int | None) -> None:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < rate
    y[:2], y[2:4] = True, False  # at least two of each
    a = rng.random(n) + y * 0.3
    b = rng.random(n) + y * 0.1
    if decimals is not None:  # heavy ties, within and across the classes
        a, b = np.round(a, decimals), np.round(b, decimals)
    auc_a, auc_b, var = brute_force_delong(y, a, b)
    t = delong_test(y, a, b)
    assert t.diff == pytest.approx(auc_a - auc_b, abs=1e-12)
    assert t.se**2 == pytest.approx(var, rel=1e-9, abs=1e-15)
    assert auc(y, a) == pytest.approx(auc_a, abs=1e-12)
    assert t.z == pytest.approx(t.diff / t.se)
    assert t.ci_low == pytest.approx(t.diff - 1.959964 * t.se, rel=1e-6)
    assert t.ci_high == pytest.approx(t.diff + 1.959964 * t.se, rel=1e-6)


def test_delong_rejects_at_about_alpha_for_two_equally_good_scorers() -> None:
    rng = np.random.default_rng(20240601)
    p = np.array([delong_test(*world(rng, 400, 1.0, 1.0)).p_one_sided for _ in range(1000)])
    # 1,000 seeds: the rate's standard error at alpha 0.05 is 0.007.
    assert 0.03 <= np.mean(p < 0.05) <= 0.075, np.mean(p < 0.05)
    assert 0.07 <= np.mean(p < 0.10) <= 0.135, np.mean(p < 0.10)
    # The p-values are uniform under the null: no bias in the middle either.
    assert 0.45 <= np.mean(p < 0.5) <= 0.55


def test_delong_finds_a_clearly_better_scorer() -> None:
    rng = np.random.default_rng(7)
    tests = [delong_test(*world(rng, 1000, 0.6, 1.2)) for _ in range(200)]
    assert np.mean([t.p_one_sided < 0.05 for t in tests]) >= 0.95
    assert all(t.diff > 0 for t in tests)
    # ... and never "finds" the worse one better: the test is one-sided.
    rng = np.random.default_rng(7)
    worse = [delong_test(y, b, a) for y, a, b in (world(rng, 1000, 0.6, 1.2) for _ in range(50))]
    assert max(t.p_one_sided for t in worse) > 0.99


def test_delong_standard_error_matches_the_spread_across_repeated_holdouts() -> None:
    rng = np.random.default_rng(11)
    tests = [delong_test(*world(rng, 600, 0.8, 1.0)) for _ in range(400)]
    spread = np.std([t.diff for t in tests], ddof=1)
    assert np.mean([t.se for t in tests]) == pytest.approx(spread, rel=0.12)


def test_delong_swapping_the_models_negates_the_difference() -> None:
    y, a, b = world(np.random.default_rng(3), 500, 0.8, 1.0)
    ab, ba = delong_test(y, a, b), delong_test(y, b, a)
    assert ba.diff == pytest.approx(-ab.diff) and ba.se == pytest.approx(ab.se)
    assert ab.p_one_sided + ba.p_one_sided == pytest.approx(1.0)


def test_delong_of_a_model_with_itself_is_no_difference() -> None:
    y, a, _ = world(np.random.default_rng(4), 300, 1.0, 1.0)
    t = delong_test(y, a, a.copy())
    assert t.diff == 0 and t.se == pytest.approx(0, abs=1e-12) and t.p_one_sided == pytest.approx(0.5)
    # A monotone transform ranks the same: the same AUC.
    assert delong_test(y, sigmoid(a), a).diff == pytest.approx(0, abs=1e-12)


def test_delong_runs_on_half_a_million_rows() -> None:
    y, a, b = world(np.random.default_rng(5), 500_000, 0.9, 1.0)
    t = delong_test(y, a, b)
    assert t.p_one_sided < 1e-6 and 0 < t.se < 0.002


@pytest.mark.parametrize("args, match", [
    (([0, 1, 0, 1], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3, 0.4]), "same rows"),
    (([0, 1, 0, 0], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]), "at least 2 positives"),
    (([0, 1, 0, 1], [0.1, math.nan, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]), "1 non-finite"),
    (([0, 2, 0, 1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]), r"0/1 or bool, got values \[0, 1, 2\]"),
])
def test_delong_rejects_what_it_cannot_test(args: tuple[list[float], ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        delong_test(*args)


# -- the paired bootstrap ----------------------------------------------------------------------


def test_weighted_auc_is_the_auc_of_the_resampled_rows() -> None:
    rng = np.random.default_rng(8)
    y = rng.random(80) < 0.3
    p = np.round(rng.random(80), 1)  # ties
    w = _bootstrap_counts(rng, 80, 20)
    fast = _weighted_auc(y, p, w)
    for r in range(20):
        rows = np.repeat(np.arange(80), w[r])
        assert fast[r] == pytest.approx(auc(y[rows], p[rows]), abs=1e-12)


def test_bootstrap_is_seeded_and_resamples_both_models_with_the_same_rows() -> None:
    y, a, b = world(np.random.default_rng(9), 2000, 0.8, 1.0)
    pa, pb = sigmoid(a - 1.5), sigmoid(b - 1.5)
    t1 = paired_bootstrap(y, pa, pb, "log_loss", n=500, seed=1)
    assert t1 == paired_bootstrap(y, pa, pb, "log_loss", n=500, seed=1)
    assert t1 != paired_bootstrap(y, pa, pb, "log_loss", n=500, seed=2)
    assert t1.diff == pytest.approx(log_loss(y, pa) - log_loss(y, pb))
    # Paired: a model against itself shifted by nothing varies by nothing.
    same = paired_bootstrap(y, pa, pa.copy(), "log_loss", n=200, seed=1)
    assert same.diff == 0 and same.se == 0 and same.ci_low == same.ci_high == 0


def test_bootstrap_log_loss_standard_error_is_that_of_a_paired_mean() -> None:
    y, a, b = world(np.random.default_rng(10), 3000, 0.8, 1.0)
    pa, pb = sigmoid(a - 1.5), sigmoid(b - 1.5)
    t = paired_bootstrap(y, pa, pb, "log_loss", n=2000, seed=3)
    d = -np.where(y, np.log(pa), np.log1p(-pa)) + np.where(y, np.log(pb), np.log1p(-pb))
    assert t.se == pytest.approx(d.std(ddof=1) / math.sqrt(d.size), rel=0.06)
    assert t.ci_low < t.diff < t.ci_high
    assert t.lower_bound(0.975) == pytest.approx(t.ci_low, abs=0.1 * t.se)


def test_bootstrap_auc_agrees_with_delong() -> None:
    y, a, b = world(np.random.default_rng(12), 1500, 0.9, 1.0)
    boot = paired_bootstrap(y, a, b, "auc", n=2000, seed=4)
    dl = delong_test(y, a, b)
    assert boot.diff == pytest.approx(dl.diff, abs=1e-12)
    assert boot.se == pytest.approx(dl.se, rel=0.08)
    assert boot.p_one_sided == pytest.approx(dl.p_one_sided, abs=0.02)


def test_bootstrap_rejects_at_about_alpha_for_equally_good_models_and_finds_a_worse_one() -> None:
    rng = np.random.default_rng(13)
    null = [paired_bootstrap(y, sigmoid(a - 1.5), sigmoid(b - 1.5), "log_loss", n=400, seed=s).p_one_sided
            for s, (y, a, b) in enumerate(world(rng, 400, 1.0, 1.0) for _ in range(300))]
    # 300 seeds: the rate's standard error at 0.05 is 0.013.
    assert 0.02 <= np.mean(np.array(null) < 0.05) <= 0.09
    # A model that is clearly worse in log loss (noisier) is flagged larger nearly every time.
    worse = [paired_bootstrap(y, sigmoid(b - 1.5), sigmoid(a - 1.5), "log_loss", n=400, seed=s)
             for s, (y, a, b) in enumerate(world(rng, 2000, 0.5, 1.5) for _ in range(40))]
    assert np.mean([t.p_one_sided < 0.05 for t in worse]) >= 0.95


def test_bootstrap_brier_and_argument_checks() -> None:
    y = np.array([0, 1] * 50)
    t = paired_bootstrap(y, np.where(y, 0.8, 0.2), np.full(100, 0.5), "brier", n=100, seed=0)
    assert t.diff == pytest.approx(0.04 - 0.25) and t.method == "bootstrap:brier"
    with pytest.raises(ValueError, match="got 'mse'"):
        paired_bootstrap(y, y * 1.0, y * 1.0, "mse", seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got 10"):
        paired_bootstrap(y, y * 1.0, y * 1.0, n=10, seed=0)


# -- NDCG and guardrail measures ---------------------------------------------------------------


def test_ndcg_by_hand() -> None:
    groups = ["a", "a", "a", "b", "b", "c", "c"]
    y = [0, 1, 1, 1, 0, 0, 0]  # c has no positive: left out
    p = [0.9, 0.8, 0.1, 0.3, 0.6, 0.5, 0.4]
    a = (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    b = (1 / math.log2(3)) / 1
    assert ndcg_at_k(groups, y, p, k=3) == pytest.approx((a + b) / 2)
    # k=1: only the top item counts.
    assert ndcg_at_k(groups, y, p, k=1) == pytest.approx(0.0)
    assert ndcg_at_k(groups, y, [0.1, 0.8, 0.9, 0.9, 0.1, 0.5, 0.4], k=2) == pytest.approx(1.0)


def test_ndcg_breaks_ties_pessimistically_and_skips_rows_without_a_request() -> None:
    assert ndcg_at_k(["r"] * 4, [0, 0, 0, 1], [0.5] * 4, k=4) == pytest.approx(1 / math.log2(5))
    groups = pd.Series(["r", "r", None, np.nan])
    assert ndcg_at_k(groups, [0, 1, 1, 1], [0.9, 0.1, 0.9, 0.9], k=2) == pytest.approx(1 / math.log2(3))


@pytest.mark.parametrize("groups", [None, [None, None, None], ["a", "a", "b"]])
def test_ndcg_is_none_without_a_slate_with_a_positive(groups: list[str | None] | None) -> None:
    assert ndcg_at_k(groups, [0, 0, 0], [0.1, 0.2, 0.3], k=5) is None


def test_calibration_size_and_latency() -> None:
    assert calibration([0, 1, 1, 0], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(1.0)
    assert calibration([0, 1, 0, 0], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert math.isnan(calibration([0, 1], [0.0, 0.0]))
    assert model_size_bytes([10, 20, 0]) == 30
    with pytest.raises(ValueError, match="got -1"):
        model_size_bytes([10, -1])

    ticks = itertools.count()
    clock = [0.0, 0.004, 0.010, 0.011, 0.020, 0.029]  # calls take 4, 1, 9 ms
    seen: list[int] = []

    def predict(frame: pd.DataFrame) -> np.ndarray:
        seen.append(len(frame))
        return np.zeros(len(frame))

    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0]})
    ms = latency_ms_per_1000(predict, frame, 3, timer=lambda: clock[next(ticks)])
    assert ms == pytest.approx(4.0)
    assert seen == [1000] * 4  # a warm-up call, then three timed ones; 3 rows tiled to 1,000
    assert latency_ms_per_1000(lambda f: f["x"].to_numpy() * 2, frame, 2) >= 0
    with pytest.raises(ValueError, match="empty frame"):
        latency_ms_per_1000(predict, frame.iloc[:0])


def test_the_calibration_interval_is_the_exact_poisson_interval_over_the_expected_count() -> None:
    # Garwood's limits for 10 events at 95% (the tabulated 4.795-18.390), over 8 expected.
    lo, hi = calibration_interval(10, 8.0)
    assert (lo * 8, hi * 8) == (pytest.approx(4.7954, abs=1e-4), pytest.approx(18.3904, abs=1e-4))
    # No event: the lower limit is 0, the upper -ln(0.025).
    assert calibration_interval(0, 2.0) == (0.0, pytest.approx(-math.log(0.025) / 2))
    assert calibration_interval(40, 40.0, 0.5)[1] < calibration_interval(40, 40.0, 0.95)[1]
    assert all(math.isnan(b) for b in calibration_interval(3, 0.0))
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\), got 1.0"):
        calibration_interval(3, 2.0, 1.0)
    with pytest.raises(ValueError, match="positives must be a count >= 0, got -1"):
        calibration_interval(-1, 2.0)


@pytest.mark.parametrize("level", [0.8, 0.95])
def test_the_calibration_interval_covers_the_true_mean_at_least_at_its_level(level: float) -> None:
    """Exact coverage, summed over the Poisson distribution (no simulation), for means
    from a handful of clicks to a few hundred: never below the level, and each side
    misses at most (1 - level) / 2."""
    for mean in np.linspace(0.5, 400.0, 120):
        k = np.arange(int(mean + 12 * math.sqrt(mean) + 30))
        pmf = poisson.pmf(k, mean)
        bounds = np.array([calibration_interval(int(i), 1.0, level) for i in k])
        above, below = pmf[bounds[:, 0] > mean].sum(), pmf[bounds[:, 1] < mean].sum()
        assert above <= (1 - level) / 2 + 1e-9 and below <= (1 - level) / 2 + 1e-9, (mean, above, below)


def test_model_metrics_carry_the_calibration_counts_and_old_ones_still_decode() -> None:
    y = np.array([0, 1, 1, 0, 0, 1, 0, 0])
    p = np.array([0.1, 0.6, 0.4, 0.2, 0.1, 0.5, 0.3, 0.2])
    m = compare(y, ModelScores(p), None, model="ctr", window=HoldoutWindow(0, 1)).challenger
    assert (m.positives, m.rows) == (3, 8) and m.expected_positives == pytest.approx(2.4)
    assert m.calibration == pytest.approx(m.positives / m.expected_positives)  # type: ignore[operator]
    assert m.calibration_interval(0.95) == calibration_interval(3, m.expected_positives, 0.95)  # type: ignore[arg-type]
    assert ModelMetrics.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    # Written before the counts were kept: no such keys at all; they decode as None.
    old = {k: v for k, v in m.to_dict().items() if k not in ("positives", "expected_positives", "rows")}
    back = ModelMetrics.from_dict(old)
    assert (back.positives, back.expected_positives, back.rows) == (None, None, None)
    assert back == dataclasses.replace(m, positives=None, expected_positives=None, rows=None)
    assert back.calibration_interval(0.95) is None
    assert ModelMetrics.from_dict(json.loads(json.dumps(back.to_dict()))) == back
    h = holdout_metrics(y, p)
    assert (h["positives"], h["rows"]) == (3.0, 8.0) and h["expected_positives"] == pytest.approx(2.4)


@pytest.mark.parametrize("change, match", [
    ({"positives": -1}, "positives must be a count >= 0, got -1"),
    ({"rows": 2.5}, "rows must be a count >= 0, got 2.5"),
    ({"positives": 9, "rows": 8}, r"positives \(9\) must be <= rows \(8\)"),
    ({"expected_positives": math.nan}, "expected_positives must be a finite number >= 0, got nan"),
    ({"expected_positives": -0.5}, "expected_positives must be a finite number >= 0, got -0.5"),
])
def test_model_metrics_validate_the_counts(change: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ModelMetrics(version=None, auc=0.7, log_loss=0.3, calibration=1.0, mean_score=0.1, **change)


def test_latencies_of_two_models_are_timed_in_turns() -> None:
    """A burst of other work (here: the second and third timed calls) slows both models
    alike, whichever order they come in, so neither median sees it."""
    calls: list[str] = []
    frame = pd.DataFrame({"x": [1.0]})
    durations = iter([1.0, 1.0, 50.0, 50.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # ms per timed call
    now = [0.0]

    def timer() -> float:
        return now[0]

    def model(name: str) -> Callable[[pd.DataFrame], np.ndarray]:
        def predict(f: pd.DataFrame) -> np.ndarray:
            calls.append(name)
            if len(calls) > 2:  # after the warm-up calls
                now[0] += next(durations) / 1000.0
            return np.zeros(len(f))
        return predict

    a, b = latencies_ms_per_1000([model("a"), model("b")], frame, 5, timer=timer)
    warm_up, timed = calls[:2], calls[2:]
    assert warm_up == ["a", "b"] and timed == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]
    assert (a, b) == (pytest.approx(1.0), pytest.approx(1.0))


# -- the report --------------------------------------------------------------------------------


def test_the_report_compares_two_models_and_round_trips_through_json() -> None:
    rng = np.random.default_rng(14)
    y, a, b = world(rng, 3000, 0.6, 1.2)
    groups = np.repeat(np.arange(300), 10).astype(str)
    report = compare(y, ModelScores(sigmoid(a - 1.5), size_bytes=1000, latency_ms_per_1000=2.0),
                     ModelScores(sigmoid(b - 1.5), version="3", size_bytes=900, latency_ms_per_1000=1.5),
                     model="ctr", window=HoldoutWindow(100, 200), groups=groups, k=5, bootstrap_n=300, seed=5)
    assert report.rows == 3000 and report.positives == int(y.sum()) and report.champion_version == "3"
    assert report.auc_test is not None and report.auc_test.method == "delong"
    assert report.auc_test.diff == pytest.approx(auc(y, a) - auc(y, b))
    assert report.logloss_test is not None and report.logloss_test.diff < 0
    assert report.challenger.ndcg_at_k is not None and report.champion is not None
    assert report.challenger.ndcg_at_k > report.champion.ndcg_at_k  # type: ignore[operator]
    back = EvaluationReport.from_json(report.to_json())
    assert back == report
    assert back.challenger.positives == report.positives == int(y.sum())
    assert back.challenger.expected_positives == pytest.approx(float(sigmoid(a - 1.5).sum()))
    assert back.champion is not None and back.champion.rows == 3000
    m = report.metrics()
    assert m["eval.auc_diff"] == pytest.approx(report.auc_test.diff)
    assert m["eval.auc_p"] == pytest.approx(report.auc_test.p_one_sided)
    assert m["eval.logloss_diff"] < 0 and m["eval.champion_size_bytes"] == 900
    assert m["eval.expected_positives"] == pytest.approx(report.challenger.expected_positives)
    assert m["eval.champion_expected_positives"] == pytest.approx(report.champion.expected_positives)


def test_a_report_without_a_champion_and_undefined_numbers_travel_as_null() -> None:
    report = compare([0, 1, 1], ModelScores([0.2, 0.7, 0.9]), None, model="ctr",
                     window=HoldoutWindow(0, 0))
    assert report.champion is None and report.auc_test is None and report.logloss_test is None
    nan = EvaluationReport(model="ctr", window=HoldoutWindow(0, 0), rows=2, positives=0,
                           challenger=compare([0, 0], ModelScores([0.1, 0.2]), None, model="ctr",
                                              window=HoldoutWindow(0, 0)).challenger)
    assert math.isnan(nan.challenger.auc)
    assert '"auc": null' in nan.to_json()
    assert math.isnan(EvaluationReport.from_json(nan.to_json()).challenger.auc)
    assert "eval.auc" not in nan.metrics()


@pytest.mark.parametrize("change, match", [
    ({"rows": 0}, "rows=0"),
    ({"positives": 5}, r"\[0, rows=3\], got 5"),
    ({"version": 99}, "version 99"),
])
def test_a_report_validates_itself(change: dict[str, int], match: str) -> None:
    base = compare([0, 1, 1], ModelScores([0.2, 0.7, 0.9]), None, model="ctr", window=HoldoutWindow(0, 0))
    with pytest.raises(ValueError, match=match):
        EvaluationReport(**{**base.__dict__, **change})
    with pytest.raises(ValueError, match="before its start"):
        HoldoutWindow(5, 4)
    with pytest.raises(ValueError, match="level"):
        PairedTest("delong", 0, 0, 0, 0.5, 0, 0, level=1.5)
