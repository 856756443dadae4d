"""The trainer contract: how the training job fits, saves and loads a model.

The job (retrain/job.py) knows models only through two Protocols, so a user brings
their own model by implementing them (docs/trainer.md):

* :class:`Trainer`: ``fit(train, val, ...) -> FitResult`` and ``load(directory)``.
* :class:`ScoringModel`: what ``fit`` returns and ``load`` reads back:
  ``predict(df) -> probabilities`` and ``save(directory)``.

The job calls, in order: ``trainer.fit`` (possibly several times, from
retrain/search.py), ``result.model.save(dir)`` for the winner, and later
``trainer.load(dir)`` (or the loader named in the directory's
``driftloop_model.json``) to score the holdout and serve. :class:`TrainParams` are
the reference trainer's hyperparameters; :class:`EpochMetrics` and :class:`FitResult`
are what every trainer reports, so MLflow logging and the search work for any model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy.stats import rankdata

from retrain.ctr import FeatureSpec

__all__ = [
    "FINE_TUNE_CALIBRATION_FRACTION",
    "TRAINING_ERROR_REASONS",
    "EpochMetrics",
    "FitResult",
    "ScoringModel",
    "TrainParams",
    "Trainer",
    "TrainingError",
    "log_loss",
    "roc_auc",
]

#: Every ``TrainingError.reason``, so callers (the job, the search, alerts) can branch on it.
TRAINING_ERROR_REASONS = (
    "empty",             # no training or no validation rows
    "missing_label",     # the label column is not in the frame
    "bad_labels",        # labels other than 0/1 (NaN included)
    "single_class",      # the training labels are all 0 or all 1
    "non_finite_loss",   # the loss became NaN or infinite
    "deadline",          # the deadline passed before a single epoch finished
    "all_trials_failed",  # retrain/search.py: every trial raised
)


#: The training rows a fine-tune holds out for recalibration unless the params say
#: otherwise (retrain/ctr_trainer.py says why fine-tunes, and why this share).
FINE_TUNE_CALIBRATION_FRACTION = 0.15


class TrainingError(Exception):
    """A training run that cannot produce a model; nothing should be registered.

    Args:
        message: for people; names the values that made the run fail.
        reason: one of :data:`TRAINING_ERROR_REASONS` (machine-readable).
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@runtime_checkable
class ScoringModel(Protocol):
    """A trained model as the job and the serving wrapper use it."""

    def predict(self, df: pd.DataFrame) -> npt.NDArray[np.float64]:
        """Probabilities of the positive label, float64 ``[len(df)]``, in ``[0, 1]``.

        Must not raise on missing feature columns or unexpected values: serving
        traffic drifts, and a degraded score beats a failed request.
        """
        ...

    def save(self, directory: Path) -> None:
        """Write everything :meth:`Trainer.load` needs into ``directory`` (which may
        not exist yet), including ``driftloop_model.json`` naming the loader."""
        ...


@dataclasses.dataclass(frozen=True)
class EpochMetrics:
    """One finished epoch, reported through ``on_epoch`` and logged to MLflow.

    Args:
        epoch: 1-based.
        train_loss: mean training log loss over the epoch's batches (dropout on).
        val_loss: validation log loss at the end of the epoch.
        val_auc: validation ROC AUC (NaN when the validation set has one class).
        lr: the learning rate after the epoch's last step.
        seconds: wall time of the epoch's training steps.
        samples_per_s: training rows per second in those steps.
    """

    epoch: int
    train_loss: float
    val_loss: float
    val_auc: float
    lr: float
    seconds: float
    samples_per_s: float

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What :meth:`Trainer.fit` returns.

    Args:
        model: the model with the best epoch's weights (not the last epoch's).
        best_epoch: 1-based epoch whose weights ``model`` holds.
        best_val_loss: its validation log loss.
        history: every finished epoch, in order.
        stopped_early: True when training ended before ``max_epochs``.
        stop_reason: ``max_epochs``, ``early_stopping`` or ``deadline``.
        device: where it trained (``cpu``, ``cuda``, ``cuda:1``).
        params: the effective hyperparameters as plain JSON values (after defaults,
            and after a warm start imposed the champion's architecture).
        calibration: what a trainer's recalibration did, as numbers for the run's
            metrics (the reference trainer: the calibration slice's ``rows`` and
            ``positives``, the fitted ``scale`` and ``bias``, and observed / expected
            positives on the slice ``before`` and ``after``); None when there was none.
    """

    model: ScoringModel
    best_epoch: int
    best_val_loss: float
    history: tuple[EpochMetrics, ...]
    stopped_early: bool
    stop_reason: str
    device: str
    params: Mapping[str, Any]
    calibration: Mapping[str, float] | None = None


@runtime_checkable
class Trainer(Protocol):
    """The plug-in contract for bringing your own model (docs/trainer.md).

    A trainer is built with no arguments (the job imports ``module:Class`` from the
    job spec and calls ``Class()``); everything a run needs arrives in ``fit``.
    """

    def fit(self, train: pd.DataFrame, val: pd.DataFrame, *, label: str, params: Mapping[str, Any],
            seed: int, device: str, warm_start: Path | None,
            on_epoch: Callable[[EpochMetrics], None] | None, deadline: float | None) -> FitResult:
        """Train on ``train``, select on ``val`` (both already cleaned and split by time).

        Args:
            train: training rows: the feature columns, the contract columns
                (``user_id``, ``item_id``, ...) and the label column.
            val: validation rows (newer than ``train``), same columns; used for early
                stopping and model selection, never for gradient steps.
            label: the 0/1 label column.
            params: hyperparameters (the job spec's, or a search trial's); reject
                unknown keys rather than ignore a typo.
            seed: every random choice derives from it.
            device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
            warm_start: a directory written by ``ScoringModel.save`` (the champion's
                model artifacts) to fine-tune from, or None to train from scratch.
            on_epoch: called after every epoch (the job logs the metrics to MLflow).
            deadline: a ``time.time()`` value (Unix seconds, so a launcher in another
                process can set it); stop by then, keeping the best finished epoch.

        Raises:
            TrainingError: no usable model can come out of this data or run.
        """
        ...

    def load(self, directory: Path) -> ScoringModel:
        """Read back a directory written by ``ScoringModel.save``."""
        ...


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        msg = f"{name} must be > 0, got {value}"
        raise ValueError(msg)


@dataclasses.dataclass(frozen=True)
class TrainParams:
    """Hyperparameters of the reference CTR trainer (retrain/ctr_trainer.py).

    Args:
        lr: peak AdamW learning rate (after warmup).
        weight_decay: AdamW's decoupled weight decay (weights and embeddings, not biases).
        dropout: MLP dropout.
        batch_size: rows per optimiser step.
        max_epochs: upper bound on epochs.
        warmup_fraction: share of the total steps spent warming the learning rate up
            linearly from ~0; cosine decay to 0 over the rest.
        patience: epochs without a better validation log loss before stopping.
        embedding_dim, hidden, cross_layers, buckets: the architecture (ignored on a
            warm start: the champion's weights fix it).
        features: the feature columns; None infers them from the frame (see
            ``CTRTrainer``). Ignored on a warm start.
        exclude: columns that are neither contract columns nor features (other label
            types, dwell values, join bookkeeping) when features are inferred.
        calibration_fraction: the newest share of the training rows held out of the
            gradient steps to recalibrate the fitted model on (``CTRTrainer``); 0 turns
            recalibration off. None: :data:`FINE_TUNE_CALIBRATION_FRACTION` on a warm
            start, 0 from scratch.

    Example:
        >>> TrainParams.from_mapping({"lr": 1e-3, "hidden": [32]}).hidden
        (32,)
    """

    lr: float = 2e-3
    weight_decay: float = 1e-5
    dropout: float = 0.1
    batch_size: int = 1024
    max_epochs: int = 20
    warmup_fraction: float = 0.05
    patience: int = 3
    embedding_dim: int = 16
    hidden: tuple[int, ...] = (128, 64)
    cross_layers: int = 2
    buckets: int = 2**16
    features: FeatureSpec | None = None
    exclude: tuple[str, ...] = ()
    calibration_fraction: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(self.hidden))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        _positive("lr", self.lr)
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            msg = f"weight_decay must be >= 0, got {self.weight_decay}"
            raise ValueError(msg)
        if not 0.0 <= self.dropout < 1.0:
            msg = f"dropout must be in [0, 1), got {self.dropout}"
            raise ValueError(msg)
        for name in ("batch_size", "max_epochs", "patience", "embedding_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                msg = f"{name} must be an int >= 1, got {v!r}"
                raise ValueError(msg)
        if not 0.0 <= self.warmup_fraction < 1.0:
            msg = f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}"
            raise ValueError(msg)
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden):
            msg = f"hidden sizes must be ints >= 1, got {self.hidden}"
            raise ValueError(msg)
        if isinstance(self.cross_layers, bool) or not isinstance(self.cross_layers, int) \
                or self.cross_layers < 0:
            msg = f"cross_layers must be an int >= 0, got {self.cross_layers!r}"
            raise ValueError(msg)
        if isinstance(self.buckets, bool) or not isinstance(self.buckets, int) or self.buckets < 2:
            msg = f"buckets must be an int >= 2, got {self.buckets!r}"
            raise ValueError(msg)
        if self.features is not None and not isinstance(self.features, FeatureSpec):
            msg = f"features must be a FeatureSpec or None, got {self.features!r}"
            raise TypeError(msg)
        f = self.calibration_fraction
        if f is not None and (isinstance(f, bool) or not isinstance(f, int | float) or not 0.0 <= f < 0.5):
            msg = f"calibration_fraction must be None or in [0, 0.5), got {f!r}"
            raise ValueError(msg)

    def resolved_calibration_fraction(self, *, warm_start: bool) -> float:
        """The share of training rows a fit holds out for recalibration (see the field)."""
        if self.calibration_fraction is not None:
            return float(self.calibration_fraction)
        return FINE_TUNE_CALIBRATION_FRACTION if warm_start else 0.0

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> TrainParams:
        """Build from JSON-like values (a job spec's ``params``); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            msg = f"unknown training params {unknown}; known: {sorted(names)}"
            raise ValueError(msg)
        kw = dict(d)
        if isinstance(kw.get("features"), Mapping):
            kw["features"] = FeatureSpec.from_dict(kw["features"])
        for key in ("hidden", "exclude"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (what is logged to MLflow); ``from_mapping`` reads it back."""
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        d["exclude"] = list(self.exclude)
        d["features"] = self.features.to_dict() if self.features is not None else None
        return d


def roc_auc(y: npt.ArrayLike, score: npt.ArrayLike) -> float:
    """ROC AUC by the rank (Mann-Whitney U) formula; ties get average ranks.

    NaN when ``y`` has a single class (AUC is undefined, not 0.5).
    """
    y_arr = np.asarray(y, dtype=np.float64)
    s = np.asarray(score, dtype=np.float64)
    n_pos = float(y_arr.sum())
    n_neg = float(len(y_arr) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y_arr == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_loss(y: npt.ArrayLike, p: npt.ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary log loss, probabilities clipped to ``[eps, 1 - eps]``."""
    y_arr = np.asarray(y, dtype=np.float64)
    p_arr = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return float(-np.mean(y_arr * np.log(p_arr) + (1 - y_arr) * np.log1p(-p_arr)))
