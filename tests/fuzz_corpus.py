"""Hostile Kafka records for the fuzz campaign (tests/test_fuzz.py, bench/fuzz.py).

The daemon must survive whatever a producer can write and account for every record:
stored once, or dead-lettered once with its reason. Records come from two sources:

* `drafts(kind)`: a Hypothesis strategy mixing valid events with every wrong type in
  every field, every schema string, edge numbers, odd timestamps, duplicate keys,
  invalid UTF-8, nesting past MAX_DEPTH, empty and null values, random bytes;
* `crafted(limits)`: a deterministic corpus at every size and depth limit.

Hypothesis draws *shapes* (`Draft`); a shape becomes a `FuzzRecord` only when the
campaign numbers it (`Draft.render`), so every record has a unique id however often
Hypothesis repeats a shape. A record that can be stored carries that id as its
``prediction_id`` (both contracts have one); any record is found in the dead-letter
topic by its source offset.

Storable event times all lie in ``[base_ms, base_ms + SPAN_MS)``, one window of the
campaign's config, read in one backlog: nothing is late unless the record says it may
be (`FuzzRecord.may_be_late`), so a ``late`` dead letter of any other record is a
finding, not noise. Valid-but-extreme times (2000-01-01, 2099) exist only in the
crafted corpus, last on their topic, because one of them moves the watermark to 2100.

No Kafka here: tests/fuzz_campaign.py produces, reads back and accounts.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from connectors.events import MAX_DEPTH, MAX_TS_MS, MIN_TS_MS, EventKind, Reason, decode_batch
from connectors.kafka import DEAD_LETTER_OVERHEAD
from tests.events_gen import bad_predictions

__all__ = [
    "SPAN_MS",
    "STORED",
    "Draft",
    "FuzzRecord",
    "Limits",
    "crafted",
    "drafts",
    "draw",
    "far_future",
    "render_all",
    "verdict",
]

PREDICTION, FEEDBACK = EventKind.PREDICTION, EventKind.FEEDBACK
#: Width of the event times of storable records; the campaign's windows are this long
#: (or longer, aligned with ``base_ms``), so all of them land in one window.
SPAN_MS = 10_000
#: `FuzzRecord.expect` of a record that must be stored.
STORED = "stored"

T = TypeVar("T")
S = st.SearchStrategy

# -- the pieces of a record ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Id:
    """Where the record's unique id goes, and how it is spelled.

    Every spelling of a string contains the id, so that any record the decoder accepts
    can be recognised in the store; ``too_long`` (1,025 characters) must be refused.
    """

    style: str

    def render(self, uid: str) -> tuple[bytes, str]:
        text = {"unicode": f"{uid}·é☃😀", "unicode_ascii": f"{uid}·é☃😀", "dup": f"{uid}~dup",
                "long": uid.ljust(1024, "x"), "too_long": uid.ljust(1025, "x")}.get(self.style, uid)
        if self.style == "escaped":
            return ('"' + "".join(f"\\u{ord(c):04x}" for c in text) + '"').encode(), text
        return json.dumps(text, ensure_ascii=self.style == "unicode_ascii").encode(), text


@dataclasses.dataclass(frozen=True)
class Ts:
    """A storable event time, ``offset_ms`` after the base, spelled as ``form``."""

    offset_ms: int
    form: str

    def render(self, base_ms: int) -> bytes:
        ms = base_ms + self.offset_ms
        if self.form == "int":
            return str(ms).encode()
        if self.form == "float":
            return f"{ms}.5".encode()
        if self.form == "exponent":  # exactly representable: no rounding into the window before
            return f"{ms}0e-1".encode()
        when = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
        return json.dumps(_rfc3339(when, self.form)).encode()


def _rfc3339(when: dt.datetime, form: str) -> str:
    if form == "rfc_offset":
        return when.astimezone(dt.timezone(dt.timedelta(hours=5, minutes=30))).isoformat(
            timespec="milliseconds")
    if form == "rfc_negative":
        return when.astimezone(dt.timezone(dt.timedelta(hours=-8))).isoformat(timespec="microseconds")
    text = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if form == "rfc_nanos":
        return text.replace("Z", "123456Z")
    if form == "rfc_space":  # RFC 3339 allows a space for the T
        return text.replace("T", " ")
    return text.lower() if form == "rfc_lower" else text


Part = bytes | Id | Ts
#: One ``"name": value`` of an object: the name's JSON token and the value's parts.
Member = tuple[bytes, tuple[Part, ...]]


@dataclasses.dataclass(frozen=True)
class FuzzRecord:
    """One record of the campaign, ready to produce.

    Attributes:
        ids: the ``prediction_id`` values it may be stored under (several where a
            duplicate key makes the decoder pick one); empty: it cannot be stored.
        expect: `STORED`, a `Reason` value, or None where only the decoder knows.
        may_be_late: its event time is outside the campaign's window, so ``late`` is
            as good an outcome as being stored.
    """

    uid: str
    gen: str
    kind: EventKind
    key: bytes | None
    value: bytes | None
    ids: frozenset[str]
    expect: str | None
    may_be_late: bool = False


@dataclasses.dataclass(frozen=True)
class Draft:
    """A record before it has its id and base time.

    Attributes:
        value: the parts of the value; None is a null value (a tombstone).
        size: pad the value (an unknown field before the closing brace) to exactly
            this many bytes.
        cut: keep only this many leading bytes of the value (modulo its length).
    """

    gen: str
    kind: EventKind
    key: bytes | None
    value: tuple[Part, ...] | None
    expect: str | None = None
    may_be_late: bool = False
    size: int | None = None
    cut: int | None = None

    def render(self, uid: str, base_ms: int) -> FuzzRecord:
        ids: set[str] = set()
        value = None
        if self.value is not None:
            value = b"".join(_render_part(p, uid, base_ms, ids) for p in self.value)
            if self.size is not None:
                value = _pad(value, self.size)
            if self.cut is not None and value:
                value = value[: self.cut % len(value)]
        return FuzzRecord(uid, self.gen, self.kind, self.key, value, frozenset(ids), self.expect,
                          self.may_be_late)


def _render_part(part: Part, uid: str, base_ms: int, ids: set[str]) -> bytes:
    if isinstance(part, Id):
        raw, text = part.render(uid)
        ids.add(text)
        return raw
    if isinstance(part, Ts):
        return part.render(base_ms)
    return part


def _pad(value: bytes, size: int) -> bytes:
    filler = b',"pad":""}'
    n = size - len(value) - len(filler) + 1
    if n < 0 or not value.endswith(b"}"):
        msg = f"cannot pad a {len(value)}-byte value to {size} bytes"
        raise ValueError(msg)
    return value[:-1] + b',"pad":"' + b"x" * n + b'"}'


def _obj(members: Iterable[Member]) -> tuple[Part, ...]:
    out: list[Part] = [b"{"]
    for i, (name, value) in enumerate(members):
        out += [b"," if i else b"", name, b":", *value]
    out.append(b"}")
    return tuple(out)


def render_all(drafts: Sequence[Draft], prefix: str, base_ms: int) -> list[FuzzRecord]:
    """Number the drafts: ids ``<prefix>-000000`` on, unique within the campaign."""
    return [d.render(f"{prefix}-{i:06d}", base_ms) for i, d in enumerate(drafts)]


def verdict(record: FuzzRecord, max_bytes: int) -> str:
    """What the decoder alone says of the record: `STORED` or the reason value; the
    daemon must come to the same (batches change speed, never results)."""
    decoded = decode_batch(record.kind, [record.value], max_bytes=max_bytes)
    return decoded.failures[0].reason.value if decoded.failures else STORED


# -- JSON tokens --------------------------------------------------------------------


def _j(value: Any) -> bytes:
    return json.dumps(value).encode()


def _str_token(text: str, ascii_only: bool) -> bytes:
    return json.dumps(text, ensure_ascii=ascii_only).encode()


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=16)
#: Strings the contract takes (1 to 1,024 characters).
GOOD_STR = st.one_of(
    st.builds(_str_token, _TEXT.filter(bool), st.booleans()),
    st.sampled_from([b'"x"', _j("x" * 1024), _str_token("é" * 1024, False), b'"\\u00e9\\ud83d\\ude00"',
                     b'"tab\\tquote\\"slash\\/"']),
)
INT64_EDGES = [b"0", b"-0", b"9223372036854775807", b"-9223372036854775808"]
#: Numbers every numeric field of the contract can hold (as float64 where not int64).
FINITE_EDGES = [b"9223372036854775808", b"-9223372036854775809", b"18446744073709551616",
                b"1" + b"0" * 30, b"1e308", b"-1e308", b"1.7976931348623157e308", b"-0.0", b"0e0",
                b"1e-320", b"-1e-320", b"5e-324", b"2.2250738585072014e-308", b"1E+2", b"0.1e1",
                b"123456789012345678901234567890.5"]
#: Numbers beyond float64 (and an integer beyond any decoder's patience).
OVERFLOWS = [b"1e309", b"1e999", b"-1e999", b"1.0e400", b"1" + b"0" * 400, b"-1" + b"0" * 400,
             b"1" + b"0" * 5000]
NOT_NUMBERS = [b"NaN", b"Infinity", b"-Infinity", b"01", b"1.", b".5", b"+1", b"0x10", b"1e", b"--1"]
WRONG_TYPES = [b"null", b"true", b"false", b"0", b"-1", b"1.5", b'""', b'"x"', b"[]", b"{}",
               b"[1,2]", b'{"a":1}', b"[[[]]]", b'"1767225600000"']
#: Bytes that are not a string in valid UTF-8 JSON (bad escapes, control characters,
#: invalid or overlong UTF-8, CESU-8 surrogates, code points beyond U+10FFFF).
BAD_STRINGS = [b'"\\ud800"', b'"\\udc00x"', b'"\\x41"', b'"a\x01b"', b'"a\x00b"', b'"\xff\xfe"',
               b'"\xc3"', b'"\xed\xa0\x80"', b'"\xf4\x90\x80\x80"', b'"\xc0\xaf"', b'"unterminated',
               b'"\x80"']
INVALID_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf",
                b"\x80\x80", b"\xe2\x82"]
SCHEMAS = [b'"prediction/v1"', b'"feedback/v1"', b'"prediction/v2"', b'"feedback/v0"',
           b'"prediction/v1 "', b'"PREDICTION/V1"', b'"prediction"', b'""', b'"prediction/v1\\u0000"',
           b'"prediction\\/v1"', b'"feedback\\/v1"', b'"\\u0070rediction/v1"', b"null", b"1", b"[]",
           b'{"v":1}', b'["prediction/v1"]', b"true"]
#: Event times that are never storable: out of range, wrong type or not a time.
BAD_TS = [
    b"0", b"-1", b"-0.0", b"1e-320", b"1.5", b"1767225600", b"1767225600000000", b"1e308", b"-1e308",
    b"1e19", b"9223372036854775807", b"-9223372036854775808", b"9223372036854775808",
    b"-9223372036854775809", b"1" + b"0" * 400, b"1e999", str(MIN_TS_MS - 1).encode(),
    f"{MIN_TS_MS - 1}.5".encode(), str(MAX_TS_MS).encode(), f"{MAX_TS_MS}.0".encode(),
    b'"2026-01-01T00:00:00"', b'"2026-01-01_00:00:00Z"', b'"2026-02-30T00:00:00Z"',
    b'"2026-01-01T00:00:60Z"', b'"1999-12-31T23:59:59.999Z"', b'"2100-01-01T00:00:00Z"',
    b'"9999-12-31T23:59:59-23:59"', b'"0001-01-01T00:00:00+23:59"', b'"now"', b'""',
    b'"1767225600000"', b"null", b"true", b"[]", b"{}", b"NaN",
]
_FORMS = ["int", "float", "exponent", "rfc_z", "rfc_offset", "rfc_negative", "rfc_nanos", "rfc_lower",
          "rfc_space"]
GOOD_TS = st.builds(Ts, st.integers(0, SPAN_MS - 1), st.sampled_from(_FORMS))

_FLOAT = st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).encode())
GOOD_INT = st.one_of(st.integers(-(2**63), 2**63 - 1).map(lambda i: str(i).encode()),
                     st.sampled_from(INT64_EDGES))
GOOD_NUMBER = st.one_of(GOOD_INT, _FLOAT, st.sampled_from(FINITE_EDGES))
SCORE = st.one_of(st.floats(0, 1).map(lambda f: repr(f).encode()),
                  st.sampled_from([b"0", b"1", b"-0.0", b"1e-320", b"5e-324", b"1.0", b"1E0",
                                   b"0.99999999999999994", b"1.00000000000000001"]))
FEATURE_NAMES = st.one_of(
    st.sampled_from([b'"age"', b'"price"', b'"country"', b'"x"', b'""', b'"f.x"', b'"a b"',
                     _str_token("é", False), b'"\\u00e9"', b'"score"', b'"ts"', b'"\\u0000"',
                     b'"\\n"', b'"\\"quoted\\""', _j("n" * 1000)]),
    st.builds(_str_token, _TEXT, st.booleans()),
)
FEATURE_VALUES = st.one_of(st.sampled_from([b"null", b"true", b"false"]), GOOD_NUMBER, GOOD_STR,
                           st.just(b'""'))
BAD_FEATURE_VALUES = st.sampled_from([b"[]", b"{}", b"[1]", b'{"a":1}', *OVERFLOWS, *NOT_NUMBERS,
                                      *BAD_STRINGS])


def _json_values(max_leaves: int = 8) -> S[Any]:
    finite = st.floats(allow_nan=False, allow_infinity=False)
    scalars = st.none() | st.booleans() | st.integers() | finite | _TEXT
    return st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(_TEXT, c, max_size=3),
                        max_leaves=max_leaves)


#: Any JSON text (finite numbers: NaN and Infinity are in NOT_NUMBERS).
ANY_JSON = _json_values().map(lambda v: json.dumps(v).encode())
#: Names of unknown fields: never a contract field's.
UNKNOWN_NAMES = st.builds(lambda t, a: _str_token("x-" + t, a), _TEXT, st.booleans())


def _features(values: S[bytes], *, min_size: int = 0) -> S[list[Member]]:
    return st.lists(st.tuples(FEATURE_NAMES, values.map(lambda v: (v,))), min_size=min_size, max_size=6)


def _many_features(n: int) -> list[Member]:
    return [(b'"k%d"' % i, (str(i * 0.5).encode(),)) for i in range(n)]


# -- fields of the two contracts ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Field:
    """One contract field: its JSON name, the values it takes and the ones it refuses."""

    name: bytes
    good: S[tuple[Part, ...]]
    bad: S[tuple[Part, ...]]
    required: bool = True


def _tokens(*strategies: S[bytes] | list[bytes]) -> S[tuple[Part, ...]]:
    parts = [st.sampled_from(s) if isinstance(s, list) else s for s in strategies]
    return st.one_of(*parts).map(lambda b: (b,))


GOOD_IDS = st.sampled_from(["plain", "escaped", "unicode", "unicode_ascii", "long"]).map(
    lambda s: (Id(s),))
BAD_IDS = st.one_of(_tokens(WRONG_TYPES[:4], BAD_STRINGS, [b'""', b"12345"]),
                    st.just((Id("too_long"),)))
TS_FIELD = Field(b'"ts"', GOOD_TS.map(lambda t: (t,)), _tokens(BAD_TS, WRONG_TYPES, NOT_NUMBERS))
ID_FIELD = Field(b'"prediction_id"', GOOD_IDS, BAD_IDS)


def _str_field(name: str, optional: bool = False) -> Field:
    good = _tokens(GOOD_STR, [b"null"]) if optional else _tokens(GOOD_STR)
    bad = _tokens(WRONG_TYPES[1:], BAD_STRINGS, [_j("y" * 1025)])
    return Field(_j(name), good, bad, required=not optional)


def _id_like(name: str) -> Field:
    """``model_version``, ``user_id``, ``item_id``: a string or an integer of any size."""
    good = _tokens(GOOD_STR, GOOD_INT, FINITE_EDGES[:4], [b"1" + b"0" * 400])
    bad = _tokens([b"null", b"true", b"1.5", b"[]", b"{}", OVERFLOWS[-1]], BAD_STRINGS)
    return Field(_j(name), good, bad)


FIELDS: dict[EventKind, list[Field]] = {
    PREDICTION: [
        Field(b'"schema"', _tokens([b'"prediction/v1"', b'"prediction\\/v1"']), _tokens(SCHEMAS[1:9])),
        ID_FIELD,
        TS_FIELD,
        _str_field("model"),
        _id_like("model_version"),
        _id_like("user_id"),
        _id_like("item_id"),
        Field(b'"score"', SCORE.map(lambda b: (b,)),
              _tokens(WRONG_TYPES, FINITE_EDGES, OVERFLOWS, NOT_NUMBERS,
                      [b"1.0000000000000002", b"-0.0000001", b"2"])),
        Field(b'"features"', (_features(FEATURE_VALUES) | st.integers(50, 300).map(_many_features)).map(_obj),
              _tokens(WRONG_TYPES[:10]) | _features(BAD_FEATURE_VALUES, min_size=1).map(_obj)),
        Field(b'"rank"', _tokens(GOOD_INT, [b"null"]),
              _tokens(FINITE_EDGES[:4], OVERFLOWS, [b"1.0", b"1.5", b'"1"', b"true"]),
              required=False),
        _str_field("request_id", optional=True),
    ],
    FEEDBACK: [
        Field(b'"schema"', _tokens([b'"feedback/v1"', b'"feedback\\/v1"']),
              _tokens([SCHEMAS[0], *SCHEMAS[2:9]])),
        ID_FIELD,
        TS_FIELD,
        _str_field("type"),
        Field(b'"value"', _tokens(GOOD_NUMBER, [b"null"]),
              _tokens([b"true", b'"1"', b"[]", b"{}"], OVERFLOWS, NOT_NUMBERS),
              required=False),
        _str_field("feedback_id", optional=True),
    ],
}


# -- record generators ----------------------------------------------------------------


@st.composite
def _valid_members(draw: st.DrawFn, kind: EventKind) -> list[Member]:
    members = [(f.name, draw(f.good)) for f in FIELDS[kind] if f.required or draw(st.booleans())]
    members += draw(st.lists(st.tuples(UNKNOWN_NAMES, ANY_JSON.map(lambda b: (b,))), max_size=2))
    return list(draw(st.permutations(members)))


@st.composite
def _mutated_members(draw: st.DrawFn, kind: EventKind) -> list[Member]:
    """A valid event with one to three fields wrong: a refused value, missing, or
    given twice (last one wins in the decoder; both orders are drawn)."""
    fields = FIELDS[kind]
    targets = draw(st.sets(st.sampled_from(range(len(fields))), min_size=1, max_size=3))
    members: list[Member] = []
    for i, f in enumerate(fields):
        if i not in targets:
            members.append((f.name, draw(f.good)))
            continue
        how = draw(st.sampled_from(["bad", "missing", "twice"]))
        if how == "bad":
            members.append((f.name, draw(f.bad)))
        elif how == "twice":
            first, second = draw(f.bad | f.good), draw(f.bad | f.good)
            if f is ID_FIELD and draw(st.booleans()):
                first = (Id("dup"),)
            members += [(f.name, first), (f.name, second)]
    return list(draw(st.permutations(members)))


def _event(kind: EventKind, gen: str, members: S[list[Member]], expect: str | None = None) -> S[Draft]:
    return st.builds(lambda key, m: Draft(gen, kind, key, _obj(m), expect), KEYS, members)


def _with_field(kind: EventKind, name: bytes, values: S[bytes], gen: str) -> S[Draft]:
    """A valid event whose field ``name`` takes one of ``values`` (edge numbers, times,
    schemas): the value decides alone."""
    def replace(members: list[Member], value: bytes) -> list[Member]:
        others = [(n, v) for n, v in members if n != name]
        return [*others, (name, (value,))]

    return _event(kind, gen, st.builds(replace, _valid_members(kind), values))


@st.composite
def _nested(draw: st.DrawFn, kind: EventKind) -> Draft:
    """Arrays and objects nested around MAX_DEPTH and far past it: in an unknown field
    (fine up to the bound), in a feature value (never fine), or as the whole message."""
    depth = draw(st.sampled_from([MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, MAX_DEPTH + 2,
                                  64, 1000, 5000]) | st.integers(1, 100))
    opener = draw(st.sampled_from([b"[", b'{"a":', b'[{"a":']))
    inner = _nest(opener, depth, draw(st.sampled_from([b"1", b"[]", b"{}", b'"x"'])))
    where = draw(st.sampled_from(["unknown", "feature", "whole"]))
    if where == "whole":
        return Draft("nesting", kind, draw(KEYS), (inner,))
    members = draw(_valid_members(kind))
    if where == "feature" and kind is PREDICTION:
        members = [(n, _obj([(b'"deep"', (inner,))]) if n == b'"features"' else v) for n, v in members]
    else:
        members.append((b'"nested"', (inner,)))
    return Draft("nesting", kind, draw(KEYS), _obj(members))


def _nest(opener: bytes, depth: int, leaf: bytes) -> bytes:
    """``depth`` levels of ``opener`` (each one level, or two for ``[{"a":``)."""
    closer = {b"[": b"]", b'{"a":': b"}", b'[{"a":': b"}]"}[opener]
    n = depth if opener != b'[{"a":' else max(1, depth // 2)
    return opener * n + leaf + closer * n


@st.composite
def _bad_utf8(draw: st.DrawFn, kind: EventKind) -> Draft:
    """Invalid UTF-8 in a contract string, a feature or field name, an unknown field's
    value, or the key only (the value is then valid)."""
    members = draw(_valid_members(kind))
    bad = draw(st.sampled_from(INVALID_UTF8))
    where = draw(st.sampled_from(["field", "name", "unknown", "key"]))
    if where == "key":
        return Draft("invalid_utf8", kind, b"k" + bad, _obj(members))
    i = draw(st.integers(0, len(members) - 1))
    name, value = members[i]
    if where == "field":
        members[i] = (name, (b'"' + bad + b'"',))
    elif where == "name":
        members[i] = (b'"' + bad + b'"', value)
    else:
        members.append((b'"u"', (b'"a' + bad + b'"',)))
    return Draft("invalid_utf8", kind, draw(KEYS), _obj(members))


def _truncated(kind: EventKind) -> S[Draft]:
    return st.builds(lambda key, m, cut: Draft("truncated", kind, key, _obj(m), cut=cut),
                     KEYS, _valid_members(kind), st.integers(0, 10_000))


def _wrapped(kind: EventKind) -> S[Draft]:
    """A valid event with bytes around it: whitespace (fine), a BOM, a second object,
    trailing garbage, NUL."""
    around = st.sampled_from([(b" \n\t", b"\r\n"), (b"\xef\xbb\xbf", b""), (b"", b"{}"), (b"", b"x"),
                              (b"", b"\x00"), (b"\x00", b""), (b"[", b"]"), (b"", b" ")])
    return st.builds(lambda key, m, a: Draft("wrapped", kind, key, (a[0], *_obj(m), a[1])),
                     KEYS, _valid_members(kind), around)


KEYS: S[bytes | None] = st.one_of(
    st.none(), st.just(b""), st.binary(max_size=40),
    st.sampled_from([b"user-1", "ключ".encode(), b"\xff\xfe", b"k" * 2048]),
)


def drafts(kind: EventKind) -> S[Draft]:
    """Hostile records for the topic of ``kind``; `Draft.gen` names the generator."""
    other = FEEDBACK if kind is PREDICTION else PREDICTION
    numeric = [b'"ts"', b'"score"', b'"rank"'] if kind is PREDICTION else [b'"ts"', b'"value"']
    edge = st.sampled_from(INT64_EDGES + FINITE_EDGES + OVERFLOWS)
    return st.one_of(
        _event(kind, "valid", _valid_members(kind), STORED),
        _event(kind, "mutated", _mutated_members(kind)),
        st.sampled_from(numeric).flatmap(lambda n: _with_field(kind, n, edge, "edge_number")),
        _with_field(kind, b'"ts"', st.sampled_from(BAD_TS), "timestamp"),
        _with_field(kind, b'"schema"', st.sampled_from(SCHEMAS), "schema"),
        _event(kind, "other_contract", _valid_members(other), Reason.UNKNOWN_SCHEMA.value),
        _nested(kind),
        _bad_utf8(kind),
        _truncated(kind),
        _wrapped(kind),
        st.builds(lambda k, v: Draft("not_an_object", kind, k, (v,)), KEYS, ANY_JSON),
        st.builds(lambda k, v: Draft("random_bytes", kind, k, (v,)), KEYS, st.binary(max_size=300)),
        st.builds(lambda k: Draft("empty", kind, k, (b"",), Reason.EMPTY.value), KEYS),
        st.builds(lambda k: Draft("null_value", kind, k, None, Reason.EMPTY.value),
                  st.binary(min_size=1, max_size=20)),
    )


def draw(strategy: S[T], n: int, seed: int) -> list[T]:
    """``n`` examples of ``strategy``, the same ones for the same seed (and Hypothesis
    version): `strategy.example()` is random and warns outside an interactive shell.

    Hypothesis's own generator, not `random`, so that its bias towards boundaries and
    repeated structure applies; its first example is the simplest one.
    """
    out: list[T] = []

    @hypothesis_seed(seed)
    @settings(max_examples=n, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(example: T) -> None:
        out.append(example)

    collect()
    return out


# -- the crafted corpus ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Limits:
    """The sizes the crafted corpus straddles.

    Attributes:
        max_message_bytes: the daemon's ``kafka.max_message_bytes``.
        dead_letter_bytes: the dead-letter topic's ``max.message.bytes``.
    """

    max_message_bytes: int
    dead_letter_bytes: int
    overhead: int = DEAD_LETTER_OVERHEAD


def _valid(kind: EventKind, *, ts: Part | None = None, extra: Sequence[Member] = ()) -> tuple[Part, ...]:
    if kind is PREDICTION:
        members: list[Member] = [
            (b'"schema"', (b'"prediction/v1"',)), (b'"prediction_id"', (Id("plain"),)),
            (b'"ts"', (ts or Ts(1, "int"),)), (b'"model"', (b'"ctr"',)), (b'"model_version"', (b'"7"',)),
            (b'"user_id"', (b'"u1"',)), (b'"item_id"', (b"42",)), (b'"score"', (b"0.25",)),
            (b'"features"', (b'{"age":31,"country":"de"}',))]
    else:
        members = [(b'"schema"', (b'"feedback/v1"',)), (b'"prediction_id"', (Id("plain"),)),
                   (b'"ts"', (ts or Ts(2, "int"),)), (b'"type"', (b'"click"',))]
    return _obj([*members, *extra])


def _sized(kind: EventKind, size: int, limits: Limits, *, bad: bool = False,
           key: bytes | None = None) -> Draft:
    """A valid event (or one refused for its score/value, ``bad``) of exactly ``size`` bytes."""
    extra: list[Member] = [(b'"value"', (b"true",))] if bad and kind is FEEDBACK else []
    value = _valid(kind, extra=extra)
    if bad and kind is PREDICTION:
        value = tuple(b"2.5" if p == b"0.25" else p for p in value)
    reason = Reason.SCORE_OUT_OF_RANGE.value if kind is PREDICTION else Reason.SCHEMA_VIOLATION.value
    expect = Reason.OVERSIZED.value if size > limits.max_message_bytes else reason if bad else STORED
    return Draft(f"size_{size}", kind, key, value, expect, size=size)


def _size_drafts(limits: Limits) -> list[Draft]:
    m, d, o = limits.max_message_bytes, limits.dead_letter_bytes, limits.overhead
    key = b"k" * 100
    out = [_sized(kind, m + delta, limits) for kind in (PREDICTION, FEEDBACK) for delta in (-1, 0, 1)]
    # A dead-letter copy fits while value + key + overhead <= the topic's limit.
    for delta in (0, 1):
        out.append(_sized(PREDICTION, d - o - len(key) + delta, limits, bad=True, key=key))
        out.append(_sized(FEEDBACK, d - o + delta, limits, bad=True))
    out += [_sized(PREDICTION, 1 << 20, limits), _sized(PREDICTION, (1 << 20) + 1, limits, bad=True),
            _sized(FEEDBACK, 5 << 20, limits)]
    blob = bytes(range(256)) * ((5 << 20) // 256)
    out.append(Draft("size_random_5MiB", PREDICTION, b"k" * 2048, (blob,),
                     Reason.OVERSIZED.value if len(blob) > m else None))
    return out


def _depth_drafts() -> list[Draft]:
    """Nesting by the decoder's own count: the top-level object is one level."""
    out = []
    for depth in (MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 5000):
        expect = STORED if depth <= MAX_DEPTH else Reason.TOO_DEEP.value
        for opener in (b"[", b'{"a":'):
            extra = [(b'"nested"', (_nest(opener, depth - 1, b"1"),))]
            out += [Draft(f"depth_{depth}", kind, None, _valid(kind, extra=extra), expect)
                    for kind in (PREDICTION, FEEDBACK)]
    quoted = [(b'"brackets"', (_j("[{" * 5000),)), (b'"escaped"', (b'"\\"' + b"[" * 40 + b'"',))]
    out.append(Draft("depth_in_strings", PREDICTION, None, _valid(PREDICTION, extra=quoted), STORED))
    whole = (_nest(b"[", 5000, b""),)
    out.append(Draft("depth_5000_whole", PREDICTION, None, whole, Reason.TOO_DEEP.value))
    feature = _valid(PREDICTION)
    deep = b'{"deep":' + _nest(b"[", 5000, b"1") + b"}"
    deep_feature = tuple(deep if isinstance(p, bytes) and p.startswith(b'{"age"') else p for p in feature)
    out.append(Draft("depth_5000_feature", PREDICTION, None, deep_feature, Reason.TOO_DEEP.value))
    return out


def _value_drafts() -> list[Draft]:
    """Edge values with a known verdict, one each."""
    def pred(gen: str, expect: str, *extra: Member, key: bytes | None = None) -> Draft:
        return Draft(gen, PREDICTION, key, _valid(PREDICTION, extra=extra), expect)

    out = [
        pred("rank_int64_max", STORED, (b'"rank"', (b"9223372036854775807",))),
        pred("rank_int64_min", STORED, (b'"rank"', (b"-9223372036854775808",))),
        pred("rank_beyond_int64", Reason.SCHEMA_VIOLATION.value, (b'"rank"', (b"9223372036854775808",))),
        pred("feature_1e308", STORED, (b'"features"', (b'{"x":1e308,"y":-0.0,"z":1e-320}',))),
        pred("feature_1e999", Reason.NON_FINITE.value, (b'"features"', (b'{"x":1e999}',))),
        pred("feature_10e400", Reason.NON_FINITE.value, (b'"features"', (b'{"x":1' + b"0" * 400 + b"}",))),
        pred("feature_int_2e64", STORED, (b'"features"', (b'{"x":18446744073709551616}',))),
        pred("duplicate_id", STORED, (b'"prediction_id"', (Id("dup"),))),  # the last one counts
        pred("duplicate_schema_bad_last", Reason.UNKNOWN_SCHEMA.value, (b'"schema"', (b'"prediction/v2"',))),
        pred("key_invalid_utf8", STORED, key=b"\xff\xfe\xfd"),
        pred("unknown_field_invalid_utf8", STORED, (b'"u"', (b'"\xff"',))),
        Draft("empty", FEEDBACK, None, (b"",), Reason.EMPTY.value),
        Draft("null_value", PREDICTION, b"tombstone", None, Reason.EMPTY.value),
        Draft("null_value", FEEDBACK, b"tombstone", None, Reason.EMPTY.value),
        Draft("ts_min", PREDICTION, None, _valid(PREDICTION, ts=str(MIN_TS_MS).encode()), STORED,
              may_be_late=True),
        Draft("ts_min_minus_1", PREDICTION, None, _valid(PREDICTION, ts=str(MIN_TS_MS - 1).encode()),
              Reason.TS_OUT_OF_RANGE.value),
        Draft("ts_max", FEEDBACK, None, _valid(FEEDBACK, ts=str(MAX_TS_MS).encode()),
              Reason.TS_OUT_OF_RANGE.value),
        Draft("ts_beyond_int64", FEEDBACK, None, _valid(FEEDBACK, ts=b"1e300"), Reason.TS_OUT_OF_RANGE.value),
    ]
    for score, expect in ((b"1e-320", STORED), (b"-0.0", STORED), (b"1e308", Reason.SCORE_OUT_OF_RANGE.value),
                          (b"-1e-320", Reason.SCORE_OUT_OF_RANGE.value)):
        value = tuple(score if p == b"0.25" else p for p in _valid(PREDICTION))
        out.append(Draft(f"score_{score.decode()}", PREDICTION, None, value, expect))
    return out


def far_future() -> list[Draft]:
    """Valid event times in 2099: they close every window before them, so they must be
    the last records of their topics."""
    last = str(MAX_TS_MS - 1).encode()
    return [Draft("ts_max_minus_1", PREDICTION, None, _valid(PREDICTION, ts=last), STORED, may_be_late=True),
            Draft("ts_2099_rfc3339", FEEDBACK, None, _valid(FEEDBACK, ts=b'"2099-12-31T23:59:59.999Z"'),
                  STORED, may_be_late=True)]


def crafted(limits: Limits) -> list[Draft]:
    """The deterministic corpus (`far_future` adds the records that must come last)."""
    known = [Draft("bad_prediction", PREDICTION, None, (raw,), reason)
             for raw, reason in bad_predictions(limits.max_message_bytes)]
    return [*_size_drafts(limits), *_depth_drafts(), *_value_drafts(), *known]
