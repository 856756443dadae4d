"""Holdout evaluation of a challenger against the champion (a pure core; the gate builds on it).

Every model a job trains is scored on the same holdout, the newest time slice, which
no model was fitted or early-stopped on: the challenger and, when there is one, the
champion it warm-started from. Because both models score the *same rows*, their
metrics are correlated, and every comparison here is paired:

* :func:`delong_test`: the difference of two correlated AUCs, DeLong, DeLong &
  Clarke-Pearson (1988), "Comparing the areas under two or more correlated receiver
  operating characteristic curves: a nonparametric approach", Biometrics 44(3),
  837-845; computed with the O(n log n) midrank algorithm of Sun & Xu (2014), "Fast
  implementation of DeLong's algorithm for comparing the areas under correlated
  receiver operating characteristic curves", IEEE Signal Processing Letters 21(11),
  1389-1393.
* :func:`paired_bootstrap`: a metric difference with rows resampled with the same
  indices for both models (Efron & Tibshirani 1993, "An Introduction to the
  Bootstrap", ch. 13 and 16), for log loss, whose per-row terms are not independent
  of the model either.
* :func:`ndcg_at_k`: ranking quality per request slate (Järvelin & Kekäläinen 2002,
  "Cumulated gain-based evaluation of IR techniques", ACM TOIS 20(4)).

:func:`compare` puts them together into an :class:`EvaluationReport`, the one object
the training job logs (``evaluation/report.json``) and the promotion gate
(retrain/promote.py) decides on. Nothing here does I/O; :func:`latencies_ms_per_1000`
(and :func:`latency_ms_per_1000`, for one model) is the one function that reads a
clock (an injectable timer), because scoring latency can only be measured.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy.stats import chi2, norm, rankdata

__all__ = [
    "EPS",
    "REPORT_PATH",
    "REPORT_VERSION",
    "EvaluationReport",
    "HoldoutWindow",
    "ModelMetrics",
    "ModelScores",
    "PairedTest",
    "auc",
    "calibration",
    "calibration_interval",
    "compare",
    "delong_test",
    "holdout_metrics",
    "latencies_ms_per_1000",
    "latency_ms_per_1000",
    "log_loss",
    "model_size_bytes",
    "ndcg_at_k",
    "paired_bootstrap",
]

#: Scores are clipped to [EPS, 1 - EPS] in log loss: one confident miss must not be inf.
EPS = 1e-7
#: Where the training job logs the report in its run (and where the promoter reads it back).
REPORT_PATH = "evaluation/report.json"
#: Bumped when :class:`EvaluationReport`'s JSON changes incompatibly.
REPORT_VERSION = 1
#: Bootstrap replicates are drawn in chunks of at most this many resampled rows, so a
#: 2,000-replicate bootstrap of a million-row holdout never holds 2e9 indices at once.
_BOOTSTRAP_CELLS = 4_000_000

FloatArray = npt.NDArray[np.float64]
BootstrapMetric = Literal["log_loss", "brier", "auc"]


def auc(y: Any, p: Any) -> float:
    """Area under the ROC curve by the rank-sum formula (ties count one half); NaN
    when one class is absent."""
    y = np.asarray(y, dtype=bool)
    p = np.asarray(p, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(p)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _row_log_loss(y: npt.NDArray[np.bool_], p: FloatArray) -> FloatArray:
    p = np.clip(p, EPS, 1.0 - EPS)
    return -np.where(y, np.log(p), np.log1p(-p))


def log_loss(y: Any, p: Any) -> float:
    y = np.asarray(y, dtype=bool)
    if y.size == 0:
        return math.nan
    return float(np.mean(_row_log_loss(y, np.asarray(p, dtype=np.float64))))


def calibration(y: Any, p: Any) -> float:
    """Observed over expected positives, ``sum(y) / sum(p)``: 1 is calibrated, 0.8 means
    the model predicts 25% more clicks than happen. NaN when nothing is expected."""
    y = np.asarray(y, dtype=bool)
    expected = float(np.asarray(p, dtype=np.float64).sum())
    return float(y.sum()) / expected if expected > 0 else math.nan


def calibration_interval(positives: int, expected: float, level: float = 0.95) -> tuple[float, float]:
    """A two-sided ``level`` confidence interval for the calibration ratio
    ``positives / expected``: the exact Poisson interval for the observed count
    (Garwood 1936, "Fiducial limits for the Poisson distribution", Biometrika 28,
    437-442) divided by the expected count. (NaN, NaN) when nothing is expected.

    Why this interval. Given the holdout's rows and the model's scores, the expected
    count ``E = sum(p)`` is fixed and the observed count is the random part: a sum of
    independent Bernoulli labels whose mean is ``r * E`` for a model off by the
    factor ``r``. So an interval for the count's mean, divided by ``E``, is one for
    ``r``. The exact Poisson interval is the one for such a count that is also right
    at the small counts a holdout of a few thousand rows has (a normal interval on
    20 clicks is not), and it errs only on the safe side: the Bernoulli
    sum's variance, ``sum q (1 - q)``, is below the Poisson's ``sum q``, so the
    interval is a little wider than it needs to be (by about ``1 / sqrt(1 - rate)``:
    3% at a 6% click rate, 7% at the demo's 12%), and a gate that rejects only
    when the whole interval is outside its band rejects a model exactly at the
    band's edge at most ``(1 - level) / 2`` of the time, a calibrated one less still
    (tests/test_promote.py measures both on simulated holdouts). For a Poisson count
    the Garwood interval's coverage is at least ``level`` at every mean (it inverts
    two exact one-sided tests; tests/test_evaluate.py sums it exactly).

    Example:
        >>> lo, hi = calibration_interval(90, 90.0)
        >>> round(lo, 3), round(hi, 3)
        (0.804, 1.229)
        >>> calibration_interval(0, 3.0)[0]
        0.0
    """
    if isinstance(positives, bool) or int(positives) != positives or positives < 0:
        msg = f"positives must be a count >= 0, got {positives!r}"
        raise ValueError(msg)
    if not 0.0 < level < 1.0:
        msg = f"level must be in (0, 1), got {level}"
        raise ValueError(msg)
    if not (math.isfinite(expected) and expected > 0):
        return math.nan, math.nan
    k = int(positives)
    alpha = 1.0 - level
    low = float(chi2.ppf(alpha / 2, 2 * k)) / 2 if k > 0 else 0.0
    high = float(chi2.ppf(1 - alpha / 2, 2 * k + 2)) / 2
    return low / expected, high / expected


def holdout_metrics(y: Any, p: Any) -> dict[str, float]:
    """AUC, log loss, calibration (observed / expected positives) and the counts it is
    made of (``positives``, ``expected_positives``, ``rows``), rates."""
    y = np.asarray(y, dtype=bool)
    p = np.asarray(p, dtype=np.float64)
    return {
        "auc": auc(y, p),
        "log_loss": log_loss(y, p),
        "calibration": calibration(y, p),
        "positive_rate": float(y.mean()) if y.size else math.nan,
        "mean_score": float(p.mean()) if p.size else math.nan,
        "rows": float(y.size),
        "positives": float(y.sum()),
        "expected_positives": float(p.sum()),
    }


# -- paired tests ------------------------------------------------------------------------------


def _num(x: float | None) -> float | None:
    """JSON has no NaN: non-finite floats travel as null."""
    return None if x is None or not math.isfinite(x) else float(x)


def _float(x: Any) -> float:
    return math.nan if x is None else float(x)


def _opt_float(x: float | None) -> float | None:
    return None if x is None else float(x)


@dataclasses.dataclass(frozen=True)
class PairedTest:
    """A paired comparison of model A (the challenger) with model B (the champion).

    Args:
        method: ``delong`` or ``bootstrap:<metric>``.
        diff: metric(A) - metric(B) on the holdout.
        se: its standard error (DeLong's variance estimate, or the bootstrap standard
            deviation).
        z: ``diff / se`` (inf when ``se`` is 0 and ``diff`` is not).
        p_one_sided: the p-value of "metric(A) > metric(B)" (small: A is larger).
        ci_low, ci_high: a two-sided interval for ``diff`` at ``level``.
        level: the interval's coverage (0.95).

    A gate with its own confidence uses :meth:`lower_bound`, the normal-approximation
    bound ``diff - z_c * se``; it is exact for DeLong (whose statistic *is* the normal
    approximation) and close to the percentile bound for a bootstrapped mean.

    Example:
        >>> t = PairedTest("delong", diff=0.02, se=0.01, z=2.0, p_one_sided=0.0228,
        ...                ci_low=0.0004, ci_high=0.0396)
        >>> round(t.lower_bound(0.95), 4)
        0.0036
    """

    method: str
    diff: float
    se: float
    z: float
    p_one_sided: float
    ci_low: float
    ci_high: float
    level: float = 0.95

    def __post_init__(self) -> None:
        if not 0.5 < self.level < 1.0:
            msg = f"level must be in (0.5, 1), got {self.level}"
            raise ValueError(msg)
        if not (math.isnan(self.se) or self.se >= 0):
            msg = f"se must be >= 0, got {self.se}"
            raise ValueError(msg)

    def lower_bound(self, confidence: float) -> float:
        """The one-sided lower confidence bound of ``diff`` at ``confidence``."""
        return self.diff - float(norm.ppf(confidence)) * self.se

    def upper_bound(self, confidence: float) -> float:
        """The one-sided upper confidence bound of ``diff`` at ``confidence``."""
        return self.diff + float(norm.ppf(confidence)) * self.se

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "diff": _num(self.diff), "se": _num(self.se),
                "z": _num(self.z), "p_one_sided": _num(self.p_one_sided), "ci_low": _num(self.ci_low),
                "ci_high": _num(self.ci_high), "level": self.level}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PairedTest:
        z = d.get("z")
        return cls(method=str(d["method"]), diff=_float(d["diff"]), se=_float(d["se"]),
                   z=_float(z), p_one_sided=_float(d["p_one_sided"]), ci_low=_float(d["ci_low"]),
                   ci_high=_float(d["ci_high"]), level=float(d.get("level", 0.95)))


def _z_and_p(diff: float, se: float) -> tuple[float, float]:
    if se > 0:
        z = diff / se
    elif diff == 0:
        z = 0.0
    else:  # identical structural components and a difference: certain (a degenerate holdout)
        z = math.copysign(math.inf, diff)
    return z, float(norm.sf(z))


def _binary_labels(y: Any, n: int | None = None) -> npt.NDArray[np.bool_]:
    arr = np.asarray(y)
    if arr.ndim != 1:
        msg = f"labels must be one-dimensional, got shape {arr.shape}"
        raise ValueError(msg)
    if arr.dtype != bool:
        values = np.unique(arr)
        if not np.isin(values, [0, 1]).all():
            msg = f"labels must be 0/1 or bool, got values {values[:5].tolist()}"
            raise ValueError(msg)
    if n is not None and arr.size != n:
        msg = f"labels have {arr.size} rows and the scores {n}"
        raise ValueError(msg)
    return arr.astype(bool)


def _scores(p: Any, name: str) -> FloatArray:
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim != 1:
        msg = f"{name} must be one-dimensional, got shape {arr.shape}"
        raise ValueError(msg)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        msg = f"{name} has {bad} non-finite scores"
        raise ValueError(msg)
    return arr


def _structural_components(pos: FloatArray, neg: FloatArray) -> tuple[float, FloatArray, FloatArray]:
    """AUC and DeLong's structural components V10 (one per positive) and V01 (one per
    negative) by midranks (Sun & Xu 2014, eq. 11-13).

    ``V10[i]`` is the share of negatives that positive ``i`` outscores (ties one half);
    the rank of ``pos[i]`` among all scores minus its rank among the positives counts
    exactly those negatives, so no O(m n) comparison matrix is built.
    """
    m, n = pos.size, neg.size
    tz = rankdata(np.concatenate([pos, neg]))
    tx = rankdata(pos)
    ty = rankdata(neg)
    auc_ = float((tz[:m].sum() - m * (m + 1) / 2.0) / (m * n))
    v10 = (tz[:m] - tx) / n
    v01 = 1.0 - (tz[m:] - ty) / m
    return auc_, v10, v01


def delong_test(y: Any, p_challenger: Any, p_champion: Any, *, level: float = 0.95) -> PairedTest:
    """DeLong's paired test of AUC(challenger) - AUC(champion) on the same rows.

    The variance of the difference is ``S10/m + S01/n`` projected on (1, -1), where
    S10 and S01 are the sample covariance matrices (divisor m-1 and n-1, as in DeLong
    et al. 1988) of the structural components over positives and negatives; the
    components come from midranks in O(n log n) (Sun & Xu 2014).

    Args:
        y: 0/1 labels.
        p_challenger, p_champion: the two models' scores of the same rows.
        level: coverage of the two-sided interval in the result.

    Returns:
        A :class:`PairedTest` with ``p_one_sided`` the p-value of "the challenger's
        AUC is larger".

    Raises:
        ValueError: lengths differ, non-finite scores, or fewer than two positives or
            two negatives (the covariances are undefined).

    Example:
        >>> t = delong_test([0, 0, 1, 1, 0, 1], [.1, .3, .8, .7, .2, .9], [.3, .2, .6, .4, .5, .9])
        >>> round(t.diff, 4), t.method
        (0.1111, 'delong')
    """
    a = _scores(p_challenger, "p_challenger")
    b = _scores(p_champion, "p_champion")
    if a.size != b.size:
        msg = f"p_challenger has {a.size} rows and p_champion {b.size}: a paired test needs the same rows"
        raise ValueError(msg)
    yb = _binary_labels(y, a.size)
    m, n = int(yb.sum()), int((~yb).sum())
    if m < 2 or n < 2:
        msg = f"DeLong's test needs at least 2 positives and 2 negatives, got {m} and {n}"
        raise ValueError(msg)
    auc_a, v10_a, v01_a = _structural_components(a[yb], a[~yb])
    auc_b, v10_b, v01_b = _structural_components(b[yb], b[~yb])
    s10 = np.cov(np.vstack([v10_a, v10_b]))
    s01 = np.cov(np.vstack([v01_a, v01_b]))
    s = s10 / m + s01 / n
    var = float(s[0, 0] + s[1, 1] - 2.0 * s[0, 1])
    se = math.sqrt(max(var, 0.0))  # rounding can make a zero variance slightly negative
    diff = auc_a - auc_b
    z, p = _z_and_p(diff, se)
    half = float(norm.ppf(0.5 + level / 2.0)) * se
    return PairedTest("delong", diff=diff, se=se, z=z, p_one_sided=p, ci_low=diff - half,
                      ci_high=diff + half, level=level)


def _bootstrap_counts(rng: np.random.Generator, rows: int, replicates: int) -> npt.NDArray[np.int64]:
    """How often each row is drawn in each replicate, ``[replicates, rows]``: the same
    resample for both models, as weights (a bincount, not a gather of rows)."""
    idx = rng.integers(0, rows, size=(replicates, rows))
    flat = (idx + (np.arange(replicates) * rows)[:, None]).ravel()
    return np.bincount(flat, minlength=replicates * rows).reshape(replicates, rows)


def _weighted_auc(y: npt.NDArray[np.bool_], p: FloatArray, w: npt.NDArray[np.int64]) -> FloatArray:
    """AUC of every replicate, ``w[r, i]`` the multiplicity of row ``i`` in replicate ``r``.

    Rows are sorted by score once; a positive's credit is the weight of the negatives
    below its score plus half of those tied with it, summed per tie group.
    """
    order = np.argsort(p, kind="stable")
    ps, ys, ws = p[order], y[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    neg = np.add.reduceat(np.where(ys, 0, ws), starts, axis=1)
    pos = np.add.reduceat(np.where(ys, ws, 0), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    credit = (pos * (below + 0.5 * neg)).sum(axis=1)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), credit / (n_pos * n_neg), np.nan)


def paired_bootstrap(y: Any, p_a: Any, p_b: Any, metric: BootstrapMetric = "log_loss", *, n: int = 2000,
                     seed: int, level: float = 0.95) -> PairedTest:
    """Paired bootstrap of metric(A) - metric(B): each replicate resamples the rows once
    and scores both models on that same resample.

    Vectorised over chunks of replicates: a mean metric (log loss, Brier) is the mean
    of the per-row differences at the drawn rows; for AUC a replicate is a vector of
    row multiplicities, and its AUC one sort plus cumulative sums. About 4 s for 2,000
    replicates of a 100,000-row holdout on one core.

    Args:
        y: 0/1 labels.
        p_a, p_b: the two models' scores (A is the challenger).
        metric: ``log_loss``, ``brier`` or ``auc``.
        n: replicates (2,000 put the 2.5% and 97.5% percentiles within about 0.1 se).
        seed: the resampling seed: the same inputs and seed give the same result.
        level: coverage of the two-sided percentile interval.

    Returns:
        A :class:`PairedTest`: ``diff`` on the full holdout, ``se`` the replicates'
        standard deviation, the percentile interval, and ``p_one_sided`` the share of
        replicates with metric(A) <= metric(B) (the percentile-method p-value of
        "metric(A) > metric(B)", with the +1 correction so it is never 0).

    Raises:
        ValueError: lengths differ, non-finite scores, an unknown metric, ``n < 100``.

    Example:
        >>> t = paired_bootstrap([0, 1] * 50, [0.3, 0.7] * 50, [0.5, 0.5] * 50, n=200, seed=1)
        >>> t.diff < 0 and t.ci_high < 0  # A's log loss is lower
        True
    """
    if metric not in ("log_loss", "brier", "auc"):
        msg = f"metric must be log_loss, brier or auc, got {metric!r}"
        raise ValueError(msg)
    if n < 100:
        msg = f"n must be >= 100 bootstrap replicates, got {n}"
        raise ValueError(msg)
    a = _scores(p_a, "p_a")
    b = _scores(p_b, "p_b")
    if a.size != b.size:
        msg = f"p_a has {a.size} rows and p_b {b.size}: a paired bootstrap needs the same rows"
        raise ValueError(msg)
    yb = _binary_labels(y, a.size)
    rows = a.size
    if rows < 2:
        msg = f"a bootstrap needs at least 2 rows, got {rows}"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n, _BOOTSTRAP_CELLS // rows))
    if metric == "auc":
        diff = auc(yb, a) - auc(yb, b)
    else:
        per_row = (_row_log_loss(yb, a) - _row_log_loss(yb, b) if metric == "log_loss"
                   else (a - yb) ** 2 - (b - yb) ** 2)
        diff = float(per_row.mean())
    reps: list[FloatArray] = []
    done = 0
    while done < n:
        size = min(chunk, n - done)
        if metric == "auc":
            w = _bootstrap_counts(rng, rows, size)
            reps.append(_weighted_auc(yb, a, w) - _weighted_auc(yb, b, w))
        else:
            # A mean of per-row differences: gathering the drawn rows is twice as fast
            # as counting them (a bincount and a matrix product).
            reps.append(per_row[rng.integers(0, rows, size=(size, rows))].mean(axis=1))
        done += size
    d = np.concatenate(reps)
    d = d[np.isfinite(d)]  # an AUC replicate that drew one class only
    if d.size < n // 2:
        msg = f"only {d.size} of {n} bootstrap replicates were defined: too few positives or negatives"
        raise ValueError(msg)
    se = float(d.std(ddof=1))
    z = diff / se if se > 0 else _z_and_p(diff, se)[0]
    p = float((1 + np.count_nonzero(d <= 0)) / (d.size + 1))
    lo, hi = np.quantile(d, [0.5 - level / 2.0, 0.5 + level / 2.0])
    return PairedTest(f"bootstrap:{metric}", diff=diff, se=se, z=z, p_one_sided=p, ci_low=float(lo),
                      ci_high=float(hi), level=level)


# -- ranking ----------------------------------------------------------------------------------


def ndcg_at_k(groups: Any, y: Any, p: Any, k: int) -> float | None:
    """Mean NDCG@k over request slates with at least one positive.

    Each request's items are ranked by the model's score (the model is judged on the
    ranking *it* would have produced, not the one that was served); gains are the 0/1
    labels with the log2 discount of Järvelin & Kekäläinen (2002). Ties are broken
    pessimistically (negatives first), so a constant scorer gets no credit for the
    order its rows happened to arrive in.

    Args:
        groups: the request id of each row; None or missing (NaN/None) ids leave a row
            out.
        y: 0/1 labels.
        p: scores.
        k: the cut-off (>= 1).

    Returns:
        None when there is no slate: no request ids, or no request with a positive
        (NDCG is undefined without one, and an all-negative slate says nothing about
        the order).

    Example:
        >>> ndcg_at_k(["r1"] * 3 + ["r2"] * 2, [0, 1, 0, 1, 0], [.9, .5, .1, .8, .2], k=3)
        0.8154648767857288
        >>> ndcg_at_k(None, [0, 1], [.1, .2], k=3) is None
        True
    """
    if k < 1:
        msg = f"k must be >= 1, got {k}"
        raise ValueError(msg)
    if groups is None:
        return None
    scores = _scores(p, "p")
    labels = _binary_labels(y, scores.size)
    g = pd.Series(np.asarray(groups, dtype=object))
    if len(g) != scores.size:
        msg = f"groups has {len(g)} rows and the scores {scores.size}"
        raise ValueError(msg)
    df = pd.DataFrame({"g": g, "y": labels.astype(np.int64), "p": scores}).dropna(subset=["g"])
    if df.empty:
        return None
    df = df[df.groupby("g", sort=False)["y"].transform("max") > 0]
    if df.empty:
        return None
    discount = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))

    def dcg(sort_cols: list[str], ascending: list[bool]) -> pd.Series:
        s = df.sort_values(["g", *sort_cols], ascending=[True, *ascending], kind="stable")
        pos = s.groupby("g", sort=False).cumcount().to_numpy()
        keep = pos < k
        gains = s["y"].to_numpy()[keep] * discount[pos[keep]]
        return pd.Series(gains, index=s["g"].to_numpy()[keep]).groupby(level=0).sum()

    actual = dcg(["p", "y"], [False, True])
    ideal = dcg(["y"], [False])
    return float((actual.reindex(ideal.index, fill_value=0.0) / ideal).mean())


# -- guardrail measures ------------------------------------------------------------------------


def model_size_bytes(file_sizes: Sequence[int]) -> int:
    """A model's size: the sum of the sizes of the files it is saved as.

    The caller lists the files (the job walks the saved directory), so this module
    stays free of file I/O; the size guardrail compares two such sums.
    """
    sizes = [int(s) for s in file_sizes]
    if any(s < 0 for s in sizes):
        msg = f"file sizes must be >= 0, got {min(sizes)}"
        raise ValueError(msg)
    return sum(sizes)


def latency_ms_per_1000(predict: Callable[[pd.DataFrame], Any], frame: pd.DataFrame, repeats: int = 5, *,
                        timer: Callable[[], float] = time.perf_counter) -> float:
    """Median milliseconds ``predict`` takes to score 1,000 rows (one model's
    :func:`latencies_ms_per_1000`)."""
    return latencies_ms_per_1000([predict], frame, repeats, timer=timer)[0]


def latencies_ms_per_1000(predicts: Sequence[Callable[[pd.DataFrame], Any]], frame: pd.DataFrame,
                          repeats: int = 5, *, timer: Callable[[], float] = time.perf_counter) -> list[float]:
    """Median milliseconds each of ``predicts`` takes to score 1,000 rows, timed in turns.

    The rows are the first 1,000 of ``frame`` (repeated when it has fewer), so every
    model scores the same batch. One untimed call each first: lazy initialisation
    (thread pools, caches) is not what serving pays per request. Then ``repeats``
    rounds of one timed call each, the order reversed every other round, and each
    model's median (a busy machine's outliers are all on one side). In turns, not one
    model after the other: a burst of other work then slows every model alike instead
    of whichever was being timed. A demo run on two shared cores timed a fine-tune at
    91.7 ms and, right after it, its champion of the same architecture at 4.4 ms, and
    the gate kept the challenger as too slow; loaded again, the two time alike (3.8
    and 3.7 ms).

    Args:
        predicts: the models' scoring functions.
        frame: holdout rows (at least one).
        repeats: timed calls per model (>= 1).
        timer: seconds, monotonic (injectable for tests).
    """
    if repeats < 1:
        msg = f"repeats must be >= 1, got {repeats}"
        raise ValueError(msg)
    if len(frame) == 0:
        msg = "latency needs at least one row to score, got an empty frame"
        raise ValueError(msg)
    batch = frame.iloc[np.arange(1000) % len(frame)].reset_index(drop=True)
    for predict in predicts:
        predict(batch)
    times: list[list[float]] = [[] for _ in predicts]
    for r in range(repeats):
        order = range(len(predicts)) if r % 2 == 0 else reversed(range(len(predicts)))
        for i in order:
            t0 = timer()
            predicts[i](batch)
            times[i].append((timer() - t0) * 1000.0)
    return [float(statistics.median(t)) for t in times]


# -- the report --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HoldoutWindow:
    """The event-time span ``[start_ms, end_ms]`` the holdout rows come from."""

    start_ms: int
    end_ms: int

    def __post_init__(self) -> None:
        if self.end_ms < self.start_ms:
            msg = f"holdout window end {self.end_ms} is before its start {self.start_ms}"
            raise ValueError(msg)


@dataclasses.dataclass(frozen=True)
class ModelScores:
    """What :func:`compare` needs of one model: its holdout scores and measured guardrails.

    Args:
        p: scores of the holdout rows, in the holdout's order.
        version: the registry version (None for a challenger not registered yet).
        size_bytes: :func:`model_size_bytes` of its saved directory.
        latency_ms_per_1000: :func:`latency_ms_per_1000` on the holdout.
    """

    p: Any
    version: str | None = None
    size_bytes: int | None = None
    latency_ms_per_1000: float | None = None


@dataclasses.dataclass(frozen=True)
class ModelMetrics:
    """One model's holdout metrics and guardrail measures (NaN: undefined).

    ``positives``, ``expected_positives`` (the sum of the model's scores) and ``rows``
    are the counts ``calibration`` is the ratio of, so the gate can tell a
    miscalibrated model from a small holdout's noise (:func:`calibration_interval`).
    None in a report written before they were kept: the gate then judges the ratio
    alone.
    """

    version: str | None
    auc: float
    log_loss: float
    calibration: float
    mean_score: float
    ndcg_at_k: float | None = None
    size_bytes: int | None = None
    latency_ms_per_1000: float | None = None
    positives: int | None = None
    expected_positives: float | None = None
    rows: int | None = None

    def __post_init__(self) -> None:
        if self.size_bytes is not None and self.size_bytes < 0:
            msg = f"size_bytes must be >= 0, got {self.size_bytes}"
            raise ValueError(msg)
        if self.latency_ms_per_1000 is not None and not self.latency_ms_per_1000 >= 0:
            msg = f"latency_ms_per_1000 must be >= 0, got {self.latency_ms_per_1000}"
            raise ValueError(msg)
        for name in ("positives", "rows"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or int(v) != v or v < 0):
                msg = f"{name} must be a count >= 0, got {v!r}"
                raise ValueError(msg)
        if self.positives is not None and self.rows is not None and self.positives > self.rows:
            msg = f"positives ({self.positives}) must be <= rows ({self.rows})"
            raise ValueError(msg)
        e = self.expected_positives
        if e is not None and not (math.isfinite(e) and e >= 0):
            msg = f"expected_positives must be a finite number >= 0, got {e!r}"
            raise ValueError(msg)

    def calibration_interval(self, level: float) -> tuple[float, float] | None:
        """:func:`calibration_interval` of the counts; None without them (an old
        report) or when nothing is expected (the ratio is undefined)."""
        if self.positives is None or self.expected_positives is None or not self.expected_positives > 0:
            return None
        return calibration_interval(self.positives, self.expected_positives, level)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "auc": _num(self.auc), "log_loss": _num(self.log_loss),
                "calibration": _num(self.calibration), "mean_score": _num(self.mean_score),
                "ndcg_at_k": _num(self.ndcg_at_k), "size_bytes": self.size_bytes,
                "latency_ms_per_1000": _num(self.latency_ms_per_1000), "positives": self.positives,
                "expected_positives": _num(self.expected_positives), "rows": self.rows}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelMetrics:
        """The inverse of :meth:`to_dict`; keys a report from before a field existed
        lacks (the counts, the guardrails) decode as None."""
        def opt(key: str) -> float | None:
            return None if d.get(key) is None else float(d[key])

        def count(key: str) -> int | None:
            return None if d.get(key) is None else int(d[key])

        return cls(version=None if d.get("version") is None else str(d["version"]), auc=_float(d["auc"]),
                   log_loss=_float(d["log_loss"]), calibration=_float(d["calibration"]),
                   mean_score=_float(d["mean_score"]), ndcg_at_k=opt("ndcg_at_k"),
                   size_bytes=count("size_bytes"), latency_ms_per_1000=opt("latency_ms_per_1000"),
                   positives=count("positives"), expected_positives=opt("expected_positives"),
                   rows=count("rows"))


@dataclasses.dataclass(frozen=True)
class EvaluationReport:
    """The challenger against the champion on one holdout: what the gate decides on.

    Args:
        model: the registered model's name.
        window: the holdout's event-time span.
        rows, positives: holdout size.
        challenger: its metrics and guardrail measures.
        champion: the same for the champion, None when there is none (a first model).
        auc_test: :func:`delong_test` of challenger vs champion (None without one).
        logloss_test: :func:`paired_bootstrap` of their log losses (None without one).
        ndcg_k: the cut-off of ``ndcg_at_k`` in the metrics.
        seed: the bootstrap's seed.

    Example:
        >>> y = np.array([0, 1] * 20); p = np.linspace(0.1, 0.9, 40)
        >>> r = compare(y, ModelScores(p), None, model="ctr", window=HoldoutWindow(0, 1))
        >>> EvaluationReport.from_json(r.to_json()) == r
        True
    """

    model: str
    window: HoldoutWindow
    rows: int
    positives: int
    challenger: ModelMetrics
    champion: ModelMetrics | None = None
    auc_test: PairedTest | None = None
    logloss_test: PairedTest | None = None
    ndcg_k: int = 10
    seed: int = 0
    version: int = REPORT_VERSION

    def __post_init__(self) -> None:
        if self.rows < 1:
            msg = f"an evaluation report needs holdout rows, got rows={self.rows}"
            raise ValueError(msg)
        if not 0 <= self.positives <= self.rows:
            msg = f"positives must be in [0, rows={self.rows}], got {self.positives}"
            raise ValueError(msg)
        if (self.champion is None) != (self.auc_test is None):
            msg = "auc_test is set exactly when there is a champion"
            raise ValueError(msg)
        if self.version != REPORT_VERSION:
            msg = f"evaluation report version {self.version} is not {REPORT_VERSION}, the one this code reads"
            raise ValueError(msg)

    @property
    def champion_version(self) -> str | None:
        return None if self.champion is None else self.champion.version

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "model": self.model,
                "window": {"start_ms": self.window.start_ms, "end_ms": self.window.end_ms},
                "rows": self.rows, "positives": self.positives, "ndcg_k": self.ndcg_k, "seed": self.seed,
                "challenger": self.challenger.to_dict(),
                "champion": None if self.champion is None else self.champion.to_dict(),
                "auc_test": None if self.auc_test is None else self.auc_test.to_dict(),
                "logloss_test": None if self.logloss_test is None else self.logloss_test.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvaluationReport:
        champion, auc_t, ll_t = d.get("champion"), d.get("auc_test"), d.get("logloss_test")
        return cls(model=str(d["model"]),
                   window=HoldoutWindow(int(d["window"]["start_ms"]), int(d["window"]["end_ms"])),
                   rows=int(d["rows"]), positives=int(d["positives"]),
                   challenger=ModelMetrics.from_dict(d["challenger"]),
                   champion=None if champion is None else ModelMetrics.from_dict(champion),
                   auc_test=None if auc_t is None else PairedTest.from_dict(auc_t),
                   logloss_test=None if ll_t is None else PairedTest.from_dict(ll_t),
                   ndcg_k=int(d.get("ndcg_k", 10)), seed=int(d.get("seed", 0)),
                   version=int(d.get("version", REPORT_VERSION)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> EvaluationReport:
        return cls.from_dict(json.loads(text))

    def metrics(self) -> dict[str, float]:
        """Flat ``eval.*`` numbers for an MLflow run (undefined ones left out)."""
        out: dict[str, float | None] = {
            "eval.rows": float(self.rows), "eval.positives": float(self.positives),
            "eval.auc": self.challenger.auc, "eval.log_loss": self.challenger.log_loss,
            "eval.calibration": self.challenger.calibration, "eval.ndcg_at_k": self.challenger.ndcg_at_k,
            "eval.expected_positives": self.challenger.expected_positives,
            "eval.size_bytes": _opt_float(self.challenger.size_bytes),
            "eval.latency_ms_per_1000": self.challenger.latency_ms_per_1000}
        if self.champion is not None:
            c = self.champion
            out |= {"eval.champion_auc": c.auc, "eval.champion_log_loss": c.log_loss,
                    "eval.champion_calibration": c.calibration,
                    "eval.champion_expected_positives": c.expected_positives,
                    "eval.champion_ndcg_at_k": c.ndcg_at_k,
                    "eval.champion_size_bytes": _opt_float(c.size_bytes),
                    "eval.champion_latency_ms_per_1000": c.latency_ms_per_1000}
        if self.auc_test is not None:
            t = self.auc_test
            out |= {"eval.auc_diff": t.diff, "eval.auc_se": t.se, "eval.auc_z": t.z,
                    "eval.auc_p": t.p_one_sided, "eval.auc_ci_low": t.ci_low, "eval.auc_ci_high": t.ci_high}
        if self.logloss_test is not None:
            t = self.logloss_test
            out |= {"eval.logloss_diff": t.diff, "eval.logloss_se": t.se, "eval.logloss_p": t.p_one_sided,
                    "eval.logloss_ci_low": t.ci_low, "eval.logloss_ci_high": t.ci_high}
        return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


def _metrics_of(y: npt.NDArray[np.bool_], s: ModelScores, p: FloatArray, groups: Any,
                k: int) -> ModelMetrics:
    return ModelMetrics(version=s.version, auc=auc(y, p), log_loss=log_loss(y, p),
                        calibration=calibration(y, p), mean_score=float(p.mean()),
                        ndcg_at_k=ndcg_at_k(groups, y, p, k), size_bytes=s.size_bytes,
                        latency_ms_per_1000=s.latency_ms_per_1000, positives=int(y.sum()),
                        expected_positives=float(p.sum()), rows=int(p.size))


def compare(y: Any, challenger: ModelScores, champion: ModelScores | None, *, model: str,
            window: HoldoutWindow, groups: Any = None, k: int = 10, bootstrap_n: int = 2000,
            seed: int = 0) -> EvaluationReport:
    """Scores the challenger (and the champion) on one holdout into an :class:`EvaluationReport`.

    Args:
        y: the holdout's 0/1 labels.
        challenger, champion: the models' scores of those rows and their measures;
            ``champion`` None for a first model.
        model: the registered model's name.
        window: the holdout's event-time span.
        groups: request ids for NDCG@k (None: no slates).
        k: NDCG's cut-off.
        bootstrap_n, seed: the log-loss bootstrap's replicates and seed.
    """
    a = _scores(challenger.p, "challenger scores")
    yb = _binary_labels(y, a.size)
    ch = _metrics_of(yb, challenger, a, groups, k)
    champ = auc_t = ll_t = None
    if champion is not None:
        b = _scores(champion.p, "champion scores")
        if b.size != a.size:
            msg = f"the champion scored {b.size} rows and the challenger {a.size}: not the same holdout"
            raise ValueError(msg)
        champ = _metrics_of(yb, champion, b, groups, k)
        auc_t = delong_test(yb, a, b)
        ll_t = paired_bootstrap(yb, a, b, "log_loss", n=bootstrap_n, seed=seed)
    return EvaluationReport(model=model, window=window, rows=int(a.size), positives=int(yb.sum()),
                            challenger=ch, champion=champ, auc_test=auc_t, logloss_test=ll_t, ndcg_k=k,
                            seed=seed)
