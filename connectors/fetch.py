"""A faster way from kafka-python's fetch responses to ConsumerRecords.

Profiles of the daemon put kafka-python's record parsing at ~58% of the main
thread: every record of a v2 batch goes through seven ``decode_varint`` calls, a
``DefaultRecord``, a generator frame, ``itertools`` wrappers and a 13-field
``ConsumerRecord``. This module replaces only the per-record part. It plugs a
subclass of ``Fetcher.PartitionRecords`` into one consumer's fetcher, which walks
the same ``MemoryRecords`` batch by batch with kafka-python's own batch objects
(so CRC checks, decompression, transactions, control batches and leader epochs
are handled by the same code) and parses the records of each v2 batch in one
tight loop into the very same ``ConsumerRecord`` tuples.

It is meant to be indistinguishable from the original: the same records, the same
``next_fetch_offset`` / ``leader_epoch`` after every ``take``, the same metrics,
the same exceptions at the same points. Whatever the loop does not recognise (a
malformed record, a varint longer than it expects, legacy message formats,
deserializers) goes through kafka-python's own per-record code, and a consumer
whose kafka-python does not look like the version this was written against keeps
the public path altogether (logged once). tests/test_fetch.py compares both paths
on real broker data.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from typing import Any

import kafka
import kafka.errors as Errors
import numpy as np
from kafka.consumer import fetcher as _fetcher_mod
from kafka.record.default_records import DefaultRecordBatch
from kafka.record.util import decode_varint

__all__ = ["SUPPORTED_KAFKA_PYTHON", "FastPartitionRecords", "install", "parse_records"]

log = logging.getLogger(__name__)

#: kafka-python versions whose fetcher internals this module was checked against
#: (inclusive lower bound, exclusive upper bound); pyproject.toml pins the same range.
SUPPORTED_KAFKA_PYTHON = ((3, 0, 12), (3, 1))

ConsumerRecord = _fetcher_mod.ConsumerRecord
_Base = _fetcher_mod.Fetcher.PartitionRecords
_READ_COMMITTED = _fetcher_mod.IsolationLevel.READ_COMMITTED
_new_record = tuple.__new__
_LOG_APPEND_TIME = DefaultRecordBatch.LOG_APPEND_TIME

_logged_fallback = False


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _incompatibility(fetcher: Any) -> str | None:
    """Why the fast path cannot serve this fetcher (None: it can)."""
    lo, hi = SUPPORTED_KAFKA_PYTHON
    version = _version_tuple(getattr(kafka, "__version__", "0"))
    if not lo <= version < hi:
        return f"kafka-python {kafka.__version__} is outside the supported range"
    if fetcher is None or not isinstance(fetcher, _fetcher_mod.Fetcher):
        return "the consumer has no kafka-python Fetcher"
    if getattr(fetcher, "PartitionRecords", None) is not _Base:
        return "the fetcher's PartitionRecords is not kafka-python's"
    config = getattr(fetcher, "config", None)
    if not isinstance(config, dict):
        return "the fetcher has no config"
    if config.get("key_deserializer") is not None or config.get("value_deserializer") is not None:
        return "the consumer has deserializers"
    for name in ("_buffer", "_pos", "_num_records", "_header_data", "_maybe_uncompress"):
        if not hasattr(DefaultRecordBatch, name):
            return f"DefaultRecordBatch has no {name}"
    for name in ("_unpack_records", "_maybe_skip_record", "_consume_aborted_transactions_up_to",
                 "_contains_abort_marker", "_is_batch_aborted", "_maybe_raise_next_inline_exception",
                 "drain", "take"):
        if not hasattr(_Base, name):
            return f"PartitionRecords has no {name}"
    if ConsumerRecord._fields != _FIELDS:
        return "ConsumerRecord has other fields"
    return _self_test()


_FIELDS = ("topic", "partition", "leader_epoch", "offset", "timestamp", "timestamp_type",
           "key", "value", "headers", "checksum", "serialized_key_size",
           "serialized_value_size", "serialized_header_size")


def install(consumer: Any) -> bool:
    """Use the fast path for this consumer's fetches from now on; idempotent.

    Returns whether the fast path is in use. When it cannot be (another
    kafka-python version, deserializers, internals not as expected), the consumer
    is left untouched and the reason is logged once per process.
    """
    fetcher = getattr(consumer, "_fetcher", None)
    state = getattr(fetcher, "_driftloop_fast_records", None)
    if state is not None:
        return bool(state)
    why = _incompatibility(fetcher)
    if why is None:
        fetcher.PartitionRecords = FastPartitionRecords
    else:
        global _logged_fallback
        if not _logged_fallback:
            _logged_fallback = True
            log.warning("kafka-python record fast path disabled, using the public path",
                        extra={"fields": {"reason": why}})
    if fetcher is not None:
        with contextlib.suppress(AttributeError):
            fetcher._driftloop_fast_records = why is None
    return why is None


def parse_records(
    buf: bytearray, pos: int, count: int, topic: str, partition: int, leader_epoch: int,
    base_offset: int, first_timestamp: int, max_timestamp: int, timestamp_type: int,
) -> tuple[list[Any], list[int]] | None:
    """The records of one (decompressed) v2 batch as ConsumerRecords, plus their sizes.

    Mirrors ``DefaultRecordBatch._read_msg`` and the record part of
    ``PartitionRecords._unpack_records``. Returns None for anything that would
    make kafka-python raise, or that this loop does not mirror exactly; the
    caller then lets kafka-python's own code read the batch.
    """
    end = len(buf)
    mv = memoryview(buf)
    out: list[Any] = []
    sizes: list[int] = []
    append = out.append
    size_append = sizes.append
    new = _new_record
    cr = ConsumerRecord
    log_append = timestamp_type == _LOG_APPEND_TIME
    try:
        for _ in range(count):
            b = buf[pos]
            if b < 0x80:
                length = (b >> 1) ^ -(b & 1)
                pos += 1
            else:
                length, pos = decode_varint(buf, pos)
            start = pos
            # attributes (unused; kafka-python reads them as a varint)
            if buf[pos] < 0x80:
                pos += 1
            else:
                _, pos = decode_varint(buf, pos)
            b = buf[pos]
            if b < 0x80:
                ts_delta = (b >> 1) ^ -(b & 1)
                pos += 1
            else:
                ts_delta, pos = decode_varint(buf, pos)
            b = buf[pos]
            if b < 0x80:
                offset_delta = (b >> 1) ^ -(b & 1)
                pos += 1
            else:
                offset_delta, pos = decode_varint(buf, pos)
            b = buf[pos]
            if b < 0x80:
                key_len = (b >> 1) ^ -(b & 1)
                pos += 1
            else:
                key_len, pos = decode_varint(buf, pos)
            if key_len >= 0:
                key = bytes(mv[pos:pos + key_len])
                pos += key_len
                key_size = len(key)
            else:
                key = None
                key_size = -1
            b = buf[pos]
            if b < 0x80:
                value_len = (b >> 1) ^ -(b & 1)
                pos += 1
            else:
                value_len, pos = decode_varint(buf, pos)
            if value_len >= 0:
                value = bytes(mv[pos:pos + value_len])
                pos += value_len
                value_size = len(value)
            else:
                value = None
                value_size = -1
            b = buf[pos]
            pos += 1
            headers: list[tuple[str, bytes | None]] = []
            if b:
                if b >= 0x80 or b & 1:
                    return None  # a negative or huge header count: kafka-python's call
                header_size = 0
                for _ in range(b >> 1):
                    h_key_len, pos = decode_varint(buf, pos)
                    if h_key_len < 0:
                        return None
                    h_key = buf[pos:pos + h_key_len].decode("utf-8")
                    pos += h_key_len
                    h_value_len, pos = decode_varint(buf, pos)
                    if h_value_len >= 0:
                        h_value = bytes(mv[pos:pos + h_value_len])
                        pos += h_value_len
                        header_size += len(h_value)
                    else:
                        h_value = None
                    header_size += len(h_key.encode("utf-8"))
                    headers.append((h_key, h_value))
            else:
                header_size = -1
            if pos - start != length or pos > end:
                return None
            append(new(cr, (topic, partition, leader_epoch, base_offset + offset_delta,
                            max_timestamp if log_append else first_timestamp + ts_delta,
                            timestamp_type, key, value, headers, None, key_size, value_size,
                            header_size)))
            size_append(length)
    except (IndexError, ValueError):
        return None
    if pos != end:
        return None
    return out, sizes


#: Below this many records a batch is parsed by the plain loop: numpy's per-call
#: overhead only pays off over enough records.
BULK_MIN_RECORDS = 48


def _varints(arr: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Zigzag varints starting at each of ``pos``: (values, positions after them).

    Reads are clipped to the buffer; a read past a record's end shows up as a
    record whose fields do not add up to its length, which the caller checks.
    """
    b = arr.take(pos, mode="clip").astype(np.int64)
    v = b & 0x7F
    size = np.ones(len(pos), dtype=np.int64)
    idx = np.flatnonzero(b >= 0x80)
    shift = 7
    while idx.size:
        if shift > 56:
            return None  # longer than any sane delta or length: kafka-python's call
        nb = arr.take(pos[idx] + size[idx], mode="clip").astype(np.int64)
        v[idx] |= (nb & 0x7F) << shift
        size[idx] += 1
        idx = idx[nb >= 0x80]
        shift += 7
    return (v >> 1) ^ -(v & 1), pos + size


def parse_records_bulk(
    buf: bytearray, pos: int, count: int, topic: str, partition: int, leader_epoch: int,
    base_offset: int, first_timestamp: int, max_timestamp: int, timestamp_type: int,
) -> tuple[list[Any], list[int]] | None:
    """`parse_records` for large batches: only the record lengths are chained in
    Python, every other field is decoded for all records at once with numpy.

    Returns None where `parse_records` might differ: records with headers, a
    non-zero attributes byte, anything malformed.
    """
    end = len(buf)
    starts: list[int] = []
    lengths: list[int] = []
    s_append = starts.append
    l_append = lengths.append
    p = pos
    try:
        for _ in range(count):
            b = buf[p]
            if b < 0x80:
                p += 1
                length = (b >> 1) ^ -(b & 1)
            else:
                b2 = buf[p + 1]
                if b2 < 0x80:
                    v = (b & 0x7F) | (b2 << 7)
                    p += 2
                    length = (v >> 1) ^ -(v & 1)
                else:
                    length, p = decode_varint(buf, p)
            s_append(p)
            l_append(length)
            p += length
    except (IndexError, ValueError):
        return None
    if p != end:
        return None
    arr = np.frombuffer(buf, dtype=np.uint8)
    S = np.array(starts, dtype=np.int64)
    L = np.array(lengths, dtype=np.int64)
    if count == 0 or L.min() < 0 or arr[S].max() >= 0x80:  # attributes: one byte, as read
        return None
    P = S + 1
    fields = []
    for _ in range(3):  # timestamp delta, offset delta, key length
        got = _varints(arr, P)
        if got is None:
            return None
        value, P = got
        fields.append(value)
    ts_delta, offset_delta, key_len = fields
    if key_len.min() < -1:
        return None
    key_start = P
    P = P + np.maximum(key_len, 0)
    got = _varints(arr, P)
    if got is None:
        return None
    value_len, value_start = got
    if value_len.min() < -1:
        return None
    P = value_start + np.maximum(value_len, 0)
    # No headers (a zero count byte) and every record exactly its length.
    if arr.take(P, mode="clip").any() or not np.array_equal(P + 1, S + L):
        return None
    data = bytes(buf)
    get = data.__getitem__
    value_end = value_start + value_len
    if value_len.min() >= 0:
        values: Any = list(map(get, map(slice, value_start.tolist(), value_end.tolist())))
    else:
        values = [get(slice(a, b)) if b >= a else None
                  for a, b in zip(value_start.tolist(), value_end.tolist(), strict=True)]
    if key_len.max() < 0:
        keys: Any = itertools.repeat(None)
    else:
        keys = [get(slice(a, a + n)) if n >= 0 else None
                for a, n in zip(key_start.tolist(), key_len.tolist(), strict=True)]
    if timestamp_type == _LOG_APPEND_TIME:
        timestamps: Any = itertools.repeat(max_timestamp)
    else:
        timestamps = (ts_delta + first_timestamp).tolist()
    rep = itertools.repeat
    records = list(map(_new_record, rep(ConsumerRecord), zip(  # noqa: B905 (repeat() is endless)
        rep(topic), rep(partition), rep(leader_epoch), (offset_delta + base_offset).tolist(),
        timestamps, rep(timestamp_type), keys, values, [[] for _ in range(count)], rep(None),
        key_len.tolist(), value_len.tolist(), rep(-1))))
    return records, lengths


class FastPartitionRecords(_Base):  # type: ignore[misc,valid-type]
    """``Fetcher.PartitionRecords`` with the per-record work done batch-wise.

    The base class keeps a generator over all records and ``take`` slices it; here
    ``take`` slices per-batch lists, filled one batch at a time exactly when the
    generator would have reached that batch, so positions and exceptions surface
    at the same calls as in kafka-python.
    """

    def __init__(self, fetch_offset: int, tp: Any, records: Any, key_deserializer: Any = None,
                 value_deserializer: Any = None, check_crcs: bool = True,
                 isolation_level: Any = _fetcher_mod.IsolationLevel.READ_UNCOMMITTED,
                 aborted_transactions: Any = None, metric_aggregator: Any = None,
                 on_drain: Any = lambda x: None) -> None:
        super().__init__(fetch_offset, tp, records, key_deserializer=key_deserializer,
                         value_deserializer=value_deserializer, check_crcs=check_crcs,
                         isolation_level=isolation_level,
                         aborted_transactions=aborted_transactions,
                         metric_aggregator=metric_aggregator, on_drain=on_drain)
        # With deserializers the base class's generator does everything.
        self._fast = key_deserializer is None and value_deserializer is None
        self._records = records
        self._pending: list[Any] = []
        self._sizes: list[int] = []
        self._at = 0
        self._skipping = True
        self._dead = False
        self._deferred: BaseException | None = None
        self._last_batch: Any = None

    def take(self, n: int | None = None) -> list[Any]:
        if not self._fast:
            return super().take(n)
        self._maybe_raise_next_inline_exception()
        out: list[Any] = []
        if self.record_iterator is None:
            return out
        try:
            while n is None or len(out) < n:
                pending = self._pending
                at = self._at
                left = len(pending) - at
                if left > 0:
                    want = left if n is None else min(n - len(out), left)
                    stop = at + want
                    chunk = pending if want == len(pending) else pending[at:stop]
                    self.records_read += want
                    self.bytes_read += sum(self._sizes[at:stop])
                    self._at = stop
                    self.next_fetch_offset = chunk[-1].offset + 1
                    if out:
                        out.extend(chunk)
                    else:
                        out = chunk  # the queue is replaced, never mutated, by _fill
                    continue
                if self._deferred is not None:
                    exc, self._deferred = self._deferred, None
                    self._dead = True
                    raise exc
                if self._dead:
                    break
                try:
                    if not self._next_batch():
                        break
                except BaseException:
                    self._dead = True
                    raise
        except Exception as e:
            if not out:
                raise
            self._next_inline_exception = e
        return out

    def _fill(self, records: list[Any], sizes: list[int]) -> None:
        """Queue one batch's records, dropping those before the fetch offset (the
        base class's ``dropwhile``, which stops at the first record it keeps)."""
        if self._skipping:
            fetch_offset = self.fetch_offset
            k = 0
            for r in records:
                if r.offset >= fetch_offset:
                    break
                k += 1
            if k:
                log.debug("Skipping %d messages before offset %s", k, fetch_offset)
                self.records_read += k
                self.bytes_read += sum(sizes[:k])
                self.next_fetch_offset = records[k - 1].offset + 1
                records = records[k:]
                sizes = sizes[k:]
            if records:
                self._skipping = False
        self._pending = records
        self._sizes = sizes
        self._at = 0

    def _next_batch(self) -> bool:
        """Read the next batch into the queue; False once the records are exhausted
        (and drained, as the base class's generator does when it ends)."""
        try:
            return self._read_batch()
        except StopIteration:
            log.exception("StopIteration raised unpacking messageset")
            msg = "StopIteration raised unpacking messageset"
            raise RuntimeError(msg) from None

    def _read_batch(self) -> bool:
        batch = self._records.next_batch()
        if batch is None:
            last = self._last_batch
            if last is not None and last.magic == 2:
                self.next_fetch_offset = last.next_offset
            self.drain()
            return False
        self._last_batch = batch
        tp = self.topic_partition
        if self.check_crcs and not batch.validate_crc():
            msg = f"Record batch for partition {tp} at offset {batch.base_offset} failed crc check"
            raise Errors.CorruptRecordError(msg)
        if batch.magic == 2:
            self.leader_epoch = batch.leader_epoch
            if self.isolation_level == _READ_COMMITTED and batch.has_producer_id():
                self._consume_aborted_transactions_up_to(batch.last_offset)
                producer_id = batch.producer_id
                if self._contains_abort_marker(batch):
                    self.aborted_producer_ids.discard(producer_id)
                elif self._is_batch_aborted(batch):
                    log.debug("Skipping aborted record batch from partition %s with producer_id %s"
                              " and offsets %s to %s", tp, producer_id, batch.base_offset,
                              batch.last_offset)
                    self.next_fetch_offset = batch.next_offset
                    self._fill([], [])
                    return True
            if batch.is_control_batch:
                self.next_fetch_offset = batch.next_offset
                self._fill([], [])
                return True
            iter(batch)  # decompresses, raising what kafka-python raises
            args = (batch._buffer, batch._pos, batch._num_records, tp.topic, tp.partition,
                    self.leader_epoch, batch.base_offset, batch.first_timestamp,
                    batch.max_timestamp, batch.timestamp_type)
            parsed = parse_records_bulk(*args) if batch._num_records >= BULK_MIN_RECORDS else None
            if parsed is None:
                parsed = parse_records(*args)
            if parsed is not None:
                self._fill(*parsed)
                return True
        self._read_slowly(batch)
        return True

    def _read_slowly(self, batch: Any) -> None:
        """kafka-python's own per-record loop, for batches the fast loop declined."""
        tp = self.topic_partition
        records: list[Any] = []
        sizes: list[int] = []
        try:
            for record in batch:
                if self.check_crcs and not record.validate_crc():
                    msg = f"Record for partition {tp} at offset {record.offset} failed crc check"
                    raise Errors.CorruptRecordError(msg)
                key_size = len(record.key) if record.key is not None else -1
                value_size = len(record.value) if record.value is not None else -1
                headers = record.headers
                header_size = sum(
                    len(h_key.encode("utf-8")) + (len(h_val) if h_val is not None else 0)
                    for h_key, h_val in headers) if headers else -1
                records.append(ConsumerRecord(
                    tp.topic, tp.partition, self.leader_epoch, record.offset, record.timestamp,
                    record.timestamp_type, record.key, record.value, record.headers,
                    record.checksum, key_size, value_size, header_size))
                sizes.append(record.size_in_bytes)
        except Exception as exc:
            self._deferred = exc
        self._fill(records, sizes)


def _self_test() -> str | None:
    """Parse a batch built by kafka-python both ways; None when they agree."""
    from kafka.record.default_records import DefaultRecordBatchBuilder
    from kafka.record.memory_records import MemoryRecords
    from kafka.structs import TopicPartition

    try:
        data = b""
        # One batch for each loop: headers (plain loop), and a bulk-sized one without.
        for rows in ([(b"k", b'{"a":1}', []), (None, None, [("h", b"v"), ("n", None)]),
                      (b"", b"x" * 300, []), (None, b"", [("\u00e9", b"")])],
                     [(b"k%d" % i if i % 3 else None, None if i % 7 == 0 else b"v" * (i * 5), [])
                      for i in range(BULK_MIN_RECORDS + 2)]):
            builder = DefaultRecordBatchBuilder(
                magic=2, compression_type=0, is_transactional=False, producer_id=-1,
                producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
            base = 0 if not data else 100
            for i, (key, value, headers) in enumerate(rows):
                builder.append(base + i * 3, timestamp=1_700_000_000_000 + i * 70_000, key=key,
                               value=value, headers=headers)
            data += bytes(builder.build())
        tp = TopicPartition("t", 0)

        def read(cls: Any) -> list[Any]:
            part = cls(5, tp, MemoryRecords(data), check_crcs=True)
            got = []
            while part:  # the fetcher never takes from a drained PartitionRecords
                got.append((part.take(1), part.next_fetch_offset, part.records_read,
                            part.bytes_read))
            return got

        expected, got = read(_Base), read(FastPartitionRecords)
    except Exception as exc:  # any surprise in the internals means: do not use them
        return f"self-test raised {exc!r}"
    if got != expected:
        return "self-test: the fast path disagrees with kafka-python"
    return None
