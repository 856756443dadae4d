"""A real single-node Apache Kafka broker for tests, benchmarks and the demo.

driftloop consumes Kafka, and the behaviour that matters (consumer-group
rebalances, offsets surviving a broker restart, back-pressure) only shows
against a real broker, so nothing here mocks Kafka. :class:`LocalKafka` drives
``deploy/kafka/kafka.sh``, which runs a Kafka 4.x broker in KRaft mode
(combined broker and controller, no ZooKeeper) from jars that Maven resolves
once into ``$DRIFTLOOP_CACHE`` (default ``<repo>/.cache``).

Typical use::

    with LocalKafka(tmp_path / "kafka") as kafka:
        create_topics(kafka.bootstrap, {"events": 3})
        ...
        kafka.restart()  # same port, same data

The shell script, not this module, owns the broker's configuration, so that
``kafka.sh start DIR`` in a terminal gives the demo exactly the broker the tests
use.

``LocalKafka(dir, security="sasl_ssl")`` starts a secured broker instead (SASL_SSL
with SCRAM and PLAIN, plus an mTLS listener; a throwaway CA in ``DIR/secure``), for
the tests of the clients' TLS and SASL settings; `SecureBroker` says how to reach it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

__all__ = [
    "KAFKA_SH",
    "KafkaUnavailableError",
    "LocalKafka",
    "LocalKafkaError",
    "SecureBroker",
    "create_topics",
    "fetch",
    "unique_topic_name",
]

#: The script that fetches, starts and stops the broker: found from this file,
#: so that it works from any working directory and from an installed checkout.
KAFKA_SH = Path(__file__).resolve().parents[2] / "deploy" / "kafka" / "kafka.sh"

# kafka.sh exits with this code when java or mvn is missing (or Java is too old),
# so that callers can tell "this machine cannot run Kafka" from "Kafka failed".
_EXIT_MISSING_TOOL = 4


class LocalKafkaError(RuntimeError):
    """The broker failed to fetch, start or stop; the message carries its log tail."""


class KafkaUnavailableError(LocalKafkaError):
    """This machine lacks a prerequisite (java 17+, or mvn before the first fetch).

    A separate type because test fixtures skip on it (outside CI) instead of
    failing: a missing JDK is a property of the machine, not a bug.
    """


def _run_kafka_sh(args: list[str], timeout_s: float, env: Mapping[str, str] | None) -> str:
    """Runs kafka.sh and returns its stdout.

    Raises:
        KafkaUnavailableError: kafka.sh reported a missing java or mvn.
        LocalKafkaError: kafka.sh failed or ran past ``timeout_s``.
    """
    if not KAFKA_SH.is_file():
        msg = f"{KAFKA_SH} not found: LocalKafka needs a driftloop source checkout"
        raise LocalKafkaError(msg)
    run_env = {**os.environ, **(env or {})}
    try:
        # bash explicitly: the script works even where the exec bit was lost.
        proc = subprocess.run(
            ["bash", str(KAFKA_SH), *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=run_env,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except FileNotFoundError as exc:
        msg = "bash not found: deploy/kafka/kafka.sh needs bash"
        raise KafkaUnavailableError(msg) from exc
    except subprocess.TimeoutExpired as exc:
        msg = f"kafka.sh {' '.join(args)} ran past {timeout_s:.0f}s"
        raise LocalKafkaError(msg) from exc
    stderr = proc.stderr.strip()
    if proc.returncode == _EXIT_MISSING_TOOL:
        raise KafkaUnavailableError(stderr.removeprefix("kafka.sh: "))
    if proc.returncode != 0:
        msg = f"kafka.sh {' '.join(args)} failed (exit {proc.returncode}):\n{stderr}"
        raise LocalKafkaError(msg)
    return proc.stdout


def fetch(timeout_s: float = 600.0, env: Mapping[str, str] | None = None) -> None:
    """Resolves the broker jars into the cache (a no-op once done).

    Separate from :meth:`LocalKafka.start` so that a benchmark can pay the
    one-time Maven download before it starts its clock.

    Raises:
        KafkaUnavailableError: java or mvn is missing.
        LocalKafkaError: Maven could not resolve the jars.
    """
    _run_kafka_sh(["fetch"], timeout_s, env)


@dataclass(frozen=True)
class SecureBroker:
    """How a client reaches a broker started with ``security="sasl_ssl"``.

    Attributes:
        bootstrap: the SASL_SSL listener (SCRAM-SHA-256, SCRAM-SHA-512 and PLAIN).
        mtls_bootstrap: an SSL listener that requires a client certificate.
        ca_file: the PEM CA that signed the broker's certificate (for 127.0.0.1 and
            localhost).
        client_certfile, client_keyfile: a certificate for the mTLS listener.
        username, password: the one SASL user, created when DIR was formatted.
    """

    bootstrap: str
    mtls_bootstrap: str
    ca_file: Path
    client_certfile: Path
    client_keyfile: Path
    username: str
    password: str

    def client_config(self, mechanism: str = "SCRAM-SHA-512") -> dict[str, Any]:
        """kafka-python arguments for the SASL_SSL listener."""
        return {"security_protocol": "SASL_SSL", "ssl_cafile": str(self.ca_file),
                "sasl_mechanism": mechanism, "sasl_plain_username": self.username,
                "sasl_plain_password": self.password}

    def mtls_config(self) -> dict[str, Any]:
        """kafka-python arguments for the mTLS listener."""
        return {"security_protocol": "SSL", "ssl_cafile": str(self.ca_file),
                "ssl_certfile": str(self.client_certfile), "ssl_keyfile": str(self.client_keyfile)}


@dataclass
class LocalKafka:
    """One broker process whose configuration, data and logs live in ``data_dir``.

    Attributes:
        data_dir: Where ``server.properties``, the log dirs (``data/``) and the
            logs (``logs/``) go. Reusing it keeps the topics and offsets.
        port: The client port on 127.0.0.1; ``None`` picks a free one on the
            first start and keeps it, so that :meth:`restart` comes back on the
            same address and clients reconnect as they would in production.
        start_timeout_s: Bound on one ``kafka.sh start``; generous because the
            first start on a machine also downloads the jars.
        env: Extra environment for kafka.sh, e.g. ``DRIFTLOOP_KAFKA_PROPS``
            with broker settings a benchmark wants.
        stop_at_exit: Stop the broker when the interpreter exits, so that a
            crashed test session or demo leaves no broker behind.
        security: ``sasl_ssl`` for a secured broker (`secure` after `start`); a
            DIR keeps the mode it was first started with.
    """

    data_dir: Path
    port: int | None = None
    start_timeout_s: float = 600.0
    env: Mapping[str, str] | None = None
    stop_at_exit: bool = True
    security: Literal["plaintext", "sasl_ssl"] = "plaintext"
    _bootstrap: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()

    @property
    def _env(self) -> dict[str, str]:
        # Explicit, so a DRIFTLOOP_KAFKA_SECURITY in the caller's environment never
        # turns a plaintext broker into a secured one.
        return {**(self.env or {}), "DRIFTLOOP_KAFKA_SECURITY": self.security}

    @property
    def secure(self) -> SecureBroker:
        """Addresses, CA and credentials of a started ``sasl_ssl`` broker.

        Raises:
            LocalKafkaError: the broker is not running, or is a plaintext one.
        """
        bootstrap = self.bootstrap
        if self.security != "sasl_ssl":
            msg = f"the broker in {self.data_dir} is a plaintext one: LocalKafka(security='sasl_ssl')"
            raise LocalKafkaError(msg)
        sec = self.data_dir / "secure"
        return SecureBroker(
            bootstrap=bootstrap,
            mtls_bootstrap=(sec / "mtls.bootstrap").read_text().strip(),
            ca_file=sec / "ca.pem", client_certfile=sec / "client.pem", client_keyfile=sec / "client.key",
            username=(sec / "sasl.username").read_text().strip(),
            password=(sec / "sasl.password").read_text().strip())

    @property
    def bootstrap(self) -> str:
        """The ``bootstrap_servers`` address, ``127.0.0.1:PORT``.

        Raises:
            LocalKafkaError: The broker was not started (or was stopped).
        """
        if self._bootstrap is None:
            msg = f"the broker in {self.data_dir} is not running: call start() first"
            raise LocalKafkaError(msg)
        return self._bootstrap

    def start(self) -> str:
        """Starts the broker (formatting ``data_dir`` on first use) and waits until it serves.

        Returns when the broker answers metadata requests, so that clients can
        use it at once. Starting a running broker is a no-op.

        Returns:
            The bootstrap address.

        Raises:
            KafkaUnavailableError: java or mvn is missing.
            LocalKafkaError: The broker did not come up (the message has its log tail).
        """
        args = ["start", str(self.data_dir)]
        if self.port is not None:
            args.append(str(self.port))
        out = _run_kafka_sh(args, self.start_timeout_s, self._env)
        lines = out.strip().splitlines()
        bootstrap = lines[-1].strip() if lines else ""
        host, _, port = bootstrap.rpartition(":")
        if host != "127.0.0.1" or not port.isdigit():
            msg = f"kafka.sh start printed {out!r}, not a bootstrap address"
            raise LocalKafkaError(msg)
        self.port = int(port)
        self._bootstrap = bootstrap
        if self.stop_at_exit:
            atexit.unregister(self._stop_quietly)
            atexit.register(self._stop_quietly)
        return bootstrap

    def stop(self) -> None:
        """Stops the broker: SIGTERM (a clean shutdown), SIGKILL after 30 s.

        Stopping a stopped broker is a no-op. The data stays in ``data_dir``.

        Raises:
            LocalKafkaError: kafka.sh could not stop it.
        """
        _run_kafka_sh(["stop", str(self.data_dir)], 120.0, self._env)
        self._bootstrap = None
        atexit.unregister(self._stop_quietly)

    def restart(self) -> str:
        """Stops and starts the broker on the same port with the same data.

        For tests of what the daemon does when its broker goes away and comes
        back: committed offsets and produced records survive.

        Returns:
            The bootstrap address, the same as before.

        Raises:
            LocalKafkaError: The broker was never started (no port to return
                to) or did not come back.
        """
        if self.port is None:
            msg = "restart() needs a broker that was started before"
            raise LocalKafkaError(msg)
        self.stop()
        return self.start()

    def is_running(self) -> bool:
        """Whether the broker process of ``data_dir`` is alive (per its pid file)."""
        try:
            _run_kafka_sh(["status", str(self.data_dir)], 30.0, self._env)
        except LocalKafkaError:
            return False
        return True

    def _stop_quietly(self) -> None:
        with contextlib.suppress(LocalKafkaError):
            self.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def unique_topic_name(prefix: str = "t") -> str:
    """A fresh topic name, so that tests sharing one broker never see each other's data."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def create_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    configs: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
    client_config: Mapping[str, Any] | None = None,
) -> None:
    """Creates topics (replication factor 1) and waits until every partition has a leader.

    The broker runs with ``auto.create.topics.enable=false``, like a
    production cluster, so tests and the demo create their topics here.
    Waiting for leaders matters: a producer sent to a topic whose metadata
    has not propagated yet fails with UNKNOWN_TOPIC_OR_PARTITION.

    Args:
        bootstrap: ``host:port`` of the broker.
        topics: Topic name to number of partitions.
        configs: Topic-level settings applied to every new topic
            (e.g. ``{"retention.ms": "-1"}``).
        timeout_s: Bound on the creation and on the wait for leaders.
        client_config: More KafkaAdminClient arguments (TLS and SASL for a secured
            broker, e.g. ``SecureBroker.client_config()``).

    Raises:
        LocalKafkaError: The broker refused a topic for a reason other than
            that it already exists, or the topics got no leaders in time.
    """
    # Imported here so that importing this module (e.g. for LocalKafka in a
    # shell demo) does not need kafka-python.
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError, TopicAlreadyExistsError, for_code

    if not topics:
        return
    timeout_ms = int(timeout_s * 1000)
    spec: dict[str, dict[str, Any]] = {
        name: {
            "num_partitions": partitions,
            "replication_factor": 1,
            "configs": dict(configs or {}),
        }
        for name, partitions in topics.items()
    }
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="driftloop-create-topics",
        request_timeout_ms=timeout_ms,
        **dict(client_config or {}),
    )
    try:
        result = admin.create_topics(spec, timeout_ms=timeout_ms, raise_errors=False)
        failures = []
        for topic in result.get("topics", []):
            code = topic.get("error_code", 0)
            if code == 0 or code == TopicAlreadyExistsError.errno:
                continue
            error = for_code(code).__name__
            failures.append(f"{topic.get('name')}: {error} {topic.get('error_message') or ''}")
        if failures:
            msg = f"could not create topics on {bootstrap}: " + "; ".join(failures)
            raise LocalKafkaError(msg)
        admin.wait_for_topics(list(topics), timeout_ms=timeout_ms)
    except KafkaError as exc:
        msg = f"could not create topics {sorted(topics)} on {bootstrap}: {exc}"
        raise LocalKafkaError(msg) from exc
    finally:
        admin.close()


def committed_offsets(bootstrap: str, group: str, topic: str, *,
                      client_config: Mapping[str, Any] | None = None) -> dict[int, int]:
    """The offsets ``group`` has committed on ``topic``, by partition (tests, benchmarks)."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **dict(client_config or {}))
    try:
        offsets = admin.list_group_offsets({group: None}).get(group, {})
    finally:
        admin.close()
    return {tp.partition: om.offset for tp, om in offsets.items() if tp.topic == topic}
