"""The record fast path gives exactly what kafka-python gives, on real broker data.

Raw fetch responses are captured from a real broker (compressed and uncompressed
batches of every size, keys, headers, null and empty values, committed and aborted
transactions with their control batches) and replayed through kafka-python's
``PartitionRecords`` and through ``FastPartitionRecords``: every ``take`` must return
the same records and leave the same positions, counters and exceptions.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.codec import has_lz4, has_zstd
from kafka.record.memory_records import MemoryRecords

import connectors.fetch as fast
from connectors.fetch import FastPartitionRecords, install

pytest_plugins = ["tests.kafka_fixtures"]

Base = fast._Base
READ_COMMITTED = fast._READ_COMMITTED

CODECS = [None, "gzip"] + (["lz4"] if has_lz4() else []) + (["zstd"] if has_zstd() else [])


def _fill(bootstrap: str, topic: str) -> None:
    """Records of every shape the parser distinguishes, on partition 0 and 1."""
    for codec in CODECS:
        for linger, count in ((0, 7), (100, 400)):  # small batches (plain loop) and bulk ones
            producer = KafkaProducer(bootstrap_servers=bootstrap, compression_type=codec,
                                     linger_ms=linger, batch_size=1 << 20)
            for i in range(count):
                key = None if i % 3 else f"k{i}".encode()
                value: bytes | None = b'{"i": %d}' % i
                headers: list[tuple[str, bytes | None]] = []
                if i % 5 == 0:
                    value = None if key is not None else b""
                if i % 7 == 0:
                    headers = [("trace", b"abc"), ("\u00e9", b"\xff"), ("empty", b"")]
                if i % 11 == 0:
                    value = b"x" * (20_000 + i)  # multi-byte length varints
                producer.send(topic, key=key, value=value, headers=headers, partition=i % 2,
                              timestamp_ms=1_767_225_600_000 + i * 50_000)  # multi-byte deltas
            producer.flush()
            producer.close()
    # Transactions: one committed, one aborted, each followed by its control batch.
    tx = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"tx-{topic}")
    tx.init_transactions()
    for commit in (True, False, True):
        tx.begin_transaction()
        for i in range(30):
            tx.send(topic, key=b"t", value=b"tx-%d-%d" % (commit, i), partition=i % 2)
        tx.flush()
        if commit:
            tx.commit_transaction()
        else:
            tx.abort_transaction()
    tx.close()


def _capture(bootstrap: str, topic: str, isolation: str,
             monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple[Any, ...]], list[Any]]:
    """Consume the topic through the fast path; return the raw fetches it saw and the
    records poll() returned."""
    fetches: list[tuple[Any, ...]] = []
    init = FastPartitionRecords.__init__

    def capturing(self: Any, fetch_offset: int, tp: Any, records: Any, *args: Any,
                  **kwargs: Any) -> None:
        fetches.append((fetch_offset, tp, bytes(records._buffer), kwargs.get("isolation_level"),
                        kwargs.get("aborted_transactions")))
        init(self, fetch_offset, tp, records, *args, **kwargs)

    monkeypatch.setattr(FastPartitionRecords, "__init__", capturing)
    got = _consume(bootstrap, topic, isolation, use_fast=True, max_poll_records=97,
                   max_partition_fetch_bytes=64 * 1024)
    monkeypatch.setattr(FastPartitionRecords, "__init__", init)
    return fetches, got


def _consume(bootstrap: str, topic: str, isolation: str, *, use_fast: bool | None,
             **config: Any) -> list[Any]:
    """All records of partitions 0 and 1; ``use_fast``: install the fast path and
    expect it to be used (True) or refused (False), or leave the consumer alone."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             isolation_level=isolation, fetch_max_wait_ms=20, **config)
    try:
        tps = [TopicPartition(topic, p) for p in (0, 1)]
        consumer.assign(tps)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(tps)
        if use_fast is not None:
            assert install(consumer) is use_fast
        got: list[Any] = []
        for _ in range(2000):
            for recs in consumer.poll(timeout_ms=200).values():
                got.extend(recs)
            if all(consumer.position(tp) >= ends[tp] for tp in tps):
                break
        return sorted(got, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()


def _replay(cls: type, fetch: tuple[Any, ...], take: int, start: int | None = None,
            data: bytes | None = None, check_crcs: bool = True) -> list[Any]:
    """Every observable step of draining one fetch the way the Fetcher does."""
    fetch_offset, tp, raw, isolation, aborted = fetch
    part = cls(fetch_offset if start is None else start, tp, MemoryRecords(raw if data is None else data),
               check_crcs=check_crcs, isolation_level=isolation, aborted_transactions=aborted)
    steps: list[Any] = []
    for _ in range(10_000):
        if not part:
            break
        try:
            out: Any = part.take(take)
        except Exception as exc:
            out = (type(exc), str(exc))
        steps.append((out, part.next_fetch_offset, part.leader_epoch, part.records_read,
                      part.bytes_read))
        if out == [] and not isinstance(out, tuple) and part:
            # A stream that ended in an exception yields nothing more and never drains.
            steps.append("stuck")
            break
    return steps


@pytest.fixture(scope="module")
def filled_topic(kafka_bootstrap: str) -> str:
    from monitor.testbed.local_kafka import create_topics, unique_topic_name

    topic = unique_topic_name("fetch")
    create_topics(kafka_bootstrap, {topic: 2})
    _fill(kafka_bootstrap, topic)
    return topic


@pytest.mark.parametrize("isolation", ["read_uncommitted", "read_committed"])
def test_fast_path_returns_what_kafka_python_returns(
        kafka_bootstrap: str, filled_topic: str, isolation: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    fetches, fast_records = _capture(kafka_bootstrap, filled_topic, isolation, monkeypatch)
    plain = _consume(kafka_bootstrap, filled_topic, isolation, use_fast=None,
                     max_poll_records=97, max_partition_fetch_bytes=64 * 1024)
    assert fast_records == plain
    values = [r.value for r in plain]
    assert None in values and b"" in values
    assert any(r.headers for r in plain) and any(r.key for r in plain)
    aborted = [r for r in plain if r.value and r.value.startswith(b"tx-0")]
    assert bool(aborted) is (isolation == "read_uncommitted")
    assert sum(r.value is not None and r.value.startswith(b"tx-1") for r in plain) == 60

    for fetch in fetches:
        for take in (1, 97, None):
            assert _replay(FastPartitionRecords, fetch, take) == _replay(Base, fetch, take)
    # Fetches starting inside a batch skip the records before the fetch offset.
    for fetch in fetches[:40]:
        start = fetch[0] + 3
        assert _replay(FastPartitionRecords, fetch, 50, start) == _replay(Base, fetch, 50, start)


def test_bulk_and_plain_loops_are_both_exercised(
        kafka_bootstrap: str, filled_topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"bulk": 0, "plain": 0}
    bulk, plain = fast.parse_records_bulk, fast.parse_records

    def count_bulk(*a: Any) -> Any:
        calls["bulk"] += 1
        return bulk(*a)

    def count_plain(*a: Any) -> Any:
        calls["plain"] += 1
        return plain(*a)

    monkeypatch.setattr(fast, "parse_records_bulk", count_bulk)
    monkeypatch.setattr(fast, "parse_records", count_plain)
    _capture(kafka_bootstrap, filled_topic, "read_uncommitted", monkeypatch)
    assert calls["bulk"] > 0 and calls["plain"] > 0


def test_corrupt_data_fails_exactly_as_in_kafka_python(
        kafka_bootstrap: str, filled_topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fetches, _ = _capture(kafka_bootstrap, filled_topic, "read_uncommitted", monkeypatch)
    fetch = max(fetches, key=lambda f: len(f[2]))
    raw = bytearray(fetch[2])
    seen_errors = 0
    for where in (70, 71, 100, len(raw) // 2, len(raw) - 5):
        for flip in (0x01, 0x80, 0xFF):
            data = bytearray(raw)
            data[where] ^= flip
            for check in (True, False):
                base = _replay(Base, fetch, 97, data=bytes(data), check_crcs=check)
                assert _replay(FastPartitionRecords, fetch, 97, data=bytes(data),
                               check_crcs=check) == base
                seen_errors += any(isinstance(s, tuple) and isinstance(s[0], tuple)
                                   for s in base)
    assert seen_errors  # the corruptions did reach the error paths


def test_fallback_to_the_public_path_is_logged_once_and_still_consumes(
        kafka_bootstrap: str, filled_topic: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(fast, "_logged_fallback", False)
    caplog.set_level(logging.WARNING, logger="connectors.fetch")
    with_deserializer = _consume(kafka_bootstrap, filled_topic, "read_committed",
                                 use_fast=False, value_deserializer=lambda v: v)
    monkeypatch.setattr(fast, "SUPPORTED_KAFKA_PYTHON", ((9, 0), (10, 0)))
    other_version = _consume(kafka_bootstrap, filled_topic, "read_committed", use_fast=False)
    plain = _consume(kafka_bootstrap, filled_topic, "read_committed", use_fast=None)
    assert with_deserializer == other_version == plain
    warnings = [r for r in caplog.records if "fast path disabled" in r.getMessage()]
    assert len(warnings) == 1
    assert "deserializers" in str(warnings[0].__dict__.get("fields"))


@pytest.mark.parametrize("loop", ["parse_records", "parse_records_bulk"])
def test_a_self_test_mismatch_keeps_the_public_path(
        loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert fast._self_test() is None
    original = getattr(fast, loop)
    monkeypatch.setattr(fast, loop, lambda *a: None)
    assert fast._self_test() is None  # declining a batch is fine: kafka-python reads it

    def wrong(*a: Any) -> Any:
        records, sizes = original(*a)
        return [r._replace(offset=r.offset + 1) for r in records], sizes

    monkeypatch.setattr(fast, loop, wrong)
    assert fast._self_test() is not None

    class FakeConsumer:
        _fetcher = None

    assert install(FakeConsumer()) is False
