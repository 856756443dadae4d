"""The prediction <- feedback join: attribution boundaries, types, dedupe, unmatched feedback."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from monitor.join import FeedbackIndex, JoinSpec, dedupe_predictions, matured_upto

MIN = 60_000
SPEC = JoinSpec(attribution_ms=2 * MIN, label_types=("click", "like"), window_ms=MIN)


def _fb(rows: list[tuple[str, str, int]]) -> pa.Table:
    return pa.table({"prediction_id": pa.array([r[0] for r in rows], pa.string()),
                     "type": pa.array([r[1] for r in rows], pa.string()),
                     "ts": pa.array([r[2] for r in rows], pa.int64())})


def _index(feedback: list[tuple[str, str, int]], windows: range) -> FeedbackIndex:
    idx = FeedbackIndex(SPEC)
    for start in windows:
        idx.add(start, _fb([r for r in feedback if start <= r[2] < start + MIN]))
    return idx


def test_label_only_inside_the_attribution_window() -> None:
    preds = pa.table({"prediction_id": ["a", "b", "c", "d", "e"],
                      "ts": [10_000, 10_000, 10_000, 10_000, 50_000]})
    feedback = [
        ("a", "click", 10_000),  # at the prediction time: counts
        ("b", "click", 10_000 + 2 * MIN),  # exactly at the end of attribution: counts
        ("c", "click", 10_001 + 2 * MIN),  # one ms too late
        ("d", "click", 9_999),  # before the prediction (clock skew): does not count
        ("e", "like", 50_000 + MIN),
        ("zz", "click", 20_000),  # unknown prediction
        ("a", "skip", 11_000),  # not a label type
    ]
    idx = _index(feedback, SPEC.feedback_windows(0))
    joined = idx.join(0, preds)
    assert joined.labels["click"].tolist() == [True, True, False, False, False]
    assert joined.labels["like"].tolist() == [False, False, False, False, True]
    idx.evict_before(10 * MIN)
    # c's click, d's click and zz's click matched nothing; the skip is not a label type.
    assert idx.unmatched == {"click": 3, "like": 0}
    assert idx.windows == []


def test_duplicate_feedback_is_one_label_and_feedback_can_serve_two_windows() -> None:
    idx = _index([("a", "click", 70_000), ("a", "click", 71_000), ("b", "click", 130_000)],
                 range(0, 5 * MIN, MIN))
    w0 = idx.join(0, pa.table({"prediction_id": ["a"], "ts": [59_000]}))
    w1 = idx.join(MIN, pa.table({"prediction_id": ["b", "x"], "ts": [61_000, 62_000]}))
    assert w0.labels["click"].tolist() == [True]
    assert w1.labels["click"].tolist() == [True, False]
    idx.evict_before(5 * MIN)
    assert idx.unmatched["click"] == 0


def test_feedback_sent_twice_by_its_producer_counts_once_as_unmatched() -> None:
    """Predictions are deduplicated; feedback duplicates used to count twice in
    driftloop_feedback_unmatched_total."""
    idx = FeedbackIndex(SPEC)
    dropped = idx.add(0, _fb([("zz", "click", 5_000), ("zz", "click", 5_000), ("zz", "like", 5_000),
                              ("a", "click", 6_000), ("a", "click", 6_000)]))
    assert dropped == 2
    for start in range(MIN, 4 * MIN, MIN):
        idx.add(start, _fb([]))
    joined = idx.join(0, pa.table({"prediction_id": ["a"], "ts": [1_000]}))
    assert joined.labels["click"].tolist() == [True]
    idx.evict_before(10 * MIN)
    assert idx.unmatched == {"click": 1, "like": 1}


def test_join_refuses_when_feedback_windows_are_missing() -> None:
    idx = _index([], range(0, 2 * MIN, MIN))
    with pytest.raises(KeyError, match="not indexed"):
        idx.join(0, pa.table({"prediction_id": ["a"], "ts": [1]}))


def test_windows_loaded_after_restart_do_not_count_unmatched() -> None:
    idx = FeedbackIndex(SPEC)
    idx.add(0, _fb([("q", "click", 5)]), count_unmatched=False)
    idx.evict_before(MIN)
    assert idx.unmatched["click"] == 0


def test_maturity_needs_the_feedback_watermark_past_attribution() -> None:
    assert not SPEC.matured(0, None)
    assert not SPEC.matured(0, 3 * MIN - 1)
    assert SPEC.matured(0, 3 * MIN)
    assert matured_upto(SPEC, 3 * MIN) == MIN
    assert matured_upto(SPEC, None) is None
    assert list(SPEC.feedback_windows(MIN)) == [MIN, 2 * MIN, 3 * MIN]


def test_dedupe_keeps_the_first_of_each_prediction_id() -> None:
    t = pa.table({"prediction_id": ["a", "b", "a", "c", "b"], "score": [0.1, 0.2, 0.3, 0.4, 0.5]})
    out, dropped = dedupe_predictions(t)
    assert dropped == 2
    assert out.column("prediction_id").to_pylist() == ["a", "b", "c"]
    assert out.column("score").to_pylist() == [0.1, 0.2, 0.4]


def test_join_at_scale_matches_a_python_reference() -> None:
    rng = np.random.default_rng(7)
    n = 20_000
    ids = np.array([f"p{i}" for i in range(n)])
    pts = rng.integers(0, MIN, n)
    clicked = rng.random(n) < 0.1
    delay = rng.integers(0, 3 * MIN, n)  # some beyond attribution
    fb = [(ids[i], "click", int(pts[i] + delay[i])) for i in np.flatnonzero(clicked)]
    idx = _index(fb, range(0, 4 * MIN, MIN))
    joined = idx.join(0, pa.table({"prediction_id": ids, "ts": pts}))
    expected = clicked & (delay <= 2 * MIN)
    assert np.array_equal(joined.labels["click"], expected)
    # Feedback beyond attribution falls in windows up to 4 minutes; the index only
    # holds what could match, so the unmatched count covers windows 0..3 only.
    idx.evict_before(4 * MIN)
    late = clicked & (delay > 2 * MIN) & (pts + delay < 4 * MIN)
    assert idx.unmatched["click"] == int(late.sum())
