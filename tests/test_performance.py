"""Tests of monitor.stats.performance: metrics against scipy, test sizes, power, insufficient data.

The simulated world is a calibrated CTR model: a latent ``z ~ N(0, 1)``, the
score ``s = expit(-3.3724 + z)`` (mean 0.05, AUC about 0.753) and the click
``~ Bernoulli(s)``; a secondary "like" label has rate ``0.3 s + 0.1 click``
(about 2%, correlated with the click). Degradations: the click rate scaled
(``ctr``), label noise (a share of clicks replaced by Bernoulli(0.05) draws,
which keeps the rate and the calibration and lowers the AUC: 0.2 gives about
0.703) and scores inflated after the labels were drawn (``inflate``).
"""

from __future__ import annotations

import doctest
import json
import math

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats

import monitor.stats.performance
from monitor.stats.performance import (
    PerformanceReference,
    PerformanceReport,
    PerformanceSpec,
    WindowMetrics,
    auc_delong,
    evaluate,
    hanley_mcneil_variance,
    window_metrics,
)

FloatArray = npt.NDArray[np.float64]
Labels = dict[str, npt.NDArray[np.bool_]]

INTERCEPT = -3.372393051435644  # mean score 0.05 with a unit-variance logit
# Significance alone: the effect gates at zero, so each test's size is visible.
P_ONLY = PerformanceSpec(min_rate_change=0.0, min_auc_drop=0.0, min_calibration_change=0.0,
                         min_log_loss_increase=0.0)


def draw(rng: np.random.Generator, n: int, ctr: float = 1.0, noise: float = 0.0,
         inflate: float = 1.0, dislike: float = 0.0) -> tuple[FloatArray, Labels]:
    s = special.expit(INTERCEPT + rng.standard_normal(n))
    click = rng.random(n) < ctr * s
    if noise:
        click = np.where(rng.random(n) < noise, rng.random(n) < 0.05, click)
    labels = {"click": click, "like": rng.random(n) < 0.3 * s + 0.1 * click}
    if dislike:
        labels["dislike"] = rng.random(n) < dislike
    return np.minimum(inflate * s, 1.0), labels


def metrics(rng: np.random.Generator, n: int, **kw: float) -> WindowMetrics:
    return window_metrics(*draw(rng, n, **kw), "click")


@pytest.fixture(scope="module")
def reference() -> PerformanceReference:
    """Two million events: 400x a 5k window, so rates take the exact binomial path."""
    return PerformanceReference.fit(*draw(np.random.default_rng(2024), 2_000_000), "click")


def binomial_bound(rate: float, trials: int, k: float = 3.0) -> float:
    return rate + k * math.sqrt(rate * (1.0 - rate) / trials)


def test_docstring_examples_run() -> None:
    result = doctest.testmod(monitor.stats.performance)
    assert result.attempted > 0
    assert result.failed == 0


# ------------------------------------------------------- metrics against scipy


tied_samples = st.integers(2, 60).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 6), min_size=n, max_size=n),
    st.lists(st.booleans(), min_size=n, max_size=n)))


@settings(max_examples=200, deadline=None)
@given(tied_samples)
def test_auc_equals_mann_whitney_u_over_pairs_with_ties(sample: tuple[list[int], list[bool]]) -> None:
    s = np.array(sample[0], dtype=np.float64) / 6.0
    y = np.array(sample[1])
    auc, _ = auc_delong(s, y)
    if y.all() or not y.any():
        assert math.isnan(auc)
        return
    u = stats.mannwhitneyu(s[y], s[~y]).statistic
    assert auc == pytest.approx(u / (y.sum() * (~y).sum()), rel=1e-12, abs=1e-15)


def brute_force_delong(s: FloatArray, y: npt.NDArray[np.bool_]) -> tuple[float, float]:
    """DeLong et al. (1988) straight from the O(n1 n0) kernel matrix."""
    pos, neg = s[y], s[~y]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return float(psi.mean()), float(v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size)


@settings(max_examples=150, deadline=None)
@given(st.integers(4, 80).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 20), min_size=n, max_size=n),
    st.lists(st.booleans(), min_size=n, max_size=n))))
def test_delong_variance_equals_the_quadratic_kernel_computation(
        sample: tuple[list[int], list[bool]]) -> None:
    s = np.array(sample[0], dtype=np.float64) / 20.0
    y = np.array(sample[1])
    if min(y.sum(), (~y).sum()) < 2:
        assert math.isnan(auc_delong(s, y)[1])
        return
    auc, var = auc_delong(s, y)
    ref_auc, ref_var = brute_force_delong(s, y)
    assert auc == pytest.approx(ref_auc, abs=1e-12)
    assert var == pytest.approx(ref_var, rel=1e-9, abs=1e-15)


def test_delong_variance_matches_the_spread_of_the_auc_across_windows() -> None:
    rng = np.random.default_rng(5)
    aucs, variances = [], []
    for _ in range(600):
        m = metrics(rng, 5000)
        aucs.append(m.auc)
        variances.append(m.auc_var)
    ratio = float(np.var(aucs, ddof=1) / np.mean(variances))
    # 600 windows estimate a variance to about 6%: +-15% is 2.5 standard errors.
    assert 0.85 < ratio < 1.15


def test_hanley_mcneil_agrees_with_delong_only_for_exponential_scores() -> None:
    rng = np.random.default_rng(6)
    pos, neg = rng.exponential(2.0, 3000), rng.exponential(1.0, 3000)
    s = np.concatenate([pos, neg]) / 50.0  # into [0, 1], order kept
    y = np.arange(6000) < 3000
    auc, var = auc_delong(np.minimum(s, 1.0), y)
    assert hanley_mcneil_variance(auc, 3000, 3000) == pytest.approx(var, rel=0.1)
    # Binormal scores with unequal spreads: HM's exponential shape is off by far more.
    g = np.concatenate([rng.normal(1.5, 0.3, 3000), rng.normal(0.0, 1.5, 3000)])
    auc, var = auc_delong(special.expit(g), y)
    assert abs(hanley_mcneil_variance(auc, 3000, 3000) / var - 1.0) > 0.25


def test_log_loss_equals_a_direct_numpy_computation() -> None:
    rng = np.random.default_rng(7)
    s = rng.beta(0.5, 5.0, 20_000)
    s[:5] = [0.0, 1.0, 0.0, 1.0, 1e-9]  # confident mistakes and hits: the clip matters
    y = rng.random(s.size) < s
    y[:5] = [True, False, False, True, True]
    m = window_metrics(s, {"click": y}, "click")
    c = np.clip(s, 1e-7, 1 - 1e-7)
    direct = -(y * np.log(c) + (1 - y) * np.log(1 - c))
    assert m.log_loss == pytest.approx(direct.mean(), rel=1e-12)
    assert m.log_loss_var == pytest.approx(direct.var(ddof=1), rel=1e-10)
    assert math.isfinite(m.log_loss)


def test_window_metrics_counts_rates_and_calibration() -> None:
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    m = window_metrics(s, {"click": [0, 1, 0, 1, 1], "like": np.array([1, 0, 0, 0, 0], np.uint8)}, "click")
    assert (m.n, m.n_pos, m.n_neg) == (5, 3, 2)
    assert m.positives == {"click": 3, "like": 1}
    assert m.rates == {"click": 0.6, "like": 0.2}
    assert m.expected == pytest.approx(1.5) and m.observed == 3
    assert m.calibration_ratio == pytest.approx(2.0)
    assert (m.score_sq_sum, m.score_cube_sum) == (pytest.approx(0.55), pytest.approx(0.225))
    assert m.auc == pytest.approx(stats.mannwhitneyu([0.2, 0.4, 0.5], [0.1, 0.3]).statistic / 6)


@pytest.mark.parametrize(("scores", "labels", "primary", "message"), [
    ([0.1, 1.2], {"click": [0, 1]}, "click", "in \\[0, 1\\], got 1.2"),
    ([0.1, np.nan], {"click": [0, 1]}, "click", "finite"),
    ([[0.1, 0.2]], {"click": [0, 1]}, "click", "1-d"),
    ([0.1, 0.2], {"click": [0, 1, 1]}, "click", "labels\\['click'\\] must be a 1-d array of 2"),
    ([0.1, 0.2], {"click": [0, 2]}, "click", "only 0 and 1, got 2"),
    ([0.1, 0.2], {"like": [0, 1]}, "click", "primary label 'click'"),
])
def test_window_metrics_rejects_bad_input_naming_it(scores: object, labels: dict[str, object],
                                                    primary: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        window_metrics(scores, labels, primary)


def test_metrics_and_references_round_trip_through_strict_json() -> None:
    rng = np.random.default_rng(8)
    m = metrics(rng, 3000)
    assert WindowMetrics.from_json(m.to_json()) == m
    ref = PerformanceReference.from_windows([m, metrics(rng, 2000)])
    assert PerformanceReference.from_json(ref.to_json()) == ref
    empty = window_metrics([], {"click": []}, "click")
    back = WindowMetrics.from_dict(json.loads(empty.to_json()))
    assert back.n == 0 and math.isnan(back.auc) and math.isnan(back.log_loss)
    with pytest.raises(ValueError, match="unsupported format"):
        PerformanceReference.from_dict(m.to_dict())


def test_from_windows_pools_counts_and_log_loss_exactly_and_auc_over_within_window_pairs() -> None:
    rng = np.random.default_rng(9)
    parts = [draw(rng, n) for n in (4000, 1, 7000, 2500)]
    windows = [window_metrics(s, y, "click") for s, y in parts]
    pooled = PerformanceReference.from_windows(windows)
    s_all = np.concatenate([s for s, _ in parts])
    y_all = {k: np.concatenate([y[k] for _, y in parts]) for k in ("click", "like")}
    exact = PerformanceReference.fit(s_all, y_all, "click")
    assert (pooled.n, pooled.positives, pooled.n_pos, pooled.n_neg) == (
        exact.n, exact.positives, exact.n_pos, exact.n_neg)
    for name in ("log_loss", "log_loss_var", "score_sum", "score_sq_sum", "score_cube_sum"):
        assert getattr(pooled, name) == pytest.approx(getattr(exact, name), rel=1e-9), name
    # The one-event window has no DeLong variance and is left out of the AUC.
    kept = [w for w in windows if w.n > 1]
    u = sum(w.auc * w.n_pos * w.n_neg for w in kept)
    assert pooled.auc == pytest.approx(u / sum(w.n_pos * w.n_neg for w in kept), rel=1e-12)
    assert pooled.auc == pytest.approx(exact.auc, abs=0.01)
    assert (pooled.auc_method, pooled.n_windows, exact.auc_method) == ("pair-weighted", 4, "exact")
    single = PerformanceReference.from_windows(windows[:1])
    assert single.auc == windows[0].auc and single.auc_var == windows[0].auc_var
    with pytest.raises(ValueError, match="cannot pool"):
        PerformanceReference.from_windows([windows[0], window_metrics([0.5], {"like": [1]}, "like")])


# ------------------------------------------------------------- the tests themselves


def test_rate_tests_equal_scipy_binomtest_and_the_two_by_two_chi_square(
        reference: PerformanceReference) -> None:
    rng = np.random.default_rng(10)
    m = metrics(rng, 5000, ctr=0.9)
    known = {t.metric: t for t in evaluate(reference, m, P_ONLY).tests}
    k, p_ref = m.positives["click"], reference.rates["click"]
    assert known["rate:click"].test == "binomial"
    assert known["rate:click"].p_value == pytest.approx(
        stats.binomtest(k, m.n, p_ref, alternative="less").pvalue, rel=1e-9)

    small_ref = PerformanceReference.fit(*draw(rng, 20_000), "click")
    two = {t.metric: t for t in evaluate(small_ref, m, P_ONLY).tests}["rate:click"]
    assert two.test == "two-proportion z"
    table = [[small_ref.n_pos, small_ref.n_neg], [m.n_pos, m.n_neg]]
    chi2 = stats.chi2_contingency(table, correction=False).statistic
    z = special.ndtri(two.p_value)
    assert z < 0 and z * z == pytest.approx(chi2, rel=1e-9)


def test_calibration_tail_matches_the_exact_poisson_binomial_distribution() -> None:
    rng = np.random.default_rng(11)
    s = rng.beta(1.0, 19.0, 600)  # 30 expected positives: the smallest window tested
    pmf = np.array([1.0])
    for p in s:
        pmf = np.convolve(pmf, [1.0 - p, p])
    lower, upper = np.cumsum(pmf), np.cumsum(pmf[::-1])[::-1]
    big = 10**9  # a reference so large that its own error vanishes, with ratio 1
    ref = PerformanceReference(n=big, primary="click", positives={"click": big // 20}, n_pos=big // 20,
                               n_neg=big - big // 20, auc=0.75, auc_var=1e-12, log_loss=0.2,
                               log_loss_var=0.3, score_sum=big / 20, score_sq_sum=big / 400,
                               score_cube_sum=big / 8000)
    worst_rna, worst_plain = 0.0, 0.0
    mu, sd = s.sum(), math.sqrt(float(np.sum(s * (1 - s))))
    for k in range(101):
        exact = min(1.0, 2.0 * min(lower[k], upper[k]))
        if not 1e-3 <= exact <= 0.1:
            continue
        y = np.arange(s.size) < k
        test = {t.metric: t for t in evaluate(ref, window_metrics(s, {"click": y}, "click"), P_ONLY).tests}
        worst_rna = max(worst_rna, abs(test["calibration"].p_value / exact - 1.0))
        plain = 2 * min(special.ndtr((k + 0.5 - mu) / sd), special.ndtr((mu - k + 0.5) / sd))
        worst_plain = max(worst_plain, abs(plain / exact - 1.0))
    assert worst_rna < 0.15  # measured 0.087 (the plain normal: 1.22)
    assert worst_plain > 0.5  # the skewness correction is what makes it hold


@pytest.fixture(scope="module")
def stationary_p_values(reference: PerformanceReference) -> dict[str, npt.NDArray[np.float64]]:
    rng = np.random.default_rng(12)
    out: dict[str, list[float]] = {}
    for _ in range(2000):
        for t in evaluate(reference, metrics(rng, 5000), P_ONLY).tests:
            out.setdefault(t.metric, []).append(t.p_value)
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("metric", ["rate:click", "rate:like", "auc", "calibration", "log_loss"])
def test_each_test_holds_its_size_on_stationary_windows(
        stationary_p_values: dict[str, FloatArray], metric: str) -> None:
    p = stationary_p_values[metric]
    assert p.size == 2000
    assert np.mean(p <= 0.01) <= binomial_bound(0.01, p.size)
    # Not vacuously: a test that never rejects is as broken as one that always does.
    assert abs(np.mean(p <= 0.05) - 0.05) <= 3.5 * math.sqrt(0.05 * 0.95 / p.size)


def test_each_test_holds_its_size_against_a_reference_pooled_from_a_few_windows() -> None:
    rng = np.random.default_rng(13)
    pool = [metrics(rng, 2000) for _ in range(1500)]
    out: dict[str, list[float]] = {}
    for i, w in enumerate(pool):
        # Four other windows: 4x the window's events, the two-sample path.
        ref = PerformanceReference.from_windows([pool[(i + j) % len(pool)] for j in (1, 2, 3, 4)])
        for t in evaluate(ref, w, P_ONLY).tests:
            if t.metric.startswith("rate:"):
                assert t.test == "two-proportion z"
            out.setdefault(t.metric, []).append(t.p_value)
    assert set(out) == {"rate:click", "rate:like", "auc", "calibration", "log_loss"}
    for metric, values in out.items():
        p = np.array(values)
        assert np.mean(p <= 0.01) <= binomial_bound(0.01, p.size), metric
        assert np.mean(p <= 0.05) <= binomial_bound(0.05, p.size), metric


@pytest.mark.parametrize(("n", "windows"), [(1000, 2000), (100_000, 100), (1_000_000, 4)])
def test_stationary_windows_raise_drops_at_most_at_alpha(reference: PerformanceReference,
                                                         n: int, windows: int) -> None:
    rng = np.random.default_rng(n)
    reports = [evaluate(reference, metrics(rng, n)) for _ in range(windows)]
    assert all(r.status != "insufficient_data" for r in reports)
    dropped = sum(bool(r.drops) for r in reports)
    assert dropped / windows <= binomial_bound(0.01, windows)
    if n == 1_000_000:
        # At a million events the effect gates bind: noise never reaches them.
        assert dropped == 0


def test_million_event_windows_flag_a_3pct_ctr_dip_by_p_value_but_not_by_the_rule(
        reference: PerformanceReference) -> None:
    rng = np.random.default_rng(14)
    reports = [evaluate(reference, metrics(rng, 1_000_000, ctr=0.97)) for _ in range(4)]
    for r in reports:
        tests = {t.metric: t for t in r.tests}
        assert tests["rate:click"].significant and tests["calibration"].significant
    assert not any(r.drops for r in reports)


def test_a_10pct_ctr_drop_is_detected_in_every_100k_window(reference: PerformanceReference) -> None:
    rng = np.random.default_rng(15)
    for _ in range(10):
        report = evaluate(reference, metrics(rng, 100_000, ctr=0.9))
        assert "rate:click" in {t.metric for t in report.drops}
        assert "auc" not in {t.metric for t in report.drops}


def test_an_auc_drop_from_075_to_070_is_detected_in_every_50k_window(
        reference: PerformanceReference) -> None:
    rng = np.random.default_rng(16)
    for _ in range(20):
        report = evaluate(reference, metrics(rng, 50_000, noise=0.2))
        auc = next(t for t in report.tests if t.metric == "auc")
        assert auc.fired and auc.observed < 0.715
        assert "rate:click" not in {t.metric for t in report.drops}


def test_scores_inflated_by_a_fifth_are_detected_as_miscalibration(reference: PerformanceReference) -> None:
    rng = np.random.default_rng(17)
    for _ in range(10):
        report = evaluate(reference, metrics(rng, 100_000, inflate=1.2))
        cal = next(t for t in report.tests if t.metric == "calibration")
        assert cal.fired and cal.relative_change == pytest.approx(1 / 1.2 - 1, abs=0.05)
        assert {t.metric for t in report.drops} == {"calibration"}


def test_small_windows_are_insufficient_data_and_never_fire(reference: PerformanceReference) -> None:
    rng = np.random.default_rng(18)
    # 500 events expect 25 clicks: below min_positives, however bad the window is.
    for kw in [{}, {"ctr": 0.0}, {"noise": 1.0}, {"inflate": 3.0}]:
        for _ in range(50):
            report = evaluate(reference, metrics(rng, 500, **kw))
            assert report.status == "insufficient_data" and report.insufficient_data
            assert report.tests == () and report.drops == ()
            assert "window" in report.skipped


def test_a_large_window_whose_clicks_vanish_is_a_drop_not_insufficient_data(
        reference: PerformanceReference) -> None:
    report = evaluate(reference, metrics(np.random.default_rng(19), 20_000, ctr=0.0))
    assert report.status == "drop"
    assert {"rate:click", "calibration"} <= {t.metric for t in report.drops}
    assert "auc" in report.skipped


def test_a_label_type_that_is_bad_news_fires_on_a_rise() -> None:
    rng = np.random.default_rng(20)
    ref = PerformanceReference.fit(*draw(rng, 500_000, dislike=0.02), "click")
    up = evaluate(ref, metrics(rng, 50_000, dislike=0.025))
    dislike = next(t for t in up.tests if t.metric == "rate:dislike")
    assert dislike.alternative == "rise" and dislike.fired
    down = evaluate(ref, metrics(rng, 50_000, dislike=0.015))
    assert not any(t.fired for t in down.tests)


def test_rare_or_missing_label_types_are_skipped_not_failed(reference: PerformanceReference) -> None:
    rng = np.random.default_rng(21)
    report = evaluate(reference, metrics(rng, 1000, dislike=0.01))
    assert report.status == "ok"
    assert "rate:like" in report.skipped  # 20 expected likes
    assert "absent from the reference" in report.skipped["rate:dislike"]
    assert "auc" in {t.metric for t in report.tests}


def test_bonferroni_never_adjusts_below_benjamini_hochberg(reference: PerformanceReference) -> None:
    rng = np.random.default_rng(22)
    for _ in range(10):
        m = metrics(rng, 20_000, ctr=0.95, noise=0.05)
        bh = evaluate(reference, m, P_ONLY).tests
        bonf = evaluate(reference, m, PerformanceSpec(min_rate_change=0.0, correction="bonferroni")).tests
        for a, b in zip(bh, bonf, strict=True):
            assert a.metric == b.metric and a.p_value == b.p_value
            assert b.p_adjusted >= a.p_adjusted - 1e-15
            assert b.p_adjusted == pytest.approx(min(1.0, a.p_value * len(bh)))


def test_report_is_json_ready_evidence(reference: PerformanceReference) -> None:
    report = evaluate(reference, metrics(np.random.default_rng(23), 100_000, ctr=0.9))
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d["status"] == "drop"
    assert any(t["metric"] == "rate:click" and t["fired"] for t in d["tests"])
    assert isinstance(report, PerformanceReport)


def test_evaluate_refuses_another_primary_label(reference: PerformanceReference) -> None:
    s, y = draw(np.random.default_rng(24), 1000)
    with pytest.raises(ValueError, match="reference predicts 'click' but the window 'like'"):
        evaluate(reference, window_metrics(s, y, "like"))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"alpha": 0.0}, "alpha must be in \\(0, 1\\), got 0.0"),
    ({"correction": "holm"}, "correction must be 'bh' or 'bonferroni', got 'holm'"),
    ({"min_rate_change": -0.01}, "min_rate_change must be a finite number >= 0, got -0.01"),
    ({"min_auc_drop": math.nan}, "min_auc_drop must be a finite number >= 0, got nan"),
    ({"min_calibration_change": None}, "min_calibration_change must be a finite number >= 0"),
    ({"min_log_loss_increase": math.inf}, "min_log_loss_increase must be a finite number >= 0"),
    ({"min_positives": 1}, "min_positives must be an integer >= 2, got 1"),
    ({"min_negatives": 30.0}, "min_negatives must be an integer >= 2, got 30.0"),
    ({"known_reference_ratio": 0.5}, "known_reference_ratio must be a finite number >= 1, got 0.5"),
    ({"worse_when_higher": "dislike"}, "worse_when_higher must be a tuple of label types"),
])
def test_spec_rejects_bad_values_naming_them(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PerformanceSpec(**kwargs)  # type: ignore[arg-type]


def test_log_loss_test_can_be_switched_off(reference: PerformanceReference) -> None:
    report = evaluate(reference, metrics(np.random.default_rng(25), 5000),
                      PerformanceSpec(min_log_loss_increase=None))
    assert "log_loss" not in {t.metric for t in report.tests} and "log_loss" not in report.skipped
