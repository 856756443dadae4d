"""Holdout metrics of a model's scores (a pure core; the promotion gate builds on it).

Every model a job trains is scored on the same holdout, the newest time slice, which
no model was fitted or early-stopped on: the challenger and, when there is one, the
champion it warm-started from. Those numbers are what the run logs and what the
promotion gate (issue #6) compares.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import rankdata

__all__ = ["EPS", "auc", "holdout_metrics", "log_loss"]

#: Scores are clipped to [EPS, 1 - EPS] in log loss: one confident miss must not be inf.
EPS = 1e-7


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


def log_loss(y: Any, p: Any) -> float:
    y = np.asarray(y, dtype=bool)
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    if y.size == 0:
        return math.nan
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


def holdout_metrics(y: Any, p: Any) -> dict[str, float]:
    """AUC, log loss, calibration (observed / expected positives), rates, size."""
    y = np.asarray(y, dtype=bool)
    p = np.asarray(p, dtype=np.float64)
    expected = float(p.sum())
    return {
        "auc": auc(y, p),
        "log_loss": log_loss(y, p),
        "calibration": float(y.sum()) / expected if expected > 0 else math.nan,
        "positive_rate": float(y.mean()) if y.size else math.nan,
        "mean_score": float(p.mean()) if p.size else math.nan,
        "rows": float(y.size),
    }
