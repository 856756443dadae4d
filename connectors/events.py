"""The event contract (prediction/v1, feedback/v1): typed decoding straight into columns.

Decoding is the hottest code in driftloop after the Kafka client itself, so it is
shaped around two facts measured on the target machine (docs/design-notes.md):
msgspec decoding into typed Structs runs at ~300k events/s where a dict-then-validate
path runs at a fraction of that, and building numpy/Arrow columns once per batch beats
any per-row container. So: one reusable typed decoder per event kind, a fast loop that
only appends, and every check that can be vectorised done on the finished columns.

A bad message never raises out of here: it becomes a `DecodeFailure` carrying a
reason code from `Reason`, which the daemon sends to the dead-letter topic and counts.
That holds for hostile input too (docs/delivery.md): nesting is bounded before any
recursive step looks at a message, numbers too large for the columns are rejected by
type, and should anything still raise, the batch is decoded again one record at a
time so that only the record that raised is rejected, as an ``internal_error``.
The JSON Schema published in docs/schemas/ mirrors the Structs below; a test keeps
them in step.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import operator
import re
from collections.abc import Callable, Sequence
from typing import Annotated, Literal

import msgspec
import numpy as np
import pyarrow as pa

__all__ = [
    "FEATURE_PREFIX",
    "DecodeFailure",
    "DecodedBatch",
    "EventKind",
    "Feedback",
    "Prediction",
    "Reason",
    "decode_batch",
]

#: Feature columns are stored as ``f.<name>`` so that a feature called ``score`` or
#: ``ts`` can never collide with a contract field.
FEATURE_PREFIX = "f."

# Event times outside this range are almost always a unit bug upstream (seconds sent as
# milliseconds lands in 1970, microseconds lands in the year 50000); accepting them
# would put every event into a window that closed long ago.
MIN_TS_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
MAX_TS_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z


class EventKind(enum.StrEnum):
    PREDICTION = "prediction"
    FEEDBACK = "feedback"


class Reason(enum.StrEnum):
    """Why a message went to the dead-letter topic (the ``reason`` header and metric label)."""

    MALFORMED_JSON = "malformed_json"
    INVALID_UTF8 = "invalid_utf8"
    SCHEMA_VIOLATION = "schema_violation"  # missing or mistyped field
    UNKNOWN_SCHEMA = "unknown_schema"
    SCORE_OUT_OF_RANGE = "score_out_of_range"
    NON_FINITE = "non_finite"
    TS_OUT_OF_RANGE = "ts_out_of_range"
    OVERSIZED = "oversized"
    EMPTY = "empty"
    TOO_DEEP = "too_deep"  # nested deeper than MAX_DEPTH
    #: Decoding or windowing raised on this record: a driftloop bug, never the
    #: producer's. The detail names the exception type only (its message may quote
    #: payload bytes).
    INTERNAL_ERROR = "internal_error"
    LATE = "late"  # assigned by the windowing layer, not by decoding
    #: The record was rejected for another reason, but its copy does not fit the
    #: dead-letter topic: a reference to it (where it is, its size, its first KiB)
    #: went there instead (connectors/kafka.py).
    TOO_LARGE_FOR_DEAD_LETTER = "too_large_for_dead_letter"


#: Deepest nesting of arrays and objects a message may have. The contract's deepest
#: field is a feature value inside ``features`` (depth 2); the bound is generous, and it
#: keeps every recursive decoder far from the interpreter's recursion limit.
MAX_DEPTH = 32


NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
#: Integers the int64 columns can hold; a larger literal is a schema violation, not a crash.
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
Score = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
AwareDatetime = Annotated[dt.datetime, msgspec.Meta(tz=True)]
# Epoch milliseconds (int, or float from producers that only have doubles) or RFC 3339
# with an explicit offset: a naive time is ambiguous, so it is rejected, not guessed.
Timestamp = Int64 | float | AwareDatetime
FeatureValue = int | float | str | bool | None


class Prediction(msgspec.Struct, frozen=True, gc=False):
    """prediction/v1: one scored item served to one user.

    Unknown fields are accepted and ignored, so producers may add fields before the
    contract names them.
    """

    schema: Literal["prediction/v1"]
    prediction_id: NonEmptyStr
    ts: Timestamp
    model: NonEmptyStr
    model_version: str | int
    user_id: str | int
    item_id: str | int
    score: Score
    features: dict[str, FeatureValue]
    rank: Int64 | None = None
    request_id: str | None = None


class Feedback(msgspec.Struct, frozen=True, gc=False):
    """feedback/v1: one user action on a served prediction (click, like, ...)."""

    schema: Literal["feedback/v1"]
    prediction_id: NonEmptyStr
    ts: Timestamp
    type: NonEmptyStr
    value: float | None = None
    feedback_id: str | None = None


class DecodeFailure(msgspec.Struct, frozen=True):
    """A message that did not decode: its position in the batch and why."""

    index: int
    reason: Reason
    detail: str


class DecodedBatch(msgspec.Struct, frozen=True):
    """The valid events of a batch as Arrow columns, plus the failures.

    Attributes:
        table: one row per valid event, contract fields plus ``f.<name>`` feature
            columns; ``ts`` is ``timestamp[ms, UTC]``.
        ts_ms: the same event times as int64 epoch ms, for window arithmetic.
        index: for each row of ``table``, its position in the input batch (so the
            caller can map rows back to offsets).
        failures: one entry per rejected message.
    """

    table: pa.Table
    ts_ms: np.ndarray
    index: np.ndarray
    failures: list[DecodeFailure]


_DECODERS: dict[EventKind, msgspec.json.Decoder[Prediction] | msgspec.json.Decoder[Feedback]] = {
    EventKind.PREDICTION: msgspec.json.Decoder(Prediction),
    EventKind.FEEDBACK: msgspec.json.Decoder(Feedback),
}
_SCHEMA_TAG = {EventKind.PREDICTION: "prediction/v1", EventKind.FEEDBACK: "feedback/v1"}


def decode_batch(
    kind: EventKind, values: Sequence[bytes | None], *, max_bytes: int
) -> DecodedBatch:
    """Decode a batch of raw Kafka values of one event kind into columns.

    Never raises on any input: a record that makes decoding raise (a bug, since every
    reason a producer can cause has its code) is found by decoding the batch again one
    record at a time, and only it is rejected, as ``internal_error``.

    Args:
        kind: which contract the topic carries.
        values: raw message values, in offset order.
        max_bytes: messages longer than this are rejected before parsing, so one huge
            message cannot stall the consumer or blow its memory.
    """
    try:
        return _decode_batch(kind, values, max_bytes)
    except Exception:
        return _decode_isolated(kind, values, max_bytes)


def _decode_isolated(kind: EventKind, values: Sequence[bytes | None], max_bytes: int) -> DecodedBatch:
    """The batch without the records that make decoding raise (the slow way, bugs only)."""
    poison: dict[int, str] = {}
    for i, value in enumerate(values):
        try:
            _decode_batch(kind, [value], max_bytes)
        except Exception as exc:
            poison[i] = type(exc).__name__
    keep = [i for i in range(len(values)) if i not in poison]
    try:
        good = _decode_batch(kind, [values[i] for i in keep], max_bytes)
    except Exception as exc:  # records fine alone but not together: reject them all
        poison.update(dict.fromkeys(keep, type(exc).__name__))
        keep = []
        good = _decode_batch(kind, [], max_bytes)
    index = np.asarray(keep, dtype=np.int64)[good.index] if keep else good.index
    failures = [DecodeFailure(keep[f.index], f.reason, f.detail) for f in good.failures]
    failures += [DecodeFailure(i, Reason.INTERNAL_ERROR, f"{name} while decoding (a driftloop bug)")
                 for i, name in poison.items()]
    failures.sort(key=lambda f: f.index)
    return DecodedBatch(table=good.table, ts_ms=good.ts_ms, index=index, failures=failures)


def _decode_batch(kind: EventKind, values: Sequence[bytes | None], max_bytes: int) -> DecodedBatch:
    decode = _DECODERS[kind].decode
    failures: list[DecodeFailure] = []
    events: list[Prediction] | list[Feedback]
    # Fast path: every message non-empty, within the size limit and valid, decoded
    # by a list comprehension (no per-message bookkeeping). Any exception sends the
    # whole batch through the careful loop below, which classifies each failure.
    # Both kinds first try a decoder that refuses unknown fields (for predictions its
    # features are a Struct learned from the batch's first event, `_feature_decoder`);
    # any event it refuses sends the batch to the generic decoder, so it changes speed,
    # never results.
    feature_names: tuple[str, ...] | None = None
    try:
        if not values or (all(values) and max(map(len, values)) <= max_bytes):  # type: ignore[arg-type]
            index: list[int] | range = range(len(values))
            events, feature_names = _decode_fast(kind, decode, values)  # type: ignore[arg-type]
        else:
            raise _SlowPath
    except (_SlowPath, msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError,
            RecursionError):
        # RecursionError: msgspec's own guard on a deeply nested message (it skips
        # unknown fields recursively); the careful loop bounds depth before decoding.
        events, index, failures = _decode_carefully(kind, values, max_bytes)

    ts_ms = _ts_to_ms(events)
    idx = np.arange(len(values), dtype=np.int64) if isinstance(index, range) else np.asarray(
        index, dtype=np.int64)
    # Vectorised checks on the finished columns; rows that fail are removed.
    bad_ts = (ts_ms < MIN_TS_MS) | (ts_ms >= MAX_TS_MS)
    if kind is EventKind.PREDICTION:
        table, bad_features = _prediction_table(events, ts_ms, feature_names)  # type: ignore[arg-type]
    else:
        table, bad_features = _feedback_table(events, ts_ms)  # type: ignore[arg-type]
    bad = bad_ts | bad_features
    if bad.any():
        for row in np.flatnonzero(bad):
            if bad_ts[row]:
                shown = "beyond int64" if ts_ms[row] == _TS_UNREPRESENTABLE else f"{int(ts_ms[row])} ms"
                detail = f"ts {shown} is outside [{MIN_TS_MS}, {MAX_TS_MS}) ms"
                failures.append(DecodeFailure(int(idx[row]), Reason.TS_OUT_OF_RANGE, detail))
            else:
                detail = "a number is NaN or infinite"
                failures.append(DecodeFailure(int(idx[row]), Reason.NON_FINITE, detail))
        keep = ~bad
        table = table.filter(pa.array(keep))
        ts_ms = ts_ms[keep]
        idx = idx[keep]
    failures.sort(key=lambda f: f.index)
    return DecodedBatch(table=table, ts_ms=ts_ms, index=idx, failures=failures)


class _SlowPath(Exception):
    pass


_FAST_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError)


def _decode_fast(
    kind: EventKind, decode: Callable[[bytes], Prediction | Feedback], values: Sequence[bytes]
) -> tuple[list[Prediction] | list[Feedback], tuple[str, ...] | None]:
    """Every event of the batch and its feature names (None: features are dicts), or raise.

    What a decoder refusing unknown fields accepts nests two levels at most (an object
    in an object), so only a batch with unknown fields pays for the depth check; that
    check keeps a message nested too deep rejected whatever batch it is in.
    """
    strict = _feature_decoder(decode, values) if kind is EventKind.PREDICTION else _STRICT_FEEDBACK
    if strict is not None and values:
        try:
            return [strict[0](v) for v in values], strict[1]  # type: ignore[misc]
        except _FAST_ERRORS:
            pass
    if not _shallow(values):
        raise _SlowPath
    # Unknown fields (producers may add them before the contract names them): shallow,
    # so the features Struct may skip them; it refuses nothing the generic one accepts.
    lenient = _feature_decoder(decode, values, strict=False) if kind is EventKind.PREDICTION else None
    if lenient is not None:
        try:
            return [lenient[0](v) for v in values], lenient[1]  # type: ignore[misc]
        except _FAST_ERRORS:
            pass
    return [decode(v) for v in values], None  # type: ignore[return-value]


def _shallow(values: Sequence[bytes]) -> bool:
    """Whether no message nests deeper than MAX_DEPTH: the fast path's guard.

    msgspec skips unknown fields to any depth its own stack allows, so without it a
    message nested 33 to ~1,000 levels deep in an unknown field was stored when its
    batch was clean and rejected as ``too_deep`` when the batch took the careful path.
    The openers of the whole batch are found in one vectorised pass (per-message
    ``bytes.count`` cost twice as much); only a message with more of them than the
    bound is looked at closely.
    """
    data = np.frombuffer(b"".join(values), dtype=np.uint8)
    opens = np.flatnonzero((data | 0x20) == 0x7B)  # b"[" is 0x5B, b"{" is 0x7B
    if len(opens) <= MAX_DEPTH:
        return True
    ends = np.cumsum(np.fromiter(map(len, values), np.int64, len(values)))
    per_message = np.diff(np.searchsorted(opens, ends), prepend=0)
    return not any(too_deep(values[i], MAX_DEPTH) for i in np.flatnonzero(per_message > MAX_DEPTH))


def _strict(struct: type[msgspec.Struct], name: str, *, forbid: bool = True,
            **types: object) -> type[msgspec.Struct]:
    """``struct`` refusing unknown fields (unless not ``forbid``), with the field types in
    ``types`` replaced."""
    return msgspec.defstruct(
        name, [(f.name, types.get(f.name, f.type)) if f.required
               else (f.name, types.get(f.name, f.type), f.default)
               for f in msgspec.structs.fields(struct)],
        forbid_unknown_fields=forbid, frozen=True, gc=False)


_STRICT_FEEDBACK = (msgspec.json.Decoder(_strict(Feedback, "StrictFeedback")).decode, None)


#: Feature key sets seen recently -> (decode, the keys in struct field order).
_FEATURE_DECODERS: dict[tuple[frozenset[str], bool],
                        tuple[Callable[[bytes], Prediction], tuple[str, ...]]] = {}
_MAX_FEATURE_DECODERS = 64


def _feature_decoder(
    decode: Callable[[bytes], Prediction], values: Sequence[bytes], *, strict: bool = True
) -> tuple[Callable[[bytes], Prediction], tuple[str, ...]] | None:
    """A prediction decoder whose ``features`` is a Struct of the first event's keys.

    Decoding features into a dict, then transposing the dicts into columns, is about
    half of decode_batch's cost; a Struct with one field per key decodes faster and
    its fields make the columns directly. Its fields are exactly the first event's
    keys, it refuses unknown keys (and, when ``strict``, unknown fields of the event:
    `_decode_fast`), and a missing key reads as None (a null, as in a dict-built
    column), so whenever every event of the batch decodes with it the columns are the
    ones the generic decoder would give.
    """
    if not values:
        return None
    try:
        first = decode(values[0])
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
        return None
    keys = frozenset(first.features)
    cached = _FEATURE_DECODERS.get((keys, strict))
    if cached is None:
        if not keys:
            return None
        names = tuple(sorted(keys))
        fields = [(f"f{i}", FeatureValue, None) for i in range(len(names))]
        try:
            features = msgspec.defstruct(
                "Features", fields, rename=dict(zip([f[0] for f in fields], names, strict=True)),
                forbid_unknown_fields=True, frozen=True, gc=False)
            struct = _strict(Prediction, "PredictionWithFeatures", forbid=strict, features=features)
        except (TypeError, ValueError):
            return None
        if len(_FEATURE_DECODERS) >= _MAX_FEATURE_DECODERS:
            _FEATURE_DECODERS.clear()
        cached = _FEATURE_DECODERS[(keys, strict)] = (msgspec.json.Decoder(struct).decode, names)
    return cached


def _decode_carefully(
    kind: EventKind, values: Sequence[bytes | None], max_bytes: int
) -> tuple[list[Prediction] | list[Feedback], list[int], list[DecodeFailure]]:
    decode = _DECODERS[kind].decode
    events: list[Prediction] | list[Feedback] = []
    index: list[int] = []
    failures: list[DecodeFailure] = []
    for i, value in enumerate(values):
        if not value:
            failures.append(DecodeFailure(i, Reason.EMPTY, "empty message value"))
        elif len(value) > max_bytes:
            detail = f"message is {len(value)} bytes, limit is {max_bytes}"
            failures.append(DecodeFailure(i, Reason.OVERSIZED, detail))
        elif too_deep(value, MAX_DEPTH):
            detail = f"arrays and objects nested deeper than {MAX_DEPTH} levels"
            failures.append(DecodeFailure(i, Reason.TOO_DEEP, detail))
        else:
            try:
                events.append(decode(value))  # type: ignore[arg-type]
                index.append(i)
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
                failures.append(_classify(kind, i, value, exc))
    return events, index, failures


def _classify(kind: EventKind, i: int, value: bytes, exc: Exception) -> DecodeFailure:
    """Turn a decoder exception into a reason code (the slow path: bad messages only)."""
    # msgspec only notices bad UTF-8 inside strings it reaches, so check the whole
    # message first: "not UTF-8" is the more useful reason for a producer to read.
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as utf8_exc:
        return DecodeFailure(i, Reason.INVALID_UTF8, str(utf8_exc))
    msg = str(exc)
    # ValidationError subclasses DecodeError, so the order of these checks matters.
    if not isinstance(exc, msgspec.ValidationError):
        return DecodeFailure(i, Reason.MALFORMED_JSON, msg)
    if "`$.schema`" in msg:
        try:
            tag = msgspec.json.decode(value).get("schema")
        except (msgspec.DecodeError, AttributeError):
            tag = None
        expected = _SCHEMA_TAG[kind]
        detail = f"schema {tag!r} is not {expected!r}: {msg}"
        return DecodeFailure(i, Reason.UNKNOWN_SCHEMA, detail)
    if "`$.ts`" in msg and ("<=" in msg or ">=" in msg):
        return DecodeFailure(i, Reason.TS_OUT_OF_RANGE, msg)
    if "Number out of range" in msg:
        return DecodeFailure(i, Reason.NON_FINITE, msg)
    if "`$.score`" in msg and ("<=" in msg or ">=" in msg):
        return DecodeFailure(i, Reason.SCORE_OUT_OF_RANGE, msg)
    return DecodeFailure(i, Reason.SCHEMA_VIOLATION, msg)


#: Stands for an event time that fits no int64 (a float such as 1e300): far outside
#: [MIN_TS_MS, MAX_TS_MS), so the vectorised range check rejects it with the others.
_TS_UNREPRESENTABLE = -(2**62)


def _ts_to_ms(events: Sequence[Prediction | Feedback]) -> np.ndarray:
    ts = [e.ts for e in events]
    try:
        return np.array(ts, dtype=np.int64)
    except (TypeError, OverflowError):
        pass  # datetimes somewhere in the batch, or a float beyond int64
    out = np.empty(len(ts), dtype=np.int64)
    for j, t in enumerate(ts):
        ms = t.timestamp() * 1000 if isinstance(t, dt.datetime) else t
        out[j] = int(ms) if -(2**62) < ms < 2**62 else _TS_UNREPRESENTABLE
    return out


def too_deep(value: bytes, limit: int) -> bool:
    """Whether arrays and objects nest deeper than ``limit`` in a JSON text, counted
    without recursion (brackets inside strings do not count).

    The careful decoding path asks before any recursive decoder sees a message. It
    reads malformed JSON too (its count is then approximate, which is enough for a
    bound: the decoder rejects such a message anyway).
    """
    if value.count(b"[") + value.count(b"{") <= limit:
        return False  # the common case: two scans in C
    codes = np.frombuffer(_STRINGS.sub(b"", value), dtype=np.uint8)
    steps = np.isin(codes, _OPENERS).astype(np.int64) - np.isin(codes, _CLOSERS).astype(np.int64)
    return int(np.cumsum(steps).max(initial=0)) > limit


_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPENERS = np.frombuffer(b"[{", dtype=np.uint8)
_CLOSERS = np.frombuffer(b"]}", dtype=np.uint8)


def _ids(values: list[str | int]) -> pa.Array:
    """Ids may be ints or strings upstream; they are stored as strings so joins agree."""
    try:
        return pa.array(values, type=pa.string())
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        return pa.array([str(v) for v in values], type=pa.string())


def _prediction_table(
    events: list[Prediction], ts_ms: np.ndarray, feature_names: tuple[str, ...] | None = None
) -> tuple[pa.Table, np.ndarray]:
    n = len(events)
    columns: dict[str, pa.Array] = {
        "prediction_id": pa.array([e.prediction_id for e in events], type=pa.string()),
        "ts": pa.array(ts_ms, type=pa.timestamp("ms", tz="UTC")),
        "model": pa.array([e.model for e in events], type=pa.string()),
        "model_version": _ids([e.model_version for e in events]),
        "user_id": _ids([e.user_id for e in events]),
        "item_id": _ids([e.item_id for e in events]),
        "score": pa.array(np.fromiter((e.score for e in events), np.float64, n)),
        "rank": pa.array([e.rank for e in events], type=pa.int64()),
        "request_id": pa.array([e.request_id for e in events], type=pa.string()),
    }
    feats = [e.features for e in events]
    bad = np.zeros(n, dtype=bool)
    if feature_names is None:
        feature_cols = _feature_columns(feats)
    else:  # features decoded as Structs, fields f0.. in the order of the sorted names
        columns_of = [list(map(operator.attrgetter(f"f{i}"), feats))
                      for i in range(len(feature_names))]
        try:
            feature_cols = [(name, pa.array(col))
                            for name, col in zip(feature_names, columns_of, strict=True)]
        except (pa.ArrowTypeError, pa.ArrowInvalid, OverflowError):
            # A column mixing types (or an integer beyond int64): pyarrow's struct
            # inference over dicts (the generic path) may still type it, so give it
            # exactly the dicts it would have seen.
            rows = [dict(zip(feature_names, vals, strict=True))
                    for vals in zip(*columns_of, strict=True)]
            feature_cols = _feature_columns(rows)
    for name, col in feature_cols:
        col, col_bad = _typed_feature(col)
        columns[FEATURE_PREFIX + name] = col
        if col_bad is not None:
            bad |= col_bad
    return pa.table(columns), bad


def _feature_columns(feats: list[dict[str, FeatureValue]]) -> list[tuple[str, pa.Array | list[FeatureValue]]]:
    """Transpose the feature dicts into columns, sorted by name.

    pyarrow converts a list of dicts into a struct array in C++ (missing keys become
    nulls), ~40% faster than a Python pass per feature; a feature whose values mix
    types makes that fail, and the batch falls back to plain lists.
    """
    try:
        arr = pa.array(feats)
        if pa.types.is_struct(arr.type):
            return sorted((f.name, arr.field(i)) for i, f in enumerate(arr.type))
    except (pa.ArrowTypeError, pa.ArrowInvalid, OverflowError):
        pass
    names: set[str] = set()
    for f in feats:
        names.update(f)
    return [(name, [f.get(name) for f in feats]) for name in sorted(names)]


def _typed_feature(values: pa.Array | list[FeatureValue]) -> tuple[pa.Array, np.ndarray | None]:
    """Type one feature's values: numbers (and booleans, as 0/1) become float64,
    strings stay strings, and a column mixing both is stored as strings so nothing
    is lost. The non-finite check is vectorised; msgspec already rejects literal
    overflow such as 1e999, this catches values that are finite JSON but not
    representable, should a future decoder let one through.
    """
    if isinstance(values, pa.Array):
        arr = values
    else:
        numbers = _int64_or_float(values)
        try:
            arr = pa.array(numbers)
        except (pa.ArrowTypeError, pa.ArrowInvalid):
            text = pa.array([_as_category(v) for v in values], type=pa.string())
            return text, _overflowed(numbers) if numbers is not values else None
    if pa.types.is_string(arr.type) or pa.types.is_null(arr.type):
        return arr.cast(pa.string()), None
    # Unsafe: an integer beyond 2**53 is stored rounded rather than failing the batch.
    arr = arr.cast(pa.float64(), safe=False)
    np_values = arr.to_numpy(zero_copy_only=False)
    bad = ~np.isfinite(np_values) & ~np.isnan(np_values)  # NaN here means null
    return arr, bad if bad.any() else None


def _int64_or_float(values: list[FeatureValue]) -> list[FeatureValue]:
    """An integer too large for int64 as the float it is stored as anyway (numbers are
    float64 columns), so that Arrow's conversion cannot overflow."""
    if any(type(v) is int and not -(2**63) <= v < 2**63 for v in values):
        return [_as_float(v) if type(v) is int else v for v in values]
    return values


def _as_float(v: int) -> float:
    """``float(v)``, or an infinity for an integer beyond float64 too (``1`` and 400
    zeros is valid JSON), which the non-finite check then rejects like ``1e400``."""
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def _overflowed(numbers: list[FeatureValue]) -> np.ndarray | None:
    """Rows whose integer overflowed float64, in a column stored as text: rejected all
    the same, so that a row's verdict never depends on the other rows of its batch."""
    bad = np.fromiter((type(v) is float and math.isinf(v) for v in numbers), bool, len(numbers))
    return bad if bad.any() else None


def _as_category(v: FeatureValue) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _feedback_table(events: list[Feedback], ts_ms: np.ndarray) -> tuple[pa.Table, np.ndarray]:
    n = len(events)
    values = [e.value for e in events]
    value_arr = pa.array(values, type=pa.float64())
    np_values = value_arr.to_numpy(zero_copy_only=False)
    bad = ~np.isfinite(np_values) & ~np.isnan(np_values)
    table = pa.table(
        {
            "prediction_id": pa.array([e.prediction_id for e in events], type=pa.string()),
            "ts": pa.array(ts_ms, type=pa.timestamp("ms", tz="UTC")),
            "type": pa.array([e.type for e in events], type=pa.string()),
            "value": value_arr,
            "feedback_id": pa.array([e.feedback_id for e in events], type=pa.string()),
        }
    )
    assert table.num_rows == n
    return table, bad
