"""Label-based performance of a model version on matured windows, and its drop tests.

A window's predictions are joined with the feedback that arrived within the
attribution window (docs/monitoring.md); once the window has matured, the
join hands this module, per model version, the scores and one 0/1 label array
per label type. :func:`window_metrics` reduces them to a
:class:`WindowMetrics` (counts and sums, plus the AUC and its DeLong
variance); :class:`PerformanceReference` holds the same numbers for the
reference (the training data, or the previous champion on live traffic);
:func:`evaluate` runs one test per metric against it (docs/statistics.md).

The rule: a metric has *dropped in a window* only when the change reaches a
configured minimum effect **and** its multiplicity-corrected p-value is at or
below ``alpha`` (:class:`PerformanceSpec`). As for drift, neither gate works
alone: at a million events a 1% relative CTR wobble is "significant", and at
a thousand events noise alone moves the CTR by more than any useful effect
threshold.

The tests (formulas, measured sizes and power in docs/statistics.md):

* Rate of each label type: one-sided for a drop (a rise for label types that
  are bad news, such as dislikes). When the reference holds at least
  ``known_reference_ratio`` times the window's events its rate is treated as
  known and the window's count gets the exact binomial test (the one-sided
  p-value of ``scipy.stats.binomtest``); otherwise both rates are
  estimates and the pooled two-proportion z-test is used (Agresti 2013,
  3.1). Treating a 20x larger reference as known understates the variance
  of the difference by at most 5%, which moves a nominal 0.01 to about 0.012.
* Calibration (observed / expected positives): two-sided, because over- and
  under-prediction both mislead whoever consumes the scores. Given the scores
  and a model whose calibration ratio is the reference's ``c``, the observed
  positive count is a sum of independent Bernoulli(``c * s_i``) labels, a
  Poisson-binomial variable. Its exact mean ``c * sum(s)`` and variance
  ``sum(c s (1 - c s))`` are used, not the Poisson approximation (variance
  ``c * sum(s)``), which overstates the variance by the factor
  ``1 / (1 - c sum(s^2) / sum(s))``: 12% for the simulated 5% CTR model of
  the tests, far more for labels at 30%. The tail is the refined normal
  approximation, with a continuity and a skewness correction (Volkova 1996;
  Hong 2013, section 3): at 30 expected positives it stays within 10% of the
  exact Poisson-binomial p-value between 1e-3 and 0.1, where the plain
  normal approximation is off by up to a factor 2 (tested). The reference's
  own sampling error is added to the variance.
* AUC: one-sided z-test for a drop, ``z = (AUC_w - AUC_ref) /
  sqrt(Var_w + Var_ref)``, both variances by DeLong, DeLong & Clarke-Pearson
  (1988), computed from placement values in O(n log n) (Sun & Xu 2014). The
  window and the reference are independent samples, so the variances add.
  Hanley & McNeil's (1982) formula assumes exponential score distributions;
  :func:`hanley_mcneil_variance` is kept for comparison only.
* Log loss: one-sided z-test for an increase of the mean per-event loss,
  with the per-event sample variances of both sides (Welch's statistic with
  a normal reference distribution; the counts are far too large for the t
  correction to matter).

Multiple testing: Benjamini & Hochberg (1995) across the metrics of one
window (or Bonferroni, configured), so that one window raises a false drop
with probability at most about ``alpha`` whatever the number of label types.

A window whose *size* is too small (fewer than ``min_positives`` expected
positives or ``min_negatives`` expected negatives of the primary label at the
reference rate) is reported as insufficient data and tests nothing. The gate
looks at the expected counts, not the observed ones, on purpose: a window of
100k events in which the clicks vanished is a drop, not a small window.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt
from scipy import special

from monitor.stats.drift import benjamini_hochberg

__all__ = [
    "DropTest",
    "PerformanceReference",
    "PerformanceReport",
    "PerformanceSpec",
    "WindowMetrics",
    "auc_delong",
    "evaluate",
    "hanley_mcneil_variance",
    "window_metrics",
]

FloatArray = npt.NDArray[np.float64]

WINDOW_FORMAT = "driftloop.performance-window/v1"
REFERENCE_FORMAT = "driftloop.performance-reference/v1"

#: Scores are clipped to [EPS, 1 - EPS] for the log loss only: one confident
#: mistake then costs at most -ln(1e-7) = 16.1 nats instead of infinity.
LOG_LOSS_EPS = 1e-7


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class PerformanceSpec:
    """Every threshold of the performance drop tests.

    A metric *drops* in a window when its change reaches the minimum effect
    AND its adjusted p-value is at or below ``alpha``. The defaults were
    measured against the stationary and shifted worlds in docs/statistics.md
    (CTR 5%, AUC 0.75): stationary windows of 1k to 1M events raise drops at
    most at ``alpha``, while a 10% CTR drop at 100k events, an AUC drop from
    0.75 to 0.70 at 50k and scores inflated 1.2x are caught every time.

    Parameters:
        alpha: Level of each window's family of tests, after ``correction``.
        correction: ``"bh"`` (Benjamini-Hochberg, the default, as for drift)
            or ``"bonferroni"``.
        min_rate_change: Smallest relative change of a label rate that counts
            (0.05: a CTR falling from 5% to 4.75%).
        min_auc_drop: Smallest absolute AUC drop that counts. 0.01 is about
            the gain that justifies shipping a new ranking model, so a loss of
            that size is worth a page.
        min_calibration_change: Smallest relative departure of the calibration
            ratio from the reference's, either way (0.10: the scores over- or
            understate the positives by 10% more than they used to).
        min_log_loss_increase: Smallest relative increase of the mean log
            loss, or ``None`` to skip the log-loss test. At a 5% CTR an AUC
            drop from 0.75 to 0.70 costs +4.9% and scores inflated 1.2x cost
            only +0.6% (log loss is a poor miscalibration detector at low
            rates, hence the separate calibration test); 0.02 sits between.
        min_positives: Fewest expected positives (of the primary label at the
            reference rate) for a window to be tested at all, and fewest
            positives behind any single test (the observed ones for AUC).
            30 keeps the normal approximations honest in the tails.
        min_negatives: The same for negatives.
        known_reference_ratio: When the reference has at least this many
            times the window's events, the reference rate is treated as known
            (exact binomial test); below it, the two-proportion z-test.
        worse_when_higher: Label types for which a rise, not a drop, is bad
            news (tested one-sided for a rise).

    Example:
        >>> PerformanceSpec().alpha
        0.01
        >>> PerformanceSpec(min_auc_drop=-0.1)
        Traceback (most recent call last):
        ...
        ValueError: min_auc_drop must be a finite number >= 0, got -0.1
    """

    alpha: float = 0.01
    correction: Literal["bh", "bonferroni"] = "bh"
    min_rate_change: float = 0.05
    min_auc_drop: float = 0.01
    min_calibration_change: float = 0.10
    min_log_loss_increase: float | None = 0.02
    min_positives: int = 30
    min_negatives: int = 30
    known_reference_ratio: float = 20.0
    worse_when_higher: tuple[str, ...] = ("dislike", "skip")

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            msg = f"alpha must be in (0, 1), got {self.alpha}"
            raise ValueError(msg)
        if self.correction not in ("bh", "bonferroni"):
            msg = f"correction must be 'bh' or 'bonferroni', got {self.correction!r}"
            raise ValueError(msg)
        effects: dict[str, float | None] = {
            "min_rate_change": self.min_rate_change, "min_auc_drop": self.min_auc_drop,
            "min_calibration_change": self.min_calibration_change,
            "min_log_loss_increase": self.min_log_loss_increase}
        for name, value in effects.items():
            if value is None and name == "min_log_loss_increase":
                continue
            if value is None or not (math.isfinite(value) and value >= 0.0):
                msg = f"{name} must be a finite number >= 0, got {value}"
                raise ValueError(msg)
        for name, count in [("min_positives", self.min_positives),
                            ("min_negatives", self.min_negatives)]:
            if isinstance(count, bool) or not isinstance(count, int) or count < 2:
                # DeLong's variance needs two of each; fewer is no test at all.
                msg = f"{name} must be an integer >= 2, got {count!r}"
                raise ValueError(msg)
        if not (math.isfinite(self.known_reference_ratio) and self.known_reference_ratio >= 1.0):
            msg = f"known_reference_ratio must be a finite number >= 1, got {self.known_reference_ratio}"
            raise ValueError(msg)
        if not isinstance(self.worse_when_higher, tuple) or not all(
                isinstance(x, str) for x in self.worse_when_higher):
            msg = f"worse_when_higher must be a tuple of label types, got {self.worse_when_higher!r}"
            raise ValueError(msg)


# ----------------------------------------------------------------------- the AUC


def auc_delong(scores: Any, labels: Any) -> tuple[float, float]:
    """AUC and its DeLong variance, in O(n log n).

    The AUC is the Mann-Whitney statistic ``U / (n1 n0)`` with ties counted
    one half, so it equals ``scipy.stats.mannwhitneyu(pos, neg).statistic /
    (n1 * n0)``. DeLong, DeLong & Clarke-Pearson (1988) write it as the mean
    of the positives' placement values ``V10_i`` (the share of negatives
    scored below positive ``i``, ties one half) and equally as the mean of
    the negatives' ``V01_j`` (the share of positives above negative ``j``);
    its variance is ``var(V10) / n1 + var(V01) / n0`` (sample variances).
    The placements come from two sorts and two binary searches (Sun & Xu
    2014's observation that midranks are all DeLong needs), not the O(n1 n0)
    kernel matrix.

    Returns:
        ``(auc, variance)``; the AUC is NaN without both classes, the variance
        NaN with fewer than two of either.

    Example:
        >>> auc, var = auc_delong([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        >>> auc, round(var, 4)
        (0.75, 0.125)
    """
    s = _as_scores(scores)
    y = _as_label(labels, "labels", s.size)
    return _auc_delong(s, y)


def _auc_delong(s: FloatArray, y: npt.NDArray[np.bool_]) -> tuple[float, float]:
    pos = np.sort(s[y])
    neg = np.sort(s[~y])
    n1, n0 = pos.size, neg.size
    if n1 == 0 or n0 == 0:
        return math.nan, math.nan
    # Twice the placements, as integers: (#below + #below-or-equal) counts a
    # tie once in total, so the AUC is exact and equal to scipy's U / (n1 n0).
    two_v10 = np.searchsorted(neg, pos, "left") + np.searchsorted(neg, pos, "right")
    two_above = 2 * n1 - np.searchsorted(pos, neg, "left") - np.searchsorted(pos, neg, "right")
    auc = float(two_v10.sum(dtype=np.int64)) / (2.0 * n1 * n0)
    if n1 < 2 or n0 < 2:
        return auc, math.nan
    var10 = float(np.var(two_v10 / (2.0 * n0), ddof=1))
    var01 = float(np.var(two_above / (2.0 * n1), ddof=1))
    return auc, var10 / n1 + var01 / n0


def hanley_mcneil_variance(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil's (1982) variance of the AUC, for comparison with DeLong's.

    ``(A(1-A) + (n1-1)(Q1-A^2) + (n0-1)(Q2-A^2)) / (n1 n0)`` with ``Q1 =
    A/(2-A)`` and ``Q2 = 2A^2/(1+A)``, the values for exponential score
    distributions. It needs only the AUC and the counts, which is its appeal,
    but it misstates the variance when the scores are not exponential-like;
    the tests here use DeLong's.

    Example:
        >>> round(hanley_mcneil_variance(0.75, 100, 100), 6)
        0.001186
    """
    if n_pos < 1 or n_neg < 1 or not 0.0 <= auc <= 1.0:
        msg = f"need n_pos, n_neg >= 1 and auc in [0, 1], got {n_pos}, {n_neg}, {auc}"
        raise ValueError(msg)
    q1 = auc / (2.0 - auc)
    q2 = 2.0 * auc * auc / (1.0 + auc)
    a2 = auc * auc
    return (auc * (1.0 - auc) + (n_pos - 1) * (q1 - a2) + (n_neg - 1) * (q2 - a2)) / (n_pos * n_neg)


# ------------------------------------------------------------------- the metrics


class _Sums:
    """Metrics derived from the sums that windows and references both keep."""

    n: int
    positives: Mapping[str, int]
    n_pos: int
    score_sum: float

    @property
    def rates(self) -> dict[str, float]:
        """Label type -> share of predictions with that feedback (NaN when empty)."""
        return {k: v / self.n if self.n else math.nan for k, v in self.positives.items()}

    @property
    def expected(self) -> float:
        """Expected positives of the primary label: ``sum(scores)``."""
        return self.score_sum

    @property
    def observed(self) -> int:
        """Observed positives of the primary label."""
        return self.n_pos

    @property
    def calibration_ratio(self) -> float:
        """Observed / expected positives: 1 for a calibrated model."""
        return self.n_pos / self.score_sum if self.score_sum > 0 else math.nan


@dataclass(frozen=True)
class WindowMetrics(_Sums):
    """Label-based metrics of one model version in one matured window.

    Sums rather than only ratios are kept, so that windows pool into a
    :class:`PerformanceReference` exactly for every metric but the AUC.

    Parameters:
        n: Predictions in the window.
        primary: The label type the scores predict (e.g. ``"click"``).
        positives: Label type -> count of predictions with that feedback.
        n_pos: Positives of the primary label (``positives[primary]``).
        n_neg: ``n - n_pos``.
        auc: Area under the ROC curve of the scores for the primary label
            (Mann-Whitney, ties one half); NaN without both classes.
        auc_var: DeLong's variance of ``auc``; NaN with fewer than 2 of a class.
        log_loss: Mean per-event log loss of the primary label, scores clipped
            to ``[1e-7, 1 - 1e-7]``; NaN for an empty window.
        log_loss_var: Sample variance (ddof 1) of the per-event log loss.
        score_sum: ``sum(s)``, the expected positives of a calibrated model.
        score_sq_sum: ``sum(s^2)``, for the variance of the positive count.
        score_cube_sum: ``sum(s^3)``, for its skewness.

    Example:
        >>> m = window_metrics([0.2, 0.6, 0.7, 0.1], {"click": [0, 1, 1, 0]}, "click")
        >>> m.auc, m.rates["click"], round(m.calibration_ratio, 3)
        (1.0, 0.5, 1.25)
    """

    n: int
    primary: str
    positives: Mapping[str, int]
    n_pos: int
    n_neg: int
    auc: float
    auc_var: float
    log_loss: float
    log_loss_var: float
    score_sum: float
    score_sq_sum: float
    score_cube_sum: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN written as null) with a ``format`` key."""
        return {"format": WINDOW_FORMAT, **_numbers_to_dict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WindowMetrics:
        """Inverse of :meth:`to_dict`; refuses an unknown ``format``."""
        _check_format(d, WINDOW_FORMAT)
        return cls(**_numbers_from_dict(d))

    def to_json(self) -> str:
        """Strict JSON; floats round-trip exactly."""
        return json.dumps(self.to_dict(), allow_nan=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> WindowMetrics:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


def window_metrics(scores: Any, labels: Mapping[str, Any], primary: str) -> WindowMetrics:
    """Reduce one matured window of one model version to :class:`WindowMetrics`.

    Parameters:
        scores: 1-d array of predicted probabilities of the primary label, in [0, 1].
        labels: Label type -> 1-d 0/1 (or bool) array of the same length: 1 when
            feedback of that type arrived within the attribution window.
        primary: The label type the scores predict; must be a key of ``labels``.

    Raises:
        ValueError: On a score outside [0, 1] or non-finite, a label array of
            another length or with values other than 0 and 1, or a missing
            primary label.
    """
    s = _as_scores(scores)
    if primary not in labels:
        msg = f"primary label {primary!r} is not among the label types {sorted(labels)}"
        raise ValueError(msg)
    ys = {str(k): _as_label(v, f"labels[{k!r}]", s.size) for k, v in labels.items()}
    y = ys[primary]
    n = int(s.size)
    n_pos = int(np.count_nonzero(y))
    auc, auc_var = _auc_delong(s, y)
    if n:
        c = np.clip(s, LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS)
        loss = np.where(y, -np.log(c), -np.log1p(-c))
        log_loss = float(loss.mean())
        log_loss_var = float(loss.var(ddof=1)) if n > 1 else math.nan
    else:
        log_loss = log_loss_var = math.nan
    s2 = s * s
    return WindowMetrics(
        n=n, primary=primary,
        positives={k: int(np.count_nonzero(v)) for k, v in ys.items()},
        n_pos=n_pos, n_neg=n - n_pos, auc=auc, auc_var=auc_var,
        log_loss=log_loss, log_loss_var=log_loss_var,
        score_sum=float(s.sum()), score_sq_sum=float(s2.sum()), score_cube_sum=float(np.dot(s2, s)))


@dataclass(frozen=True)
class PerformanceReference(_Sums):
    """The performance a window is compared with: training data or the champion's traffic.

    The fields mean what they mean in :class:`WindowMetrics`. Counts, score
    sums and the log loss (mean and variance, merged by Chan, Golub &
    LeVeque 1979) pool exactly across windows; the AUC does not, because the
    pooled AUC ranks every positive against every negative of every window.

    * :meth:`fit` computes everything from the raw arrays: the AUC is exact.
    * :meth:`from_windows` takes the AUC over the pairs *within* windows:
      ``sum(U_w) / sum(n1_w n0_w)``, the mean of the window AUCs weighted by
      their pair counts (the stratified Mann-Whitney statistic), with variance
      ``sum(w^2 Var_w)``. It equals the pooled AUC when the windows share one
      score distribution and base rate; when they differ it is the better
      reference anyway, since each window is later compared in isolation.
      Windows without a DeLong variance (fewer than two positives or
      negatives) are left out of the AUC.

    Parameters:
        auc_method: ``"exact"`` (from :meth:`fit`), ``"pair-weighted"``, or
            ``"binned"`` (every pair ranked on 2,000 logit bins, from
            ``monitor.stats.labels.LabelSummary.to_reference``).
        n_windows: Windows pooled (1 for :meth:`fit`).

    Example:
        >>> ref = PerformanceReference.fit([0.1, 0.4, 0.35, 0.8], {"click": [0, 0, 1, 1]}, "click")
        >>> ref.auc, ref.rates["click"], ref.auc_method
        (0.75, 0.5, 'exact')
    """

    n: int
    primary: str
    positives: Mapping[str, int]
    n_pos: int
    n_neg: int
    auc: float
    auc_var: float
    log_loss: float
    log_loss_var: float
    score_sum: float
    score_sq_sum: float
    score_cube_sum: float
    auc_method: Literal["exact", "pair-weighted", "binned"] = "exact"
    n_windows: int = field(default=1)

    @classmethod
    def fit(cls, scores: Any, labels: Mapping[str, Any], primary: str) -> PerformanceReference:
        """The reference of raw arrays (same contract as :func:`window_metrics`); exact AUC."""
        m = window_metrics(scores, labels, primary)
        return cls(**_numbers_to_dict(m, keep_nan=True), auc_method="exact", n_windows=1)

    @classmethod
    def from_windows(cls, windows: Sequence[WindowMetrics]) -> PerformanceReference:
        """Pool window metrics (e.g. the champion's last week) into a reference.

        Raises:
            ValueError: On no windows, or windows with different primary
                labels or label types.
        """
        if not windows:
            msg = "from_windows needs at least one window"
            raise ValueError(msg)
        first = windows[0]
        for w in windows[1:]:
            if w.primary != first.primary or set(w.positives) != set(first.positives):
                msg = (f"cannot pool windows of primary {w.primary!r} with label types "
                       f"{sorted(w.positives)} and {first.primary!r} with {sorted(first.positives)}")
                raise ValueError(msg)
        n = sum(w.n for w in windows)
        with_auc = [w for w in windows if math.isfinite(w.auc_var)]
        pairs = np.array([float(w.n_pos) * w.n_neg for w in with_auc])
        if pairs.size and pairs.sum() > 0:
            weight = pairs / pairs.sum()
            auc = float(np.dot(weight, [w.auc for w in with_auc]))
            auc_var = float(np.dot(weight * weight, [w.auc_var for w in with_auc]))
        else:
            auc = auc_var = math.nan
        log_loss, log_loss_var = _pool_moments([(w.n, w.log_loss, w.log_loss_var) for w in windows])
        return cls(
            n=n, primary=first.primary,
            positives={k: sum(w.positives[k] for w in windows) for k in first.positives},
            n_pos=sum(w.n_pos for w in windows), n_neg=sum(w.n_neg for w in windows),
            auc=auc, auc_var=auc_var, log_loss=log_loss, log_loss_var=log_loss_var,
            score_sum=math.fsum(w.score_sum for w in windows),
            score_sq_sum=math.fsum(w.score_sq_sum for w in windows),
            score_cube_sum=math.fsum(w.score_cube_sum for w in windows),
            auc_method="pair-weighted", n_windows=len(windows))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN written as null) with a ``format`` key."""
        return {"format": REFERENCE_FORMAT, **_numbers_to_dict(self),
                "auc_method": self.auc_method, "n_windows": self.n_windows}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PerformanceReference:
        """Inverse of :meth:`to_dict`; refuses an unknown ``format``."""
        _check_format(d, REFERENCE_FORMAT)
        method = d["auc_method"]
        if method not in ("exact", "pair-weighted", "binned"):
            msg = f"unknown auc_method {method!r}"
            raise ValueError(msg)
        return cls(**_numbers_from_dict(d), auc_method=method, n_windows=int(d["n_windows"]))

    def to_json(self) -> str:
        """Strict JSON; floats round-trip exactly."""
        return json.dumps(self.to_dict(), allow_nan=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> PerformanceReference:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


_INT_FIELDS = ("n", "n_pos", "n_neg")
_FLOAT_FIELDS = ("auc", "auc_var", "log_loss", "log_loss_var",
                 "score_sum", "score_sq_sum", "score_cube_sum")


def _numbers_to_dict(m: WindowMetrics | PerformanceReference, keep_nan: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {k: int(getattr(m, k)) for k in _INT_FIELDS}
    for k in _FLOAT_FIELDS:
        v = float(getattr(m, k))
        out[k] = v if keep_nan or math.isfinite(v) else None
    out["primary"] = m.primary
    out["positives"] = {str(k): int(v) for k, v in m.positives.items()}
    return out


def _numbers_from_dict(d: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: int(d[k]) for k in _INT_FIELDS}
    out.update({k: math.nan if d[k] is None else float(d[k]) for k in _FLOAT_FIELDS})
    out["primary"] = str(d["primary"])
    out["positives"] = {str(k): int(v) for k, v in d["positives"].items()}
    if out["primary"] not in out["positives"] or out["positives"][out["primary"]] != out["n_pos"]:
        msg = f"positives {out['positives']} do not hold n_pos {out['n_pos']} of {out['primary']!r}"
        raise ValueError(msg)
    return out


def _check_format(d: Mapping[str, Any], expected: str) -> None:
    fmt = d.get("format")
    if fmt != expected:
        msg = f"unsupported format {fmt!r}; this reader knows {expected!r}"
        raise ValueError(msg)


def _pool_moments(parts: Sequence[tuple[int, float, float]]) -> tuple[float, float]:
    """Mean and sample variance of concatenated samples from (n, mean, var ddof=1)."""
    parts = [p for p in parts if p[0] > 0]
    total = sum(p[0] for p in parts)
    if total == 0:
        return math.nan, math.nan
    mean = math.fsum(n * m for n, m, _ in parts) / total
    if total < 2:
        return mean, math.nan
    m2 = math.fsum((n - 1) * v + n * (m - mean) ** 2 if n > 1 else (m - mean) ** 2
                   for n, m, v in parts)
    return mean, m2 / (total - 1)


# ---------------------------------------------------------------------- the tests


@dataclass(frozen=True)
class DropTest:
    """One metric's test in one window.

    Parameters:
        metric: ``"rate:<label type>"``, ``"auc"``, ``"calibration"`` or
            ``"log_loss"`` (the last three of the primary label).
        test: The test used: ``"binomial"``, ``"two-proportion z"``,
            ``"poisson-binomial"``, ``"delong z"`` or ``"welch z"``.
        alternative: The bad direction tested: ``"drop"``, ``"rise"`` or
            ``"two-sided"``.
        reference: The reference value (for calibration, its ratio).
        observed: The window's value.
        change: ``observed - reference``.
        relative_change: ``observed / reference - 1``.
        p_value: Unadjusted p-value.
        p_adjusted: After the window's multiple-testing correction.
        effect_ok: Whether the change reached the configured minimum effect
            in the bad direction.
        significant: ``p_adjusted <= alpha``.
    """

    metric: str
    test: str
    alternative: Literal["drop", "rise", "two-sided"]
    reference: float
    observed: float
    change: float
    relative_change: float
    p_value: float
    p_adjusted: float
    effect_ok: bool
    significant: bool

    @property
    def fired(self) -> bool:
        """Both gates passed: this metric dropped in this window."""
        return self.effect_ok and self.significant

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready evidence for an incident (non-finite numbers as null)."""
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            out[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        out["fired"] = self.fired
        return out


@dataclass(frozen=True)
class PerformanceReport:
    """Everything :func:`evaluate` found in one window.

    Parameters:
        tests: Every test that ran, rates first (primary label first).
        skipped: Metric -> why it was not tested (too few events, or a label
            type missing on one side).
        insufficient_data: The window was too small to test anything.
    """

    tests: tuple[DropTest, ...]
    skipped: Mapping[str, str]
    insufficient_data: bool

    @property
    def drops(self) -> tuple[DropTest, ...]:
        """The tests that fired."""
        return tuple(t for t in self.tests if t.fired)

    @property
    def status(self) -> Literal["drop", "ok", "insufficient_data"]:
        """``"insufficient_data"``, ``"drop"`` when any test fired, else ``"ok"``."""
        if self.insufficient_data:
            return "insufficient_data"
        return "drop" if self.drops else "ok"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready evidence."""
        return {"status": self.status, "tests": [t.to_dict() for t in self.tests],
                "skipped": dict(self.skipped)}


def evaluate(reference: PerformanceReference, window: WindowMetrics,
             spec: PerformanceSpec | None = None) -> PerformanceReport:
    """Test every metric of ``window`` against ``reference`` for a drop.

    Parameters:
        reference: The reference of this model version (or the champion).
        window: The metrics of one matured window.
        spec: Thresholds; the defaults of :class:`PerformanceSpec` otherwise.

    Raises:
        ValueError: When the primary labels differ.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> s = rng.beta(1, 19, 400_000)
        >>> ref = PerformanceReference.fit(s, {"click": rng.random(s.size) < s}, "click")
        >>> w = rng.beta(1, 19, 100_000)
        >>> ok = evaluate(ref, window_metrics(w, {"click": rng.random(w.size) < w}, "click"))
        >>> ok.status, [t.metric for t in ok.tests]
        ('ok', ['rate:click', 'auc', 'calibration', 'log_loss'])
        >>> bad = evaluate(ref, window_metrics(w, {"click": rng.random(w.size) < 0.85 * w}, "click"))
        >>> bad.status, [t.metric for t in bad.drops]
        ('drop', ['rate:click', 'calibration'])
    """
    spec = spec or PerformanceSpec()
    if reference.primary != window.primary:
        msg = f"reference predicts {reference.primary!r} but the window {window.primary!r}"
        raise ValueError(msg)
    primary = window.primary
    skipped: dict[str, str] = {}
    ref_rate = reference.n_pos / reference.n if reference.n else math.nan
    exp_pos = window.n * ref_rate
    if not (exp_pos >= spec.min_positives and window.n - exp_pos >= spec.min_negatives):
        skipped["window"] = (f"{window.n} events expect {exp_pos:.1f} positives of {primary!r} at the "
                             f"reference rate; need {spec.min_positives} and {spec.min_negatives} negatives")
        return PerformanceReport((), skipped, insufficient_data=True)

    outcomes: dict[str, _Outcome] = {}

    def run(metric: str, result: _Outcome | str) -> None:
        if isinstance(result, str):
            skipped[metric] = result
        else:
            outcomes[metric] = result

    labels = [primary, *sorted(k for k in set(reference.positives) | set(window.positives) if k != primary)]
    for label in labels:
        if label not in reference.positives or label not in window.positives:
            side = "reference" if label not in reference.positives else "window"
            skipped[f"rate:{label}"] = f"label type {label!r} is absent from the {side}"
        else:
            run(f"rate:{label}", _rate_test(reference, window, label, label in spec.worse_when_higher, spec))
    run("auc", _auc_test(reference, window, spec))
    run("calibration", _calibration_test(reference, window, spec))
    if spec.min_log_loss_increase is not None:
        run("log_loss", _log_loss_test(reference, window, spec))

    p = np.array([o.p_value for o in outcomes.values()], dtype=np.float64)
    adjusted = benjamini_hochberg(p) if spec.correction == "bh" else np.minimum(p * p.size, 1.0)
    tests = tuple(
        DropTest(metric, o.test, o.alternative, o.reference, o.observed, o.observed - o.reference,
                 _relative(o.observed, o.reference), o.p_value, p_adj, o.effect_ok, p_adj <= spec.alpha)
        for (metric, o), p_adj in zip(outcomes.items(), adjusted.tolist(), strict=True))
    return PerformanceReport(tests, skipped, insufficient_data=False)


class _Outcome(NamedTuple):
    test: str
    alternative: Literal["drop", "rise", "two-sided"]
    reference: float
    observed: float
    p_value: float
    effect_ok: bool


def _relative(observed: float, reference: float) -> float:
    if reference != 0.0:
        return observed / reference - 1.0
    return 0.0 if observed == 0.0 else math.copysign(math.inf, observed)


def _rate_test(ref: PerformanceReference, win: WindowMetrics, label: str, rise_is_bad: bool,
               spec: PerformanceSpec) -> _Outcome | str:
    k_r, n_r = ref.positives[label], ref.n
    k_w, n_w = win.positives[label], win.n
    p_r = k_r / n_r
    if min(k_r, n_r - k_r) < min(spec.min_positives, spec.min_negatives) or not (
            n_w * p_r >= spec.min_positives and n_w * (1 - p_r) >= spec.min_negatives):
        return (f"{n_w} events expect {n_w * p_r:.1f} of {label!r} (reference {k_r} of {n_r}); "
                f"need {spec.min_positives} expected positives and {spec.min_negatives} negatives")
    p_w = k_w / n_w
    if n_r >= spec.known_reference_ratio * n_w:
        test = "binomial"
        # scipy.stats.binomtest's one-sided p-values, as ufuncs: the exact tails.
        p = (float(special.bdtrc(k_w - 1, n_w, p_r)) if k_w > 0 else 1.0) if rise_is_bad \
            else float(special.bdtr(k_w, n_w, p_r))
    else:
        test = "two-proportion z"
        pooled = (k_r + k_w) / (n_r + n_w)
        z = (p_w - p_r) / math.sqrt(pooled * (1.0 - pooled) * (1.0 / n_r + 1.0 / n_w))
        p = float(special.ndtr(z if not rise_is_bad else -z))
    rel = p_w / p_r - 1.0
    effect = rel >= spec.min_rate_change if rise_is_bad else -rel >= spec.min_rate_change
    return _Outcome(test, "rise" if rise_is_bad else "drop", p_r, p_w, p, bool(effect))


def _auc_test(ref: PerformanceReference, win: WindowMetrics,
              spec: PerformanceSpec) -> _Outcome | str:
    for side, m in [("reference", ref), ("window", win)]:
        if m.n_pos < spec.min_positives or m.n_neg < spec.min_negatives or not math.isfinite(m.auc_var):
            return (f"the {side} has {m.n_pos} positives and {m.n_neg} negatives; "
                    f"need {spec.min_positives} and {spec.min_negatives}")
    se = math.sqrt(win.auc_var + ref.auc_var)
    diff = win.auc - ref.auc
    p = float(special.ndtr(diff / se)) if se > 0 else (0.0 if diff < 0 else 1.0)
    return _Outcome("delong z", "drop", ref.auc, win.auc, p, bool(-diff >= spec.min_auc_drop))


def _calibration_test(ref: PerformanceReference, win: WindowMetrics,
                      spec: PerformanceSpec) -> _Outcome | str:
    c = ref.calibration_ratio
    if not (ref.n_pos >= spec.min_positives and ref.n_neg >= spec.min_negatives and math.isfinite(c)):
        return (f"the reference has {ref.n_pos} positives and {ref.n_neg} negatives; "
                f"need {spec.min_positives} and {spec.min_negatives}")
    mean = c * win.score_sum
    if not (mean >= spec.min_positives and win.n - mean >= spec.min_negatives):
        return (f"the window expects {mean:.1f} positives of {win.n}; "
                f"need {spec.min_positives} and {spec.min_negatives} negatives")
    # Cumulants of sum(Bernoulli(c s_i)) from the power sums of the scores; the
    # reference's ratio is itself a ratio of such sums, so its error adds.
    k2_w, k3_w = _bernoulli_cumulants(c, win)
    k2_r, k3_r = _bernoulli_cumulants(c, ref)
    scale = win.score_sum / ref.score_sum
    var = k2_w + scale * scale * k2_r
    third = k3_w - scale ** 3 * k3_r
    p = _two_sided_rna(win.n_pos - mean, var, third)
    observed = win.calibration_ratio
    effect = abs(observed / c - 1.0) >= spec.min_calibration_change
    return _Outcome("poisson-binomial", "two-sided", c, observed, p, bool(effect))


def _bernoulli_cumulants(c: float, m: WindowMetrics | PerformanceReference) -> tuple[float, float]:
    """Variance and third cumulant of a sum of Bernoulli(c s_i): sum p(1-p), sum p(1-p)(1-2p)."""
    s1, s2, s3 = m.score_sum, m.score_sq_sum, m.score_cube_sum
    k2 = c * s1 - c * c * s2
    k3 = c * s1 - 3.0 * c * c * s2 + 2.0 * c ** 3 * s3
    # c s_i > 1 for some event makes the polynomial meaningless (a ratio far
    # above 1 on confident scores); fall back to the Poisson variance then.
    if k2 <= 0.0:
        return c * s1, c * s1
    return k2, k3


def _two_sided_rna(t: float, var: float, third: float) -> float:
    """Two-sided p-value of a centred count ``t`` by the refined normal approximation.

    ``P(T <= t) ~ G((t + 1/2) / sd)`` with ``G(x) = Phi(x) + g (1 - x^2) phi(x) / 6`` and
    ``g`` the skewness (Volkova 1996; Hong 2013, section 3); the upper tail likewise.
    """
    if var <= 0.0:
        return 1.0 if t == 0 else 0.0
    sd = math.sqrt(var)
    g = third / sd ** 3

    def cdf(x: float) -> float:
        return min(1.0, max(0.0, float(special.ndtr(x)) + g * (1.0 - x * x) * math.exp(-0.5 * x * x)
                            / (6.0 * math.sqrt(2.0 * math.pi))))

    lower = cdf((t + 0.5) / sd)
    upper = 1.0 - cdf((t - 0.5) / sd)
    return min(1.0, 2.0 * min(lower, upper))


def _log_loss_test(ref: PerformanceReference, win: WindowMetrics,
                   spec: PerformanceSpec) -> _Outcome | str:
    assert spec.min_log_loss_increase is not None
    for side, m, exp_pos in [("reference", ref, float(ref.n_pos)),
                             ("window", win, ref.calibration_ratio * win.score_sum)]:
        if not (exp_pos >= spec.min_positives and m.n - exp_pos >= spec.min_negatives
                and math.isfinite(m.log_loss_var)):
            return (f"the {side} expects {exp_pos:.1f} positives of {m.n}; "
                    f"need {spec.min_positives} and {spec.min_negatives} negatives")
    se = math.sqrt(win.log_loss_var / win.n + ref.log_loss_var / ref.n)
    diff = win.log_loss - ref.log_loss
    p = float(special.ndtr(-diff / se)) if se > 0 else (0.0 if diff > 0 else 1.0)
    effect = diff >= spec.min_log_loss_increase * ref.log_loss
    return _Outcome("welch z", "rise", ref.log_loss, win.log_loss, p, bool(effect))


# ------------------------------------------------------------------------ helpers


def _as_scores(scores: Any) -> FloatArray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        msg = f"scores must be a 1-d array, got shape {s.shape}"
        raise ValueError(msg)
    if s.size and not (bool(np.isfinite(s).all()) and s.min() >= 0.0 and s.max() <= 1.0):
        bad = s[~(np.isfinite(s) & (s >= 0.0) & (s <= 1.0))][0].item()
        msg = f"scores must be finite and in [0, 1], got {bad}"
        raise ValueError(msg)
    return s


def _as_label(values: Any, name: str, size: int) -> npt.NDArray[np.bool_]:
    y = np.asarray(values)
    if y.ndim != 1 or y.size != size:
        msg = f"{name} must be a 1-d array of {size} values like the scores, got shape {y.shape}"
        raise ValueError(msg)
    if y.dtype == np.bool_:
        return y
    if y.size and not bool(((y == 0) | (y == 1)).all()):
        bad = y[~((y == 0) | (y == 1))][0].item()
        msg = f"{name} must hold only 0 and 1, got {bad!r}"
        raise ValueError(msg)
    return y.astype(np.bool_)
