"""Feature and prediction drift of a window summary against the reference.

The rule (docs/statistics.md): a feature is *drifting in a window* only when
its distribution moved by a practically relevant amount (an effect size at or
above its threshold) **and** the move is statistically credible (a
Benjamini-Hochberg adjusted p-value at or below ``alpha``); a *drift
decision* needs that in ``k`` of the feature's last ``m`` evaluated windows
(:class:`DriftDecider`). Either gate alone fails in production: at a million
rows every irrelevant wiggle is "significant", and at a thousand rows sampling
noise alone produces effect sizes above any useful threshold.

Effect sizes, all computed from the binned counts of :mod:`monitor.stats.profile`:

* PSI (population stability index), ``sum((q - p) * ln(q / p))`` over bins,
  the symmetrised Kullback-Leibler divergence (Jeffreys' J). Proportions are
  smoothed as ``(p + eps) / (1 + B * eps)`` with ``eps = 1e-4`` so that an
  empty bin gives a large finite value instead of infinity; the smoothing
  changes PSI by far less than its sampling noise for bins holding well over
  ``eps`` of the mass. The credit-scoring convention (Siddiqi 2006; Yurdakul
  2018) reads 0.1 and 0.25 as "moderate" and "major" shifts; for a normal
  feature on 10 decile bins a mean shift of ``d`` standard deviations gives
  PSI of about ``0.96 * d**2`` (0.0096 at 0.1 sd), so those conventional
  thresholds only see shifts of a third of a standard deviation and more.
* Jensen-Shannon distance (Lin 1991; Endres & Schindelin 2003): the square
  root of the JS divergence in bits, a metric bounded by [0, 1] and finite
  with empty bins, so it needs no smoothing.
* Wasserstein-1 normalised by the reference's standard deviation (numeric
  features and the score only). The CDFs are known at the bin edges; the
  mass inside a bin is taken as uniform (linear CDF between edges). The open
  outer bins are closed, separately for reference and window, where a
  uniform distribution would have the bin's observed mean
  (:meth:`NumericSummary.tail_bounds`); closing them at the min/max instead
  overstated a 0.2 sd shift as 0.28 on decile bins. The standard deviation (not the IQR) is the
  scale because W1 of a pure location shift equals the shift, so W1 / sd
  reads as "shift in standard deviations" like Cohen's d; its price is that a
  heavy-tailed reference with a large sd makes the measure less sensitive.

Significance: the chi-square test of homogeneity on the 2 x B table
(reference counts, window counts), for numeric and categorical features
alike. It is a two-sample test on purpose: the reference proportions are
themselves estimates from a finite training set, and a goodness-of-fit test
that treats them as exact rejects, at window sizes well above the reference
size, for the reference's own sampling error. On binned data the chi-square
test has its nominal size; a Kolmogorov-Smirnov statistic on binned CDFs with
the continuous null distribution is conservative (the maximum is taken over
fewer points) and so loses power for nothing. Bins whose expected count falls
below ``min_expected`` are pooled (Cochran 1954's rule of thumb for the
chi-square approximation).

Multiple testing: Benjamini & Hochberg (1995) across all tested features (and
the score) of one window; under the global null of no drift at all it
controls the familywise error at ``alpha`` as well.

Data quality: a missing-rate spike (one-sided pooled two-proportion z-test of
"window missing rate > reference missing rate", BH-adjusted across features,
AND an absolute increase of at least ``missing_delta``) and an unseen-category
share (the fraction of a window's non-missing rows in categories the
reference never saw, at or above ``unseen_threshold``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy import special

from monitor.stats.profile import CategoricalSummary, NumericSummary, Profile

__all__ = [
    "DriftDecider",
    "DriftReport",
    "DriftSpec",
    "FeatureDrift",
    "QualityCheck",
    "benjamini_hochberg",
    "chi2_homogeneity",
    "compare",
    "js_distance",
    "missing_rate_test",
    "psi",
    "wasserstein_binned",
]

FloatArray = npt.NDArray[np.float64]


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class DriftSpec:
    """Every threshold of the drift and data-quality rules.

    The defaults were chosen against the measurements in docs/statistics.md:
    a 0.1 sd mean shift of a numeric feature, a 1.2x scale change, a 5%
    contamination and a 15% relative reweighting of a category are decided
    in ``k`` windows of 100k rows, while stationary windows of 1M rows, and
    windows with a practically irrelevant 0.03 sd shift that every p-value
    test flags, decide nothing.

    Parameters:
        alpha: Benjamini-Hochberg false discovery rate per window, applied to
            the drift family and, separately, to the missing-rate family.
        psi_threshold: PSI at or above which a move is relevant. 0.006 sits
            between a 0.05 sd mean shift of a normal feature (PSI 0.0024) and
            a 0.1 sd shift (0.0096) on 10 decile bins. ``None`` disables it.
        js_threshold: Jensen-Shannon distance (base 2) threshold, or ``None``.
        wasserstein_threshold: Threshold on W1 / reference sd (numeric features
            and the score), or ``None``.
        psi_epsilon: Additive smoothing of bin proportions in PSI.
        min_rows: Fewest non-missing window rows for a feature to be tested;
            below that it is reported as skipped and the decider sees no
            observation (rather than a clean one).
        min_expected: Chi-square bins with a smaller expected count are pooled.
        k: Windows out of the last ``m`` that must flag a feature to decide
            drift. Three of five turns a per-window false-flag probability
            ``q`` into about ``10 q**3`` per window.
        m: Length of the persistence memory, in evaluated windows.
        missing_delta: Smallest absolute missing-rate increase that counts
            (0.01 = one percentage point).
        unseen_threshold: Share of a window's non-missing rows in never-seen
            categories that counts as a finding.
        unseen_min_count: Fewest never-seen rows for a finding, so that one odd
            row in a tiny window is not an incident.

    The effect gate passes when any enabled effect size reaches its threshold;
    at least one must be enabled (use ``psi_threshold=0.0`` for significance
    alone, e.g. to measure the test's size).

    Example:
        >>> DriftSpec().alpha
        0.01
        >>> DriftSpec(k=4, m=3)
        Traceback (most recent call last):
        ...
        ValueError: need 1 <= k <= m, got k=4 and m=3
    """

    alpha: float = 0.01
    psi_threshold: float | None = 0.006
    js_threshold: float | None = None
    wasserstein_threshold: float | None = None
    psi_epsilon: float = 1e-4
    min_rows: int = 1000
    min_expected: float = 5.0
    k: int = 3
    m: int = 5
    missing_delta: float = 0.01
    unseen_threshold: float = 0.01
    unseen_min_count: int = 10

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            msg = f"alpha must be in (0, 1), got {self.alpha}"
            raise ValueError(msg)
        thresholds = {"psi_threshold": self.psi_threshold, "js_threshold": self.js_threshold,
                      "wasserstein_threshold": self.wasserstein_threshold}
        for name, value in thresholds.items():
            if value is not None and not (value >= 0.0 and math.isfinite(value)):
                msg = f"{name} must be a finite number >= 0 or None, got {value}"
                raise ValueError(msg)
        if all(v is None for v in thresholds.values()):
            msg = "enable at least one effect-size threshold (psi, js or wasserstein)"
            raise ValueError(msg)
        if not 0.0 < self.psi_epsilon < 0.01:
            msg = f"psi_epsilon must be in (0, 0.01), got {self.psi_epsilon}"
            raise ValueError(msg)
        if self.min_rows < 1:
            msg = f"min_rows must be >= 1, got {self.min_rows}"
            raise ValueError(msg)
        if self.min_expected < 0.0:
            msg = f"min_expected must be >= 0, got {self.min_expected}"
            raise ValueError(msg)
        if not 1 <= self.k <= self.m:
            msg = f"need 1 <= k <= m, got k={self.k} and m={self.m}"
            raise ValueError(msg)
        if not 0.0 <= self.missing_delta <= 1.0:
            msg = f"missing_delta must be in [0, 1], got {self.missing_delta}"
            raise ValueError(msg)
        if not 0.0 < self.unseen_threshold <= 1.0:
            msg = f"unseen_threshold must be in (0, 1], got {self.unseen_threshold}"
            raise ValueError(msg)
        if self.unseen_min_count < 1:
            msg = f"unseen_min_count must be >= 1, got {self.unseen_min_count}"
            raise ValueError(msg)

    def build(self, resume_state: Mapping[str, Any] | None = None) -> DriftDecider:
        """The persistence decider of this spec, resumed from ``resume_state``."""
        decider = DriftDecider(self.k, self.m)
        if resume_state is not None:
            decider.load_state_dict(resume_state)
        return decider


# ------------------------------------------------------------------ effect sizes


def _as_counts(counts: Any, name: str) -> FloatArray:
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or c.size == 0 or bool((c < 0).any()) or not bool(np.isfinite(c).all()):
        msg = f"{name} must be a non-empty 1-d array of counts >= 0, got {counts!r}"
        raise ValueError(msg)
    return c


def _pair(ref_counts: Any, win_counts: Any) -> tuple[FloatArray, FloatArray]:
    r = _as_counts(ref_counts, "ref_counts")
    w = _as_counts(win_counts, "win_counts")
    if r.shape != w.shape:
        msg = f"ref_counts has {r.size} bins but win_counts has {w.size}"
        raise ValueError(msg)
    if r.sum() == 0 or w.sum() == 0:
        msg = f"need counts on both sides, got totals {r.sum():g} and {w.sum():g}"
        raise ValueError(msg)
    return r / r.sum(), w / w.sum()


def psi(ref_counts: Any, win_counts: Any, epsilon: float = 1e-4) -> float:
    """Population stability index of the window against the reference.

    Parameters:
        ref_counts: Reference count per bin.
        win_counts: Window count per bin, same bins.
        epsilon: Additive smoothing of the proportions, ``(p + eps) / (1 +
            B * eps)``; keeps an emptied bin finite.

    Example:
        >>> round(psi([50, 50], [60, 40]), 4)
        0.0405
    """
    return _psi(*_pair(ref_counts, win_counts), epsilon)


def _psi(p: FloatArray, q: FloatArray, epsilon: float) -> float:
    b = p.size
    p = (p + epsilon) / (1.0 + b * epsilon)
    q = (q + epsilon) / (1.0 + b * epsilon)
    return float(np.dot(q - p, np.log(q / p)))


def js_distance(ref_counts: Any, win_counts: Any) -> float:
    """Jensen-Shannon distance in bits (Endres & Schindelin 2003), in [0, 1].

    Example:
        >>> js_distance([1, 0], [0, 1])
        1.0
    """
    return _js(*_pair(ref_counts, win_counts))


def _js(p: FloatArray, q: FloatArray) -> float:
    mid = 0.5 * (p + q)
    # xlogy gives 0 * log(0) = 0: empty bins need no smoothing here.
    div = 0.5 * float(np.sum(special.xlogy(p, p) - special.xlogy(p, mid))
                      + np.sum(special.xlogy(q, q) - special.xlogy(q, mid))) / math.log(2.0)
    return math.sqrt(min(max(div, 0.0), 1.0))


def wasserstein_binned(edges: Sequence[float], ref_counts: Any, win_counts: Any,
                       ref_bounds: tuple[float, float],
                       win_bounds: tuple[float, float] | None = None) -> float:
    """Wasserstein-1 distance between two binned distributions (not normalised).

    Mass is uniform inside each bin, so both CDFs are piecewise linear; the
    outer bins of each side end at its ``bounds`` (``(lo, hi)``, which must
    enclose the edges). Between consecutive knots of either CDF both are
    linear, and the integral of ``|F - G|`` is computed exactly there.

    Parameters:
        edges: Interior bin edges shared by both sides.
        ref_counts: Reference count per bin.
        win_counts: Window count per bin.
        ref_bounds: Where the reference's outer bins end.
        win_bounds: Where the window's outer bins end; the reference's if None.

    Example:
        >>> wasserstein_binned([1.0], [1, 0], [0, 1], ref_bounds=(0.0, 2.0))
        1.0
    """
    p, q = _pair(ref_counts, win_counts)
    e = np.asarray(edges, dtype=np.float64)
    if p.size != e.size + 1:
        msg = f"{p.size} bins need {p.size - 1} edges, got {e.size}"
        raise ValueError(msg)
    for lo, hi in (ref_bounds, win_bounds or ref_bounds):
        if not lo <= hi or (e.size and not (lo <= e[0] and e[-1] <= hi)):
            msg = f"bounds [{lo}, {hi}] do not enclose the edges {e.tolist()}"
            raise ValueError(msg)
    return _w1(e, p, q, ref_bounds, win_bounds or ref_bounds)


def _w1(e: FloatArray, p: FloatArray, q: FloatArray,
        p_bounds: tuple[float, float], q_bounds: tuple[float, float]) -> float:
    xp = np.concatenate([[p_bounds[0]], e, [p_bounds[1]]])
    xq = np.concatenate([[q_bounds[0]], e, [q_bounds[1]]])
    fp = np.concatenate([[0.0], np.cumsum(p)])
    fq = np.concatenate([[0.0], np.cumsum(q)])
    fp[-1] = fq[-1] = 1.0
    nodes = np.unique(np.concatenate([xp, xq]))
    if nodes.size < 2:
        return 0.0
    left, width = nodes[:-1], np.diff(nodes)
    # No knot lies strictly inside a segment, so both CDFs are linear on it:
    # read them at its quarter points (never on a knot, where a zero-width
    # bin makes a jump) and extrapolate to the segment's ends.
    x1, x3 = left + 0.25 * width, left + 0.75 * width
    d1 = np.interp(x1, xp, fp) - np.interp(x1, xq, fq)
    d3 = np.interp(x3, xp, fp) - np.interp(x3, xq, fq)
    a, b = 1.5 * d1 - 0.5 * d3, 1.5 * d3 - 0.5 * d1
    s = np.abs(a) + np.abs(b)
    same_sign = a * b >= 0.0
    # Where F - G changes sign inside a segment, the area of |linear| is
    # (a^2 + b^2) / (2 (|a| + |b|)) per unit width, not the trapezoid.
    area = np.where(same_sign, 0.5 * s,
                    np.divide(a * a + b * b, 2.0 * s, out=np.zeros_like(s), where=s > 0))
    return float(np.sum(width * area))


# ------------------------------------------------------------------ significance


def chi2_homogeneity(ref_counts: Any, win_counts: Any,
                     min_expected: float = 5.0) -> tuple[float, int, float]:
    """Chi-square test that reference and window share one distribution.

    The test of homogeneity on the 2 x B contingency table (Pearson 1900),
    without continuity correction, so it agrees with
    ``scipy.stats.chi2_contingency(..., correction=False)`` when no bin is
    pooled. Bins empty on both sides carry no information and are dropped;
    bins whose smaller expected count is below ``min_expected`` are pooled
    into one, and a pool that is still too small joins the smallest
    remaining bin.

    Returns:
        ``(statistic, degrees of freedom, p-value)``; ``(0.0, 0, 1.0)`` when
        nothing is left to compare.

    Example:
        >>> stat, dof, p = chi2_homogeneity([500, 500], [550, 450])
        >>> round(stat, 3), dof, round(p, 4)
        (5.013, 1, 0.0252)
    """
    r = _as_counts(ref_counts, "ref_counts")
    w = _as_counts(win_counts, "win_counts")
    if r.shape != w.shape:
        msg = f"ref_counts has {r.size} bins but win_counts has {w.size}"
        raise ValueError(msg)
    return _chi2(r, w, min_expected)


def _chi2(r: FloatArray, w: FloatArray, min_expected: float) -> tuple[float, int, float]:
    big_r, big_w = float(r.sum()), float(w.sum())
    if big_r == 0 or big_w == 0:
        return 0.0, 0, 1.0
    keep = (r + w) > 0
    r, w = r[keep], w[keep]
    share = min(big_r, big_w) / (big_r + big_w)
    small = share * (r + w) < min_expected
    if small.any():
        r = np.append(r[~small], r[small].sum())
        w = np.append(w[~small], w[small].sum())
        if r.size > 1 and share * (r[-1] + w[-1]) < min_expected:
            j = int(np.argmin(r[:-1] + w[:-1]))
            r[j] += r[-1]
            w[j] += w[-1]
            r, w = r[:-1], w[:-1]
    dof = r.size - 1
    if dof < 1:
        return 0.0, 0, 1.0
    total = r + w
    exp_r = big_r * total / (big_r + big_w)
    exp_w = big_w * total / (big_r + big_w)
    stat = float(np.sum((r - exp_r) ** 2 / exp_r) + np.sum((w - exp_w) ** 2 / exp_w))
    # chdtrc is chi2.sf as a bare ufunc: the same value, ~50x less overhead.
    return stat, dof, float(special.chdtrc(dof, stat))


def benjamini_hochberg(p_values: Any) -> FloatArray:
    """Benjamini-Hochberg (1995) adjusted p-values (step-up, monotone).

    Rejecting every hypothesis with adjusted p <= alpha controls the false
    discovery rate at alpha for independent or positively dependent tests.
    Matches ``scipy.stats.false_discovery_control(p, method="bh")``.

    Example:
        >>> benjamini_hochberg([0.01, 0.04, 0.03]).round(3).tolist()
        [0.03, 0.04, 0.04]
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or bool(((p < 0) | (p > 1) | np.isnan(p)).any()):
        msg = f"p-values must be a 1-d array in [0, 1], got {p_values!r}"
        raise ValueError(msg)
    m = p.size
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    # The step-up rule: the adjusted value of rank i is the smallest scaled
    # value at any rank >= i, hence the reversed running minimum.
    adjusted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    out = np.empty(m)
    out[order] = adjusted
    return out


def missing_rate_test(ref_missing: int, ref_rows: int, win_missing: int, win_rows: int) -> float:
    """One-sided p-value that the window's missing rate exceeds the reference's.

    The pooled two-proportion z-test (e.g. Agresti 2013, section 3.1); its
    square is the uncorrected 2 x 2 chi-square statistic. Returns 1.0 when
    either side is empty or the pooled rate is 0 or 1.

    Example:
        >>> round(missing_rate_test(100, 10_000, 150, 10_000), 5)
        0.00073
    """
    for name, v in [("ref_missing", ref_missing), ("ref_rows", ref_rows),
                    ("win_missing", win_missing), ("win_rows", win_rows)]:
        if v < 0:
            msg = f"{name} must be >= 0, got {v}"
            raise ValueError(msg)
    if ref_missing > ref_rows or win_missing > win_rows:
        msg = f"missing counts exceed rows: {ref_missing}/{ref_rows}, {win_missing}/{win_rows}"
        raise ValueError(msg)
    if ref_rows == 0 or win_rows == 0:
        return 1.0
    pooled = (ref_missing + win_missing) / (ref_rows + win_rows)
    if pooled in (0.0, 1.0):
        return 1.0
    se = math.sqrt(pooled * (1.0 - pooled) * (1.0 / ref_rows + 1.0 / win_rows))
    z = (win_missing / win_rows - ref_missing / ref_rows) / se
    return float(special.ndtr(-z))


# ------------------------------------------------------------------------ report


@dataclass(frozen=True)
class FeatureDrift:
    """Drift statistics of one feature (or the score) in one window."""

    feature: str
    kind: Literal["numeric", "categorical", "score"]
    rows: int
    psi: float
    js: float
    wasserstein: float | None
    chi2: float
    dof: int
    p_value: float
    p_adjusted: float
    effect: bool
    drifting: bool


@dataclass(frozen=True)
class QualityCheck:
    """One data-quality check of one feature in one window.

    ``value`` and ``reference`` are the window's and the reference's missing
    rate (``check == "missing_rate"``) or unseen share (``"unseen_categories"``,
    where the reference is 0 by construction and there is no p-value).
    """

    feature: str
    check: Literal["missing_rate", "unseen_categories"]
    value: float
    reference: float
    p_value: float | None
    p_adjusted: float | None
    firing: bool


@dataclass(frozen=True)
class DriftReport:
    """Everything :func:`compare` found in one window."""

    features: tuple[FeatureDrift, ...]
    quality: tuple[QualityCheck, ...]
    skipped: tuple[str, ...]

    @property
    def drifting(self) -> tuple[str, ...]:
        """Features drifting in this window (both gates passed)."""
        return tuple(f.feature for f in self.features if f.drifting)

    @property
    def flags(self) -> dict[str, bool]:
        """Tested feature -> drifting, the input of :meth:`DriftDecider.update`."""
        return {f.feature: f.drifting for f in self.features}

    @property
    def findings(self) -> tuple[QualityCheck, ...]:
        """The data-quality checks that fired."""
        return tuple(q for q in self.quality if q.firing)


def compare(reference: Profile, window: Profile, spec: DriftSpec | None = None) -> DriftReport:
    """Test every feature and the score of ``window`` against ``reference``.

    Parameters:
        reference: The fitted reference profile.
        window: A summary on the reference's layout (``reference.summarise``,
            or a merge of such summaries).
        spec: Thresholds; the defaults of :class:`DriftSpec` otherwise.

    Raises:
        ValueError: When the window's layout differs from the reference's.
    """
    spec = spec or DriftSpec()
    items: list[tuple[str, Literal["numeric", "categorical", "score"], Any, Any]] = []
    for name, ref_n in reference.numeric.items():
        items.append((name, "numeric", ref_n, _same_layout(name, ref_n, window.numeric.get(name))))
    for name, ref_c in reference.categorical.items():
        items.append((name, "categorical", ref_c,
                      _same_layout(name, ref_c, window.categorical.get(name))))
    if reference.score is not None:
        name = reference.score_column
        items.append((name, "score", reference.score, _same_layout(name, reference.score,
                                                                   window.score)))

    tested: list[tuple[str, Literal["numeric", "categorical", "score"], int, float, float,
                       float | None, float, int, float]] = []
    skipped: list[str] = []
    for name, kind, ref, win in items:
        if win.count < spec.min_rows or ref.count == 0:
            skipped.append(name)
            continue
        # Summaries validated their counts when built: skip re-validation.
        rc = np.asarray(ref.counts, dtype=np.float64)
        wc = np.asarray(win.counts, dtype=np.float64)
        pr, pw = rc / rc.sum(), wc / wc.sum()
        w1 = _normalised_w1(ref, win, pr, pw) if isinstance(ref, NumericSummary) else None
        stat, dof, p = _chi2(rc, wc, spec.min_expected)
        tested.append((name, kind, win.count, _psi(pr, pw, spec.psi_epsilon), _js(pr, pw),
                       w1, stat, dof, p))

    adjusted = benjamini_hochberg([t[-1] for t in tested])
    features = []
    for (name, kind, rows, psi_v, js_v, w1, stat, dof, p), p_adj in zip(
            tested, adjusted.tolist(), strict=True):
        effect = _effect(spec, psi_v, js_v, w1)
        features.append(FeatureDrift(name, kind, rows, psi_v, js_v, w1, stat, dof, p, p_adj,
                                     effect, effect and p_adj <= spec.alpha))
    return DriftReport(tuple(features), _quality(items, spec), tuple(skipped))


def _same_layout(name: str, ref: Any, win: Any) -> Any:
    if win is None:
        msg = f"feature {name!r} is in the reference but not in the window"
        raise ValueError(msg)
    if isinstance(ref, NumericSummary) and ref.edges != win.edges:
        msg = f"feature {name!r}: window edges {win.edges} differ from the reference's"
        raise ValueError(msg)
    if isinstance(ref, CategoricalSummary) and ref.categories != win.categories:
        msg = f"feature {name!r}: window categories {win.categories} differ from the reference's"
        raise ValueError(msg)
    return win


def _normalised_w1(ref: NumericSummary, win: NumericSummary,
                   pr: FloatArray, pw: FloatArray) -> float | None:
    ref_bounds, win_bounds = ref.tail_bounds(), win.tail_bounds()
    assert ref_bounds is not None and win_bounds is not None
    sd = ref.std
    if math.isnan(sd):
        return None
    w1 = _w1(np.asarray(ref.edges, dtype=np.float64), pr, pw, ref_bounds, win_bounds)
    if sd == 0.0:
        return 0.0 if w1 == 0.0 else math.inf
    return w1 / sd


def _effect(spec: DriftSpec, psi_v: float, js_v: float, w1: float | None) -> bool:
    return ((spec.psi_threshold is not None and psi_v >= spec.psi_threshold)
            or (spec.js_threshold is not None and js_v >= spec.js_threshold)
            or (spec.wasserstein_threshold is not None and w1 is not None
                and w1 >= spec.wasserstein_threshold))


def _quality(items: Sequence[tuple[str, str, Any, Any]],
             spec: DriftSpec) -> tuple[QualityCheck, ...]:
    miss = [(name, ref, win) for name, _, ref, win in items
            if win.rows >= spec.min_rows and ref.rows > 0]
    p_miss = [missing_rate_test(ref.missing, ref.rows, win.missing, win.rows)
              for _, ref, win in miss]
    checks = []
    for (name, ref, win), p, p_adj in zip(miss, p_miss, benjamini_hochberg(p_miss).tolist(),
                                          strict=True):
        rise = win.missing_rate - ref.missing_rate
        checks.append(QualityCheck(name, "missing_rate", win.missing_rate, ref.missing_rate,
                                   p, p_adj, p_adj <= spec.alpha and rise >= spec.missing_delta))
    for name, _, ref, win in items:
        if isinstance(win, CategoricalSummary) and ref.known_complete and win.count > 0:
            share = win.unseen_share
            checks.append(QualityCheck(
                name, "unseen_categories", share, 0.0, None, None,
                share >= spec.unseen_threshold and win.unseen >= spec.unseen_min_count))
    return tuple(checks)


# ----------------------------------------------------------------------- decider


class DriftDecider:
    """Decide drift when a feature is flagged in ``k`` of its last ``m`` windows.

    Persistence is what turns per-window tests into pages a person trusts: a
    single flagged window is as likely to be a bad batch as a trend. Windows
    in which a feature was not tested (absent from the flags, e.g. too few
    rows) are not observations and do not age its history. The decision is
    not latched: it is recomputed on every update; the incident layer
    debounces and resolves. Like every detector here it never resets itself.

    Parameters:
        k: Flagged windows needed.
        m: Windows remembered per feature.

    Example:
        >>> d = DriftDecider(k=2, m=3)
        >>> d.update({"age": True}), d.update({"age": False}), d.update({"age": True})
        (frozenset(), frozenset(), frozenset({'age'}))
        >>> d.drift_detected
        True
    """

    def __init__(self, k: int = 3, m: int = 5) -> None:
        if not 1 <= k <= m:
            msg = f"need 1 <= k <= m, got k={k} and m={m}"
            raise ValueError(msg)
        self.k = k
        self.m = m
        self._history: dict[str, list[bool]] = {}
        self._drifting: frozenset[str] = frozenset()

    def update(self, flags: Mapping[str, bool]) -> frozenset[str]:
        """Record one window's per-feature flags; return the features decided drifting."""
        for name, flag in flags.items():
            history = self._history.setdefault(name, [])
            history.append(bool(flag))
            del history[:-self.m]
        self._drifting = frozenset(n for n, h in self._history.items() if sum(h) >= self.k)
        return self._drifting

    @property
    def drifting(self) -> frozenset[str]:
        """Features decided drifting after the last update."""
        return self._drifting

    @property
    def drift_detected(self) -> bool:
        """Whether any feature is decided drifting."""
        return bool(self._drifting)

    def reset(self, feature: str | None = None) -> None:
        """Forget the history of ``feature``, or of every feature."""
        if feature is None:
            self._history.clear()
        else:
            self._history.pop(feature, None)
        self._drifting = frozenset(n for n, h in self._history.items() if sum(h) >= self.k)

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state; hyperparameters included so a mismatch is caught."""
        return {"k": self.k, "m": self.m,
                "history": {n: list(h) for n, h in self._history.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output of a decider with the same k and m."""
        if (state["k"], state["m"]) != (self.k, self.m):
            msg = (f"state is for k={state['k']}, m={state['m']}; "
                   f"this decider has k={self.k}, m={self.m}")
            raise ValueError(msg)
        self._history = {str(n): [bool(x) for x in h][-self.m:]
                         for n, h in state["history"].items()}
        self._drifting = frozenset(n for n, h in self._history.items() if sum(h) >= self.k)

    def __repr__(self) -> str:
        return f"DriftDecider(k={self.k}, m={self.m})"
