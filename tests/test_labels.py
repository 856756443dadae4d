"""The mergeable label summary: binned AUC and DeLong variance against exact versions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import mannwhitneyu

from monitor.stats.labels import LabelSummary, score_bins


def _world(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logit = rng.normal(-3.0, 1.2, n)
    s = 1.0 / (1.0 + np.exp(-logit))
    y = rng.random(n) < s
    return s, y


def test_binned_auc_matches_mann_whitney() -> None:
    s, y = _world(200_000, 1)
    summary = LabelSummary.from_arrays(s, {"click": y}, "click")
    u = mannwhitneyu(s[y], s[~y]).statistic
    exact = u / (y.sum() * (~y).sum())
    assert summary.auc() == pytest.approx(exact, abs=1e-4)
    assert 0.6 < exact < 0.9  # the world is informative, so the check means something


def _delong_bruteforce(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """DeLong 1988 with an O(n1 n0) kernel matrix (ties count a half)."""
    kernel = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10 = kernel.mean(axis=1)
    v01 = kernel.mean(axis=0)
    auc = kernel.mean()
    return auc, v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg)


def test_delong_variance_matches_bruteforce_on_binned_scores() -> None:
    s, y = _world(3_000, 2)
    bins = score_bins(s).astype(float)
    auc, var = _delong_bruteforce(bins[y], bins[~y])
    summary = LabelSummary.from_arrays(s, {"click": y}, "click")
    assert summary.auc() == pytest.approx(auc, rel=1e-12)
    assert summary.auc_variance() == pytest.approx(var, rel=1e-9)


def test_delong_variance_covers_the_sampling_spread() -> None:
    """Over independent windows the AUC spreads as the variance says (within 15%)."""
    aucs, variances = [], []
    for seed in range(200):
        s, y = _world(5_000, 100 + seed)
        summary = LabelSummary.from_arrays(s, {"click": y}, "click")
        aucs.append(summary.auc())
        variances.append(summary.auc_variance())
    assert np.var(aucs, ddof=1) == pytest.approx(np.mean(variances), rel=0.15)


def test_metrics_match_direct_numpy() -> None:
    s, y = _world(50_000, 3)
    clicks = y
    likes = np.random.default_rng(4).random(len(s)) < 0.01
    summary = LabelSummary.from_arrays(s, {"click": clicks, "like": likes}, "click")
    clipped = np.clip(s, 1e-7, 1 - 1e-7)
    loss = -(clicks * np.log(clipped) + (~clicks) * np.log(1 - clipped))
    assert summary.log_loss() == pytest.approx(loss.mean(), rel=1e-12)
    assert summary.log_loss_variance() == pytest.approx(loss.var(ddof=1) / len(s), rel=1e-6)
    assert summary.calibration() == pytest.approx(clicks.sum() / s.sum())
    assert summary.rate("like") == pytest.approx(likes.mean())
    assert summary.n_pos == clicks.sum() and summary.n_neg == (~clicks).sum()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), min_size=0, max_size=60),
       st.integers(0, 60))
def test_merge_equals_summary_of_concatenation(rows: list[tuple[float, bool]], cut: int) -> None:
    s = np.array([r[0] for r in rows], dtype=float)
    y = np.array([r[1] for r in rows], dtype=bool)
    cut = min(cut, len(rows))
    whole = LabelSummary.from_arrays(s, {"click": y}, "click")
    merged = (LabelSummary.from_arrays(s[:cut], {"click": y[:cut]}, "click")
              + LabelSummary.from_arrays(s[cut:], {"click": y[cut:]}, "click"))
    assert merged.n == whole.n and merged.positives == whole.positives
    assert np.array_equal(merged.hist_pos, whole.hist_pos)
    assert merged.expected == pytest.approx(whole.expected)
    assert merged.loss_sum == pytest.approx(whole.loss_sum)
    np.testing.assert_equal(merged.auc(), whole.auc())


def test_round_trip_through_dict() -> None:
    s, y = _world(10_000, 5)
    summary = LabelSummary.from_arrays(s, {"click": y}, "click")
    back = LabelSummary.from_dict(summary.to_dict())
    assert back.auc() == summary.auc() and back.positives == summary.positives
    assert back.loss_sq_sum == summary.loss_sq_sum


def test_degenerate_windows_give_nan_not_errors() -> None:
    empty = LabelSummary.from_arrays(np.zeros(0), {"click": np.zeros(0, bool)}, "click")
    assert np.isnan(empty.auc()) and np.isnan(empty.rate("click")) and np.isnan(empty.log_loss())
    no_pos = LabelSummary.from_arrays(np.full(10, 0.1), {"click": np.zeros(10, bool)}, "click")
    assert np.isnan(no_pos.auc()) and np.isnan(no_pos.auc_variance())
    with pytest.raises(KeyError, match="primary"):
        LabelSummary.from_arrays(np.zeros(1), {"like": np.zeros(1, bool)}, "click")


def test_feeds_the_drop_tests_like_the_exact_window_metrics() -> None:
    from monitor.stats.performance import evaluate, window_metrics

    s, y = _world(100_000, 6)
    summary = LabelSummary.from_arrays(s, {"click": y}, "click")
    exact = window_metrics(s, {"click": y}, "click")
    binned = summary.to_window_metrics()
    assert binned.auc == pytest.approx(exact.auc, abs=2e-4)
    assert binned.auc_var == pytest.approx(exact.auc_var, rel=0.02)
    assert binned.log_loss_var == pytest.approx(exact.log_loss_var, rel=1e-6)
    assert binned.score_sq_sum == pytest.approx(exact.score_sq_sum, rel=1e-9)
    assert binned.score_cube_sum == pytest.approx(exact.score_cube_sum, rel=1e-9)
    ref_s, ref_y = _world(400_000, 7)
    ref = LabelSummary.from_arrays(ref_s, {"click": ref_y}, "click").to_reference()
    assert evaluate(ref, binned).status == "ok"
    dropped = LabelSummary.from_arrays(s, {"click": y & (np.random.default_rng(8).random(len(y)) < 0.85)},
                                       "click").to_window_metrics()
    assert "rate:click" in [t.metric for t in evaluate(ref, dropped).drops]
