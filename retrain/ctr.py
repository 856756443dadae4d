"""The reference CTR model: hashed embeddings, normalised numerics, a DCN-v2 cross network.

Three pieces, each with a JSON (or ``state_dict``) form so a model is never a pickle:

* :class:`FeatureSpec`: which columns are ids, categoricals and numerics.
* :class:`Preprocessor`: turns a DataFrame into two arrays, fully vectorised.

  - Ids and categoricals are hashed, never looked up in a vocabulary: a new user or
    item on the day after training gets a bucket like any other value, and the
    model needs no vocabulary to travel with it. Values are compared as strings
    (``str(value)``; a float that is a whole number is written as an integer, so an
    integer id column that picked up a NaN, and so became float, hashes as before)
    and hashed with ``pandas.util.hash_array`` (SipHash-2-4) under a fixed key. The
    scheme has a name (:data:`HASH_SCHEME`) stored with the model: a model saved
    under another scheme refuses to load instead of silently scoring every id in
    the wrong bucket. Missing values map to the reserved bucket 0; the others to
    ``1 + hash % (buckets - 1)``.
  - Numerics are clipped to their training [0.1%, 99.9%] quantiles (one absurd
    value must not dominate the mean, the standard deviation or a gradient),
    standardised with the clipped mean and standard deviation, and imputed with
    the median. A missing indicator per numeric feature keeps "missing" apart from
    "typical". Non-numeric strings and non-finite numbers count as missing; a
    column absent from the frame is all missing (serving traffic that drops a
    feature degrades the score instead of failing the request).

* :class:`CTRNet`: one embedding table per field, concatenated with the numeric
  inputs into ``x0``; a DCN-v2 cross network (Wang et al. 2021, "DCN V2: Improved
  Deep & Cross Network", https://arxiv.org/abs/2008.13535) with full-rank layers
  ``x_{l+1} = x0 * (W_l x_l + b_l) + x_l`` in parallel with an MLP; the two outputs
  are concatenated into one logit (the paper's "parallel" structure).

* :class:`Calibration`: ``scale * logit + bias`` on the net's logit before the sigmoid
  (Platt scaling; identity unless the trainer fitted one on rows the net was not
  trained on, retrain/ctr_trainer.py says when and why). It is part of the model:
  every score the model gives (serving, the job's holdout, the promotion gate) is
  the calibrated one.

:class:`CTRModel` bundles them and is what is saved, registered and loaded: ``ctr.json``
(preprocessing, features, architecture, calibration, format version), ``weights.pt`` (a
``state_dict``, loaded with ``weights_only=True`` so loading never runs pickled code)
and ``driftloop_model.json`` (which class loads the directory; docs/trainer.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
from pandas.api.types import is_bool_dtype, is_float_dtype, is_integer_dtype
from scipy.special import expit
from torch import nn

__all__ = [
    "FORMAT_VERSION",
    "HASH_SCHEME",
    "LOADER_FILE",
    "Architecture",
    "CTRModel",
    "CTRNet",
    "Calibration",
    "FeatureSpec",
    "ModelLoadError",
    "NumericStats",
    "Preprocessor",
    "hash_buckets",
]

#: Version of the ``ctr.json`` layout; a loader refuses versions it does not know.
#: 2 added the calibration: code that knows only 1 would score a calibrated model
#: without it, so it must refuse the file rather than ignore the key.
FORMAT_VERSION = 2
#: Layouts this code reads (1: no calibration, the identity).
_READABLE_FORMATS = (1, 2)
#: The one hashing scheme this code implements. Changing anything about how a value
#: becomes a bucket (the key, the string form, the modulo) needs a new name.
HASH_SCHEME = "pandas.hash_array:siphash24:key=driftloop.ctr.v1:str-intfloat:mod-1+1"
_HASH_KEY = "driftloop.ctr.v1"  # hash_array wants exactly 16 bytes
#: The file every model directory carries, naming the class that loads it.
LOADER_FILE = "driftloop_model.json"
_LOADER = "retrain.ctr:CTRModel"
_CONFIG_FILE = "ctr.json"
_WEIGHTS_FILE = "weights.pt"
_KIND = "driftloop.ctr"
_CLIP_QUANTILES = (0.001, 0.999)
# Whole floats below 2**53 are written as integers; above it a float no longer holds
# every integer, so "whole" stops meaning anything.
_EXACT_INT = 2.0**53
_PREDICT_BATCH = 65_536


class ModelLoadError(ValueError):
    """A model directory that cannot be loaded: missing files, an unknown format or
    hashing scheme, or a weights file that is not a plain ``state_dict``."""


def _names(value: Iterable[str], what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        msg = f"{what} must be a sequence of column names, got the string {value!r}"
        raise TypeError(msg)
    names = tuple(value)
    for n in names:
        if not isinstance(n, str) or not n:
            msg = f"{what}: column names must be non-empty strings, got {n!r}"
            raise ValueError(msg)
    return names


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """Which columns feed the model, and as what.

    Args:
        ids: high-cardinality identifiers (hashed, one embedding table each).
        categorical: other categorical features (hashed the same way).
        numeric: numeric or boolean features (clipped, standardised, imputed).

    Example:
        >>> FeatureSpec(categorical=("country",), numeric=("price",)).fields
        ('user_id', 'item_id', 'country')
    """

    ids: tuple[str, ...] = ("user_id", "item_id")
    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("ids", "categorical", "numeric"):
            object.__setattr__(self, name, _names(getattr(self, name), name))
        every = self.ids + self.categorical + self.numeric
        if not every:
            msg = "a feature spec needs at least one id, categorical or numeric column"
            raise ValueError(msg)
        dupes = sorted({n for n in every if every.count(n) > 1})
        if dupes:
            msg = f"feature spec names columns more than once: {dupes}"
            raise ValueError(msg)

    @property
    def fields(self) -> tuple[str, ...]:
        """The hashed fields in embedding-table order: ids, then categoricals."""
        return self.ids + self.categorical

    def to_dict(self) -> dict[str, list[str]]:
        return {"ids": list(self.ids), "categorical": list(self.categorical),
                "numeric": list(self.numeric)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureSpec:
        unknown = sorted(set(d) - {"ids", "categorical", "numeric"})
        if unknown:
            msg = f"feature spec: unknown keys {unknown}"
            raise ValueError(msg)
        return cls(**{k: tuple(v) for k, v in d.items()})


@dataclasses.dataclass(frozen=True)
class NumericStats:
    """Training statistics of one numeric feature (after clipping to ``[lo, hi]``)."""

    median: float
    mean: float
    std: float
    lo: float
    hi: float

    def __post_init__(self) -> None:
        values = dataclasses.astuple(self)
        if not all(math.isfinite(v) for v in values):
            msg = f"numeric stats must be finite, got {self}"
            raise ValueError(msg)
        if self.std <= 0:
            msg = f"std must be > 0, got {self.std}"
            raise ValueError(msg)
        if self.lo > self.hi:
            msg = f"clip range is empty: lo {self.lo} > hi {self.hi}"
            raise ValueError(msg)


def _numeric_values(df: pd.DataFrame, name: str) -> npt.NDArray[np.float64]:
    """The column as float64 with NaN for missing, non-numeric and non-finite values."""
    if name not in df.columns:
        return np.full(len(df), np.nan)
    col = df[name]
    if is_bool_dtype(col.dtype) or is_integer_dtype(col.dtype) or is_float_dtype(col.dtype):
        x = col.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        try:
            x = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        except (TypeError, ValueError):
            # to_numeric refuses some objects outright (nested containers in a JSON
            # feature); those rows are as unusable as a non-numeric string.
            x = pd.to_numeric(col.map(_scalar_or_none), errors="coerce").to_numpy(
                dtype=np.float64, na_value=np.nan)
    x = np.array(x, dtype=np.float64)  # a writable copy, never a view of the frame
    x[~np.isfinite(x)] = np.nan
    return x


def _scalar_or_none(v: object) -> object:
    return v if isinstance(v, str | bytes | int | float | bool | np.generic) else None


def _canonical_strings(col: pd.Series) -> tuple[npt.NDArray[np.object_], npt.NDArray[np.bool_]]:
    """``(strings, missing)`` for hashing: ``str(value)``, whole floats as integers."""
    missing = np.asarray(col.isna().to_numpy(), dtype=bool)
    if is_float_dtype(col.dtype):
        x = col.to_numpy(dtype=np.float64, na_value=np.nan)
        whole = np.isfinite(x) & (np.abs(x) < _EXACT_INT)
        whole[whole] = x[whole] == np.floor(x[whole])
        as_int = np.where(whole, x, 0.0).astype(np.int64).astype(str)
        strings = np.where(whole, as_int, x.astype(str)).astype(object)
    else:
        strings = col.astype(str).to_numpy(dtype=object, na_value="")
    return strings, missing


def hash_buckets(col: pd.Series, buckets: int) -> npt.NDArray[np.int64]:
    """Buckets ``1..buckets-1`` for values and 0 for missing (see :data:`HASH_SCHEME`)."""
    strings, missing = _canonical_strings(col)
    if len(strings) == 0:
        return np.zeros(0, dtype=np.int64)
    h = pd.util.hash_array(strings, hash_key=_HASH_KEY, categorize=True)
    out = (h % np.uint64(buckets - 1)).astype(np.int64) + 1
    out[missing] = 0
    return out


class Preprocessor:
    """Fitted feature preprocessing: hashing for ids and categoricals, clipping,
    standardising and imputing for numerics (see the module docstring for why).

    Build one with :meth:`fit`; it is immutable afterwards, so the same object can
    serve the trainer and every model that shares its normalisation.

    Args:
        spec: the feature columns.
        buckets: hash buckets per field, bucket 0 reserved for missing values.
        numeric_stats: one :class:`NumericStats` per ``spec.numeric`` column.
        hash_scheme: must be :data:`HASH_SCHEME`; a saved preprocessor carries its
            scheme so a change of hashing refuses to load rather than mis-score.

    Example:
        >>> df = pd.DataFrame({"user_id": ["u1", "u2"], "item_id": [7, 8], "price": [1.0, None]})
        >>> pre = Preprocessor.fit(df, FeatureSpec(numeric=("price",)), buckets=1024)
        >>> cat, num = pre.transform(df)
        >>> cat.shape, num.shape, num[1, 1]
        ((2, 2), (2, 2), np.float32(1.0))
    """

    def __init__(self, spec: FeatureSpec, buckets: int, numeric_stats: Mapping[str, NumericStats],
                 hash_scheme: str = HASH_SCHEME) -> None:
        if hash_scheme != HASH_SCHEME:
            msg = f"unknown hash scheme {hash_scheme!r}; this code implements {HASH_SCHEME!r}"
            raise ValueError(msg)
        if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 2:
            msg = f"buckets must be an int >= 2, got {buckets!r}"
            raise ValueError(msg)
        if set(numeric_stats) != set(spec.numeric):
            msg = (f"numeric stats cover {sorted(numeric_stats)}, the spec's numeric columns are "
                   f"{sorted(spec.numeric)}")
            raise ValueError(msg)
        self.spec = spec
        self.buckets = buckets
        self.hash_scheme = hash_scheme
        self.numeric_stats = {n: numeric_stats[n] for n in spec.numeric}
        stats = [self.numeric_stats[n] for n in spec.numeric]
        self._median = np.array([s.median for s in stats], dtype=np.float64)
        self._mean = np.array([s.mean for s in stats], dtype=np.float64)
        self._std = np.array([s.std for s in stats], dtype=np.float64)
        self._lo = np.array([s.lo for s in stats], dtype=np.float64)
        self._hi = np.array([s.hi for s in stats], dtype=np.float64)

    @classmethod
    def fit(cls, df: pd.DataFrame, spec: FeatureSpec, buckets: int = 2**16) -> Preprocessor:
        """Fit the numeric statistics on ``df`` (hashing needs no fitting)."""
        stats: dict[str, NumericStats] = {}
        for name in spec.numeric:
            x = _numeric_values(df, name)
            x = x[~np.isnan(x)]
            if len(x) == 0:
                # All missing in training: the indicator carries everything, the value
                # input is a constant 0 after standardising.
                stats[name] = NumericStats(median=0.0, mean=0.0, std=1.0, lo=0.0, hi=0.0)
                continue
            lo, hi = (float(q) for q in np.quantile(x, _CLIP_QUANTILES))
            clipped = np.clip(x, lo, hi)
            std = float(clipped.std())
            # A constant feature would divide by zero; 1 leaves it at 0 after centring.
            stats[name] = NumericStats(median=float(np.median(clipped)), mean=float(clipped.mean()),
                                       std=std if std > 0 else 1.0, lo=lo, hi=hi)
        return cls(spec, buckets, stats)

    @property
    def n_fields(self) -> int:
        return len(self.spec.fields)

    @property
    def n_numeric(self) -> int:
        return len(self.spec.numeric)

    def transform(self, df: pd.DataFrame) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """``(cat, num)``: ``cat`` int64 ``[n, n_fields]`` buckets; ``num`` float32
        ``[n, 2 * n_numeric]``, the standardised values then the missing indicators."""
        n = len(df)
        cat = np.zeros((n, self.n_fields), dtype=np.int64)
        for j, name in enumerate(self.spec.fields):
            if name in df.columns:
                cat[:, j] = hash_buckets(df[name], self.buckets)
        k = self.n_numeric
        num = np.zeros((n, 2 * k), dtype=np.float32)
        if k:
            raw = np.column_stack([_numeric_values(df, name) for name in self.spec.numeric])
            missing = np.isnan(raw)
            x = np.where(missing, self._median, np.clip(raw, self._lo, self._hi))
            num[:, :k] = (x - self._mean) / self._std
            num[:, k:] = missing
        return cat, num

    def to_dict(self) -> dict[str, Any]:
        return {"hash_scheme": self.hash_scheme, "buckets": self.buckets,
                "features": self.spec.to_dict(),
                "numeric": {n: dataclasses.asdict(s) for n, s in self.numeric_stats.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessor:
        spec = FeatureSpec.from_dict(d["features"])
        stats = {n: NumericStats(**{k: float(v) for k, v in s.items()}) for n, s in d["numeric"].items()}
        return cls(spec, int(d["buckets"]), stats, hash_scheme=d["hash_scheme"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Preprocessor) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"Preprocessor(fields={list(self.spec.fields)}, numeric={list(self.spec.numeric)}, "
                f"buckets={self.buckets})")


class _Cross(nn.Module):
    """One full-rank DCN-v2 cross layer: ``x0 * (W x + b) + x``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


class CTRNet(nn.Module):
    """Embeddings + a DCN-v2 cross network in parallel with an MLP, one logit out.

    Args:
        embedding_dim: width of every embedding table.
        hidden: MLP layer widths (may be empty: cross network only).
        cross_layers: number of cross layers (0: MLP only, plus ``x0`` itself).
        dropout: dropout after each MLP activation.
        buckets: rows per embedding table.
        n_fields: hashed fields (one table each).
        n_numeric: numeric features; the net takes ``2 * n_numeric`` inputs (values
            and missing indicators).

    Example:
        >>> net = CTRNet(embedding_dim=4, hidden=(8,), cross_layers=1, dropout=0.0,
        ...              buckets=16, n_fields=2, n_numeric=1)
        >>> net(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2)).shape
        torch.Size([3])
    """

    def __init__(self, *, embedding_dim: int, hidden: Sequence[int], cross_layers: int, dropout: float,
                 buckets: int, n_fields: int, n_numeric: int) -> None:
        super().__init__()
        dim = n_fields * embedding_dim + 2 * n_numeric
        if dim == 0:
            msg = "CTRNet needs at least one field or numeric feature"
            raise ValueError(msg)
        self.embeddings = nn.ModuleList(nn.Embedding(buckets, embedding_dim) for _ in range(n_fields))
        for emb in self.embeddings:
            # N(0, 1) (torch's default) makes x0 large and the cross terms (products of
            # x0 entries) larger still; a small start keeps the first steps sane.
            nn.init.normal_(emb.weight, std=0.05)
        self.cross = nn.ModuleList(_Cross(dim) for _ in range(cross_layers))
        layers: list[nn.Module] = []
        width = dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(dim + (width if hidden else 0), 1)
        self._has_mlp = bool(hidden)

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        parts = [emb(cat[:, j]) for j, emb in enumerate(self.embeddings)]
        if num.shape[1]:
            parts.append(num)
        x0 = torch.cat(parts, dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        out = torch.cat([x, self.mlp(x0)], dim=1) if self._has_mlp else x
        return self.head(out).squeeze(1)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The shape of a :class:`CTRNet` beyond what the preprocessor fixes.

    Args:
        embedding_dim: width of every embedding table.
        hidden: MLP widths.
        cross_layers: DCN-v2 cross layers.
        dropout: MLP dropout (only active in training).
    """

    embedding_dim: int = 16
    hidden: tuple[int, ...] = (128, 64)
    cross_layers: int = 2
    dropout: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(self.hidden))
        if self.embedding_dim < 1:
            msg = f"embedding_dim must be >= 1, got {self.embedding_dim}"
            raise ValueError(msg)
        if any(h < 1 for h in self.hidden):
            msg = f"hidden sizes must be >= 1, got {self.hidden}"
            raise ValueError(msg)
        if self.cross_layers < 0:
            msg = f"cross_layers must be >= 0, got {self.cross_layers}"
            raise ValueError(msg)
        if not 0.0 <= self.dropout < 1.0:
            msg = f"dropout must be in [0, 1), got {self.dropout}"
            raise ValueError(msg)

    def to_dict(self) -> dict[str, Any]:
        return {"embedding_dim": self.embedding_dim, "hidden": list(self.hidden),
                "cross_layers": self.cross_layers, "dropout": self.dropout}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Architecture:
        return cls(embedding_dim=int(d["embedding_dim"]), hidden=tuple(int(h) for h in d["hidden"]),
                   cross_layers=int(d["cross_layers"]), dropout=float(d["dropout"]))


#: Newton steps a calibration fit may take; the problem is convex, a handful suffice.
_CALIBRATION_STEPS = 50
#: Precision of the calibration's Gaussian prior around the identity. It keeps the fit
#: finite on a slice the net separates perfectly, and moves a fit on a few hundred rows
#: by about a percent.
_CALIBRATION_PRIOR = 1.0


@dataclasses.dataclass(frozen=True)
class Calibration:
    """``scale * logit + bias`` on the net's logit: Platt scaling (identity by default).

    ``bias`` moves the mean score, ``scale`` how far the scores spread around it (a
    fine-tune that came out overconfident gets ``scale < 1``). The scale is positive,
    so a calibration never changes how the model ranks.

    Example:
        >>> Calibration(scale=2.0, bias=-1.0).apply(np.array([0.0, 1.0]))
        array([-1.,  1.])
    """

    scale: float = 1.0
    bias: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "bias", float(self.bias))
        if not (math.isfinite(self.scale) and math.isfinite(self.bias)) or self.scale <= 0:
            msg = f"a calibration needs a finite scale > 0 and a finite bias, got {self}"
            raise ValueError(msg)

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.bias == 0.0

    def apply(self, logits: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return self.scale * np.asarray(logits, dtype=np.float64) + self.bias

    @classmethod
    def fit(cls, logits: npt.ArrayLike, y: npt.ArrayLike) -> Calibration:
        """The scale and bias of a logistic regression of ``y`` (0/1) on ``logits``,
        by Newton's method with step halving (maximum a posteriori under the prior
        around the identity, :data:`_CALIBRATION_PRIOR`).

        A scale that comes out <= 0 (the rows rank no better than chance under the
        net) would flatten or reverse the ranking the net learned: then only the bias
        is fitted. With an intercept, the fit's expected positives equal the observed
        ones on these rows (up to the prior's pull).

        Example:
            >>> z = np.linspace(-3, 3, 2001)
            >>> p = 1 / (1 + np.exp(-(0.5 * z - 1)))
            >>> y = (np.random.default_rng(0).random(z.size) < p).astype(float)
            >>> c = Calibration.fit(z, y)
            >>> bool(abs(c.scale - 0.5) < 0.1 and abs(c.bias + 1) < 0.15)
            True
        """
        z = np.asarray(logits, dtype=np.float64)
        t = np.asarray(y, dtype=np.float64)
        scale, bias = _newton(np.zeros_like(z), np.column_stack([z, np.ones_like(z)]), t,
                              prior_mean=np.array([1.0, 0.0]))
        if scale > 0:
            return cls(scale, bias)
        (bias,) = _newton(z, np.ones((z.size, 1)), t, prior_mean=np.zeros(1))
        return cls(1.0, bias)

    def to_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "bias": self.bias}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        unknown = sorted(set(d) - {"scale", "bias"})
        if unknown:
            msg = f"calibration: unknown keys {unknown}"
            raise ValueError(msg)
        return cls(scale=float(d["scale"]), bias=float(d["bias"]))


def _newton(offset: npt.NDArray[np.float64], x: npt.NDArray[np.float64], t: npt.NDArray[np.float64], *,
            prior_mean: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Minimise the log loss of ``sigmoid(offset + x @ theta)`` plus the Gaussian prior
    around ``prior_mean``; convex, so Newton with step halving converges from the prior."""
    lam = _CALIBRATION_PRIOR

    def objective(theta: npt.NDArray[np.float64]) -> float:
        s = offset + x @ theta
        return float(np.sum(np.logaddexp(0.0, s) - t * s) + 0.5 * lam * np.sum((theta - prior_mean) ** 2))

    theta = prior_mean.copy()
    for _ in range(_CALIBRATION_STEPS):
        p = expit(offset + x @ theta)
        grad = x.T @ (p - t) + lam * (theta - prior_mean)
        hess = (x * (p * (1.0 - p))[:, None]).T @ x + lam * np.eye(len(theta))
        step = np.linalg.solve(hess, grad)
        before, k = objective(theta), 1.0
        while objective(theta - k * step) > before and k > 1e-8:
            k /= 2
        theta = theta - k * step
        if float(np.max(np.abs(k * step))) < 1e-10:
            break
    return theta


class CTRModel:
    """A fitted preprocessor and its net: what is trained, saved, registered and served.

    Args:
        preprocessor: the feature preprocessing the weights were trained with.
        net: the network; built from ``preprocessor`` and ``architecture`` when None
            (freshly initialised from torch's current random state).
        architecture: the net's shape.
        calibration: applied to the net's logit before the sigmoid (None: identity).

    Example:
        >>> df = pd.DataFrame({"user_id": ["a", "b"], "item_id": ["x", "y"], "price": [1.0, 2.0]})
        >>> pre = Preprocessor.fit(df, FeatureSpec(numeric=("price",)), buckets=64)
        >>> model = CTRModel(pre, architecture=Architecture(embedding_dim=4, hidden=(8,)))
        >>> p = model.predict(df)
        >>> p.shape, p.dtype, bool(((p > 0) & (p < 1)).all())
        ((2,), dtype('float64'), True)
    """

    def __init__(self, preprocessor: Preprocessor, net: CTRNet | None = None,
                 architecture: Architecture | None = None, calibration: Calibration | None = None) -> None:
        self.preprocessor = preprocessor
        self.architecture = architecture or Architecture()
        self.net = net if net is not None else self.build_net(preprocessor, self.architecture)
        self.calibration = calibration or Calibration()

    @staticmethod
    def build_net(preprocessor: Preprocessor, architecture: Architecture) -> CTRNet:
        return CTRNet(embedding_dim=architecture.embedding_dim, hidden=architecture.hidden,
                      cross_layers=architecture.cross_layers, dropout=architecture.dropout,
                      buckets=preprocessor.buckets, n_fields=preprocessor.n_fields,
                      n_numeric=preprocessor.n_numeric)

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    @property
    def size_bytes(self) -> int:
        """Bytes of the weights as saved (every tensor of the ``state_dict``)."""
        return sum(t.numel() * t.element_size() for t in self.net.state_dict().values())

    def predict(self, df: pd.DataFrame, batch_size: int = _PREDICT_BATCH) -> npt.NDArray[np.float64]:
        """Calibrated click probabilities, float64 ``[len(df)]``, computed on CPU in batches."""
        cat, num = self.preprocessor.transform(df)
        return self.predict_arrays(cat, num, batch_size)

    def predict_arrays(self, cat: npt.NDArray[np.int64], num: npt.NDArray[np.float32],
                       batch_size: int = _PREDICT_BATCH) -> npt.NDArray[np.float64]:
        """:meth:`predict` on already transformed arrays."""
        out: npt.NDArray[np.float64] = expit(self.calibration.apply(
            self.logits_arrays(cat, num, batch_size)))
        return out

    def logits(self, df: pd.DataFrame, batch_size: int = _PREDICT_BATCH) -> npt.NDArray[np.float64]:
        """The net's own logits, before the calibration (what a calibration is fitted on)."""
        cat, num = self.preprocessor.transform(df)
        return self.logits_arrays(cat, num, batch_size)

    def logits_arrays(self, cat: npt.NDArray[np.int64], num: npt.NDArray[np.float32],
                      batch_size: int = _PREDICT_BATCH) -> npt.NDArray[np.float64]:
        """:meth:`logits` on already transformed arrays."""
        out = np.empty(len(cat), dtype=np.float64)
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.inference_mode():
                cat_t, num_t = torch.from_numpy(cat), torch.from_numpy(num)
                for s in range(0, len(cat), batch_size):
                    logits = self.net(cat_t[s:s + batch_size], num_t[s:s + batch_size])
                    out[s:s + batch_size] = logits.double().numpy()
        finally:
            self.net.train(was_training)
        return out

    def calibrated_state_dict(self) -> dict[str, torch.Tensor]:
        """The net's ``state_dict`` with the calibration folded into the output layer:
        a net loaded from it, uncalibrated, scores as this model does (a fine-tune
        starts from the scores the champion served)."""
        state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        c = self.calibration
        state["head.weight"] = state["head.weight"] * c.scale
        state["head.bias"] = state["head.bias"] * c.scale + c.bias
        return state

    def config(self) -> dict[str, Any]:
        return {"kind": _KIND, "format_version": FORMAT_VERSION,
                "features": self.preprocessor.spec.to_dict(),
                "preprocessor": self.preprocessor.to_dict(),
                "architecture": self.architecture.to_dict(),
                "calibration": self.calibration.to_dict()}

    def save(self, directory: str | Path) -> None:
        """Write ``ctr.json``, ``weights.pt`` and ``driftloop_model.json`` into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / _CONFIG_FILE).write_text(json.dumps(self.config(), indent=2, sort_keys=True) + "\n")
        # Tensors moved to CPU so a model trained on a GPU loads anywhere without a
        # map_location, and contiguous clones so no shared storage is written twice.
        state = {k: v.detach().to("cpu").clone() for k, v in self.net.state_dict().items()}
        torch.save(state, d / _WEIGHTS_FILE)
        (d / LOADER_FILE).write_text(json.dumps(
            {"loader": _LOADER, "format_version": FORMAT_VERSION}, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> CTRModel:
        """Read a directory written by :meth:`save`; never unpickles arbitrary objects.

        Raises:
            ModelLoadError: a missing file, an unknown format or hash scheme, or a
                weights file holding anything but tensors.
        """
        d = Path(directory)
        try:
            config = json.loads((d / _CONFIG_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            msg = f"cannot read {d / _CONFIG_FILE}: {exc}"
            raise ModelLoadError(msg) from exc
        version = config.get("format_version")
        if config.get("kind") != _KIND or version not in _READABLE_FORMATS:
            msg = (f"{d / _CONFIG_FILE}: expected kind {_KIND!r} format one of {list(_READABLE_FORMATS)}, "
                   f"got {config.get('kind')!r} format {version!r}")
            raise ModelLoadError(msg)
        try:
            pre = Preprocessor.from_dict(config["preprocessor"])
            arch = Architecture.from_dict(config["architecture"])
            # Format 1 had no calibration: its scores were the net's own.
            calibration = Calibration.from_dict(config["calibration"]) if version >= 2 else Calibration()
        except (KeyError, TypeError, ValueError) as exc:
            msg = f"{d / _CONFIG_FILE}: {exc}"
            raise ModelLoadError(msg) from exc
        try:
            state = torch.load(d / _WEIGHTS_FILE, weights_only=True, map_location="cpu")
        except (OSError, pickle.UnpicklingError, RuntimeError) as exc:
            msg = f"refusing to load {d / _WEIGHTS_FILE}: {exc}"
            raise ModelLoadError(msg) from exc
        net = cls.build_net(pre, arch)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            msg = f"{d / _WEIGHTS_FILE} is not a state_dict of tensors"
            raise ModelLoadError(msg)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            msg = f"{d / _WEIGHTS_FILE} does not match the architecture in {_CONFIG_FILE}: {exc}"
            raise ModelLoadError(msg) from exc
        return cls(pre, net, arch, calibration)

    def __repr__(self) -> str:
        return (f"CTRModel({self.preprocessor!r}, {self.architecture}, {self.calibration}, "
                f"n_parameters={self.n_parameters})")
