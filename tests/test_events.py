"""The event contract: every valid event decodes to the right columns, every bad one
to its reason, and no input of any shape raises."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors import events as events_module
from connectors.events import (
    MAX_DEPTH,
    EventKind,
    Feedback,
    Prediction,
    Reason,
    decode_batch,
)
from connectors.schemas import json_schema
from tests.events_gen import BASE_TS_MS, bad_predictions, encode, feedback, prediction
from tests.fuzz_corpus import STORED, Draft, drafts, render_all, verdict

MAX = 4096
DOCS = Path(__file__).resolve().parents[1] / "docs" / "schemas"


@pytest.mark.parametrize(("raw", "reason"), bad_predictions(MAX), ids=lambda x: str(x)[:30])
def test_each_bad_prediction_is_rejected_with_its_reason(raw: bytes, reason: str) -> None:
    good = encode(prediction(1, BASE_TS_MS))
    batch = decode_batch(EventKind.PREDICTION, [good, raw, good], max_bytes=MAX)
    assert [f.index for f in batch.failures] == [1]
    assert batch.failures[0].reason == Reason(reason)
    assert batch.failures[0].detail
    assert batch.index.tolist() == [0, 2]
    assert batch.table.num_rows == 2


def test_valid_prediction_becomes_typed_columns() -> None:
    event = prediction(7, BASE_TS_MS + 1234)
    batch = decode_batch(EventKind.PREDICTION, [encode(event)], max_bytes=MAX)
    row = batch.table.to_pylist()[0]
    assert row["prediction_id"] == "p-7"
    assert int(batch.ts_ms[0]) == BASE_TS_MS + 1234
    assert row["score"] == event["score"]
    assert row["rank"] == event["rank"]
    assert row["f.age"] == float(event["features"]["age"])
    assert row["f.country"] == event["features"]["country"]
    assert row["f.is_new"] == float(event["features"]["is_new"])
    assert batch.table.schema.field("ts").type.tz == "UTC"


def test_rfc3339_and_epoch_ms_give_the_same_event_time() -> None:
    a = prediction(1, BASE_TS_MS + 500)
    b = {**a, "ts": "2026-01-01T01:00:00.500+01:00"}
    batch = decode_batch(EventKind.PREDICTION, [encode(a), encode(b)], max_bytes=MAX)
    assert batch.ts_ms.tolist() == [BASE_TS_MS + 500, BASE_TS_MS + 500]


def test_naive_rfc3339_time_is_rejected_not_guessed() -> None:
    event = {**prediction(1, 0), "ts": "2026-01-01T00:00:00"}
    batch = decode_batch(EventKind.PREDICTION, [encode(event)], max_bytes=MAX)
    assert batch.failures[0].reason is Reason.SCHEMA_VIOLATION
    assert "timezone" in batch.failures[0].detail


def test_unknown_fields_are_accepted() -> None:
    event = {**prediction(1, BASE_TS_MS), "experiment": {"arm": "b"}, "extra": [1, 2]}
    batch = decode_batch(EventKind.PREDICTION, [encode(event)], max_bytes=MAX)
    assert batch.table.num_rows == 1 and not batch.failures


def test_integer_ids_are_stored_as_strings() -> None:
    event = {**prediction(1, BASE_TS_MS), "user_id": 42, "item_id": 7, "model_version": 3}
    row = decode_batch(EventKind.PREDICTION, [encode(event)], max_bytes=MAX).table.to_pylist()[0]
    assert (row["user_id"], row["item_id"], row["model_version"]) == ("42", "7", "3")


def test_feature_mixing_numbers_and_strings_keeps_every_value_as_text() -> None:
    a = {**prediction(1, BASE_TS_MS), "features": {"zip": 10115}}
    b = {**prediction(2, BASE_TS_MS), "features": {"zip": "SW1A"}}
    c = {**prediction(3, BASE_TS_MS), "features": {"zip": None, "flag": True}}
    table = decode_batch(EventKind.PREDICTION, [encode(x) for x in (a, b, c)], max_bytes=MAX).table
    assert table.column("f.zip").to_pylist() == ["10115", "SW1A", None]
    assert table.column("f.flag").to_pylist() == [None, None, 1.0]


def test_feedback_decodes_and_rejects() -> None:
    good = encode(feedback(1, BASE_TS_MS, "like"))
    bad_type = encode({**feedback(2, BASE_TS_MS), "type": ""})
    wrong_schema = encode({**feedback(3, BASE_TS_MS), "schema": "prediction/v1"})
    inf_value = encode({**feedback(4, BASE_TS_MS), "value": 1}).replace(b'"value":1', b'"value":1e999')
    batch = decode_batch(EventKind.FEEDBACK, [good, bad_type, wrong_schema, inf_value], max_bytes=MAX)
    assert batch.table.to_pylist()[0]["type"] == "like"
    assert [(f.index, f.reason) for f in batch.failures] == [
        (1, Reason.SCHEMA_VIOLATION), (2, Reason.UNKNOWN_SCHEMA), (3, Reason.NON_FINITE)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=200),
    st.builds(lambda i, s: encode({**prediction(i, BASE_TS_MS), "score": s}),
              st.integers(0, 10**6), st.floats(allow_nan=False, allow_infinity=False)),
    st.builds(lambda d: json.dumps(d).encode(),
              st.dictionaries(st.text(max_size=12), st.none() | st.integers() | st.text())),
), max_size=30))
def test_any_input_is_either_a_row_or_a_failure_and_never_raises(values: list[bytes]) -> None:
    batch = decode_batch(EventKind.PREDICTION, values, max_bytes=MAX)
    failed = [f.index for f in batch.failures]
    assert sorted(failed + batch.index.tolist()) == list(range(len(values)))
    assert batch.table.num_rows == len(batch.index) == len(batch.ts_ms)
    assert all(0.0 <= s <= 1.0 for s in batch.table.column("score").to_pylist()) if len(batch.index) else True


@pytest.mark.parametrize(("struct", "name"), [(Prediction, "prediction-v1"), (Feedback, "feedback-v1")])
def test_published_json_schema_matches_the_structs(struct: type, name: str) -> None:
    published = json.loads((DOCS / f"{name}.schema.json").read_text())
    assert published == json_schema(struct), (
        f"docs/schemas/{name}.schema.json is stale: run `python -m connectors.schemas`")


_FEATURE_VALUES = (st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1)
                   | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5))
_FEATURE_NAMES = st.sampled_from(["age", "price", "f0", "f.x", "a b", "", "score", "\u00e9"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(_FEATURE_NAMES, _FEATURE_VALUES, max_size=5), min_size=1,
                max_size=25),
       st.booleans())
def test_feature_struct_decoding_gives_the_generic_decoders_columns(
        features: list[dict], duplicate_key: bool) -> None:
    # Later events may lack keys of the first, add unknown ones, or change types.
    values = [encode({**prediction(i, BASE_TS_MS), "features": f}) for i, f in enumerate(features)]
    if duplicate_key and features[0]:
        name = json.dumps(next(iter(features[0])))
        values[0] = values[0].replace(b'"features":{', b'"features":{%s:"dup",' % name.encode(), 1)
    fast = decode_batch(EventKind.PREDICTION, values, max_bytes=MAX)
    with mock.patch.object(events_module, "_feature_decoder", lambda *a, **kw: None):
        generic = decode_batch(EventKind.PREDICTION, values, max_bytes=MAX)
    assert fast.table.equals(generic.table)
    assert fast.table.schema.equals(generic.table.schema)
    assert fast.index.tolist() == generic.index.tolist()
    assert fast.failures == generic.failures


def test_feature_struct_decoder_is_used_for_uniform_batches() -> None:
    values = [encode(prediction(i, BASE_TS_MS)) for i in range(20)]
    assert events_module._feature_decoder(events_module._DECODERS[EventKind.PREDICTION].decode,
                                          values) is not None
    with mock.patch.object(events_module, "_feature_decoder", lambda *a, **kw: None):
        generic = decode_batch(EventKind.PREDICTION, values, max_bytes=MAX)
    assert decode_batch(EventKind.PREDICTION, values, max_bytes=MAX).table.equals(generic.table)


def _nested(event: bytes, depth: int) -> bytes:
    """``event`` with an unknown field that makes the message ``depth`` levels deep."""
    return event[:-1] + b',"extra":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


@pytest.mark.parametrize("depth", [MAX_DEPTH, MAX_DEPTH + 1, 200])
@pytest.mark.parametrize("kind", list(EventKind))
def test_nesting_gets_the_same_verdict_in_a_clean_batch_and_beside_a_bad_record(
        kind: EventKind, depth: int) -> None:
    # A clean batch used to skip the depth check (msgspec skips unknown fields to any
    # depth up to ~1,000): nested 33-200 levels, the record was stored there and
    # rejected as too_deep beside a bad record.
    make = prediction if kind is EventKind.PREDICTION else feedback
    deep, good = _nested(encode(make(1, BASE_TS_MS)), depth), encode(make(2, BASE_TS_MS))
    for values in ([deep], [good, deep, good], [good, deep, b"{"]):
        batch = decode_batch(kind, values, max_bytes=MAX)
        reasons = {f.index: f.reason for f in batch.failures}
        if depth <= MAX_DEPTH:
            assert 1 % len(values) in batch.index.tolist()
        else:
            assert reasons[1 % len(values)] is Reason.TOO_DEEP


@pytest.mark.parametrize("neighbour", [None, 5, "text", 2**64])
@pytest.mark.parametrize("sign", [b"", b"-"])
def test_integer_feature_beyond_float64_is_non_finite_whatever_its_column(
        neighbour: object, sign: bytes) -> None:
    # 1 with 400 zeros is valid JSON; float() of it raised OverflowError, which made
    # the record an internal_error (a driftloop bug), unlike 1e400 (non_finite).
    big = sign + b"1" + b"0" * 400
    huge = encode(prediction(1, BASE_TS_MS)).replace(b'"age":', b'"big":' + big + b',"age":')
    other = {**prediction(2, BASE_TS_MS), "features": {"big": neighbour}}
    others = [] if neighbour is None else [encode(other)]
    batch = decode_batch(EventKind.PREDICTION, [huge, *others], max_bytes=MAX)
    assert [(f.index, f.reason) for f in batch.failures] == [(0, Reason.NON_FINITE)]
    assert batch.index.tolist() == list(range(1, 1 + len(others)))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(list(EventKind)).flatmap(lambda k: st.lists(drafts(k), min_size=1, max_size=12)))
def test_a_hostile_records_verdict_does_not_depend_on_its_batch(shapes: list[Draft]) -> None:
    records = render_all(shapes, "b", BASE_TS_MS)
    batch = decode_batch(records[0].kind, [r.value for r in records], max_bytes=MAX)
    got = dict.fromkeys(batch.index.tolist(), STORED) | {f.index: f.reason.value for f in batch.failures}
    assert [got[i] for i in range(len(records))] == [verdict(r, MAX) for r in records]
    assert "internal_error" not in got.values()


def test_a_batch_with_fields_the_contract_does_not_name_decodes_as_the_generic_decoder_does() -> None:
    """Producers may add fields before the contract names them: such a batch takes the
    features Struct that skips them (not the dict path, which costs about 65% more) and
    gives the generic decoder's columns."""
    values = [encode({**prediction(i, BASE_TS_MS + i), "context": {"page": "home", "slot": i}})
              for i in range(50)]
    fast = decode_batch(EventKind.PREDICTION, values, max_bytes=MAX)
    with mock.patch.object(events_module, "_feature_decoder", lambda *a, **kw: None):
        generic = decode_batch(EventKind.PREDICTION, values, max_bytes=MAX)
    assert fast.table.num_rows == 50 and not fast.failures
    assert fast.table.equals(generic.table)
    assert (frozenset(json.loads(values[0])["features"]), False) in events_module._FEATURE_DECODERS
