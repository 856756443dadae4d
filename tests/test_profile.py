"""Tests of monitor.stats.profile: counts, moments, layout, merging and JSON."""

from __future__ import annotations

import doctest
import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import monitor.stats.profile
from monitor.stats.profile import (
    FORMAT,
    CategoricalSummary,
    NumericSummary,
    Profile,
    ProfileSpec,
    RateSummary,
)

SPEC = ProfileSpec(numeric=("x", "y"), categorical=("c",), score="score", labels=("click",),
                   bins=8, score_bins=10, top_k=3)


def make_frame(rng: np.random.Generator, n: int) -> pd.DataFrame:
    x = rng.normal(10.0, 3.0, n)
    x[rng.random(n) < 0.05] = np.nan
    c = rng.choice(np.array(["a", "b", "c", "d", "e"], dtype=object), n,
                   p=[0.4, 0.3, 0.15, 0.1, 0.05])
    c[rng.random(n) < 0.02] = None
    click = (rng.random(n) < 0.1).astype(float)
    click[rng.random(n) < 0.3] = np.nan
    return pd.DataFrame({"x": x, "y": rng.integers(0, 5, n).astype(float), "c": c,
                         "score": rng.beta(2, 8, n), "click": click})


def assert_profiles_close(a: Profile, b: Profile) -> None:
    """Counts and layout exactly equal; moments and sums equal up to rounding."""
    da, db = a.to_dict(), b.to_dict()
    for d in (da, db):
        for s in [*d["numeric"].values(), d["score"]]:
            if s is not None:
                s["moments"] = (s.pop("mean"), s.pop("m2"), *s.pop("tail_sums"))
    ma = {n: s.pop("moments") for n, s in da["numeric"].items()}
    mb = {n: s.pop("moments") for n, s in db["numeric"].items()}
    sa, sb = da["score"].pop("moments"), db["score"].pop("moments")
    assert da == db
    for name in ma:
        assert ma[name] == pytest.approx(mb[name], rel=1e-9, abs=1e-6)
    assert sa == pytest.approx(sb, rel=1e-9, abs=1e-9)


def test_docstring_examples_run() -> None:
    result = doctest.testmod(monitor.stats.profile, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


# ------------------------------------------------------------------ numeric


def test_numeric_moments_agree_with_numpy() -> None:
    rng = np.random.default_rng(1)
    x = rng.lognormal(3.0, 1.0, 50_000)
    x[::7] = np.nan
    x[::11] = np.inf  # non-finite counts as missing, like NaN
    s = NumericSummary.from_values(x, edges=(10.0, 20.0, 40.0))
    v = x[np.isfinite(x)]
    assert s.count == v.size
    assert s.missing == x.size - v.size
    assert s.mean == pytest.approx(np.mean(v), rel=1e-12)
    assert s.variance == pytest.approx(np.var(v, ddof=1), rel=1e-10)
    assert s.std == pytest.approx(np.std(v, ddof=1), rel=1e-10)
    assert (s.min, s.max) == (v.min(), v.max())
    assert s.missing_rate == pytest.approx((x.size - v.size) / x.size)


def test_bins_are_right_closed_with_open_outer_bins() -> None:
    s = NumericSummary.from_values(np.array([-1e100, 1.0, 1.0000001, 2.0, 2.5, 1e100]),
                                   edges=(1.0, 2.0))
    # (-inf, 1] gets -1e100 and the value equal to the edge; (2, inf) the huge one.
    assert s.counts == (2, 2, 2)


def test_magnitudes_that_would_overflow_the_moments_count_as_missing() -> None:
    s = NumericSummary.from_values(np.array([1.0, 3.0, 1e300, -np.inf]), edges=(2.0,))
    assert (s.counts, s.missing, s.mean, s.variance) == ((1, 1), 2, 2.0, 2.0)


def test_quantile_edges_collapse_point_masses() -> None:
    flag = np.array([0.0] * 300 + [1.0] * 700)
    ref = Profile.fit({"flag": flag}, ProfileSpec(numeric=("flag",), categorical=()))
    s = ref.numeric["flag"]
    assert s.edges == (0.0, 1.0)
    assert s.counts == (300, 700, 0)


def test_reference_quantile_bins_hold_equal_mass() -> None:
    rng = np.random.default_rng(2)
    ref = Profile.fit({"x": rng.normal(size=100_000)}, ProfileSpec(bins=10))
    counts = np.array(ref.numeric["x"].counts)
    assert counts.size == 10
    assert np.all(np.abs(counts - 10_000) <= 1)


def test_all_missing_numeric_column_has_one_bin_and_no_moments() -> None:
    ref = Profile.fit({"x": np.full(5, np.nan)}, ProfileSpec(numeric=("x",)))
    s = ref.numeric["x"]
    assert (s.edges, s.counts, s.missing, s.min, s.max) == ((), (0,), 5, None, None)
    assert math.isnan(s.variance)


def test_nullable_pandas_dtypes_count_na_as_missing() -> None:
    df = pd.DataFrame({"x": pd.array([1.0, None, 3.0], dtype="Float64"),
                       "c": pd.array(["u", None, "v"], dtype="string")})
    ref = Profile.fit(df)
    assert ref.numeric["x"].missing == 1
    assert ref.categorical["c"].missing == 1


def test_dataframe_and_mapping_inputs_give_the_same_profile() -> None:
    df = make_frame(np.random.default_rng(3), 2_000)
    from_df = Profile.fit(df, SPEC)
    from_map = Profile.fit({c: df[c].to_numpy() for c in df.columns}, SPEC)
    assert from_df == from_map


def test_roles_are_inferred_from_dtypes() -> None:
    df = make_frame(np.random.default_rng(4), 100)
    df["flag"] = df["y"] > 2
    ref = Profile.fit(df, ProfileSpec(score="score", labels=("click",)))
    assert set(ref.numeric) == {"x", "y"}
    assert set(ref.categorical) == {"c", "flag"}


# -------------------------------------------------------------- categorical


def test_categorical_keeps_top_k_other_and_missing() -> None:
    values = np.array(["a"] * 5 + ["b"] * 3 + ["c"] * 3 + ["d"] + [None] * 2, dtype=object)
    s = CategoricalSummary.fit(values, top_k=2)
    # b and c tie on 3: the tie breaks on the string, so the layout is order-free.
    assert s.categories == ("a", "b")
    assert s.counts == (5, 3, 4)
    assert s.missing == 2
    assert s.known == frozenset("abcd")
    assert s.known_complete


def test_window_counts_unseen_categories_inside_other() -> None:
    ref = CategoricalSummary.fit(np.array(["a", "a", "b", "c"]), top_k=1)
    win = ref.summarise(np.array(["a", "b", "new", "new", "other-new", None], dtype=object))
    assert win.counts == (1, 4)
    assert win.unseen == 3
    assert win.missing == 1
    assert win.unseen_share == pytest.approx(3 / 5)


def test_known_set_beyond_max_known_is_marked_incomplete() -> None:
    values = np.array([f"v{i}" for i in range(50)] + ["v0"] * 10)
    s = CategoricalSummary.fit(values, top_k=5, max_known=10)
    assert len(s.known) == 10
    assert "v0" in s.known
    assert not s.known_complete


def test_categories_compare_as_strings() -> None:
    ref = CategoricalSummary.fit(np.array([True, False, True]), top_k=5)
    assert ref.categories == ("True", "False")
    assert ref.summarise(np.array(["True", "False"], dtype=object)).counts == (1, 1, 0)


# ------------------------------------------------------------- score, labels


def test_score_uses_fixed_equal_width_bins() -> None:
    ref = Profile.fit({"score": np.array([0.0, 0.05, 0.1, 0.51, 1.0])},
                      ProfileSpec(score="score", score_bins=10))
    assert ref.score is not None
    assert ref.score.edges == pytest.approx(tuple(np.linspace(0, 1, 11)[1:-1]))
    # Right-closed: 0.1 sits in the first bin (0, 0.1], 1.0 in the open last bin.
    assert ref.score.counts == (3, 0, 0, 0, 0, 1, 0, 0, 0, 1)


def test_label_rates_skip_unmatured_labels() -> None:
    ref = Profile.fit({"x": np.arange(4.0), "click": np.array([1.0, 0.0, np.nan, 1.0])},
                      ProfileSpec(labels=("click",)))
    assert ref.labels["click"] == RateSummary(positives=2, count=3)


def test_labels_other_than_zero_one_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"labels must be 0, 1 or NaN, got 2\.0"):
        RateSummary.from_values(np.array([0.0, 2.0]))


# ------------------------------------------------------------------ windows


def test_window_summary_uses_the_reference_layout() -> None:
    rng = np.random.default_rng(5)
    ref = Profile.fit(make_frame(rng, 5_000), SPEC)
    win = ref.summarise(make_frame(rng, 700))
    assert win.rows == 700
    assert win.numeric["x"].edges == ref.numeric["x"].edges
    assert win.categorical["c"].categories == ref.categorical["c"].categories
    assert sum(win.numeric["x"].counts) + win.numeric["x"].missing == 700


def test_column_absent_from_window_counts_as_missing() -> None:
    rng = np.random.default_rng(6)
    ref = Profile.fit(make_frame(rng, 1_000), SPEC)
    win = ref.summarise(make_frame(rng, 100).drop(columns=["x", "c", "click"]))
    assert win.numeric["x"].missing == 100
    assert win.categorical["c"].missing == 100
    assert win.labels["click"] == RateSummary()


def test_summarise_is_vectorised_for_a_million_rows() -> None:
    rng = np.random.default_rng(7)
    ref = Profile.fit(make_frame(rng, 10_000), SPEC)
    win = ref.summarise(make_frame(rng, 1_000_000))
    assert win.rows == 1_000_000


# ------------------------------------------------------------------ merging

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
maybe_missing = st.one_of(finite, st.just(math.nan))
category = st.one_of(st.sampled_from(["a", "b", "c", "zz"]), st.none())


@st.composite
def frames(draw: st.DrawFn, min_size: int = 0) -> pd.DataFrame:
    n = draw(st.integers(min_value=min_size, max_value=60))
    return pd.DataFrame({
        "x": draw(st.lists(maybe_missing, min_size=n, max_size=n)),
        "y": draw(st.lists(finite, min_size=n, max_size=n)),
        "c": pd.Series(draw(st.lists(category, min_size=n, max_size=n)), dtype=object),
        "score": draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n)),
        "click": draw(st.lists(st.sampled_from([0.0, 1.0, math.nan]), min_size=n, max_size=n)),
    })


REF = Profile.fit(make_frame(np.random.default_rng(8), 3_000), SPEC)


@settings(max_examples=60, deadline=None)
@given(frames(), st.data())
def test_merge_equals_profiling_the_concatenation(df: pd.DataFrame, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(df)), max_size=4)))
    parts = [df.iloc[a:b] for a, b in zip([0, *cuts], [*cuts, len(df)], strict=True)]
    merged = REF.empty()
    for part in parts:
        merged = merged + REF.summarise(part)
    assert_profiles_close(merged, REF.summarise(df))


@settings(max_examples=40, deadline=None)
@given(frames(), frames(), frames())
def test_merge_is_associative(a: pd.DataFrame, b: pd.DataFrame, c: pd.DataFrame) -> None:
    pa, pb, pc = (REF.summarise(d) for d in (a, b, c))
    assert_profiles_close((pa + pb) + pc, pa + (pb + pc))


@settings(max_examples=30, deadline=None)
@given(frames())
def test_empty_profile_is_the_identity_of_merge(df: pd.DataFrame) -> None:
    p = REF.summarise(df)
    assert p + REF.empty() == p
    assert REF.empty() + p == p


def test_merged_moments_stay_accurate_for_large_offsets() -> None:
    rng = np.random.default_rng(9)
    x = 1e9 + rng.normal(size=20_000)
    parts = np.array_split(x, 37)
    merged = NumericSummary.from_values(parts[0], ())
    for p in parts[1:]:
        merged = merged + NumericSummary.from_values(p, ())
    assert merged.variance == pytest.approx(np.var(x, ddof=1), rel=1e-6)


def test_merge_refuses_different_layouts() -> None:
    a = NumericSummary.from_values(np.array([1.0]), (0.0,))
    b = NumericSummary.from_values(np.array([1.0]), (0.5,))
    with pytest.raises(ValueError, match="edges"):
        _ = a + b
    rng = np.random.default_rng(10)
    other = Profile.fit(make_frame(rng, 500), SPEC)
    with pytest.raises(ValueError, match="feature 'x'"):
        _ = REF + other


# --------------------------------------------------------------------- JSON


@settings(max_examples=40, deadline=None)
@given(frames(min_size=1))
def test_json_round_trip_is_exact(df: pd.DataFrame) -> None:
    ref = Profile.fit(df, SPEC)
    text = ref.to_json()
    assert json.loads(text)["format"] == FORMAT
    assert Profile.from_json(text) == ref
    win = ref.summarise(df.iloc[::2])
    assert Profile.from_json(win.to_json()) == win


def test_json_is_strict_without_nan() -> None:
    ref = Profile.fit({"x": np.full(3, np.nan)}, ProfileSpec(numeric=("x",)))
    assert "NaN" not in ref.to_json()


def test_unknown_format_is_refused() -> None:
    d = REF.to_dict()
    d["format"] = "driftloop.profile/v2"
    with pytest.raises(ValueError, match=r"unsupported profile format 'driftloop\.profile/v2'"):
        Profile.from_dict(d)


# --------------------------------------------------------------- validation


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"bins": 1}, "bins must be >= 2, got 1"),
    ({"score_bins": 0}, "score_bins must be >= 2, got 0"),
    ({"top_k": 0}, "top_k must be >= 1, got 0"),
    ({"top_k": 10, "max_known": 5}, "max_known 5 is smaller than top_k 10"),
    ({"numeric": ("a",), "categorical": ("a",)}, r"more than one role: \['a'\]"),
])
def test_spec_rejects_bad_values_naming_them(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProfileSpec(**kwargs)  # type: ignore[arg-type]


def test_summaries_reject_inconsistent_counts() -> None:
    with pytest.raises(ValueError, match="3 counts for 1 edges"):
        NumericSummary((0.0,), (1, 2, 3))
    with pytest.raises(ValueError, match="strictly increasing"):
        NumericSummary((1.0, 1.0), (0, 0, 0))
    with pytest.raises(ValueError, match="unseen 2 exceeds the 'other' count 1"):
        CategoricalSummary(("a",), (0, 1), unseen=2, known=frozenset({"a"}))


def test_fit_names_absent_and_non_numeric_columns() -> None:
    with pytest.raises(ValueError, match=r"columns \['nope'\] are not in the reference"):
        Profile.fit({"x": np.ones(3)}, ProfileSpec(numeric=("nope",)))
    with pytest.raises(ValueError, match="column 'c' is not numeric"):
        Profile.fit({"c": np.array(["a", "b"], dtype=object)}, ProfileSpec(numeric=("c",)))
