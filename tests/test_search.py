"""The hyperparameter search (retrain/search.py): the draws, the budget, failures, the winner."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from retrain.ctr_trainer import CTRTrainer
from retrain.search import search, trial_params
from retrain.trainer import EpochMetrics, FitResult, TrainingError
from tests.test_ctr import synthetic_clicks

EMPTY = pd.DataFrame({"click": [0, 1]})


class _Model:
    def predict(self, df: pd.DataFrame) -> np.ndarray:
        return np.full(len(df), 0.5)

    def save(self, directory: Path) -> None:  # pragma: no cover - never saved here
        pass


class _FakeTrainer:
    """A trainer whose validation loss is a known function of lr and whose every fit
    takes ``seconds`` of a fake clock; ``fail`` picks the trials that raise."""

    def __init__(self, clock: list[float], seconds: float = 10.0,
                 fail: Callable[[int, Mapping[str, Any]], str | None] = lambda k, p: None) -> None:
        self.clock, self.seconds, self.fail = clock, seconds, fail
        self.calls: list[dict[str, Any]] = []

    def fit(self, train: pd.DataFrame, val: pd.DataFrame, *, label: str, params: Mapping[str, Any],
            seed: int, device: str, warm_start: Path | None,
            on_epoch: Callable[[EpochMetrics], None] | None, deadline: float | None) -> FitResult:
        k = len(self.calls)
        self.calls.append({"params": dict(params), "seed": seed, "deadline": deadline,
                           "device": device, "warm_start": warm_start})
        self.clock[0] += self.seconds
        reason = self.fail(k, params)
        if reason is not None:
            raise TrainingError(f"trial {k} broke", reason=reason)
        loss = abs(math.log(params.get("lr", 2e-3) / 1e-3))  # best at lr = 1e-3
        return FitResult(model=_Model(), best_epoch=1, best_val_loss=loss, history=(),
                         stopped_early=False, stop_reason="max_epochs", device=device,
                         params=dict(params))

    def load(self, directory: Path) -> _Model:  # pragma: no cover
        return _Model()


def _search(trainer: _FakeTrainer, clock: list[float], **kw: Any) -> tuple[FitResult, list[Any]]:
    args: dict[str, Any] = {"label": "click", "base_params": {"lr": 2e-3, "max_epochs": 5}, "trials": 6,
                            "seed": 0, "deadline": None, "warm_start": None, "device": "cpu",
                            "clock": lambda: clock[0]}
    return search(trainer, EMPTY, EMPTY, **(args | kw))


def test_trial_zero_is_the_base_and_draws_stay_in_their_ranges() -> None:
    base = {"lr": 3e-3, "weight_decay": 1e-4, "max_epochs": 7}
    trials = trial_params(base, 200, seed=1)
    assert trials[0] == base and len(trials) == 200
    lr = np.array([t["lr"] for t in trials[1:]])
    wd = np.array([t["weight_decay"] for t in trials[1:]])
    dropout = np.array([t["dropout"] for t in trials[1:]])
    assert (lr >= 1e-3 - 1e-12).all() and (lr <= 9e-3 + 1e-12).all()
    assert (wd >= 1e-5 - 1e-15).all() and (wd <= 1e-3 + 1e-15).all()
    assert (dropout >= 0).all() and (dropout <= 0.3).all()
    # log-uniform: about half the draws on each side of the base
    assert 0.35 < (lr < 3e-3).mean() < 0.65 and 0.35 < (wd < 1e-4).mean() < 0.65
    assert all(t["max_epochs"] == 7 for t in trials)
    assert trial_params(base, 5, seed=1) == trials[:5]
    assert trial_params(base, 5, seed=2)[1:] != trials[1:5]
    zero = trial_params({"weight_decay": 0.0}, 50, seed=0)
    assert all(1e-6 <= t["weight_decay"] <= 1e-3 for t in zero[1:])


def test_best_is_the_lowest_validation_loss_and_every_trial_is_recorded() -> None:
    clock = [0.0]
    trainer = _FakeTrainer(clock)
    best, records = _search(trainer, clock, warm_start=Path("/champion"))
    assert [r["status"] for r in records] == ["ok"] * 6
    losses = [r["best_val_loss"] for r in records]
    assert best.best_val_loss == min(losses)
    assert best.params == records[int(np.argmin(losses))]["params"]
    assert trainer.calls[0]["params"] == {"lr": 2e-3, "max_epochs": 5}
    assert {c["seed"] for c in trainer.calls} == {0}
    assert {c["warm_start"] for c in trainer.calls} == {Path("/champion")}
    json.dumps(records)  # logged with the run as JSON


def test_no_new_trial_starts_when_less_time_is_left_than_the_slowest_trial() -> None:
    clock = [1000.0]
    trainer = _FakeTrainer(clock, seconds=10.0)
    _, records = _search(trainer, clock, deadline=1025.0)
    # t=1010: 15 s left >= 10 -> trial 1; t=1020: 5 s left < 10 -> stop.
    assert [r["status"] for r in records] == ["ok", "ok", "skipped", "skipped", "skipped", "skipped"]
    assert records[2]["reason"] == "budget"
    assert {c["deadline"] for c in trainer.calls} == {1025.0}


def test_a_failing_trial_is_recorded_and_skipped() -> None:
    clock = [0.0]
    trainer = _FakeTrainer(clock, fail=lambda k, p: "non_finite_loss" if k in (0, 2) else None)
    best, records = _search(trainer, clock)
    assert [r["status"] for r in records] == ["failed", "ok", "failed", "ok", "ok", "ok"]
    assert records[0]["reason"] == "non_finite_loss: trial 0 broke"
    assert best.best_val_loss == min(r["best_val_loss"] for r in records if r["status"] == "ok")


def test_all_trials_failing_raises() -> None:
    clock = [0.0]
    reasons = ["non_finite_loss", "deadline", "non_finite_loss"]
    trainer = _FakeTrainer(clock, fail=lambda k, p: reasons[k])
    with pytest.raises(TrainingError, match="all 3 trials failed: trial 0: non_finite_loss") as exc:
        _search(trainer, clock, trials=3)
    assert exc.value.reason == "all_trials_failed"
    alike = _FakeTrainer(clock, fail=lambda k, p: "non_finite_loss")
    with pytest.raises(TrainingError) as exc:
        _search(alike, clock, trials=2)
    assert exc.value.reason == "non_finite_loss"


def test_a_data_problem_ends_the_search_at_once() -> None:
    clock = [0.0]
    trainer = _FakeTrainer(clock, fail=lambda k, p: "single_class")
    with pytest.raises(TrainingError, match="trial 0 broke") as exc:
        _search(trainer, clock)
    assert exc.value.reason == "single_class" and len(trainer.calls) == 1


def test_search_over_the_real_trainer_respects_the_deadline() -> None:
    data = synthetic_clicks(3000, seed=9)
    train, val = data.iloc[:2500], data.iloc[2500:]
    params = {"max_epochs": 2, "buckets": 256, "embedding_dim": 4, "hidden": [16], "batch_size": 256}
    best, records = search(CTRTrainer(), train, val, label="click", base_params=params, trials=3, seed=1,
                           deadline=None, warm_start=None, device="cpu")
    assert [r["status"] for r in records] == ["ok", "ok", "ok"]
    assert best.best_val_loss == min(r["best_val_loss"] for r in records)
    assert len({r["params"].get("lr") for r in records}) == 3
    # A deadline already spent: trial 0 fails on it, no other trial starts, the search raises.
    with pytest.raises(TrainingError) as exc:
        search(CTRTrainer(), train, val, label="click", base_params=params, trials=3, seed=1,
               deadline=0.0, warm_start=None, device="cpu")
    assert exc.value.reason == "deadline"
