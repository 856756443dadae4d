"""The fuzz corpus through the real broker and the real daemon, and the books kept on it
(tests/test_fuzz.py, bench/fuzz.py).

The accounting is by offset, because a hostile record may have no id at all: every
offset of every input topic must end up either as exactly one stored row (found by the
record's id) or as exactly one dead letter (found by its ``driftloop-source`` header),
and its fate must be the one the decoder alone gives it (`fuzz_corpus.verdict`): a
batch, a rebalance or a restart may change how fast a record is handled, never what
becomes of it.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from connectors.events import EventKind, Reason
from connectors.kafka import (
    DEAD_LETTER_OVERHEAD,
    ERROR_HEADER,
    ORIGINAL_REASON_HEADER,
    REASON_HEADER,
    REFERENCE_HEAD_BYTES,
    SOURCE_HEADER,
)
from connectors.store import FeedbackStore
from monitor.testbed.local_kafka import committed_offsets
from tests.daemon_proc import DaemonProcess, end_offsets
from tests.fuzz_corpus import STORED, FuzzRecord, verdict

__all__ = ["DeadLetter", "Placed", "Report", "account", "log_lines", "produce", "read_dead_letters",
           "settle", "stored_ids"]

#: The input topics' ``max.message.bytes`` in the campaign: a team publishing large events.
LARGE_TOPIC_BYTES = 10 * 1024 * 1024
TOO_LARGE = Reason.TOO_LARGE_FOR_DEAD_LETTER.value
Source = tuple[str, int, int]


@dataclasses.dataclass(frozen=True)
class Placed:
    """A record and where the broker put it."""

    record: FuzzRecord
    topic: str
    partition: int
    offset: int

    @property
    def source(self) -> Source:
        return self.topic, self.partition, self.offset

    def __str__(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset} ({self.record.gen}, {self.record.uid})"


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """One record of the dead-letter topic, its headers parsed."""

    source: Source
    reason: str
    original_reason: str | None
    error: str
    key: bytes | None
    value: bytes | None


def produce(bootstrap: str, records: Sequence[FuzzRecord], topics: Mapping[EventKind, str],
            partitions: int) -> list[Placed]:
    """Produce in order, record ``i`` to partition ``i % partitions``; returns the offsets."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                             batch_size=512 * 1024, max_request_size=LARGE_TOPIC_BYTES + 65_536)
    try:
        futures = [(r, topics[r.kind], i % partitions,
                    producer.send(topics[r.kind], key=r.key, value=r.value, partition=i % partitions))
                   for i, r in enumerate(records)]
        producer.flush(timeout=120)
        return [Placed(r, t, p, f.get(timeout=60).offset) for r, t, p, f in futures]
    finally:
        producer.close()


def read_dead_letters(bootstrap: str, topic: str, timeout_s: float = 60) -> list[DeadLetter]:
    """The whole dead-letter topic, up to the end offsets read first."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             max_partition_fetch_bytes=LARGE_TOPIC_BYTES + 65_536,
                             fetch_max_bytes=64 * 1024 * 1024)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        out: list[DeadLetter] = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in parts):
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end in {timeout_s}s")
            for records in consumer.poll(timeout_ms=500).values():
                out.extend(_dead_letter(m) for m in records)
        return out
    finally:
        consumer.close()


def _dead_letter(message: Any) -> DeadLetter:
    headers = {k: v.decode("utf-8", "replace") for k, v in message.headers}
    topic, partition, offset = headers.get(SOURCE_HEADER, "?/-1/-1").rsplit("/", 2)
    return DeadLetter((topic, int(partition), int(offset)), headers.get(REASON_HEADER, ""),
                      headers.get(ORIGINAL_REASON_HEADER), headers.get(ERROR_HEADER, ""),
                      message.key, message.value)


def stored_ids(store: FeedbackStore) -> dict[EventKind, collections.Counter[str]]:
    """How often each ``prediction_id`` was stored, per kind."""
    out = {}
    for kind, name in ((EventKind.PREDICTION, "predictions"), (EventKind.FEEDBACK, "feedbacks")):
        table = store.read(name, columns=["prediction_id"])
        out[kind] = collections.Counter(table.column("prediction_id").to_pylist() if table.num_rows else [])
    return out


def settle(daemon: DaemonProcess, bootstrap: str, group: str, topics: Iterable[str],
           timeout_s: float) -> None:
    """Wait until the daemon committed every input offset and closed every window.

    Raises:
        AssertionError: the daemon exited (its log tail in the message), or the time ran out.
    """
    topics = list(topics)
    ends = {t: end_offsets(bootstrap, t) for t in topics}
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        assert daemon.proc is not None
        if daemon.proc.poll() is not None:
            raise AssertionError(f"the daemon exited with {daemon.proc.returncode}:\n{daemon.tail()}")
        committed = _committed(bootstrap, group, topics)
        status = daemon.status()
        open_windows = None if status is None else {
            t: s["open_windows"] for t, s in status["ingest"]["topics"].items() if s["open_windows"]}
        last = (committed, open_windows)
        if committed == ends and open_windows == {}:
            return
        time.sleep(0.5)
    raise AssertionError(f"not settled in {timeout_s}s: committed/open windows {last!r}, ends {ends}\n"
                         f"{daemon.tail()}")


def _committed(bootstrap: str, group: str, topics: list[str]) -> dict[str, dict[int, int]] | None:
    """None while the group has no coordinator yet (a fresh broker creates its offsets
    topic on the first commit)."""
    try:
        return {t: committed_offsets(bootstrap, group, t) for t in topics}
    except KafkaError:
        return None


def log_lines(path: Path, levels: tuple[str, ...] = ("error", "critical")) -> collections.Counter[str]:
    """The daemon's log lines of ``levels``, counted by logger and message: a handled
    failure (a rewind, a failed analysis step) keeps the daemon alive but is a finding.

    Text that is not a JSON line (a traceback on stderr: the process died outside its
    logging) counts as an error, once per block, by its last line (the exception).
    """
    out: collections.Counter[str] = collections.Counter()
    block: list[str] = []
    for line in [*path.read_text(errors="replace").splitlines(), "{}"]:
        try:
            entry = json.loads(line)
        except ValueError:
            block.append(line)
            continue
        if block and "error" in levels:
            out[f"(stderr) {block[-1][:200]}"] += 1
        block = []
        if isinstance(entry, dict) and entry.get("level") in levels:
            out[f"{entry.get('logger')}: {entry.get('msg')}"] += 1
    return out


@dataclasses.dataclass
class Report:
    """What became of a campaign's records.

    Attributes:
        reasons: dead letters by their reason header.
        reference_reasons: the original reasons of the records sent as references.
        unaccounted: records neither stored nor dead-lettered.
        problems: every other broken promise (stored or dead-lettered twice, a fate
            other than the decoder's, a copy that differs from the record, ...).
    """

    records: int = 0
    stored: int = 0
    dead_lettered: int = 0
    kinds: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    reasons: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    reference_reasons: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    unaccounted: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)


def account(placed: Sequence[Placed], dead: Sequence[DeadLetter],
            stored: Mapping[EventKind, Mapping[str, int]], *, max_bytes: int,
            dead_letter_bytes: int) -> Report:
    """Check every record's fate against the decoder's verdict; see the module docstring."""
    report = Report(records=len(placed))
    letters: dict[Source, list[DeadLetter]] = collections.defaultdict(list)
    for d in dead:
        letters[d.source].append(d)
    owners = {(p.record.kind, i): p for p in placed for i in p.record.ids}
    for kind, counts in stored.items():
        strays = [i for i in counts if (kind, i) not in owners]
        if strays:
            report.problems.append(f"{len(strays)} stored {kind.value} ids match no record: {strays[:3]}")
    sources = {p.source for p in placed}
    strays_dl = [s for s in letters if s not in sources]
    if strays_dl:
        report.problems.append(f"{len(strays_dl)} dead letters match no record, e.g. {strays_dl[:3]}")
    for p in placed:
        report.kinds[p.record.gen] += 1
        _account_one(report, p, letters.get(p.source, []), stored.get(p.record.kind, {}), max_bytes,
                     dead_letter_bytes)
    return report


def _account_one(report: Report, p: Placed, letters: list[DeadLetter], stored: Mapping[str, int],
                 max_bytes: int, dead_letter_bytes: int) -> None:
    r = p.record
    times_stored = sum(stored.get(i, 0) for i in r.ids)
    expected = verdict(r, max_bytes)
    if r.expect is not None and expected != r.expect:
        report.problems.append(f"{p}: the decoder says {expected}, the corpus expects {r.expect}")
    if times_stored + len(letters) == 0:
        report.unaccounted.append(str(p))
        return
    if times_stored + len(letters) > 1:
        report.problems.append(f"{p}: stored {times_stored}x and dead-lettered {len(letters)}x")
    if times_stored:
        report.stored += 1
        if expected != STORED:
            report.problems.append(f"{p}: stored, but the decoder alone says {expected}")
        return
    report.dead_lettered += 1
    d = letters[0]
    report.reasons[d.reason] += 1
    reason = d.original_reason if d.reason == TOO_LARGE else d.reason
    allowed = {expected, Reason.LATE.value} if expected == STORED and r.may_be_late else {expected}
    if reason not in allowed:
        report.problems.append(f"{p}: dead-lettered as {d.reason}/{d.original_reason}, "
                               f"the decoder alone says {expected}: {d.error[:200]}")
    if not d.error:
        report.problems.append(f"{p}: dead letter without a {ERROR_HEADER} header")
    report.problems += [f"{p}: {msg}" for msg in _copy_problems(p, d, dead_letter_bytes)]
    if d.reason == TOO_LARGE:
        report.reference_reasons[reason or "?"] += 1


def _copy_problems(p: Placed, d: DeadLetter, dead_letter_bytes: int) -> list[str]:
    """A dead letter is the record byte for byte, or a reference when its copy would not
    fit the dead-letter topic."""
    r = p.record
    value = r.value or b""
    as_reference = len(value) + len(r.key or b"") + DEAD_LETTER_OVERHEAD > dead_letter_bytes
    if as_reference != (d.reason == TOO_LARGE):
        return [f"sent {'as a reference' if d.reason == TOO_LARGE else 'as a copy'} at "
                f"{len(value)}+{len(r.key or b'')} bytes (dead-letter topic: {dead_letter_bytes})"]
    if not as_reference:
        problems = [] if (d.value or b"") == value else ["the dead-letter value differs from the record's"]
        return problems + ([] if d.key == r.key else [f"dead-letter key {d.key!r:.40} is not {r.key!r:.40}"])
    ref = json.loads(d.value or b"{}")
    want_head = base64.b64encode(value[:REFERENCE_HEAD_BYTES]).decode()
    if (ref.get("source") != {"topic": p.topic, "partition": p.partition, "offset": p.offset}
            or ref.get("value_bytes") != len(value) or ref.get("head_base64") != want_head):
        return [f"reference {str(ref)[:200]} does not describe the record"]
    return []
