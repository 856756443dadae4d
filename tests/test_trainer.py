"""The trainer contract (retrain/trainer.py) and the reference trainer (retrain/ctr_trainer.py).

Every fit runs on the synthetic click world of tests/test_ctr.py, small enough that a
fit takes about a second on two CPU cores.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import expit

import retrain.ctr_trainer as ctr_trainer
from retrain.ctr import CTRModel, FeatureSpec
from retrain.ctr_trainer import CTRTrainer, infer_features, resolve_device
from retrain.evaluate import calibration
from retrain.trainer import (
    FINE_TUNE_CALIBRATION_FRACTION,
    EpochMetrics,
    ScoringModel,
    Trainer,
    TrainingError,
    TrainParams,
    log_loss,
    roc_auc,
)
from tests.test_ctr import synthetic_clicks

#: Small enough for two CPU cores, large enough to learn the world.
PARAMS: dict[str, Any] = {"max_epochs": 8, "buckets": 4096, "embedding_dim": 8, "hidden": [64, 32],
                          "batch_size": 512, "lr": 3e-3, "patience": 2}
TINY: dict[str, Any] = {"max_epochs": 3, "buckets": 256, "embedding_dim": 4, "hidden": [16],
                        "batch_size": 256}


def _fit(train: pd.DataFrame, val: pd.DataFrame, params: dict[str, Any] | None = None, seed: int = 0,
         **kw: Any) -> Any:
    return CTRTrainer().fit(train, val, label="click", params=PARAMS if params is None else params,
                            seed=seed, device="cpu", **kw)


@pytest.fixture(scope="module")
def world_a() -> dict[str, Any]:
    data = synthetic_clicks(14_000, seed=1)
    return {"holdout": synthetic_clicks(5000, seed=2), "result": _fit(data.iloc[:12_000], data.iloc[12_000:])}


@pytest.fixture(scope="module")
def small() -> tuple[pd.DataFrame, pd.DataFrame]:
    data = synthetic_clicks(3000, seed=5)
    return data.iloc[:2500], data.iloc[2500:]


# -- the contract --------------------------------------------------------------------------------

def test_ctr_trainer_and_model_satisfy_the_protocols(world_a: dict[str, Any]) -> None:
    assert isinstance(CTRTrainer(), Trainer)
    assert isinstance(world_a["result"].model, ScoringModel)


def test_train_params_validation_names_the_bad_value() -> None:
    with pytest.raises(ValueError, match=r"lr must be > 0, got -0\.1"):
        TrainParams(lr=-0.1)
    with pytest.raises(ValueError, match="lr must be > 0, got nan"):
        TrainParams(lr=float("nan"))
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        TrainParams(batch_size=0)
    with pytest.raises(ValueError, match=r"warmup_fraction must be in \[0, 1\), got 1.0"):
        TrainParams(warmup_fraction=1.0)
    with pytest.raises(ValueError, match=r"hidden sizes must be ints >= 1, got \(64, 0\)"):
        TrainParams(hidden=(64, 0))
    with pytest.raises(ValueError, match=r"calibration_fraction must be None or in \[0, 0.5\), got 0.5"):
        TrainParams(calibration_fraction=0.5)
    with pytest.raises(ValueError, match=r"unknown training params \['epochs', 'learning_rate'\]"):
        TrainParams.from_mapping({"learning_rate": 1e-3, "epochs": 3})


def test_train_params_defaults_and_json_round_trip() -> None:
    p = TrainParams()
    assert (p.lr, p.weight_decay, p.dropout, p.batch_size, p.max_epochs, p.warmup_fraction, p.patience,
            p.embedding_dim, p.hidden, p.cross_layers, p.buckets) == (
        2e-3, 1e-5, 0.1, 1024, 20, 0.05, 3, 16, (128, 64), 2, 2**16)
    custom = TrainParams.from_mapping({"hidden": [8], "features": {"ids": ["u"], "numeric": ["x"]}})
    assert custom.features == FeatureSpec(ids=("u",), numeric=("x",))
    assert TrainParams.from_mapping(custom.to_dict()) == custom


def test_roc_auc_matches_the_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300), 1)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert roc_auc(y, s) == pytest.approx(pairs)
    assert math.isnan(roc_auc(np.ones(5), s[:5]))


def test_infer_features_skips_contract_label_excluded_and_time_columns() -> None:
    df = synthetic_clicks(10, seed=0).assign(
        like=0, score=0.5, model_version="3", seen_at=pd.Timestamp("2026-01-01"), dwell=1.5)
    spec = infer_features(df, label="click", exclude=("like",))
    assert spec.ids == ("user_id", "item_id")
    assert spec.categorical == ("country", "device")
    assert spec.numeric == ("price", "age", "is_new", "dwell")


def test_device_auto_and_a_cuda_request_without_cuda() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' requested"):
            resolve_device("cuda")


# -- learning ------------------------------------------------------------------------------------

def test_trained_model_beats_chance_and_an_untrained_model(world_a: dict[str, Any]) -> None:
    result, holdout = world_a["result"], world_a["holdout"]
    auc = roc_auc(holdout["click"], result.model.predict(holdout))
    torch.manual_seed(0)
    untrained = CTRModel(result.model.preprocessor, architecture=result.model.architecture)
    auc0 = roc_auc(holdout["click"], untrained.predict(holdout))
    assert auc > 0.70, auc
    assert auc > auc0 + 0.1, (auc, auc0)
    assert result.device == "cpu" and 1 <= result.best_epoch <= len(result.history)
    assert result.history[result.best_epoch - 1].val_loss == result.best_val_loss
    assert all(m.samples_per_s > 0 and m.lr > 0 for m in result.history)
    assert result.params["features"]["categorical"] == ["country", "device"]


def test_warm_start_fine_tunes_to_a_shifted_world(world_a: dict[str, Any], tmp_path: Path) -> None:
    champion = world_a["result"].model
    champion.save(tmp_path / "champion")
    b = synthetic_clicks(8000, seed=3, world="B")
    holdout = synthetic_clicks(5000, seed=4, world="B")
    result = _fit(b.iloc[:6500], b.iloc[6500:], params={**PARAMS, "hidden": [8], "buckets": 64},
                  warm_start=tmp_path / "champion")
    y = holdout["click"]
    before, after = champion.predict(holdout), result.model.predict(holdout)
    assert roc_auc(y, after) > roc_auc(y, before) + 0.08, (roc_auc(y, after), roc_auc(y, before))
    assert log_loss(y, after) < log_loss(y, before) - 0.05
    # The champion's preprocessing and architecture, whatever the params said.
    assert result.model.preprocessor == champion.preprocessor
    assert result.model.architecture == champion.architecture
    assert result.params["hidden"] == list(champion.architecture.hidden)


def test_a_fine_tune_that_comes_out_miscalibrated_is_recalibrated_on_rows_it_did_not_train_on(
        world_a: dict[str, Any], tmp_path: Path) -> None:
    """The click rate falls (every logit 1.5 lower, what ranks above what unchanged), and
    a gentle fine-tune (one epoch, lr 1e-3) keeps much of the champion's offset: it
    predicts about 1.5 times the clicks that happen, outside the promotion gate's band.
    The newest 15% of the training rows, held out of the gradient steps, bring the
    holdout's observed / expected back to 1; the ranking is the net's."""
    world_a["result"].model.save(tmp_path / "champion")
    fresh = synthetic_clicks(32_000, seed=3, shift=-1.5)
    holdout = synthetic_clicks(20_000, seed=4, shift=-1.5)
    y = holdout["click"]
    params = {**PARAMS, "lr": 1e-3, "max_epochs": 1, "batch_size": 1024}
    train, val = fresh.iloc[:30_000], fresh.iloc[30_000:]

    plain = _fit(train, val, params={**params, "calibration_fraction": 0.0}, warm_start=tmp_path / "champion")
    assert plain.calibration is None and plain.model.calibration.is_identity
    assert calibration(y, plain.model.predict(holdout)) < 0.8

    tuned = _fit(train, val, params=params, warm_start=tmp_path / "champion")
    raw, scores = expit(tuned.model.logits(holdout)), tuned.model.predict(holdout)
    assert calibration(y, raw) < 0.8  # the same net without its calibration
    assert 0.9 <= calibration(y, scores) <= 1.1, calibration(y, scores)
    assert roc_auc(y, scores) == pytest.approx(roc_auc(y, raw), abs=1e-12)
    assert tuned.params["calibration_fraction"] == FINE_TUNE_CALIBRATION_FRACTION
    report = tuned.calibration
    assert report is not None and report["rows"] == 4500  # the newest 15% of 30,000
    assert report["before"] < 0.8 and report["after"] == pytest.approx(1.0, abs=0.01)
    assert (report["scale"], report["bias"]) == (tuned.model.calibration.scale, tuned.model.calibration.bias)

    tuned.model.save(tmp_path / "tuned")  # what is registered and served is the calibrated model
    back = CTRModel.load(tmp_path / "tuned")
    assert back.calibration == tuned.model.calibration
    np.testing.assert_array_equal(back.predict(holdout), scores)


def test_a_fit_from_scratch_is_recalibrated_only_when_asked(small: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    default = _fit(*small, params=TINY)
    assert default.calibration is None and default.model.calibration.is_identity
    assert default.params["calibration_fraction"] == 0.0
    trainer = CTRTrainer()
    asked = trainer.fit(*small, label="click", params={**TINY, "calibration_fraction": 0.2}, seed=0,
                        device="cpu")
    assert asked.calibration is not None and asked.calibration["rows"] == 500
    assert trainer.state_dict()["fingerprint"]["rows"] == [2000, 500, 500]  # trained on the rest


def test_early_stopping_restores_the_best_epoch_on_a_tiny_overfitting_set() -> None:
    rng = np.random.default_rng(7)
    df = synthetic_clicks(400, seed=7).assign(click=rng.integers(0, 2, 400))  # pure noise
    train, val = df.iloc[:300], df.iloc[300:]
    result = _fit(train, val, params={**TINY, "max_epochs": 40, "patience": 2, "lr": 0.05,
                                      "batch_size": 32, "warmup_fraction": 0.0})
    assert result.stopped_early and result.stop_reason == "early_stopping"
    assert len(result.history) < 40
    assert len(result.history) - result.best_epoch == 2
    assert log_loss(val["click"], result.model.predict(val)) == pytest.approx(result.best_val_loss,
                                                                               abs=1e-5)


def test_on_epoch_sees_every_epoch(small: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    seen: list[EpochMetrics] = []
    result = _fit(*small, params={**TINY, "patience": 10}, on_epoch=seen.append)
    assert [m.epoch for m in seen] == [1, 2, 3] and tuple(seen) == result.history
    assert result.stop_reason == "max_epochs" and not result.stopped_early
    lrs = [m.lr for m in seen]
    assert lrs[0] > lrs[1] > lrs[2] >= 0  # cosine decay after the warmup


def test_explicit_features_override_inference(small: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    spec = {"ids": ["user_id"], "categorical": [], "numeric": ["price"]}
    result = _fit(*small, params={**TINY, "features": spec})
    assert result.model.preprocessor.spec == FeatureSpec.from_dict(spec)


# -- determinism and resuming ---------------------------------------------------------------------

def _weights(result: Any) -> dict[str, torch.Tensor]:
    return result.model.net.state_dict()


def test_same_seed_gives_bit_identical_weights_on_cpu(small: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    a, b, c = (_fit(*small, params=TINY, seed=s) for s in (11, 11, 12))
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [m.val_loss for m in a.history] == [m.val_loss for m in b.history]
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_fit_restores_global_torch_state(small: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    _fit(*small, params=TINY)
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.equal(torch.get_rng_state(), rng_before)
    with pytest.raises(TrainingError):
        _fit(*small, params={**TINY, "lr": 1e30})
    assert not torch.are_deterministic_algorithms_enabled()


def test_state_dict_round_trip_resumes_to_the_same_weights(small: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    params = {**TINY, "max_epochs": 4, "patience": 10}
    full = _fit(*small, params=params, seed=3)

    class Crash(Exception):
        pass

    def crash_after_two(m: EpochMetrics) -> None:
        if m.epoch == 2:
            raise Crash

    first = CTRTrainer()
    with pytest.raises(Crash):
        first.fit(*small, label="click", params=params, seed=3, device="cpu", on_epoch=crash_after_two)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain tensors and containers only
    assert state["epoch"] == 2 and not state["finished"]

    second = CTRTrainer()
    second.load_state_dict(state)
    seen: list[int] = []
    resumed = second.fit(*small, label="click", params=params, seed=3, device="cpu",
                         on_epoch=lambda m: seen.append(m.epoch))
    assert seen == [3, 4]
    assert [m.val_loss for m in resumed.history] == [m.val_loss for m in full.history]
    wf, wr = _weights(full), _weights(resumed)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)

    # A finished run resumes to its result without training again.
    again = CTRTrainer()
    again.load_state_dict(second.state_dict())
    done = again.fit(*small, label="click", params=params, seed=3, device="cpu",
                     on_epoch=lambda m: seen.append(m.epoch))
    assert seen == [3, 4] and done.best_epoch == full.best_epoch
    wd = _weights(done)
    assert all(torch.equal(wf[k], wd[k]) for k in wf)
    assert again.state_dict()["finished"]

    third = CTRTrainer()
    third.load_state_dict(second.state_dict())
    with pytest.raises(ValueError, match=r"different run: \['seed'\] differ"):
        third.fit(*small, label="click", params=params, seed=4, device="cpu")


def test_state_dict_before_any_epoch_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no epoch has finished"):
        CTRTrainer().state_dict()
    with pytest.raises(ValueError, match="version"):
        CTRTrainer().load_state_dict({"version": 0})


# -- failures ------------------------------------------------------------------------------------

def test_empty_single_class_and_bad_labels_raise(small: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    train, val = small
    cases = [
        (train.iloc[:0], val, "empty", "training set is empty"),
        (train, val.iloc[:0], "empty", "validation set is empty"),
        (train.assign(click=1), val, "single_class", "all 1"),
        (train.drop(columns="click"), val, "missing_label", "no label column 'click'"),
        (train.assign(click=train["click"].where(train.index != train.index[5])), val, "bad_labels",
         "1 values other than 0/1 \\(first at row 5: nan\\)"),
        (train, val.assign(click=2), "bad_labels", "validation label"),
    ]
    for tr, va, reason, message in cases:
        with pytest.raises(TrainingError, match=message) as exc:
            _fit(tr, va, params=TINY)
        assert exc.value.reason == reason


def test_a_loss_that_goes_non_finite_raises_naming_epoch_and_step(
        small: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    # lr 1e30: after one AdamW step every weight is ~1e30, and the cross layers'
    # products overflow float32 on the next forward pass. No monkeypatching.
    with pytest.raises(TrainingError, match=r"at epoch 1 step \d+ of \d+") as exc:
        _fit(*small, params={**TINY, "lr": 1e30, "warmup_fraction": 0.0})
    assert exc.value.reason == "non_finite_loss"


class _FakeTime:
    """Stands in for the ``time`` module inside retrain.ctr_trainer: wall time that
    only moves when the test says so."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    perf_counter = staticmethod(__import__("time").perf_counter)


def test_deadline_before_any_epoch_finished_raises(small: tuple[pd.DataFrame, pd.DataFrame],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctr_trainer, "time", _FakeTime(1000.0))
    with pytest.raises(TrainingError, match="deadline passed during epoch 1") as exc:
        _fit(*small, params=TINY, deadline=999.0)
    assert exc.value.reason == "deadline"


def test_deadline_after_an_epoch_keeps_the_best_finished_epoch(
        small: tuple[pd.DataFrame, pd.DataFrame], monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _FakeTime(1000.0)
    monkeypatch.setattr(ctr_trainer, "time", clock)

    def later(m: EpochMetrics) -> None:
        if m.epoch == 2:
            clock.now = 2000.0

    result = _fit(*small, params={**TINY, "max_epochs": 10, "patience": 10}, deadline=1500.0,
                  on_epoch=later)
    assert [m.epoch for m in result.history] == [1, 2]
    assert result.stopped_early and result.stop_reason == "deadline"
    assert result.best_epoch in (1, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_path_trains_under_bf16_autocast(small: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    result = CTRTrainer().fit(*small, label="click", params=TINY, seed=0, device="auto",
                              warm_start=None, on_epoch=None, deadline=None)
    assert result.device.startswith("cuda")
    assert next(result.model.net.parameters()).device.type == "cpu"  # returned ready to save
    assert np.isfinite(result.model.predict(small[1])).all()
