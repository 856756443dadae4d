"""retrain/dataset.py: labels by the attribution window, cleaning counts, time split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from retrain.dataset import (
    CleaningSpec,
    DatasetError,
    clean,
    label_predictions,
    split_by_time,
    training_frame,
)

T0 = 1_700_000_000_000
ATTR = 30 * 60_000


def _ts(ms: list[int]) -> pa.Array:
    return pa.array(ms, type=pa.timestamp("ms", tz="UTC"))


def _preds(ids: list[str], ts: list[int], **features: list[object]) -> pa.Table:
    cols = {"prediction_id": pa.array(ids), "ts": _ts(ts), "model": pa.array(["ctr"] * len(ids)),
            "model_version": pa.array(["1"] * len(ids)),
            "user_id": pa.array([f"u{i}" for i in range(len(ids))]),
            "item_id": pa.array(["i"] * len(ids)), "score": pa.array([0.1] * len(ids))}
    cols.update({f"f.{k}": pa.array(v) for k, v in features.items()})
    return pa.table(cols)


def _feedback(ids: list[str], ts: list[int], types: list[str]) -> pa.Table:
    return pa.table({"prediction_id": pa.array(ids), "ts": _ts(ts), "type": pa.array(types)})


def test_feedback_labels_only_inside_the_attribution_window() -> None:
    preds = _preds(["a", "b", "c", "d", "e"], [T0] * 5)
    fb = _feedback(
        ["a", "b", "c", "d", "d", "zz"],
        [T0 + 1, T0 + ATTR, T0 + ATTR + 1, T0 - 1, T0 + 5, T0 + 5],
        ["click", "click", "click", "click", "like", "click"])
    out = label_predictions(preds, fb, label_types=("click", "like"), attribution_ms=ATTR)
    got = dict(zip(out["prediction_id"], out["click"], strict=True))
    # a: 1 ms after; b: exactly at the window's end (inclusive); c: 1 ms too late;
    # d: feedback before its prediction does not count; e: none. zz: unknown id.
    assert got == {"a": 1, "b": 1, "c": 0, "d": 0, "e": 0}
    assert dict(zip(out["prediction_id"], out["like"], strict=True))["d"] == 1
    assert out["ts"].dtype == np.int64 and int(out["ts"].iloc[0]) == T0


def test_redelivered_feedback_labels_once_and_other_types_are_ignored() -> None:
    preds = _preds(["a"], [T0])
    fb = _feedback(["a", "a", "a"], [T0 + 10, T0 + 10, T0 + 20], ["click", "click", "dwell"])
    out = label_predictions(preds, fb, label_types=("click",), attribution_ms=ATTR)
    assert out["click"].tolist() == [1]
    assert "dwell" not in out.columns


def test_training_frame_uses_bare_feature_names_but_never_shadows_a_contract_field() -> None:
    preds = _preds(["a"], [T0], age=[31.0], score=[0.5])
    out = training_frame(label_predictions(preds, pa.table({}), label_types=("click",), attribution_ms=ATTR))
    assert "age" in out.columns and "f.age" not in out.columns
    assert "f.score" in out.columns and out["score"].iloc[0] == pytest.approx(0.1)


def _frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "prediction_id": [f"p{i}" for i in range(n)],
        "ts": T0 + np.arange(n) * 1000,
        "user_id": [f"u{i % 200}" for i in range(n)],
        "item_id": [f"i{i % 50}" for i in range(n)],
        "x": rng.normal(size=n),
        "mostly_missing": np.where(rng.random(n) < 0.99, np.nan, 1.0),
        "click": (rng.random(n) < 0.1).astype(np.int8),
    })


def test_cleaning_counts_every_removal() -> None:
    df = _frame(5000)
    df = pd.concat([df, df.iloc[:7]], ignore_index=True)  # 7 redelivered predictions
    df.loc[10, "x"] = 1e9  # a corrupt value
    # A bot: 40 clicks inside one minute.
    bot = pd.DataFrame({"prediction_id": [f"b{i}" for i in range(40)], "ts": T0 + np.arange(40) * 100,
                        "user_id": "bot", "item_id": "i1", "x": 0.0, "mostly_missing": np.nan,
                        "click": np.int8(1)})
    df = pd.concat([df, bot], ignore_index=True)
    out, report = clean(df, label="click", features=["x", "mostly_missing"])
    assert report.rows_in == 5047
    assert report.duplicate_predictions == 7
    assert report.dropped_features == ("mostly_missing",)
    assert report.outlier_values == 1 and np.isnan(out.loc[out["prediction_id"] == "p10", "x"]).all()
    assert report.bot_users == 1 and report.bot_rows == 40
    assert report.rows_out == len(out) == 5000
    assert "bot" not in set(out["user_id"])
    assert report.missing_values == 1  # the corrupt value, now missing, imputed by the model


def test_a_user_who_clicks_nearly_everything_is_bot_like() -> None:
    df = _frame(3000)
    heavy = pd.DataFrame({"prediction_id": [f"h{i}" for i in range(60)],
                          "ts": T0 + np.arange(60) * 3_600_000, "user_id": "heavy", "item_id": "i",
                          "x": 0.0, "mostly_missing": 1.0, "click": np.int8(1)})
    out, report = clean(pd.concat([df, heavy], ignore_index=True), label="click", features=["x"],
                        spec=CleaningSpec(max_missing_rate=1.0))
    assert report.bot_users == 1 and "heavy" not in set(out["user_id"])


def test_split_is_by_time_and_the_holdout_is_the_newest_slice() -> None:
    df = _frame(10_000).sample(frac=1.0, random_state=1)  # arrival order shuffled
    s = split_by_time(df, label="click", holdout_fraction=0.2, validation_fraction=0.1, min_rows=100)
    assert s.sizes() == {"train": 7000, "validation": 1000, "holdout": 2000}
    assert s.train["ts"].max() < s.validation["ts"].min() <= s.validation["ts"].max() < s.holdout["ts"].min()
    assert s.holdout_start_ms == int(s.holdout["ts"].min())
    assert set(s.train["prediction_id"]).isdisjoint(s.holdout["prediction_id"])


@pytest.mark.parametrize(("n", "clicks", "reason"), [
    (0, 0.1, "empty_window"), (50, 0.1, "too_few_rows"), (5000, 0.0, "single_class")])
def test_a_window_that_cannot_make_a_training_set_says_why(n: int, clicks: float, reason: str) -> None:
    df = _frame(n)
    if clicks == 0.0:
        df["click"] = np.int8(0)
    with pytest.raises(DatasetError) as err:
        split_by_time(df, label="click", holdout_fraction=0.2, validation_fraction=0.1, min_rows=100)
    assert err.value.reason == reason
