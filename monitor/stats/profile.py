"""Mergeable reference profiles and window summaries.

A :class:`Profile` is the only thing the drift tests ever look at: binned
counts, missing counts, moments and label rates, never raw rows. The same
class describes the *reference* (fitted on training data, docs/statistics.md)
and a *window* (the current traffic counted against the reference's bin edges
and categories), so that

* the drift tests compare two objects with one layout, bin for bin;
* window summaries from several consumers (docs/scale-out.md) merge with
  ``a + b`` and the result equals the summary of the concatenated rows
  (counts exactly, moments up to floating-point rounding);
* a profile travels as versioned JSON (an MLflow artifact, a row in
  PostgreSQL, a Kafka message) without pickling.

Layout decisions, all made when the reference is fitted:

* Numeric features: interior bin edges are reference quantiles
  (``method="inverted_cdf"``, so every edge is an observed value and a point
  mass such as a 0/1 flag yields one edge, not interpolated empty bins),
  deduplicated. Bins are right-closed, ``(-inf, e0], (e0, e1], ...,
  (e_last, inf)``: the outer bins are open-ended, so no window value ever
  falls outside the layout. Non-finite values (and magnitudes above 1e150,
  whose squares would overflow the moments) count as missing.
* Categorical features: the ``top_k`` most frequent reference categories, an
  "other" bin for the rest, and a missing count. Categories are compared as
  ``str(value)`` (JSON keys are strings). The reference also keeps the set of
  every category it saw (up to ``max_known``) so that a window can count the
  rows in categories *never* seen before, a data-quality signal distinct from
  "other" (docs/statistics.md).
* The model score: fixed equal-width bins on [0, 1], so score profiles of
  different model versions are comparable.
* Labels: positives and matured count per label type; NaN means "not matured"
  and is not counted.

Everything is vectorised per column (chunked comparisons against the few bin
edges for numbers, hash counts for categories); Python loops run over
chunks, edges and distinct categories, never over rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

__all__ = [
    "FORMAT",
    "CategoricalSummary",
    "NumericSummary",
    "Profile",
    "ProfileSpec",
    "RateSummary",
]

#: Version tag of the JSON form; readers refuse any other value.
FORMAT = "driftloop.profile/v1"

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Larger magnitudes count as missing: their squares overflow float64 and
#: would turn the moments into inf. No real feature gets near this.
_MAX_ABS = 1e150

#: Values per chunk when counting a numeric column: two float64/bool buffers
#: of this length (0.6 MB) stay in the L2 cache however long the column is.
_CHUNK = 1 << 16

#: Columns given as a DataFrame or as a mapping of column name to array.
Data = pd.DataFrame | Mapping[str, Any]


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class ProfileSpec:
    """How to fit a reference profile.

    Parameters:
        numeric: Names of the numeric features. ``None`` infers them: every
            column with a numeric (non-boolean) dtype that is not the score or
            a label.
        categorical: Names of the categorical features. ``None`` infers them:
            every remaining column that is not the score or a label.
        score: Column with the model score in [0, 1], or ``None`` for none.
        labels: Columns with 0/1 labels (NaN = not matured), one per label
            type; the label type is the column name.
        bins: Number of reference-quantile bins per numeric feature before
            deduplication. Ten (deciles) is the PSI convention (Siddiqi
            2006); more bins see tail changes sooner but make every effect
            size noisier, roughly ``(bins - 1) / n`` in PSI for a window of
            ``n`` rows.
        score_bins: Number of equal-width score bins on [0, 1].
        top_k: Number of named categories per categorical feature; the rest
            share the "other" bin.
        max_known: Most categories remembered per feature for the unseen-
            category check. A reference with more distinct values keeps the
            most frequent ``max_known`` and marks the set incomplete, and the
            drift module then skips that check rather than raise false alarms.

    Example:
        >>> ProfileSpec(numeric=("age",), categorical=("country",), bins=10).bins
        10
        >>> ProfileSpec(bins=1)
        Traceback (most recent call last):
        ...
        ValueError: bins must be >= 2, got 1
    """

    numeric: tuple[str, ...] | None = None
    categorical: tuple[str, ...] | None = None
    score: str | None = None
    labels: tuple[str, ...] = ()
    bins: int = 10
    score_bins: int = 20
    top_k: int = 20
    max_known: int = 10_000

    def __post_init__(self) -> None:
        if self.bins < 2:
            msg = f"bins must be >= 2, got {self.bins}"
            raise ValueError(msg)
        if self.score_bins < 2:
            msg = f"score_bins must be >= 2, got {self.score_bins}"
            raise ValueError(msg)
        if self.top_k < 1:
            msg = f"top_k must be >= 1, got {self.top_k}"
            raise ValueError(msg)
        if self.max_known < self.top_k:
            msg = f"max_known {self.max_known} is smaller than top_k {self.top_k}"
            raise ValueError(msg)
        named = [*(self.numeric or ()), *(self.categorical or ()), *self.labels]
        if self.score is not None:
            named.append(self.score)
        dupes = sorted({n for n in named if named.count(n) > 1})
        if dupes:
            msg = f"columns named in more than one role: {dupes}"
            raise ValueError(msg)


# ----------------------------------------------------------------------- summaries


class _Counted:
    """Row accounting shared by the binned summaries (``counts`` plus ``missing``)."""

    counts: tuple[int, ...]
    missing: int

    @property
    def count(self) -> int:
        """Number of non-missing values."""
        return sum(self.counts)

    @property
    def rows(self) -> int:
        """Number of rows, missing ones included."""
        return self.count + self.missing

    @property
    def missing_rate(self) -> float:
        """Share of rows that were missing; NaN for an empty summary."""
        return self.missing / self.rows if self.rows else math.nan


@dataclass(frozen=True)
class NumericSummary(_Counted):
    """Binned counts and moments of one numeric column.

    Parameters:
        edges: Strictly increasing interior bin edges; bins are
            ``(-inf, e0], (e0, e1], ..., (e_last, inf)``.
        counts: Count per bin, ``len(edges) + 1`` of them.
        missing: Rows where the value was missing, not finite, or above 1e150
            in magnitude.
        mean: Mean of the non-missing values (0.0 when there are none).
        m2: Sum of squared deviations from the mean (Welford's M2), kept
            instead of the variance because it merges exactly by Chan's
            formula.
        min: Smallest value, ``None`` when there are none.
        max: Largest value, ``None`` when there are none.
        tail_sums: Sum of the values in the first and in the last bin. The
            outer bins are open-ended, so their counts alone say nothing about
            how far the tails reach; their means do (see :meth:`tail_bounds`).

    Example:
        >>> s = NumericSummary.from_values(np.array([1.0, 2.0, np.nan]), edges=(1.5,))
        >>> s.counts, s.missing, s.mean
        ((1, 1), 1, 1.5)
        >>> (s + s).counts
        (2, 2)
    """

    edges: tuple[float, ...]
    counts: tuple[int, ...]
    missing: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float | None = None
    max: float | None = None
    tail_sums: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.edges) + 1:
            msg = f"{len(self.counts)} counts for {len(self.edges)} edges; need edges + 1"
            raise ValueError(msg)
        if any(not math.isfinite(e) for e in self.edges):
            msg = f"edges must be finite, got {self.edges}"
            raise ValueError(msg)
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            msg = f"edges must be strictly increasing, got {self.edges}"
            raise ValueError(msg)
        if any(c < 0 for c in self.counts) or self.missing < 0:
            msg = f"counts must be >= 0, got {self.counts} and missing {self.missing}"
            raise ValueError(msg)
        if self.m2 < 0 or not math.isfinite(self.m2) or not math.isfinite(self.mean):
            msg = f"moments must be finite with m2 >= 0, got mean {self.mean} m2 {self.m2}"
            raise ValueError(msg)
        if (self.min is None) != (self.count == 0) or (self.max is None) != (self.count == 0):
            msg = f"min/max must be given exactly when count > 0 (count {self.count})"
            raise ValueError(msg)
        if len(self.tail_sums) != 2 or not all(math.isfinite(t) for t in self.tail_sums):
            msg = f"tail_sums must be two finite numbers, got {self.tail_sums}"
            raise ValueError(msg)

    @classmethod
    def from_values(cls, values: Any, edges: tuple[float, ...]) -> NumericSummary:
        """Count ``values`` into the bins given by ``edges``, in one vectorised pass.

        The column is read once, in chunks of ``_CHUNK`` values whose
        temporaries stay in the CPU cache: per chunk, the bin counts come from
        one comparison per edge (``count(v <= e)``; with ten bins that is
        several times faster than a binary search per value), and the chunk's
        mean and M2 merge into the running ones by Chan et al.'s formula, as
        :meth:`__add__` merges summaries. Memory beyond the input is two
        chunk-sized buffers, whatever the column's length.
        """
        x = np.asarray(values, dtype=np.float64).ravel()
        e = np.asarray(edges, dtype=np.float64)
        size = int(x.size)
        at_or_below = np.zeros(e.size, dtype=np.int64)  # values <= each edge
        n, mean, m2 = 0, 0.0, 0.0
        lo_sum = hi_sum = whole_sum = 0.0
        lo, hi = math.inf, -math.inf
        buf = np.empty(min(size, _CHUNK), dtype=np.float64)
        mask = np.empty(min(size, _CHUNK), dtype=bool)
        for start in range(0, size, _CHUNK):
            c = x[start:start + _CHUNK]
            # NaN compares False, so this one pass also drops NaN and +-inf.
            finite = np.less_equal(np.abs(c, out=buf[:c.size]), _MAX_ABS, out=mask[:c.size])
            if not bool(finite.all()):
                c = c[finite]
            k = int(c.size)
            if k == 0:
                continue
            b, m = buf[:k], mask[:k]
            for i, edge in enumerate(e.tolist()):
                # Right-closed bins: a value equal to an edge is in the bin it closes.
                np.less_equal(c, edge, out=m)
                at_or_below[i] += np.count_nonzero(m)
                if i == 0:
                    lo_sum += float(np.multiply(c, m, out=b).sum())
            if e.size:
                hi_sum += float(np.multiply(c, np.logical_not(m, out=m), out=b).sum())
            c_sum = float(c.sum())
            whole_sum += c_sum
            c_mean = c_sum / k
            d = np.subtract(c, c_mean, out=b)
            c_m2 = float(np.square(d, out=d).sum())
            total = n + k
            delta = c_mean - mean
            mean += delta * (k / total)
            m2 += c_m2 + delta * delta * (n * k / total)
            n = total
            lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
        counts = tuple(int(v) for v in np.diff(at_or_below, prepend=0, append=n))
        if n == 0:
            return cls(edges, counts, missing=size)
        if not e.size:  # one bin, both outer ones
            lo_sum = hi_sum = whole_sum
        return cls(
            edges=edges,
            counts=counts,
            missing=size - n,
            mean=mean,
            m2=m2,
            min=lo,
            max=hi,
            tail_sums=(lo_sum, hi_sum),
        )

    @property
    def variance(self) -> float:
        """Sample variance (ddof=1); NaN with fewer than two values."""
        n = self.count
        return self.m2 / (n - 1) if n > 1 else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof=1); NaN with fewer than two values."""
        return math.sqrt(self.variance)

    def tail_bounds(self) -> tuple[float, float] | None:
        """Where the open outer bins end, if their mass were spread uniformly.

        Each outer bin is closed so that a uniform distribution on it has the
        bin's observed mean (``lo = 2 * mean_0 - e0``), clipped to the
        observed min/max. Closing it at the min/max instead would stretch a
        decile's mass over the most extreme observation and inflate every
        distance computed from the bins several-fold. ``None`` when empty.
        """
        if self.min is None or self.max is None:
            return None
        if not self.edges:
            return self.min, self.max
        first, last = self.edges[0], self.edges[-1]
        lo, hi = first, last
        if self.counts[0]:
            lo = min(first, max(self.min, 2.0 * self.tail_sums[0] / self.counts[0] - first))
        if self.counts[-1]:
            hi = max(last, min(self.max, 2.0 * self.tail_sums[1] / self.counts[-1] - last))
        return lo, hi

    def empty(self) -> NumericSummary:
        """A summary with this layout and no rows: the identity of ``+``."""
        return NumericSummary(self.edges, (0,) * len(self.counts))

    def __add__(self, other: NumericSummary) -> NumericSummary:
        """Merge two summaries of the same layout (Chan, Golub & LeVeque 1979)."""
        if not isinstance(other, NumericSummary):
            return NotImplemented
        if other.edges != self.edges:
            msg = f"cannot merge numeric summaries with edges {self.edges} and {other.edges}"
            raise ValueError(msg)
        na, nb = self.count, other.count
        counts = tuple(a + b for a, b in zip(self.counts, other.counts, strict=True))
        missing = self.missing + other.missing
        tails = (self.tail_sums[0] + other.tail_sums[0], self.tail_sums[1] + other.tail_sums[1])
        if nb == 0:
            return NumericSummary(self.edges, counts, missing, self.mean, self.m2,
                                  self.min, self.max, tails)
        if na == 0:
            return NumericSummary(self.edges, counts, missing, other.mean, other.m2,
                                  other.min, other.max, tails)
        n = na + nb
        delta = other.mean - self.mean
        # Chan et al.'s pairwise update: stable where the naive sum of squares
        # would cancel catastrophically for large means.
        mean = self.mean + delta * (nb / n)
        m2 = self.m2 + other.m2 + delta * delta * (na * nb / n)
        assert self.min is not None and other.min is not None
        assert self.max is not None and other.max is not None
        return NumericSummary(self.edges, counts, missing, mean, m2,
                              min(self.min, other.min), max(self.max, other.max), tails)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "edges": list(self.edges),
            "counts": list(self.counts),
            "missing": self.missing,
            "mean": self.mean,
            "m2": self.m2,
            "min": self.min,
            "max": self.max,
            "tail_sums": list(self.tail_sums),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NumericSummary:
        """Inverse of :meth:`to_dict`."""
        return cls(
            edges=tuple(float(e) for e in d["edges"]),
            counts=tuple(int(c) for c in d["counts"]),
            missing=int(d["missing"]),
            mean=float(d["mean"]),
            m2=float(d["m2"]),
            min=None if d["min"] is None else float(d["min"]),
            max=None if d["max"] is None else float(d["max"]),
            tail_sums=(float(d["tail_sums"][0]), float(d["tail_sums"][1])),
        )


@dataclass(frozen=True)
class CategoricalSummary(_Counted):
    """Counts of one categorical column over the reference's top categories.

    Parameters:
        categories: The reference's ``top_k`` categories, most frequent first.
        counts: Count per category, then the "other" count (``len(categories)
            + 1`` values).
        missing: Rows where the value was missing.
        unseen: Rows (all inside "other") whose category is not in ``known``.
            Zero in a reference by construction.
        known: Every category the reference saw, up to ``max_known``.
        known_complete: False when the reference had more distinct categories
            than it remembered, so ``unseen`` over-counts and must not be used.

    Example:
        >>> ref = CategoricalSummary.fit(np.array(["a", "a", "b", "c", None]), top_k=1)
        >>> ref.categories, ref.counts, ref.missing
        (('a',), (2, 2), 1)
        >>> ref.summarise(np.array(["a", "b", "z"])).counts, ref.summarise(np.array(["z"])).unseen
        ((1, 2), 1)
    """

    categories: tuple[str, ...]
    counts: tuple[int, ...]
    missing: int = 0
    unseen: int = 0
    known: frozenset[str] = field(default_factory=frozenset)
    known_complete: bool = True

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.categories) + 1:
            msg = (f"{len(self.counts)} counts for {len(self.categories)} categories; "
                   "need categories + 1 (the last is 'other')")
            raise ValueError(msg)
        if len(set(self.categories)) != len(self.categories):
            msg = f"categories must be distinct, got {self.categories}"
            raise ValueError(msg)
        if any(c < 0 for c in self.counts) or self.missing < 0 or self.unseen < 0:
            msg = (f"counts must be >= 0, got {self.counts}, missing {self.missing}, "
                   f"unseen {self.unseen}")
            raise ValueError(msg)
        if self.unseen > self.counts[-1]:
            msg = f"unseen {self.unseen} exceeds the 'other' count {self.counts[-1]}"
            raise ValueError(msg)
        missing_top = [c for c in self.categories if c not in self.known]
        if missing_top:
            msg = f"top categories {missing_top} are not in the known set"
            raise ValueError(msg)

    @classmethod
    def fit(cls, values: Any, top_k: int = 20, max_known: int = 10_000) -> CategoricalSummary:
        """Choose the layout from reference ``values`` and count them.

        Ties in frequency are broken by the category's string, so the layout
        does not depend on row order.
        """
        keys, ucounts, missing = _category_counts(values)
        agg: dict[str, int] = {}
        for k, c in zip(keys, ucounts.tolist(), strict=True):
            agg[k] = agg.get(k, 0) + int(c)
        ranked = sorted(agg.items(), key=lambda kv: (-kv[1], kv[0]))
        top = tuple(k for k, _ in ranked[:top_k])
        known = frozenset(k for k, _ in ranked[:max_known])
        counts = (*(c for _, c in ranked[:top_k]), sum(c for _, c in ranked[top_k:]))
        return cls(top, counts, missing, 0, known, len(ranked) <= max_known)

    def summarise(self, values: Any) -> CategoricalSummary:
        """Count ``values`` against this summary's categories and known set."""
        keys, ucounts, missing = _category_counts(values)
        k = len(self.categories)
        index = {c: i for i, c in enumerate(self.categories)}
        slot = np.fromiter((index.get(key, k) for key in keys), dtype=np.int64, count=len(keys))
        new = np.fromiter((key not in self.known for key in keys), dtype=bool, count=len(keys))
        counts = np.bincount(slot, weights=ucounts, minlength=k + 1)
        return CategoricalSummary(
            self.categories,
            tuple(np.rint(counts).astype(np.int64).tolist()),
            missing,
            int(ucounts[new].sum()),
            self.known,
            self.known_complete,
        )

    @property
    def unseen_share(self) -> float:
        """Share of non-missing rows in never-seen categories; NaN when empty."""
        return self.unseen / self.count if self.count else math.nan

    def empty(self) -> CategoricalSummary:
        """A summary with this layout and no rows: the identity of ``+``."""
        return CategoricalSummary(self.categories, (0,) * len(self.counts), 0, 0,
                                  self.known, self.known_complete)

    def __add__(self, other: CategoricalSummary) -> CategoricalSummary:
        """Merge two summaries of the same layout: counts add."""
        if not isinstance(other, CategoricalSummary):
            return NotImplemented
        if other.categories != self.categories or other.known != self.known:
            msg = (f"cannot merge categorical summaries with categories {self.categories} "
                   f"and {other.categories} (or different known sets)")
            raise ValueError(msg)
        return CategoricalSummary(
            self.categories,
            tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)),
            self.missing + other.missing,
            self.unseen + other.unseen,
            self.known,
            self.known_complete and other.known_complete,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "categories": list(self.categories),
            "counts": list(self.counts),
            "missing": self.missing,
            "unseen": self.unseen,
            "known": sorted(self.known),
            "known_complete": self.known_complete,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CategoricalSummary:
        """Inverse of :meth:`to_dict`."""
        return cls(
            categories=tuple(str(c) for c in d["categories"]),
            counts=tuple(int(c) for c in d["counts"]),
            missing=int(d["missing"]),
            unseen=int(d["unseen"]),
            known=frozenset(str(k) for k in d["known"]),
            known_complete=bool(d["known_complete"]),
        )


@dataclass(frozen=True)
class RateSummary:
    """Positives and matured count of one label type.

    Example:
        >>> r = RateSummary.from_values(np.array([1.0, 0.0, np.nan, 1.0]))
        >>> r, r.rate
        (RateSummary(positives=2, count=3), 0.6666666666666666)
    """

    positives: int = 0
    count: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.positives <= self.count:
            msg = f"need 0 <= positives <= count, got {self.positives} of {self.count}"
            raise ValueError(msg)

    @classmethod
    def from_values(cls, values: Any) -> RateSummary:
        """Count 0/1 ``values``; NaN (not matured yet) is skipped."""
        x = np.asarray(values, dtype=np.float64).ravel()
        v = x[~np.isnan(x)]
        bad = v[(v != 0.0) & (v != 1.0)]
        if bad.size:
            msg = f"labels must be 0, 1 or NaN, got {float(bad[0])!r}"
            raise ValueError(msg)
        return cls(int(np.count_nonzero(v)), int(v.size))

    @property
    def rate(self) -> float:
        """positives / count; NaN when nothing has matured."""
        return self.positives / self.count if self.count else math.nan

    def __add__(self, other: RateSummary) -> RateSummary:
        """Merge: both counts add."""
        if not isinstance(other, RateSummary):
            return NotImplemented
        return RateSummary(self.positives + other.positives, self.count + other.count)


# ------------------------------------------------------------------------- profile


@dataclass(frozen=True)
class Profile:
    """A reference profile or a window summary on a reference's layout.

    Build a reference with :meth:`fit`, a window with ``reference.summarise``,
    merge windows with ``+`` and persist with :meth:`to_json`.

    Parameters:
        rows: Rows profiled.
        numeric: Summary per numeric feature.
        categorical: Summary per categorical feature.
        score: Summary of the model score on fixed bins, if profiled.
        labels: Rate per label type.
        score_column: Column the score is read from when summarising a window.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> train = pd.DataFrame({"age": rng.normal(40, 10, 1000),
        ...                       "country": rng.choice(["de", "fr", "us"], 1000)})
        >>> ref = Profile.fit(train)
        >>> a, b = ref.summarise(train[:300]), ref.summarise(train[300:])
        >>> (a + b).numeric["age"].counts == ref.numeric["age"].counts
        True
        >>> Profile.from_json(ref.to_json()) == ref
        True
    """

    rows: int
    numeric: Mapping[str, NumericSummary] = field(default_factory=dict)
    categorical: Mapping[str, CategoricalSummary] = field(default_factory=dict)
    score: NumericSummary | None = None
    labels: Mapping[str, RateSummary] = field(default_factory=dict)
    score_column: str = "score"

    def __post_init__(self) -> None:
        if self.rows < 0:
            msg = f"rows must be >= 0, got {self.rows}"
            raise ValueError(msg)
        clash = sorted(set(self.numeric) & set(self.categorical))
        if clash:
            msg = f"features {clash} are both numeric and categorical"
            raise ValueError(msg)
        covered = {n: s.rows for n, s in self.numeric.items()}
        covered.update((n, s.rows) for n, s in self.categorical.items())
        for name, rows in covered.items():
            if rows != self.rows:
                msg = f"feature {name!r} covers {rows} rows, the profile {self.rows}"
                raise ValueError(msg)
        if self.score is not None and self.score.rows != self.rows:
            msg = f"score covers {self.score.rows} rows, the profile {self.rows}"
            raise ValueError(msg)

    @classmethod
    def fit(cls, data: Data, spec: ProfileSpec | None = None) -> Profile:
        """Fit a reference: choose bin edges and categories, then count.

        Parameters:
            data: A DataFrame, or a mapping of column name to 1-d array.
            spec: Which columns play which role and how finely to bin them.
        """
        spec = spec or ProfileSpec()
        cols, rows = _columns(data)
        role_cols = {*spec.labels, *([spec.score] if spec.score else [])}
        absent = sorted(c for c in [*(spec.numeric or ()), *(spec.categorical or ()),
                                    *role_cols] if c not in cols)
        if absent:
            msg = f"columns {absent} are not in the reference data"
            raise ValueError(msg)
        numeric, categorical = _roles(cols, spec, role_cols)
        num = {}
        for name in numeric:
            x = _as_float(cols[name], name)
            num[name] = NumericSummary.from_values(x, _quantile_edges(x, spec.bins))
        cat = {name: CategoricalSummary.fit(cols[name], spec.top_k, spec.max_known)
               for name in categorical}
        score = None
        if spec.score is not None:
            edges = tuple(float(e) for e in np.linspace(0.0, 1.0, spec.score_bins + 1)[1:-1])
            score = NumericSummary.from_values(_as_float(cols[spec.score], spec.score), edges)
        labels = {name: RateSummary.from_values(_as_float(cols[name], name))
                  for name in spec.labels}
        return cls(rows, num, cat, score, labels, spec.score or "score")

    def summarise(self, data: Data) -> Profile:
        """Summarise ``data`` on this profile's layout (a window summary).

        A feature or label column absent from ``data`` counts as missing on
        every row: a producer that stops sending a feature is exactly the
        missing-rate spike the drift module reports.

        Parameters:
            data: A DataFrame, or a mapping of column name to 1-d array.
        """
        cols, rows = _columns(data)
        # A read-only all-NaN column of zero stride: absent columns cost no memory.
        nan = np.broadcast_to(np.float64(np.nan), (rows,))
        num = {name: NumericSummary.from_values(
                   _as_float(cols[name], name) if name in cols else nan, s.edges)
               for name, s in self.numeric.items()}
        cat = {name: s.summarise(cols.get(name, nan))
               for name, s in self.categorical.items()}
        sc = None
        if self.score is not None:
            key = self.score_column
            sc = NumericSummary.from_values(
                _as_float(cols[key], key) if key in cols else nan, self.score.edges)
        labels = {name: RateSummary.from_values(_as_float(cols[name], name))
                  if name in cols else RateSummary()
                  for name in self.labels}
        return Profile(rows, num, cat, sc, labels, self.score_column)

    def empty(self) -> Profile:
        """A profile with this layout and no rows: the identity of ``+``."""
        return Profile(
            0,
            {n: s.empty() for n, s in self.numeric.items()},
            {n: s.empty() for n, s in self.categorical.items()},
            None if self.score is None else self.score.empty(),
            {n: RateSummary() for n in self.labels},
            self.score_column,
        )

    def __add__(self, other: Profile) -> Profile:
        """Merge two profiles of the same layout; equals profiling both inputs."""
        if not isinstance(other, Profile):
            return NotImplemented
        for what, a, b in [("numeric", self.numeric, other.numeric),
                           ("categorical", self.categorical, other.categorical),
                           ("label", self.labels, other.labels)]:
            if set(a) != set(b):
                msg = f"cannot merge profiles with {what} features {sorted(a)} and {sorted(b)}"
                raise ValueError(msg)
        if (self.score is None) != (other.score is None) or (
                self.score_column != other.score_column):
            msg = (f"cannot merge profiles with scores {self.score_column!r} "
                   f"({self.score is not None}) and {other.score_column!r} "
                   f"({other.score is not None})")
            raise ValueError(msg)
        score = None
        if self.score is not None and other.score is not None:
            score = self.score + other.score
        return Profile(
            self.rows + other.rows,
            {n: _merge(n, s, other.numeric[n]) for n, s in self.numeric.items()},
            {n: _merge(n, s, other.categorical[n]) for n, s in self.categorical.items()},
            score,
            {n: s + other.labels[n] for n, s in self.labels.items()},
            self.score_column,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the ``format`` version key."""
        return {
            "format": FORMAT,
            "rows": self.rows,
            "numeric": {n: s.to_dict() for n, s in self.numeric.items()},
            "categorical": {n: s.to_dict() for n, s in self.categorical.items()},
            "score": None if self.score is None else self.score.to_dict(),
            "score_column": self.score_column,
            "labels": {n: {"positives": r.positives, "count": r.count}
                       for n, r in self.labels.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Profile:
        """Inverse of :meth:`to_dict`; refuses an unknown ``format``."""
        fmt = d.get("format")
        if fmt != FORMAT:
            msg = f"unsupported profile format {fmt!r}; this reader knows {FORMAT!r}"
            raise ValueError(msg)
        return cls(
            rows=int(d["rows"]),
            numeric={n: NumericSummary.from_dict(s) for n, s in d["numeric"].items()},
            categorical={n: CategoricalSummary.from_dict(s)
                         for n, s in d["categorical"].items()},
            score=None if d["score"] is None else NumericSummary.from_dict(d["score"]),
            labels={n: RateSummary(int(r["positives"]), int(r["count"]))
                    for n, r in d["labels"].items()},
            score_column=str(d["score_column"]),
        )

    def to_json(self) -> str:
        """Strict JSON (no NaN); floats round-trip exactly."""
        return json.dumps(self.to_dict(), allow_nan=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Profile:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


# ------------------------------------------------------------------------- helpers


def _merge(name: str, a: Any, b: Any) -> Any:
    try:
        return a + b
    except ValueError as exc:
        msg = f"feature {name!r}: {exc}"
        raise ValueError(msg) from exc


def _columns(data: Data) -> tuple[Mapping[str, Any], int]:
    """Column mapping and row count; all columns must be one length."""
    if isinstance(data, pd.DataFrame):
        return {str(c): data[c] for c in data.columns}, len(data)
    lengths = {name: len(col) for name, col in data.items()}
    if len(set(lengths.values())) > 1:
        msg = f"columns differ in length: {lengths}"
        raise ValueError(msg)
    return data, next(iter(lengths.values()), 0)


def _roles(cols: Mapping[str, Any], spec: ProfileSpec,
           role_cols: set[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Numeric and categorical feature names, inferring any left as ``None``."""
    rest = [c for c in cols if c not in role_cols]
    numeric = spec.numeric
    categorical = spec.categorical
    if numeric is None:
        taken = set(categorical or ())
        numeric = tuple(c for c in rest if c not in taken and _is_numeric(cols[c]))
    if categorical is None:
        taken = set(numeric)
        categorical = tuple(c for c in rest if c not in taken)
    return numeric, categorical


def _is_numeric(col: Any) -> bool:
    dtype = col.dtype if hasattr(col, "dtype") else np.asarray(col).dtype
    return bool(pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype))


def _as_float(col: Any, name: str) -> FloatArray:
    """The column as float64 with NaN for missing (None, NaN, pd.NA)."""
    try:
        if isinstance(col, pd.Series | pd.Index):
            return col.to_numpy(dtype=np.float64, na_value=np.nan)
        return np.asarray(col, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        msg = f"column {name!r} is not numeric: {exc}"
        raise ValueError(msg) from exc


def _quantile_edges(x: FloatArray, bins: int) -> tuple[float, ...]:
    """Deduplicated interior reference quantiles; empty when nothing is finite."""
    v = x[np.isfinite(x)]
    if v.size == 0:
        return ()
    qs = np.quantile(v, np.linspace(0.0, 1.0, bins + 1)[1:-1], method="inverted_cdf")
    return tuple(float(e) for e in np.unique(qs))


def _category_counts(values: Any) -> tuple[list[str], FloatArray, int]:
    """Distinct categories as strings, their counts, and the missing count.

    Categorical and Arrow-backed columns (pandas' default string dtype with
    pyarrow) are counted by ``value_counts``, i.e. by bincount of the codes
    or by pyarrow's hash kernel, about twice as fast as ``factorize`` on
    them. NumPy-backed columns (object arrays) are factorised in chunks of
    ``_CHUNK`` rows, so the per-row codes never exceed one chunk (a whole
    1M-row column's codes and hash table cost ~25 MB) and stay in the cache
    (faster, too); the chunks' counts merge by category. Other extension
    arrays are factorised whole. Categories with no rows (unused levels of a
    ``Categorical``) are dropped.
    """
    dtype = getattr(values, "dtype", None)
    if isinstance(values, pd.Series) and (
            isinstance(dtype, pd.CategoricalDtype | pd.ArrowDtype)
            or (isinstance(dtype, pd.StringDtype) and dtype.storage in ("pyarrow", "pyarrow_numpy"))):
        vc = values.value_counts(dropna=True, sort=False)
        counts = vc.to_numpy(dtype=np.float64)
        keep = counts > 0
        keys = vc.index.tolist() if bool(keep.all()) else vc.index[keep].tolist()
        return [str(u) for u in keys], counts[keep], int(len(values) - counts.sum())
    if isinstance(values, pd.Series | pd.Index) and isinstance(dtype, np.dtype):
        values = values.to_numpy()
    if not (isinstance(values, np.ndarray) and values.ndim == 1 and values.size > _CHUNK):
        uniques, counts, missing = _factorized_counts(values)
        return [str(u) for u in uniques], counts.astype(np.float64), missing
    merged: dict[Any, int] = {}
    missing = 0
    for start in range(0, values.size, _CHUNK):
        uniques, counts, chunk_missing = _factorized_counts(values[start:start + _CHUNK])
        missing += chunk_missing
        # Keys compare as factorize compares them (1 == 1.0), so chunks agree with a whole pass.
        for u, c in zip(uniques, counts.tolist(), strict=True):
            merged[u] = merged.get(u, 0) + c
    return ([str(u) for u in merged], np.fromiter(merged.values(), dtype=np.float64, count=len(merged)),
            missing)


def _factorized_counts(values: Any) -> tuple[list[Any], IntArray, int]:
    """Distinct values (first occurrences), their counts, and the missing count."""
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    # Shift the missing sentinel -1 to bin 0 in place: no mask, no second array.
    codes = np.add(codes, 1, out=codes if isinstance(codes, np.ndarray) and codes.flags.writeable
                   else None)
    counts = np.bincount(codes, minlength=len(uniques) + 1)
    return list(uniques), counts[1:], int(counts[0])
