"""From stored events to a clean, labelled, time-split training set (a pure core).

The feedback store holds what the daemon consumed: prediction events and feedback
events, each as validated rows (connectors/store.py). A training job reads one window
of each and this module turns them into the frames a trainer sees:

1. **label** (`label_predictions`): a prediction's label for type T is 1 when feedback
   of type T for its ``prediction_id`` has an event time within ``[ts, ts +
   attribution]``, else 0: the monitor's join (monitor/join.py), so the model learns
   the labels the monitor measures it by. Only predictions whose attribution window
   has passed are given to the job (the caller's ``data_end_ms``).
2. **clean** (`clean`): duplicate predictions, features that are nearly always
   missing, corrupt numeric values and bot-like users are removed; every removal is
   counted in a :class:`CleaningReport`, which the job logs.
3. **split** (`split_by_time`): the newest slice is the holdout, the slice before it
   validation, the rest training. Never random: a random split leaks tomorrow's
   behaviour into training and overstates every model's holdout score, most of all
   after a drift, which is when retraining happens.

No I/O, no clock: tables in, frames and counts out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

__all__ = [
    "CONTRACT_COLUMNS",
    "CleaningReport",
    "CleaningSpec",
    "DatasetError",
    "Split",
    "clean",
    "label_predictions",
    "split_by_time",
    "training_frame",
]

#: Prediction fields that are not model inputs (features are stored as ``f.<name>``).
CONTRACT_COLUMNS = ("schema", "prediction_id", "ts", "model", "model_version", "user_id",
                    "item_id", "score", "rank", "request_id")
_FEATURE_PREFIX = "f."


class DatasetError(ValueError):
    """The data window cannot make a training set; ``reason`` is a short code
    (``empty_window``, ``too_few_rows``, ``single_class``)."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def label_predictions(predictions: pa.Table, feedback: pa.Table, *, label_types: Sequence[str],
                      attribution_ms: int) -> pd.DataFrame:
    """One row per prediction with a 0/1 column per label type.

    Feedback outside ``[ts, ts + attribution_ms]`` of its prediction, of a type that is
    not a label, or for an unknown prediction does not label anything. Duplicate
    feedback (redelivered events) labels once: a label is "any feedback", not a count.
    """
    if predictions.num_rows == 0:
        return pd.DataFrame(columns=[*predictions.column_names, *label_types])
    preds = predictions.to_pandas(types_mapper=None)
    preds["ts"] = _epoch_ms(preds["ts"])
    for t in label_types:
        preds[t] = np.int8(0)
    if feedback.num_rows == 0 or "prediction_id" not in feedback.column_names:
        return preds
    fb = feedback.select(["prediction_id", "type", "ts"]).to_pandas()
    fb = fb[fb["type"].isin(list(label_types))]
    if fb.empty:
        return preds
    fb["ts"] = _epoch_ms(fb["ts"])
    # The prediction side may repeat an id (duplicates are removed by `clean`, later,
    # and counted there); the join keys on the first occurrence's time.
    first = preds.drop_duplicates("prediction_id")[["prediction_id", "ts"]]
    m = fb.merge(first, on="prediction_id", how="inner", suffixes=("_fb", ""))
    delay = m["ts_fb"].to_numpy() - m["ts"].to_numpy()
    m = m[(delay >= 0) & (delay <= attribution_ms)]
    for t in label_types:
        hit = pd.Index(m.loc[m["type"] == t, "prediction_id"].unique())
        preds[t] = preds["prediction_id"].isin(hit).astype(np.int8)
    return preds


def _epoch_ms(col: pd.Series) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(col):
        return col.astype("datetime64[ms, UTC]").astype("int64")
    return col.astype("int64")


def training_frame(labelled: pd.DataFrame) -> pd.DataFrame:
    """Features under their own names (``f.age`` -> ``age``), as a recommender passes them
    to the registered model; a feature whose name is a contract field keeps its prefix."""
    rename = {}
    for c in labelled.columns:
        if c.startswith(_FEATURE_PREFIX):
            bare = c[len(_FEATURE_PREFIX):]
            rename[c] = c if bare in CONTRACT_COLUMNS or bare in labelled.columns else bare
    return labelled.rename(columns=rename)


@dataclasses.dataclass(frozen=True)
class CleaningSpec:
    """What counts as dirty (docs/retraining.md explains each default).

    Args:
        max_missing_rate: a feature missing in more than this share of rows is dropped
            (it teaches nothing and its imputed value would dominate).
        outlier_mads: a numeric value further than this many median absolute
            deviations from the median is treated as corrupt and set missing. 20 MADs
            is ~13.5 standard deviations of a normal: no honest value of a feature
            that the reference bins get near it.
        burst_window_ms, burst_positives: a user with more than ``burst_positives``
            positive labels within one ``burst_window_ms`` bucket is bot-like (people
            do not click 30 times a minute).
        bot_min_predictions, bot_positive_rate: a user with at least this many
            predictions and a positive rate above this is bot-like too.
    """

    max_missing_rate: float = 0.95
    outlier_mads: float = 20.0
    burst_window_ms: int = 60_000
    burst_positives: int = 30
    bot_min_predictions: int = 50
    bot_positive_rate: float = 0.9

    def __post_init__(self) -> None:
        if not 0.0 < self.max_missing_rate <= 1.0:
            msg = f"max_missing_rate must be in (0, 1], got {self.max_missing_rate}"
            raise ValueError(msg)
        if self.outlier_mads <= 0:
            msg = f"outlier_mads must be > 0, got {self.outlier_mads}"
            raise ValueError(msg)
        if self.burst_window_ms <= 0 or self.burst_positives < 1:
            msg = (f"burst_window_ms and burst_positives must be positive, got "
                   f"{self.burst_window_ms}, {self.burst_positives}")
            raise ValueError(msg)
        if not 0.0 < self.bot_positive_rate <= 1.0 or self.bot_min_predictions < 1:
            msg = (f"bot_positive_rate must be in (0, 1] and bot_min_predictions >= 1, got "
                   f"{self.bot_positive_rate}, {self.bot_min_predictions}")
            raise ValueError(msg)


@dataclasses.dataclass(frozen=True)
class CleaningReport:
    """What `clean` removed, for the run's log and its MLflow params."""

    rows_in: int
    rows_out: int
    duplicate_predictions: int
    dropped_features: tuple[str, ...]
    outlier_values: int
    bot_users: int
    bot_rows: int
    missing_values: int

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dropped_features"] = list(self.dropped_features)
        return d


def clean(frame: pd.DataFrame, *, label: str, features: Sequence[str],
          spec: CleaningSpec | None = None) -> tuple[pd.DataFrame, CleaningReport]:
    """Remove what would teach the model the wrong thing; count every removal.

    Missing values that remain are left for the model's preprocessing to impute (the
    reference model imputes the median and adds a missing indicator), and counted.
    """
    spec = spec or CleaningSpec()
    rows_in = len(frame)
    df = frame.drop_duplicates("prediction_id", keep="first")
    dups = rows_in - len(df)

    dropped = []
    for f in features:
        if f in df.columns and len(df) and float(df[f].isna().mean()) > spec.max_missing_rate:
            dropped.append(f)
    df = df.drop(columns=dropped)
    kept = [f for f in features if f in df.columns and f not in dropped]

    outliers = 0
    replaced: dict[str, pd.Series] = {}
    for f in kept:
        col = df[f]
        if not (pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)):
            continue
        x = col.to_numpy(dtype=np.float64, na_value=np.nan)
        finite = np.isfinite(x)
        if not finite.any():
            continue
        med = float(np.median(x[finite]))
        mad = float(np.median(np.abs(x[finite] - med)))
        if mad == 0.0:
            # A mostly constant feature: only non-finite values are corrupt.
            bad = ~finite & ~np.isnan(x)
        else:
            bad = (~finite & ~np.isnan(x)) | (np.abs(x - med) > spec.outlier_mads * mad)
        n_bad = int(bad.sum())
        if n_bad:
            outliers += n_bad
            replaced[f] = pd.Series(np.where(bad, np.nan, x), index=df.index)
    if replaced:
        df = df.assign(**replaced)

    bots = _bot_users(df, label=label, spec=spec)
    bot_rows = int(df["user_id"].isin(bots).sum()) if len(bots) else 0
    if bot_rows:
        df = df[~df["user_id"].isin(bots)]
    missing = int(df[kept].isna().sum().sum()) if kept else 0
    report = CleaningReport(rows_in=rows_in, rows_out=len(df), duplicate_predictions=dups,
                            dropped_features=tuple(dropped), outlier_values=outliers,
                            bot_users=len(bots), bot_rows=bot_rows, missing_values=missing)
    return df.reset_index(drop=True), report


def _bot_users(df: pd.DataFrame, *, label: str, spec: CleaningSpec) -> pd.Index:
    if df.empty:
        return pd.Index([])
    pos = df[df[label] == 1]
    burst = pd.Index([])
    if len(pos):
        bucket = pos["ts"].to_numpy() // spec.burst_window_ms
        per = pd.DataFrame({"u": pos["user_id"].to_numpy(), "b": bucket}).value_counts()
        burst = pd.Index(per[per > spec.burst_positives].index.get_level_values("u").unique())
    g = df.groupby("user_id", sort=False)[label].agg(["size", "mean"])
    rate = g[(g["size"] >= spec.bot_min_predictions) & (g["mean"] > spec.bot_positive_rate)].index
    return burst.union(pd.Index(rate))


@dataclasses.dataclass(frozen=True)
class Split:
    """Train, validation and holdout frames, and the event-time cuts between them."""

    train: pd.DataFrame
    validation: pd.DataFrame
    holdout: pd.DataFrame
    validation_start_ms: int
    holdout_start_ms: int

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation),
                "holdout": len(self.holdout)}


def split_by_time(df: pd.DataFrame, *, label: str, holdout_fraction: float,
                  validation_fraction: float, min_rows: int) -> Split:
    """The newest ``holdout_fraction`` of rows by event time is the holdout, the
    ``validation_fraction`` before it validation, the rest training.

    The cuts are event times, so rows of one instant never straddle two sets: the
    holdout is strictly newer than everything a model was fitted or stopped on.

    Raises:
        DatasetError: fewer than ``min_rows`` rows, or a set with one class only.
    """
    if len(df) == 0:
        msg = "the data window holds no labelled predictions"
        raise DatasetError(msg, reason="empty_window")
    if len(df) < min_rows:
        msg = f"the data window holds {len(df)} clean labelled predictions, fewer than min_rows {min_rows}"
        raise DatasetError(msg, reason="too_few_rows")
    ts = np.sort(df["ts"].to_numpy())
    n = len(ts)
    holdout_start = int(ts[min(n - 1, int(n * (1.0 - holdout_fraction)))])
    validation_start = int(ts[min(n - 1, int(n * (1.0 - holdout_fraction - validation_fraction)))])
    t = df["ts"].to_numpy()
    parts = {"train": df[t < validation_start],
             "validation": df[(t >= validation_start) & (t < holdout_start)],
             "holdout": df[t >= holdout_start]}
    for name, part in parts.items():
        classes = part[label].nunique() if len(part) else 0
        if classes < 2:
            msg = (f"the {name} set ({len(part)} rows) has {'no rows' if not len(part) else 'one class only'}"
                   f" of {label!r}: a model cannot be fitted or judged on it")
            raise DatasetError(msg, reason="single_class")
    return Split(*(p.sort_values("ts", kind="stable").reset_index(drop=True) for p in parts.values()),
                 validation_start_ms=validation_start, holdout_start_ms=holdout_start)
