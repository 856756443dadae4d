"""The reference CTR model (retrain/ctr.py): features, preprocessing, the net, save and load.

Also home of :func:`synthetic_clicks`, the seeded click world the trainer and search
tests train on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.special import expit

import retrain.ctr as ctr
from retrain.ctr import (
    HASH_SCHEME,
    LOADER_FILE,
    Architecture,
    Calibration,
    CTRModel,
    CTRNet,
    FeatureSpec,
    ModelLoadError,
    Preprocessor,
    hash_buckets,
)

SPEC = FeatureSpec(categorical=("country", "device"), numeric=("price", "age", "is_new"))
COUNTRIES = ("de", "fr", "us", "br", "in")
DEVICES = ("ios", "android", "web")


def synthetic_clicks(n: int, seed: int, *, world: str = "A", n_users: int = 2000,
                     n_items: int = 300, shift: float = 0.0) -> pd.DataFrame:
    """Rows of a hidden logistic click model over users, items, two categoricals and
    three numerics (one with 5% missing), with a device x price interaction.

    The world's effects are fixed (the same for every ``seed``); ``seed`` draws the
    traffic and the clicks. World ``"B"`` is world A after a drift: new item effects and
    the price slope reversed, same users, items and columns. ``shift`` is added to
    every logit: the click rate moves, what ranks above what does not.
    """
    g = np.random.default_rng(20_260_101)
    user_eff = g.normal(0, 0.8, n_users)
    item_eff = {"A": g.normal(0, 0.8, n_items), "B": g.normal(0, 0.8, n_items)}[world]
    country_eff = g.normal(0, 0.6, len(COUNTRIES))
    device_eff = np.array([0.4, 0.0, -0.5])
    slope = {"A": -0.8, "B": 0.8}[world]
    r = np.random.default_rng(seed)
    users = r.integers(0, n_users, n)
    items = r.integers(0, n_items, n)
    country = r.integers(0, len(COUNTRIES), n)
    device = r.integers(0, len(DEVICES), n)
    log_price = r.normal(3.0, 0.8, n)
    age = r.integers(18, 80, n).astype(np.float64)
    is_new = r.random(n) < 0.2
    logit = (-1.2 + shift + user_eff[users] + item_eff[items] + country_eff[country] + device_eff[device]
             + slope * (log_price - 3.0) + 0.6 * (device == 2) * (log_price - 3.0)
             + 0.02 * (age - 45.0) + 0.5 * is_new)
    click = (r.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)
    age[r.random(n) < 0.05] = np.nan
    return pd.DataFrame({
        "prediction_id": [f"p{seed}-{i}" for i in range(n)], "ts": np.arange(n, dtype=np.int64),
        "user_id": np.char.add("u", users.astype(str)), "item_id": items,
        "country": np.asarray(COUNTRIES)[country], "device": np.asarray(DEVICES)[device],
        "price": np.exp(log_price), "age": age, "is_new": is_new, "click": click})


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return synthetic_clicks(3000, seed=1)


@pytest.fixture(scope="module")
def model(frame: pd.DataFrame) -> CTRModel:
    torch.manual_seed(0)
    pre = Preprocessor.fit(frame, SPEC, buckets=512)
    return CTRModel(pre, architecture=Architecture(embedding_dim=4, hidden=(16, 8), cross_layers=2))


# -- FeatureSpec ---------------------------------------------------------------------------------

def test_feature_spec_rejects_duplicate_and_missing_names() -> None:
    with pytest.raises(ValueError, match=r"more than once: \['price'\]"):
        FeatureSpec(categorical=("price",), numeric=("price",))
    with pytest.raises(ValueError, match="at least one"):
        FeatureSpec(ids=())
    with pytest.raises(TypeError, match="the string 'price'"):
        FeatureSpec(numeric="price")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown keys"):
        FeatureSpec.from_dict({"ids": ["u"], "numerics": ["x"]})


def test_feature_spec_round_trips_and_orders_fields() -> None:
    spec = FeatureSpec(ids=["u", "i"], categorical=["c"], numeric=["x"])  # type: ignore[arg-type]
    assert spec.ids == ("u", "i") and spec.fields == ("u", "i", "c")
    assert FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


# -- hashing -------------------------------------------------------------------------------------

def test_hash_buckets_are_pinned() -> None:
    """If pandas ever changes hash_array, this fails here instead of every saved model
    silently scoring its ids in the wrong buckets."""
    got = hash_buckets(pd.Series(["user-1", "item-42", "de", None]), 2**16)
    assert got.tolist() == [18608, 32034, 58533, 0]
    assert HASH_SCHEME.startswith("pandas.hash_array:siphash24")


def test_integer_ids_hash_alike_whatever_their_dtype() -> None:
    # An int column that picked up a NaN becomes float; its ids must keep their buckets.
    as_int = hash_buckets(pd.Series([7, 8, 123456789012]), 1000)
    as_float = hash_buckets(pd.Series([7.0, 8.0, 123456789012.0, np.nan]), 1000)
    as_nullable = hash_buckets(pd.Series(pd.array([7, 8, 123456789012, None], dtype="Int64")), 1000)
    as_str = hash_buckets(pd.Series(["7", "8", "123456789012", None]), 1000)
    assert as_int.tolist() == as_float[:3].tolist() == as_nullable[:3].tolist() == as_str[:3].tolist()
    assert as_float[3] == as_nullable[3] == as_str[3] == 0
    assert hash_buckets(pd.Series([7.5]), 1000)[0] == hash_buckets(pd.Series(["7.5"]), 1000)[0]


def test_missing_is_bucket_zero_and_values_never_are() -> None:
    values = pd.Series([f"v{i}" for i in range(5000)] + [None, np.nan, pd.NA], dtype=object)
    b = hash_buckets(values, 7)
    assert (b[:5000] >= 1).all() and (b[:5000] <= 6).all()
    assert b[5000:].tolist() == [0, 0, 0]
    assert set(b[:5000].tolist()) == set(range(1, 7))


# -- Preprocessor --------------------------------------------------------------------------------

def test_numerics_are_clipped_standardised_and_imputed() -> None:
    x = np.arange(10_000, dtype=np.float64)
    x[0] = 1e12  # one absurd value
    df = pd.DataFrame({"x": x})
    pre = Preprocessor.fit(df, FeatureSpec(ids=(), numeric=("x",)))
    s = pre.numeric_stats["x"]
    assert s.hi < 1e5 and s.lo >= 1.0
    clipped = np.clip(x, s.lo, s.hi)
    assert s.mean == pytest.approx(clipped.mean()) and s.std == pytest.approx(clipped.std())
    _, num = pre.transform(pd.DataFrame({"x": [1e12, np.nan, s.median]}))
    assert num[0, 0] == pytest.approx((s.hi - s.mean) / s.std, rel=1e-6)
    assert num[1, 0] == pytest.approx((s.median - s.mean) / s.std, abs=1e-6)
    assert num[:, 1].tolist() == [0.0, 1.0, 0.0]


def test_constant_and_all_missing_numerics_do_not_divide_by_zero() -> None:
    df = pd.DataFrame({"c": [3.0] * 10, "m": [np.nan] * 10})
    pre = Preprocessor.fit(df, FeatureSpec(ids=(), numeric=("c", "m")))
    _, num = pre.transform(df)
    assert np.isfinite(num).all()
    assert num[:, :2].tolist() == [[0.0, 0.0]] * 10 and num[:, 3].tolist() == [1.0] * 10


def test_preprocessor_json_round_trip(frame: pd.DataFrame) -> None:
    pre = Preprocessor.fit(frame, SPEC, buckets=4096)
    back = Preprocessor.from_dict(json.loads(json.dumps(pre.to_dict())))
    assert back == pre
    for a, b in zip(pre.transform(frame), back.transform(frame), strict=True):
        np.testing.assert_array_equal(a, b)


def test_unknown_hash_scheme_is_refused(frame: pd.DataFrame) -> None:
    d = Preprocessor.fit(frame, SPEC).to_dict()
    d["hash_scheme"] = "murmur3:v0"
    with pytest.raises(ValueError, match="unknown hash scheme 'murmur3:v0'"):
        Preprocessor.from_dict(d)


def test_missing_columns_nan_and_strings_map_to_missing(frame: pd.DataFrame) -> None:
    pre = Preprocessor.fit(frame, SPEC, buckets=512)
    k = len(SPEC.numeric)
    bad = pd.DataFrame({"user_id": ["u1", None, "u3"], "item_id": [1, 2, np.nan],
                        "price": ["12.5", "not a number", None], "age": [np.inf, 30.0, np.nan]})
    cat, num = pre.transform(bad)  # no "country", "device" or "is_new" column at all
    assert cat.dtype == np.int64 and cat.shape == (3, 4)
    assert num.dtype == np.float32 and num.shape == (3, 2 * k)
    assert cat[1, 0] == 0 and cat[2, 1] == 0 and (cat[:, 2:] == 0).all()
    price_missing, age_missing, is_new_missing = num[:, k], num[:, k + 1], num[:, k + 2]
    assert price_missing.tolist() == [0.0, 1.0, 1.0]
    assert age_missing.tolist() == [1.0, 0.0, 1.0]  # inf counts as missing
    assert is_new_missing.tolist() == [1.0, 1.0, 1.0]
    s = pre.numeric_stats["price"]
    assert num[0, 0] == pytest.approx((np.clip(12.5, s.lo, s.hi) - s.mean) / s.std, rel=1e-6)
    assert np.isfinite(num).all()


def test_transform_of_an_empty_frame() -> None:
    pre = Preprocessor.fit(pd.DataFrame({"user_id": ["a"], "x": [1.0]}),
                           FeatureSpec(ids=("user_id",), numeric=("x",)))
    cat, num = pre.transform(pd.DataFrame())
    assert cat.shape == (0, 1) and num.shape == (0, 2)


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                     st.just(float("nan")), st.lists(st.integers(), max_size=2))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(columns=st.dictionaries(st.sampled_from(["user_id", "item_id", "country", "price", "age",
                                                "other"]),
                               st.lists(_scalars, min_size=0, max_size=6), max_size=6),
       rows=st.integers(0, 6))
def test_transform_never_raises_on_arbitrary_frames(columns: dict[str, list[Any]], rows: int) -> None:
    pre = Preprocessor.fit(pd.DataFrame({"price": [1.0, 2.0], "age": [3.0, 4.0]}),
                           FeatureSpec(categorical=("country",), numeric=("price", "age")), buckets=64)
    df = pd.DataFrame({name: pd.Series((values * rows)[:rows], dtype=object)
                       for name, values in columns.items()} if columns else None, index=range(rows))
    cat, num = pre.transform(df)
    assert cat.shape == (rows, 3) and num.shape == (rows, 4)
    assert ((cat >= 0) & (cat < 64)).all() and np.isfinite(num).all()
    assert set(np.unique(num[:, 2:])) <= {0.0, 1.0}


# -- CTRNet --------------------------------------------------------------------------------------

def test_cross_layer_is_dcn_v2_formula() -> None:
    torch.manual_seed(0)
    net = CTRNet(embedding_dim=3, hidden=(), cross_layers=2, dropout=0.0, buckets=10, n_fields=2,
                 n_numeric=1)
    cat = torch.tensor([[1, 2], [3, 0]])
    num = torch.tensor([[0.5, 0.0], [-1.0, 1.0]])
    x0 = torch.cat([net.embeddings[0](cat[:, 0]), net.embeddings[1](cat[:, 1]), num], dim=1)
    x = x0
    for layer in net.cross:
        x = x0 * (x @ layer.linear.weight.T + layer.linear.bias) + x
    expected = (x @ net.head.weight.T + net.head.bias).squeeze(1)
    torch.testing.assert_close(net(cat, num), expected)


def test_net_with_mlp_and_no_cross_layers() -> None:
    net = CTRNet(embedding_dim=2, hidden=(4, 3), cross_layers=0, dropout=0.5, buckets=5, n_fields=1,
                 n_numeric=0)
    assert net.head.in_features == 2 + 3
    assert net(torch.zeros(7, 1, dtype=torch.long), torch.zeros(7, 0)).shape == (7,)


# -- CTRModel ------------------------------------------------------------------------------------

def test_predict_is_float64_probabilities_batched_and_leaves_train_mode(model: CTRModel,
                                                                        frame: pd.DataFrame) -> None:
    model.net.train()
    p = model.predict(frame)
    assert p.dtype == np.float64 and p.shape == (len(frame),)
    assert ((p > 0) & (p < 1)).all()
    # Other batch shapes take other matmul blockings: equal up to float32 rounding.
    np.testing.assert_allclose(model.predict(frame, batch_size=7), p, rtol=1e-6)
    assert model.net.training  # restored: predict must not flip a net mid-training into eval
    assert model.predict(frame.iloc[:0]).shape == (0,)


def test_save_load_round_trip_gives_identical_predictions(model: CTRModel, frame: pd.DataFrame,
                                                          tmp_path: Path) -> None:
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["ctr.json", LOADER_FILE, "weights.pt"]
    loader = json.loads((tmp_path / "m" / LOADER_FILE).read_text())
    assert loader["loader"] == "retrain.ctr:CTRModel"
    config = json.loads((tmp_path / "m" / "ctr.json").read_text())
    assert config["format_version"] == ctr.FORMAT_VERSION and config["features"] == SPEC.to_dict()
    back = CTRModel.load(tmp_path / "m")
    np.testing.assert_array_equal(back.predict(frame), model.predict(frame))
    assert back.preprocessor == model.preprocessor and back.architecture == model.architecture
    assert back.n_parameters == model.n_parameters and back.size_bytes == model.size_bytes


def test_load_uses_weights_only(model: CTRModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model.save(tmp_path)
    calls: list[dict[str, Any]] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    CTRModel.load(tmp_path)
    assert calls == [{"weights_only": True, "map_location": "cpu"}]


_side_effects: list[str] = []


def _side_effect(what: str) -> dict[str, torch.Tensor]:
    _side_effects.append(what)
    return {}


class _Payload:
    """Unpickling this calls a function: what a malicious weights file would do."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_side_effect, ("code ran",))


def test_a_weights_file_with_a_pickled_object_is_refused(model: CTRModel, tmp_path: Path) -> None:
    model.save(tmp_path)
    torch.save({"head.weight": _Payload()}, tmp_path / "weights.pt")
    with pytest.raises(ModelLoadError, match="refusing to load"):
        CTRModel.load(tmp_path)
    assert _side_effects == []


def test_load_refuses_unknown_formats_and_mismatched_weights(model: CTRModel, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot read"):
        CTRModel.load(tmp_path / "nothing here")
    model.save(tmp_path)
    config = json.loads((tmp_path / "ctr.json").read_text())
    (tmp_path / "ctr.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ModelLoadError, match="format 99"):
        CTRModel.load(tmp_path)
    config["architecture"]["embedding_dim"] = 5
    (tmp_path / "ctr.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="does not match the architecture"):
        CTRModel.load(tmp_path)


def test_parameter_count_and_size(model: CTRModel) -> None:
    arch, pre = model.architecture, model.preprocessor
    d = pre.n_fields * arch.embedding_dim + 2 * pre.n_numeric
    expected = (pre.n_fields * pre.buckets * arch.embedding_dim + arch.cross_layers * (d * d + d)
                + (d * 16 + 16) + (16 * 8 + 8) + (d + 8 + 1))
    assert model.n_parameters == expected
    assert model.size_bytes == 4 * expected  # float32, no buffers


def test_architecture_validation_names_the_value() -> None:
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1\.5"):
        Architecture(dropout=1.5)
    with pytest.raises(ValueError, match="cross_layers must be >= 0, got -1"):
        Architecture(cross_layers=-1)
    assert math.isclose(Architecture.from_dict(Architecture().to_dict()).dropout, 0.1)


# -- Calibration ---------------------------------------------------------------------------------

def test_calibration_fit_recovers_a_known_scale_and_bias_and_matches_the_positives() -> None:
    rng = np.random.default_rng(3)
    z = rng.normal(0.0, 1.5, 20_000)
    y = (rng.random(z.size) < expit(0.6 * z - 0.8)).astype(float)
    c = Calibration.fit(z, y)
    assert c.scale == pytest.approx(0.6, abs=0.05) and c.bias == pytest.approx(-0.8, abs=0.05)
    # The intercept's score equation: expected positives equal the observed ones.
    assert expit(c.apply(z)).sum() == pytest.approx(y.sum(), rel=1e-3)


def test_a_calibration_never_reverses_the_ranking() -> None:
    rng = np.random.default_rng(4)
    z = rng.normal(0.0, 1.0, 5000)
    y = (rng.random(z.size) < expit(-z - 1.0)).astype(float)  # the net ranks backwards
    c = Calibration.fit(z, y)
    assert c.scale == 1.0  # only the bias is fitted
    assert expit(c.apply(z)).sum() == pytest.approx(y.sum(), rel=1e-2)


def test_a_perfectly_separated_slice_still_gives_a_finite_calibration() -> None:
    z = np.linspace(-2.0, 2.0, 200)
    c = Calibration.fit(z, (z > 0).astype(float))
    assert math.isfinite(c.scale) and c.scale > 1 and math.isfinite(c.bias)


def test_calibration_validation_names_the_value() -> None:
    with pytest.raises(ValueError, match="finite scale > 0"):
        Calibration(scale=0.0)
    with pytest.raises(ValueError, match="finite scale > 0"):
        Calibration(bias=float("nan"))
    with pytest.raises(ValueError, match=r"unknown keys \['temperature'\]"):
        Calibration.from_dict({"scale": 1.0, "bias": 0.0, "temperature": 2.0})
    assert Calibration().is_identity and not Calibration(bias=0.1).is_identity


def test_a_calibrated_model_scores_saves_loads_and_folds_its_calibration(
        model: CTRModel, frame: pd.DataFrame, tmp_path: Path) -> None:
    cal = Calibration(scale=0.5, bias=-1.0)
    calibrated = CTRModel(model.preprocessor, model.net, model.architecture, cal)
    np.testing.assert_allclose(calibrated.predict(frame), expit(0.5 * model.logits(frame) - 1.0), rtol=1e-12)
    np.testing.assert_allclose(model.predict(frame), expit(model.logits(frame)), rtol=1e-12)

    calibrated.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "ctr.json").read_text())
    assert config["calibration"] == {"scale": 0.5, "bias": -1.0}
    back = CTRModel.load(tmp_path / "m")
    assert back.calibration == cal
    np.testing.assert_array_equal(back.predict(frame), calibrated.predict(frame))

    # A format-1 directory (before calibrations) loads with the identity.
    del config["calibration"]
    (tmp_path / "m" / "ctr.json").write_text(json.dumps({**config, "format_version": 1}))
    assert CTRModel.load(tmp_path / "m").calibration.is_identity

    # Folded into the output layer, the net alone scores as the calibrated model does
    # (a fine-tune starts from what the champion served).
    net = CTRModel.build_net(model.preprocessor, model.architecture)
    net.load_state_dict(calibrated.calibrated_state_dict())
    np.testing.assert_allclose(CTRModel(model.preprocessor, net, model.architecture).predict(frame),
                               calibrated.predict(frame), rtol=1e-5)
