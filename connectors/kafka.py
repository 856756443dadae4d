"""Kafka edge: the consumer, the dead-letter producer and offset commits.

Everything of driftloop that imports kafka-python lives here and in connectors/fetch.py
(the tests' and the demo's own producers are in monitor/testbed/ and tests/).
Settings that matter for throughput were measured on the target machine
(docs/design-notes.md): ``max_poll_records`` ~2000, ``fetch_max_wait_ms`` 10-50 ms,
synchronous commits about once a second, and the ``crc32c`` package installed.

kafka-python 3 runs its network I/O on a background thread and invokes synchronous
rebalance listeners on that thread, while the caller is blocked in ``poll()`` or
``close()``. A listener may therefore touch the caller's state, but must not call a
blocking consumer API (``commit``, ``committed``, ``position``): the client refuses.
That is why the daemon's listener checkpoints into the state store and leaves the
Kafka commit for the next regular one.

TLS and SASL (docs/security.md) reach every client through `client_security`, so a
client added later cannot quietly connect in plaintext.

The dead-letter path must succeed for every record the consumer can read, or one
record stops ingestion for good (docs/delivery.md): `check_topics` reads each topic's
``max.message.bytes`` at start-up, the producer accepts the largest of them, and a
record whose copy would not fit the dead-letter topic goes there as a reference (where
it is, its size, its reason and its first KiB) instead.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient
from kafka.errors import KafkaError, MessageSizeTooLargeError
from kafka.structs import OffsetAndMetadata, TopicPartition

from connectors.events import Reason
from connectors.http import read_secret

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DeadLetterError",
    "DeadLetterProducer",
    "KafkaError",
    "KafkaSecurityError",
    "Listener",
    "MissingTopicsError",
    "TopicPartition",
    "TopicReport",
    "check_topics",
    "client_security",
    "commit_offsets",
    "group_joined",
    "make_consumer",
]

log = logging.getLogger(__name__)

REASON_HEADER = "driftloop-reason"
ERROR_HEADER = "driftloop-error"
SOURCE_HEADER = "driftloop-source"
#: On a reference (Reason.TOO_LARGE_FOR_DEAD_LETTER): why the record itself was rejected.
ORIGINAL_REASON_HEADER = "driftloop-original-reason"

#: The brokers' default ``message.max.bytes``: what a topic takes when nothing says more.
DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
#: What a dead-letter copy adds to the record: the three headers (the error is cut at
#: 1,000 bytes) and the batch and record framing, with room to spare.
DEAD_LETTER_OVERHEAD = 2_048
#: How much of a record's value a reference keeps.
REFERENCE_HEAD_BYTES = 1_024


class DeadLetterError(RuntimeError):
    """A rejected record could not be written to the dead-letter topic."""


class MissingTopicsError(RuntimeError):
    """Topics the daemon reads or writes do not exist (and ``kafka.create_topics`` is off)."""


@dataclasses.dataclass(frozen=True)
class TopicReport:
    """What `check_topics` found.

    Attributes:
        created: the topics it created (``kafka.create_topics``).
        max_message_bytes: each topic's record size limit; None where it could not be
            read (no DescribeConfigs permission).
    """

    created: tuple[str, ...]
    max_message_bytes: Mapping[str, int | None]


def check_topics(settings: Any, topics: Iterable[str], *, create: bool = False,
                 security: Mapping[str, Any] | None = None,
                 dead_letter_topic: str | None = None) -> TopicReport:
    """Checks that ``topics`` exist, creating the missing ones when ``create``, and reads
    their size limits.

    A topic created here gets the broker's partition count and replication factor;
    the dead-letter topic also gets a size limit that holds a copy of the largest
    record any other topic can carry, so that no rejected record is too large for it.

    Raises:
        MissingTopicsError: some topic is missing and ``create`` is off; the message
            names each and the command that creates it.
        KafkaError: no broker answered (the caller retries).
    """
    topics = list(dict.fromkeys(topics))
    if security is None:
        security = client_security(settings)
    with explain_refusals(settings):
        admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers.split(","),
                                 client_id=f"{settings.client_id}-admin",
                                 request_timeout_ms=settings.request_timeout_ms, **security)
        try:
            return _check_topics(admin, settings, topics, create, dead_letter_topic)
        finally:
            admin.close()


def _check_topics(admin: KafkaAdminClient, settings: Any, topics: list[str], create: bool,
                  dead_letter_topic: str | None) -> TopicReport:
    missing = [t for t in topics if t not in set(admin.list_topics())]
    created: list[str] = []
    if missing and not create:
        cmds = "; ".join(f"kafka-topics.sh --bootstrap-server {settings.bootstrap_servers} "
                         f"--create --topic {t}" for t in missing)
        msg = (f"topic(s) {', '.join(missing)} do not exist: create them ({cmds}), or set "
               "kafka.create_topics: true to let driftloop create them")
        raise MissingTopicsError(msg)
    limits = _max_message_bytes(admin, [t for t in topics if t not in missing])
    if missing:
        largest = max([v for v in limits.values() if v] or [DEFAULT_MAX_MESSAGE_BYTES])
        spec: dict[str, Any] = {}
        for t in missing:
            spec[t] = {"configs": {"max.message.bytes": str(largest + DEAD_LETTER_OVERHEAD)}
                       if t == dead_letter_topic else {}}
        admin.create_topics(spec, wait_for_metadata=True)
        created = missing
        limits.update(_max_message_bytes(admin, missing))
    return TopicReport(tuple(created), limits)


def _max_message_bytes(admin: KafkaAdminClient, topics: list[str]) -> dict[str, int | None]:
    if not topics:
        return {}
    try:
        found = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t, None) for t in topics],
                                       config_filter="all")
    except KafkaError as exc:  # e.g. no DescribeConfigs permission: the limits stay unknown
        log.warning("cannot read the topics' max.message.bytes", extra={"fields": {"error": repr(exc)}})
        return dict.fromkeys(topics)
    out: dict[str, int | None] = {}
    for t in topics:
        entry = (found.get("topic", {}).get(t) or {}).get("max.message.bytes") or {}
        try:
            out[t] = int(entry["value"])
        except (KeyError, TypeError, ValueError):
            out[t] = None
    return out


class KafkaSecurityError(KafkaError):  # type: ignore[misc]
    """The brokers refused this client's login or TLS handshake.

    A KafkaError, so callers that retry an unreachable broker retry this too (a
    rotated password may arrive), but its message says what to fix instead of
    kafka-python's "Unable to bootstrap".
    """


def client_security(settings: Any, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The kafka-python keyword arguments for the ``kafka`` section's TLS and SASL keys.

    The same for consumers, producers and admin clients (their parameter names
    agree in kafka-python 3). Secrets are read here, from ``environ`` (default: this
    process's) or files.

    Args:
        settings: the ``kafka`` config section (monitor.config.KafkaConfig).

    Raises:
        ValueError: a password variable is unset or a password file unreadable; the
            message names the config key.
    """
    environ = os.environ if environ is None else environ
    proto = settings.security_protocol
    out: dict[str, Any] = {"security_protocol": proto}
    if proto in ("SSL", "SASL_SSL"):
        out["ssl_check_hostname"] = settings.ssl_check_hostname
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(settings, key):
                out[key] = getattr(settings, key)
        key_password = read_secret("kafka.ssl_password", settings.ssl_password_env,
                                   settings.ssl_password_file, environ)
        if key_password is not None:
            out["ssl_password"] = key_password
    if proto.startswith("SASL_"):
        out["sasl_mechanism"] = settings.sasl_mechanism
        out["sasl_plain_username"] = settings.sasl_username
        out["sasl_plain_password"] = read_secret("kafka.sasl_password", settings.sasl_password_env,
                                                 settings.sasl_password_file, environ)
    return out


#: What kafka-python logs (and then hides behind a bootstrap timeout) when a broker
#: refuses the client, and what the operator should look at.
_REFUSALS = (
    ("SaslAuthenticationFailedError", "the broker refused the SASL login"),
    ("CERTIFICATE_VERIFY_FAILED", "the broker's TLS certificate did not verify"),
    ("Handshake failed", "the TLS handshake failed"),
    ("AuthorizationError", "the broker refused an operation to this principal"),
)


class _RefusalLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.first: tuple[str, str] | None = None
        #: Connections the broker closed on us (kafka-python's own words for it).
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.first is not None:
            return
        with contextlib.suppress(Exception):
            text = record.getMessage()
            if "socket disconnected" in text:
                self.dropped += 1
            for needle, meaning in _REFUSALS:
                if needle in text:
                    self.first = (meaning, text)
                    return


@contextlib.contextmanager
def explain_refusals(settings: Any) -> Iterator[None]:
    """Turns a bootstrap timeout caused by a refused login or handshake into a KafkaSecurityError."""
    handler = _RefusalLog()
    kafka_log = logging.getLogger("kafka")
    kafka_log.addHandler(handler)
    try:
        yield
    except KafkaError as exc:
        if isinstance(exc, KafkaSecurityError):
            raise
        if (handler.first is None and handler.dropped
                and str(getattr(settings, "security_protocol", "")).startswith("SASL")):
            # The broker answers a refused login and closes; kafka-python 3.0 over TLS
            # sometimes reads the close before the answer, and reports only the drop
            # (seen in CI: the broker logged "invalid credentials" for every attempt).
            handler.first = ("the broker refused the SASL login",
                             f"the broker closed all {handler.dropped} connections during the login "
                             "without an answer the client could read; its log names the reason")
        if handler.first is None:
            raise
        meaning, detail = handler.first
        if meaning == "the broker refused the SASL login":
            where = (f"kafka.sasl_password_env ({settings.sasl_password_env})" if settings.sasl_password_env
                     else f"kafka.sasl_password_file ({settings.sasl_password_file})")
            hint = (f"check kafka.sasl_username ({settings.sasl_username!r}), kafka.sasl_mechanism "
                    f"({settings.sasl_mechanism}) and the password in {where}")
        elif meaning == "the broker refused an operation to this principal":
            hint = "check the broker's ACLs for this principal"
        else:
            hint = (f"check kafka.ssl_cafile ({settings.ssl_cafile or 'the system CAs'}), the broker "
                    "certificate's names and kafka.ssl_check_hostname")
        msg = f"{meaning} at {settings.bootstrap_servers}: {hint} (client said: {detail[-300:]})"
        raise KafkaSecurityError(msg) from exc
    finally:
        kafka_log.removeHandler(handler)


class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Adapts kafka-python's rebalance callbacks to two plain callables."""

    def __init__(
        self,
        on_revoked: Callable[[set[TopicPartition]], None],
        on_assigned: Callable[[set[TopicPartition]], None],
    ) -> None:
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._on_revoked(set(revoked))

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._on_assigned(set(assigned))


def make_consumer(settings: Any, topics: Iterable[str], listener: Listener,
                  instance: str, *, security: Mapping[str, Any] | None = None) -> KafkaConsumer:
    """A group consumer with manual commits, subscribed to ``topics``.

    Args:
        settings: the ``kafka`` config section (monitor.config.KafkaConfig).
        instance: this process's stable name; with static membership (KIP-345) it
            is the ``group.instance.id``, so a restarted process takes its old
            partitions back at once instead of waiting out the session timeout of
            its dead predecessor and rebalancing everybody twice.
        security: `client_security`'s result; None computes it from ``settings`` and
            this process's environment.

    Raises:
        KafkaSecurityError: the brokers refused the login or the TLS handshake.
        KafkaError: no broker answered within ``request_timeout_ms``.
    """
    static = {"group_instance_id": instance} if settings.static_membership else {}
    if security is None:
        security = client_security(settings)
    topics = list(topics)
    with explain_refusals(settings):
        consumer = _consumer(settings, static, security)
        # The topics' partitions known before the first JoinGroup: otherwise the first
        # assignment is empty, the metadata arriving just after forces a second
        # rebalance at once, and kafka-python 3.0 loses that rejoin now and then (the
        # member is synced on the broker, stops heartbeating and is never assigned;
        # 4 starts in 25 on a loaded machine; docs/delivery.md).
        for topic in topics:
            consumer.partitions_for_topic(topic)
    consumer.subscribe(topics=topics, listener=listener)
    return consumer


def group_joined(consumer: KafkaConsumer) -> bool | None:
    """Whether the consumer is a settled member of its group (not joining or about to);
    None when kafka-python's coordinator does not expose it (the check is then off).

    For the daemon's watchdog: a member stuck joining far longer than any rebalance can
    take is rebuilt rather than left consuming nothing (docs/delivery.md).
    """
    coordinator = getattr(consumer, "_coordinator", None)
    need_rejoin = getattr(coordinator, "need_rejoin", None)
    if coordinator is None or need_rejoin is None:
        return None
    try:
        return not (need_rejoin() or getattr(coordinator, "rejoining", False))
    except Exception:
        return None


def _consumer(settings: Any, static: dict[str, str], security: Mapping[str, Any]) -> KafkaConsumer:
    return KafkaConsumer(
        **static,
        **security,
        bootstrap_servers=settings.bootstrap_servers.split(","),
        group_id=settings.group_id,
        client_id=settings.client_id,
        enable_auto_commit=False,
        auto_offset_reset=settings.start_from,
        max_poll_records=settings.max_poll_records,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        # Bounded in-flight memory: at most this much fetched data waits in the client.
        fetch_max_bytes=32 * 1024 * 1024,
        max_partition_fetch_bytes=max(1024 * 1024, settings.max_message_bytes),
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        max_poll_interval_ms=settings.max_poll_interval_ms,
        reconnect_backoff_ms=settings.reconnect_backoff_ms,
        reconnect_backoff_max_ms=settings.reconnect_backoff_max_ms,
        request_timeout_ms=settings.request_timeout_ms,
        # A refused login shows as a bootstrap timeout: no longer than a request.
        bootstrap_timeout_ms=min(30_000, settings.request_timeout_ms),
    )


def commit_offsets(consumer: KafkaConsumer, offsets: dict[tuple[str, int], int],
                   timeout_ms: int = 5_000) -> None:
    """Commit ``(topic, partition) -> next offset`` for the partitions still assigned."""
    assigned = consumer.assignment()
    payload = {
        TopicPartition(t, p): OffsetAndMetadata(o, "", -1)
        for (t, p), o in offsets.items()
        if TopicPartition(t, p) in assigned
    }
    if payload:
        consumer.commit(payload, timeout_ms=timeout_ms)


class DeadLetterProducer:
    """Writes rejected records, unchanged, to the dead-letter topic.

    The value and key are kept byte for byte so a fixed record can be replayed; the
    reason, the error and the source coordinates travel in headers. Sends are
    asynchronous; `flush` is the barrier a checkpoint waits on, so a position never
    advances past a rejected record that is not yet safely in the dead-letter topic.

    A record whose copy would exceed the dead-letter topic's ``max.message.bytes``
    (`limit_to`, read at start-up; Kafka's default until then) is sent as a reference
    instead, with the reason ``too_large_for_dead_letter``: a JSON document naming its
    source topic, partition and offset, its size, its original reason and detail, and
    its first KiB. So is a record the broker refuses as too large after all.

    Args:
        bootstrap_servers: comma-separated broker list.
        topic: the dead-letter topic.
        config: more KafkaProducer arguments, e.g. `client_security`'s result
            (`for_settings` passes it).
    """

    @classmethod
    def for_settings(cls, settings: Any, environ: Mapping[str, str] | None = None,
                     **kwargs: Any) -> DeadLetterProducer:
        """The producer for a ``kafka`` config section, with its TLS and SASL settings.

        Raises:
            ValueError: a secret is missing (from `client_security`).
        """
        return cls(settings.bootstrap_servers, settings.dead_letter_topic, client_id=settings.client_id,
                   **kwargs, **client_security(settings, environ))

    def __init__(self, bootstrap_servers: str, topic: str, *, client_id: str = "driftloop",
                 flush_timeout_s: float = 30.0, max_block_s: float = 10.0, **config: Any) -> None:
        self.topic = topic
        self.flush_timeout_s = flush_timeout_s
        #: The largest record the dead-letter topic takes.
        self.max_record_bytes = DEFAULT_MAX_MESSAGE_BYTES
        #: Records sent as references since start (for /status).
        self.references = 0
        self._producer: KafkaProducer | None = None
        self._config = dict(
            bootstrap_servers=bootstrap_servers.split(","),
            client_id=f"{client_id}-dead-letter",
            acks="all",
            linger_ms=20,
            retries=2_147_483_647,
            # The client insists delivery > linger + request timeout.
            delivery_timeout_ms=int(flush_timeout_s * 1000),
            request_timeout_ms=min(10_000, int(flush_timeout_s * 1000) - 100),
            # A missing topic or an unreachable broker blocks send() this long, not the
            # client's default minute: the main loop must keep answering /healthz.
            max_block_ms=int(max_block_s * 1000),
            max_request_size=DEFAULT_MAX_MESSAGE_BYTES + DEAD_LETTER_OVERHEAD,
            **config,
        )
        self._pending: list[tuple[Any, tuple[str, int, Any, Reason, str]]] = []

    def use_security(self, security: Mapping[str, Any]) -> None:
        """Adds `client_security`'s arguments to a producer built without them.

        Raises:
            RuntimeError: the client exists already (it would keep its old settings).
        """
        self._unconnected("use_security()")
        self._config.update(security)

    def limit_to(self, max_record_bytes: int, largest_input_bytes: int) -> None:
        """Sizes the producer for the dead-letter topic's limit and the largest record
        the consumer can read (the inputs' limits), before its first send.

        Raises:
            RuntimeError: the client exists already.
        """
        self._unconnected("limit_to()")
        self.max_record_bytes = max_record_bytes
        self._config["max_request_size"] = max(max_record_bytes, largest_input_bytes) + DEAD_LETTER_OVERHEAD

    def _unconnected(self, what: str) -> None:
        if self._producer is not None:
            msg = f"{what} after the dead-letter producer connected"
            raise RuntimeError(msg)

    def _client(self) -> KafkaProducer:
        # Created on first use: a daemon whose input is clean never opens it.
        if self._producer is None:
            self._producer = KafkaProducer(**self._config)
        return self._producer

    def send(self, topic: str, partition: int, record: Any, reason: Reason, detail: str) -> bool:
        """Queues a rejected record; True when it went as a reference (too large).

        Raises:
            DeadLetterError: the client could not queue it (the topic's metadata did
                not arrive in time: no broker, or the topic was deleted). The caller
                treats it like a failed checkpoint and reads the record again later.
        """
        args = (topic, partition, record, reason, detail)
        value = b"" if record.value is None else record.value
        key = record.key
        as_reference = len(value) + len(key or b"") + DEAD_LETTER_OVERHEAD > self.max_record_bytes
        try:
            future = self._send(*args, as_reference=as_reference)
        except MessageSizeTooLargeError:
            as_reference = True
            future = self._send(*args, as_reference=True)
        self._pending.append((future, args))
        if as_reference:
            self.references += 1
        return as_reference

    def _send(self, topic: str, partition: int, record: Any, reason: Reason, detail: str, *,
              as_reference: bool) -> Any:
        headers = [
            (REASON_HEADER, reason.value.encode()),
            (ERROR_HEADER, detail[:1000].encode("utf-8", "replace")),
            (SOURCE_HEADER, f"{topic}/{partition}/{record.offset}".encode()),
        ]
        # A null value (tombstone) with no key is legal in Kafka but not in the
        # client's send(); an empty value carries the same information.
        value = b"" if record.value is None else record.value
        key = record.key
        if as_reference:
            headers[0] = (REASON_HEADER, Reason.TOO_LARGE_FOR_DEAD_LETTER.value.encode())
            headers.append((ORIGINAL_REASON_HEADER, reason.value.encode()))
            value = reference_value(topic, partition, record, reason, detail)
            key = key if key is None or len(key) <= REFERENCE_HEAD_BYTES else None
        try:
            return self._client().send(self.topic, key=key, value=value, headers=headers)
        except MessageSizeTooLargeError:
            if as_reference:  # a reference is a few KiB: the limits are absurd
                msg = f"the dead-letter topic {self.topic} refuses even a reference record"
                raise DeadLetterError(msg) from None
            raise
        except KafkaError as exc:
            msg = f"cannot send to the dead-letter topic {self.topic}: {exc!r}"
            raise DeadLetterError(msg) from exc

    def flush(self) -> None:
        """Wait until every pending record is acknowledged.

        A record the broker refused as too large for the topic is sent again as a
        reference, and waited for too.

        Raises:
            DeadLetterError: some record was not acknowledged within the timeout; it
                is kept and sent again on the next flush.
        """
        if not self._pending:
            return
        oversized = self._wait()
        if oversized:
            for args in oversized:
                self._pending.append((self._send(*args, as_reference=True), args))
                self.references += 1
            if self._wait():
                msg = f"the dead-letter topic {self.topic} refuses even reference records"
                raise DeadLetterError(msg)

    def _wait(self) -> list[tuple[str, int, Any, Reason, str]]:
        """Waits for the pending sends; returns those refused as too large."""
        producer = self._client()
        deadline = time.monotonic() + self.flush_timeout_s
        try:
            producer.flush(timeout=self.flush_timeout_s)
        except KafkaError as exc:
            log.warning("dead-letter flush timed out", extra={"fields": {"error": str(exc)}})
        failed = 0
        oversized = []
        for future, args in self._pending:
            if not future.is_done:
                remaining = max(0.0, deadline - time.monotonic())
                with contextlib.suppress(Exception):  # judged by the state just below
                    future.get(timeout=remaining)
            if not future.is_done:
                failed += 1
            elif future.failed():
                if isinstance(future.exception, MessageSizeTooLargeError):
                    oversized.append(args)
                else:
                    failed += 1
        self._pending = []
        if failed:
            # Not re-sent here: the caller's checkpoint fails, everything since the
            # last checkpoint is read again, and these records are rejected again.
            msg = f"{failed} dead-letter record(s) not acknowledged by topic {self.topic}"
            raise DeadLetterError(msg)
        return oversized

    def discard(self) -> None:
        """Forget pending sends (after a rewind they will be produced again)."""
        self._pending = []

    def close(self, timeout_s: float = 10.0) -> None:
        if self._producer is not None:
            self._producer.close(timeout=timeout_s)
            self._producer = None


def reference_value(topic: str, partition: int, record: Any, reason: Reason, detail: str) -> bytes:
    """What the dead-letter topic gets in place of a record too large for it: enough to
    find the record in its source topic (while retention keeps it) and to see what it was."""
    value = b"" if record.value is None else record.value
    return json.dumps({
        "driftloop_reference": 1,
        "source": {"topic": topic, "partition": partition, "offset": record.offset},
        "value_bytes": len(value),
        "key_bytes": len(record.key or b""),
        "reason": reason.value,
        "detail": detail[:1000],
        "head_base64": base64.b64encode(value[:REFERENCE_HEAD_BYTES]).decode(),
    }).encode()
