"""A small, budget-aware hyperparameter search over any :class:`~retrain.trainer.Trainer`.

Random search (Bergstra and Bengio 2012, "Random Search for Hyper-Parameter
Optimization", https://jmlr.org/papers/v13/bergstra12a.html) around the job's
params: with a handful of trials, a few random draws cover the parameters that
matter better than a grid does. Decisions:

* **Trial 0 is the base params**, so a search never does worse on validation than
  the run without one, and a one-trial "search" is exactly the plain run.
* **What varies:** ``lr`` log-uniform in ``[lr/3, 3 lr]``, ``weight_decay``
  log-uniform in ``[wd/10, 10 wd]`` (``[1e-6, 1e-3]`` when the base is 0), ``dropout``
  uniform in ``[0, 0.3]``. Every draw is made up front from ``seed``, so trial k's
  params do not depend on how earlier trials went. All trials train with the same
  seed: differences between them are the params', not the initialisation's.
* **Budget:** a new trial starts only while the time left is at least the slowest
  trial so far (a trial that will not finish wastes the budget the job needs for
  scoring and registering); each trial also gets the deadline itself.
* **Failures:** a trial raising :class:`~retrain.trainer.TrainingError` is recorded
  with its reason and skipped; a data problem (empty, single class, bad labels)
  fails every trial alike, so it ends the search at once. If every trial fails the
  search raises.
* **Best** is the lowest validation log loss (``FitResult.best_val_loss``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pandas as pd

from retrain.trainer import EpochMetrics, FitResult, Trainer, TrainingError, TrainParams

__all__ = ["TrialRecord", "search", "trial_params"]

# A data problem fails every trial the same way: retrying with other params is waste.
_DATA_REASONS = frozenset({"empty", "missing_label", "bad_labels", "single_class"})
_LR_SPAN = 3.0
_WD_SPAN = 10.0
_WD_RANGE_FROM_ZERO = (1e-6, 1e-3)
_DROPOUT_RANGE = (0.0, 0.3)


class TrialRecord(TypedDict):
    """One trial, as logged with the run (plain JSON values)."""

    trial: int
    params: dict[str, Any]
    status: str  # "ok", "failed", or "skipped" (not started: the budget ran out)
    reason: str | None
    best_val_loss: float | None
    best_epoch: int | None
    epochs: int | None
    stop_reason: str | None
    seconds: float | None


def trial_params(base_params: Mapping[str, Any], trials: int, seed: int) -> list[dict[str, Any]]:
    """The params of every trial: trial 0 is ``base_params`` itself."""
    defaults = TrainParams()
    lr = float(base_params.get("lr", defaults.lr))
    wd = float(base_params.get("weight_decay", defaults.weight_decay))
    rng = np.random.default_rng(seed)
    out = [dict(base_params)]
    for _ in range(1, trials):
        u_lr, u_wd, u_do = rng.random(3)
        if wd > 0:
            new_wd = wd * _WD_SPAN ** (2 * u_wd - 1)
        else:
            lo, hi = _WD_RANGE_FROM_ZERO
            new_wd = math.exp(math.log(lo) + u_wd * (math.log(hi) - math.log(lo)))
        out.append({**base_params, "lr": lr * _LR_SPAN ** (2 * u_lr - 1), "weight_decay": new_wd,
                    "dropout": _DROPOUT_RANGE[0] + u_do * (_DROPOUT_RANGE[1] - _DROPOUT_RANGE[0])})
    return out


def _record(trial: int, params: dict[str, Any], status: str, **kw: Any) -> TrialRecord:
    rec: TrialRecord = {"trial": trial, "params": params, "status": status, "reason": None,
                        "best_val_loss": None, "best_epoch": None, "epochs": None,
                        "stop_reason": None, "seconds": None}
    rec.update(kw)  # type: ignore[typeddict-item]
    return rec


def search(trainer: Trainer, train: pd.DataFrame, val: pd.DataFrame, *, label: str,
           base_params: Mapping[str, Any], trials: int = 1, seed: int = 0,
           deadline: float | None = None, warm_start: Path | None = None, device: str = "auto",
           on_epoch: Callable[[EpochMetrics], None] | None = None,
           clock: Callable[[], float] = time.time) -> tuple[FitResult, list[TrialRecord]]:
    """Run up to ``trials`` fits and return the best with a record of every trial.

    Args:
        trainer: any :class:`~retrain.trainer.Trainer`.
        train, val, label, seed, warm_start, device, on_epoch: passed to every ``fit``.
        base_params: the centre of the search, and trial 0's params.
        trials: how many trials at most (1: just the base params).
        deadline: a ``clock()`` value (Unix seconds by default) by which to be done.
        clock: the time source, injectable for tests.

    Returns:
        The best trial's :class:`~retrain.trainer.FitResult` and one
        :class:`TrialRecord` per trial (skipped ones included), in trial order.

    Raises:
        TrainingError: every trial failed (with the shared reason when they all
            failed alike, else ``all_trials_failed``), or the data cannot train at all.
    """
    if trials < 1:
        msg = f"trials must be >= 1, got {trials}"
        raise ValueError(msg)
    records: list[TrialRecord] = []
    best: FitResult | None = None
    slowest = 0.0
    errors: list[TrainingError] = []
    for k, params in enumerate(trial_params(base_params, trials, seed)):
        if k > 0 and deadline is not None and deadline - clock() < slowest:
            records.append(_record(k, params, "skipped", reason="budget"))
            continue
        t0 = clock()
        try:
            result = trainer.fit(train, val, label=label, params=params, seed=seed, device=device,
                                 warm_start=warm_start, on_epoch=on_epoch, deadline=deadline)
        except TrainingError as exc:
            if exc.reason in _DATA_REASONS:
                raise
            seconds = clock() - t0
            slowest = max(slowest, seconds)
            errors.append(exc)
            records.append(_record(k, params, "failed", reason=f"{exc.reason}: {exc}", seconds=seconds))
            continue
        seconds = clock() - t0
        slowest = max(slowest, seconds)
        records.append(_record(k, params, "ok", best_val_loss=float(result.best_val_loss),
                               best_epoch=result.best_epoch, epochs=len(result.history),
                               stop_reason=result.stop_reason, seconds=seconds))
        if best is None or result.best_val_loss < best.best_val_loss:
            best = result
    if best is None:
        reasons = {e.reason for e in errors}
        reason = reasons.pop() if len(reasons) == 1 else "all_trials_failed"
        detail = "; ".join(f"trial {r['trial']}: {r['reason']}" for r in records if r["status"] == "failed")
        msg = f"all {len(errors)} trials failed: {detail}"
        raise TrainingError(msg, reason=reason) from errors[-1]
    return best, records
