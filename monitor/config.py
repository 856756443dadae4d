"""Configuration: one YAML file plus ``DRIFTLOOP__SECTION__KEY`` environment overrides.

Read once, by the composition root (the daemon / CLI); the cores receive plain values
and never read the environment. Every section is a frozen msgspec Struct that rejects
unknown keys, so a typo fails at start-up with the key's path instead of being
silently ignored for weeks. ``docs/configuration.md`` lists every key.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

__all__ = ["Config", "ConfigError", "load_config"]

ENV_PREFIX = "DRIFTLOOP__"
_INSTANCE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the file, key or variable."""


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


def _positive(name: str, value: float) -> None:
    if value <= 0:
        msg = f"{name} must be > 0, got {value}"
        raise ValueError(msg)


def _secret_source(owner: Any, section: str, key: str, *, required: bool = False) -> bool:
    """At most one of ``<key>_env``/``<key>_file`` (exactly one when ``required``).

    Secrets never sit in the config file itself: it is copied, diffed and printed by
    ``check-config``. A named file must exist now, so a wrong mount fails at start-up
    with its key instead of at the first connection.
    """
    env, file = getattr(owner, f"{key}_env"), getattr(owner, f"{key}_file")
    if env and file:
        msg = f"{section}.{key}_env and {section}.{key}_file are both set: give one"
        raise ValueError(msg)
    if required and not (env or file):
        msg = f"{section}.{key}_env or {section}.{key}_file is required"
        raise ValueError(msg)
    if file:
        _existing_file(f"{section}.{key}_file", file)
    return bool(env or file)


def _existing_file(key: str, path: str) -> None:
    if not Path(path).is_file():
        msg = f"{key}: {path} does not exist or is not a file"
        raise ValueError(msg)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a server on this machine.

    A host name other than ``localhost`` may resolve to anything, so it counts as
    reachable from elsewhere.
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class KafkaConfig(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "driftloop"
    client_id: str = "driftloop"
    predictions_topic: str = "predictions"
    feedback_topic: str = "feedback"
    dead_letter_topic: str = "driftloop.dead-letter"
    #: Create missing topics at start-up (the broker's partition count and replication;
    #: the dead-letter topic sized for the largest input record). Off: a missing topic
    #: stops the start with exit code 2, naming it.
    create_topics: bool = False
    #: Where a partition with no stored position starts. ``earliest`` because losing
    #: data silently is worse than replaying retention once.
    start_from: Literal["earliest", "latest"] = "earliest"
    #: ~2000 beat the client default of 500 by ~35% on the target machine.
    max_poll_records: int = 2000
    #: The default of 500 ms stalls busy partitions when others are quiet.
    fetch_max_wait_ms: int = 20
    max_message_bytes: int = 1_048_576
    #: Static group membership (group.instance.id = instance_id): restarts keep their
    #: partitions without a rebalance. Two processes must never share an instance_id.
    static_membership: bool = True
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    max_poll_interval_ms: int = 300_000
    reconnect_backoff_ms: int = 100
    reconnect_backoff_max_ms: int = 10_000
    #: Also bounds the wait for the first connection, where a refused login shows.
    request_timeout_ms: int = 30_000
    #: Security of every client (consumer, dead-letter producer, admin); docs/security.md.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    #: The SASL password: a variable holding it, or a file (a mounted Secret).
    sasl_password_env: str | None = None
    sasl_password_file: str | None = None
    #: PEM CA bundle that signed the brokers' certificates; unset: the system's CAs.
    ssl_cafile: str | None = None
    #: Client certificate and key (PEM) for brokers that require mTLS.
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    #: The password of an encrypted ssl_keyfile.
    ssl_password_env: str | None = None
    ssl_password_file: str | None = None
    #: Off only for brokers whose certificates lack their address (never in production).
    ssl_check_hostname: bool = True

    def __post_init__(self) -> None:
        for name in ("max_poll_records", "fetch_max_wait_ms", "max_message_bytes",
                     "session_timeout_ms", "heartbeat_interval_ms", "request_timeout_ms"):
            _positive(f"kafka.{name}", getattr(self, name))
        if len({self.predictions_topic, self.feedback_topic, self.dead_letter_topic}) != 3:
            msg = "kafka.predictions_topic, feedback_topic and dead_letter_topic must differ"
            raise ValueError(msg)
        self._check_security()

    def _check_security(self) -> None:
        proto = self.security_protocol
        sasl = proto.startswith("SASL_")
        tls = proto in ("SSL", "SASL_SSL")
        password = _secret_source(self, "kafka", "sasl_password")
        if sasl:
            if self.sasl_mechanism is None:
                msg = (f"kafka.sasl_mechanism is required with kafka.security_protocol {proto} "
                       "(PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)")
                raise ValueError(msg)
            if not self.sasl_username:
                msg = f"kafka.sasl_username is required with kafka.sasl_mechanism {self.sasl_mechanism}"
                raise ValueError(msg)
            if not password:
                msg = (f"kafka.sasl_password_env or kafka.sasl_password_file is required with "
                       f"kafka.sasl_mechanism {self.sasl_mechanism} (the password never goes in the file)")
                raise ValueError(msg)
        else:
            given = [k for k in ("sasl_mechanism", "sasl_username", "sasl_password_env",
                                 "sasl_password_file") if getattr(self, k)]
            if given:
                msg = (f"kafka.{given[0]} is set but kafka.security_protocol is {proto}: "
                       "SASL needs SASL_SSL (or SASL_PLAINTEXT)")
                raise ValueError(msg)
        ssl_keys = ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password_env", "ssl_password_file")
        if not tls:
            given = [k for k in ssl_keys if getattr(self, k)]
            if given:
                msg = (f"kafka.{given[0]} is set but kafka.security_protocol is {proto}: "
                       "TLS needs SSL or SASL_SSL")
                raise ValueError(msg)
            return
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, key)
            if path:
                _existing_file(f"kafka.{key}", path)
        if self.ssl_keyfile and not self.ssl_certfile:
            msg = "kafka.ssl_keyfile needs kafka.ssl_certfile (the client certificate it belongs to)"
            raise ValueError(msg)
        if _secret_source(self, "kafka", "ssl_password") and not self.ssl_certfile:
            msg = "kafka.ssl_password_env/ssl_password_file is set but kafka.ssl_certfile is not"
            raise ValueError(msg)


class WindowConfig(_Section):
    #: Must divide one hour, so a window never straddles an hourly store partition.
    size_seconds: int = 60
    allowed_lateness_seconds: int = 30
    idle_timeout_seconds: int = 60

    def __post_init__(self) -> None:
        if self.size_seconds <= 0 or 3600 % self.size_seconds:
            msg = f"windows.size_seconds must divide 3600, got {self.size_seconds}"
            raise ValueError(msg)
        if self.allowed_lateness_seconds < 0:
            msg = f"windows.allowed_lateness_seconds must be >= 0, got {self.allowed_lateness_seconds}"
            raise ValueError(msg)
        _positive("windows.idle_timeout_seconds", self.idle_timeout_seconds)


class CheckpointConfig(_Section):
    #: How often buffered rows become durable and offsets advance. After a crash at
    #: most this much is consumed again (and deduplicated by the positions table).
    interval_seconds: float = 1.0
    #: A checkpoint is forced sooner when this many rows are buffered: the bound on
    #: the daemon's in-flight memory.
    max_buffered_rows: int = 200_000

    def __post_init__(self) -> None:
        _positive("checkpoint.interval_seconds", self.interval_seconds)
        _positive("checkpoint.max_buffered_rows", self.max_buffered_rows)


class StorageConfig(_Section):
    data_dir: str = "./var/driftloop"
    #: Defaults to <data_dir>/state.db.
    state_db: str | None = None
    #: Defaults to <data_dir>/store.
    store_dir: str | None = None
    #: The state store as a URL: ``postgresql://user@host:5432/db`` for replicas on
    #: several machines (docs/storage.md); unset: the SQLite file ``state_db``.
    state_url: str | None = None
    #: The feedback store as an fsspec URL (``s3://bucket/prefix``, ``file:///srv/store``);
    #: unset: the local directory ``store_dir``.
    store_url: str | None = None

    def __post_init__(self) -> None:
        if self.state_url is not None and not re.match(r"^postgres(ql)?(\+\w+)?://\S+$", self.state_url):
            msg = (f"storage.state_url must be a postgresql:// URL, got {self.state_url!r} "
                   "(for SQLite set storage.state_db instead)")
            raise ValueError(msg)
        if self.store_url is not None and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://\S+$", self.store_url):
            msg = f"storage.store_url must be a URL such as s3://bucket/prefix, got {self.store_url!r}"
            raise ValueError(msg)

    @property
    def state_path(self) -> Path:
        return Path(self.state_db) if self.state_db else Path(self.data_dir) / "state.db"

    @property
    def store_path(self) -> Path:
        return Path(self.store_dir) if self.store_dir else Path(self.data_dir) / "store"

    @property
    def spill_path(self) -> Path:
        return Path(self.data_dir) / "spill"


class ClusterConfig(_Section):
    """Several replicas in one consumer group (docs/scale-out.md).

    Every replica ingests its partitions and publishes per-window summaries; the one
    holding the leader lock (a PostgreSQL advisory lock when the state store is on
    PostgreSQL, a lease row in the shared SQLite file otherwise) merges them, decides
    incidents, sends alerts and launches and promotes models.
    """

    enabled: bool = False
    #: A leader that stops renewing (SIGKILL, a partition, a hung host) is replaced
    #: within this many seconds.
    leader_timeout_seconds: float = 10.0
    #: How often a follower tries to become leader and the leader renews its lease.
    poll_seconds: float = 1.0

    def __post_init__(self) -> None:
        _positive("cluster.leader_timeout_seconds", self.leader_timeout_seconds)
        _positive("cluster.poll_seconds", self.poll_seconds)
        if self.poll_seconds * 2 > self.leader_timeout_seconds:
            msg = (f"cluster.poll_seconds ({self.poll_seconds}) must be at most half of "
                   f"cluster.leader_timeout_seconds ({self.leader_timeout_seconds}): the leader "
                   "renews its lease at that interval")
            raise ValueError(msg)


class HttpConfig(_Section):
    #: Loopback unless an operator decides otherwise.
    host: str = "127.0.0.1"
    #: 0 picks a free port (tests); the chosen port is logged and in /status.
    port: int = 8080
    #: The bearer token every POST (``/retrain``, ...) must carry: a variable holding
    #: it, or a file. Required when host is not loopback (docs/security.md).
    token_env: str | None = None
    token_file: str | None = None
    #: The explicit opt-out for a non-loopback host without a token (an authenticating
    #: proxy in front, say): anyone who reaches the port may start training runs.
    allow_unauthenticated_actions: bool = False
    #: Also require the token on /metrics, /status and /incidents (never on the probes
    #: /healthz and /readyz). Report links in alerts then need a proxy that adds it.
    protect_reads: bool = False
    #: A request's line, headers and body must arrive within this long, or it is closed.
    timeout_seconds: float = 10.0
    #: Connections served at once; more are answered 503 without a thread each.
    max_connections: int = 32

    def __post_init__(self) -> None:
        _positive("http.timeout_seconds", self.timeout_seconds)
        _positive("http.max_connections", self.max_connections)
        token = _secret_source(self, "http", "token")
        if token and self.allow_unauthenticated_actions:
            msg = "http.allow_unauthenticated_actions is true but a token is set (http.token_env/token_file)"
            raise ValueError(msg)
        if self.protect_reads and not token:
            msg = "http.protect_reads needs http.token_env or http.token_file"
            raise ValueError(msg)
        if not token and not self.allow_unauthenticated_actions and not is_loopback(self.host):
            msg = (f"http.token_env (or http.token_file) is required when http.host is {self.host!r}, "
                   "not loopback: otherwise anyone who reaches the port can start training runs "
                   "(set http.allow_unauthenticated_actions: true to accept that)")
            raise ValueError(msg)


class DriftConfig(_Section):
    """Drift thresholds (monitor.stats.drift.DriftSpec; docs/statistics.md has the reasoning)."""

    alpha: float = 0.01
    psi_threshold: float | None = 0.006
    js_threshold: float | None = None
    wasserstein_threshold: float | None = None
    min_rows: int = 1000
    k: int = 3
    m: int = 5
    missing_delta: float = 0.01
    unseen_threshold: float = 0.01
    unseen_min_count: int = 10

    def __post_init__(self) -> None:
        self.spec()

    def spec(self) -> Any:
        from monitor.stats.drift import DriftSpec

        return DriftSpec(**msgspec.structs.asdict(self))


class PerformanceConfig(_Section):
    """Label-metric drop tests (monitor.stats.performance.PerformanceSpec)."""

    #: Matured windows are pooled into periods of this length before the drop tests.
    period_seconds: int = 900
    alpha: float = 0.01
    correction: Literal["bh", "bonferroni"] = "bh"
    min_rate_change: float = 0.05
    min_auc_drop: float = 0.01
    min_calibration_change: float = 0.10
    min_log_loss_increase: float | None = 0.02
    min_positives: int = 30
    min_negatives: int = 30
    known_reference_ratio: float = 20.0
    worse_when_higher: tuple[str, ...] = ("dislike", "skip")
    #: A metric is decided dropped when its test fires in k of the last m periods: two
    #: of three turns a per-period false-alarm rate q into about 3 q^2.
    k: int = 2
    m: int = 3

    def __post_init__(self) -> None:
        _positive("monitor.stats.performance.period_seconds", self.period_seconds)
        if not 1 <= self.k <= self.m:
            msg = f"need 1 <= k <= m, got k={self.k} and m={self.m}"
            raise ValueError(msg)
        self.spec()

    def spec(self) -> Any:
        from monitor.stats.performance import PerformanceSpec

        fields = msgspec.structs.asdict(self)
        for key in ("period_seconds", "k", "m"):
            fields.pop(key)
        return PerformanceSpec(**fields)


class SequentialConfig(_Section):
    """The per-event CUSUM bank on the primary label (monitor.detectors.sequential)."""

    enabled: bool = True
    #: Average number of matured predictions between two false alarms when nothing
    #: changed. Choose it from your traffic: events/day x days between false pages.
    arl0_events: float = 1e8
    #: Relative drops the bank is tuned to (one CUSUM each).
    drops: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)

    def __post_init__(self) -> None:
        if not self.arl0_events >= 100:
            msg = f"monitor.detectors.sequential.arl0_events must be >= 100, got {self.arl0_events}"
            raise ValueError(msg)
        if not self.drops or any(not 0.0 < d < 1.0 for d in self.drops):
            msg = f"monitor.detectors.sequential.drops must be non-empty values in (0, 1), got {self.drops}"
            raise ValueError(msg)


class MonitorConfig(_Section):
    """What the analysis stage does with closed windows (docs/statistics.md)."""

    enabled: bool = True
    #: Feedback types that are labels; the first is the primary one the score predicts
    #: unless primary_label says otherwise.
    label_types: tuple[str, ...] = ("click", "like", "purchase")
    primary_label: str | None = None
    #: Feedback counts for a prediction when it arrives within this long after it.
    attribution_seconds: int = 1800
    #: A model version without a stored reference bootstraps one from its first
    #: this-many seconds of traffic (and of matured labels).
    bootstrap_seconds: int = 3600
    bootstrap_max_rows: int = 200_000
    #: ... once it has at least this many predictions (and matured rows, for labels) ...
    bootstrap_min_rows: int = 500
    #: ... and, for the label reference, this many positive primary labels.
    bootstrap_min_labels: int = 20
    #: ``<dir>/<model>/<version>/reference.json`` files, for deployments without MLflow.
    reference_dir: str | None = None
    #: Consecutive clean evaluations that resolve an incident.
    resolve_after: int = 3
    #: Labels not maturing for this long beyond the attribution window is an incident.
    labels_stall_seconds: int = 1800
    #: An analysis stage (drift, join) with closed windows waiting and no progress for
    #: this long is stalled: /readyz degrades, and a critical ``monitor_stalled``
    #: incident pages (a wedged replica, a segment lost from the store).
    stall_seconds: int = 900
    drift: DriftConfig = msgspec.field(default_factory=DriftConfig)
    performance: PerformanceConfig = msgspec.field(default_factory=PerformanceConfig)
    sequential: SequentialConfig = msgspec.field(default_factory=SequentialConfig)

    def __post_init__(self) -> None:
        if not self.label_types or len(set(self.label_types)) != len(self.label_types):
            msg = f"monitor.label_types must be distinct and non-empty, got {list(self.label_types)}"
            raise ValueError(msg)
        if self.primary_label is not None and self.primary_label not in self.label_types:
            msg = (f"monitor.primary_label {self.primary_label!r} is not one of "
                   f"monitor.label_types {list(self.label_types)}")
            raise ValueError(msg)
        for name in ("attribution_seconds", "bootstrap_seconds", "bootstrap_max_rows",
                     "resolve_after", "labels_stall_seconds", "stall_seconds"):
            _positive(f"monitor.{name}", getattr(self, name))

        for name in ("bootstrap_min_rows", "bootstrap_min_labels"):
            if getattr(self, name) < 0:
                msg = f"monitor.{name} must be >= 0, got {getattr(self, name)}"
                raise ValueError(msg)

    @property
    def primary(self) -> str:
        return self.primary_label or self.label_types[0]


#: Incident kinds a sink's ``kinds`` may name (monitor/incidents.py, docs/monitoring.md).
ALERT_KINDS = ("feature_drift", "prediction_drift", "data_quality", "performance_drop",
               "training_failed", "model_promoted", "model_rollback", "monitor_stalled")


class AlertSinkConfig(_Section):
    """One receiver of alerts (docs/alerts.md)."""

    name: str
    type: Literal["webhook", "slack", "pagerduty", "alertmanager"]
    #: Exactly one of url, url_env (a variable holding it), url_file (a file holding
    #: it). A Slack webhook URL is a credential: url_env or url_file only. PagerDuty
    #: defaults to the Events API v2 endpoint; Alertmanager takes its base URL.
    url: str | None = None
    url_env: str | None = None
    url_file: str | None = None
    #: webhook: the Standard Webhooks signing secret (whsec_<base64>); pagerduty: the
    #: integration's routing key. One of the two for those types, neither for others.
    secret_env: str | None = None
    secret_file: str | None = None
    min_severity: Literal["info", "warning", "critical"] = "warning"
    #: Incident kinds this sink gets; empty: all.
    kinds: tuple[str, ...] = ()
    rate_limit_per_minute: float = 30.0
    timeout_seconds: float = 10.0
    #: Plain http to a host that is not loopback (https is the rule).
    allow_http: bool = False
    tls_verify: bool = True
    #: A CA bundle for receivers behind a private CA.
    ca_file: str | None = None
    #: alertmanager: firing alerts are re-sent this often (and expire after 4x).
    resend_seconds: float = 60.0

    def __post_init__(self) -> None:
        if not _INSTANCE_RE.match(self.name):
            msg = f"name {self.name!r} must match {_INSTANCE_RE.pattern}"
            raise ValueError(msg)
        given = [k for k in ("url", "url_env", "url_file") if getattr(self, k)]
        if len(given) > 1 or (not given and self.type != "pagerduty"):
            msg = f"sink {self.name!r}: give exactly one of url, url_env, url_file (got {given})"
            raise ValueError(msg)
        if self.type == "slack" and self.url:
            msg = (f"sink {self.name!r}: a Slack webhook URL is a secret; give it with url_env "
                   "or url_file, not in the config file")
            raise ValueError(msg)
        if self.url:
            from connectors.alerts import validate_url

            try:
                validate_url(self.url, allow_http=self.allow_http)
            except ValueError as exc:
                msg = f"sink {self.name!r}: url {exc}"
                raise ValueError(msg) from None
        secrets = [k for k in ("secret_env", "secret_file") if getattr(self, k)]
        if self.type in ("webhook", "pagerduty") and len(secrets) != 1:
            what = "signing secret" if self.type == "webhook" else "routing key"
            msg = (f"sink {self.name!r}: a {self.type} sink needs its {what} in exactly one of "
                   "secret_env, secret_file")
            raise ValueError(msg)
        if self.type not in ("webhook", "pagerduty") and secrets:
            msg = f"sink {self.name!r}: a {self.type} sink takes no secret_env/secret_file"
            raise ValueError(msg)
        unknown = sorted(set(self.kinds) - set(ALERT_KINDS))
        if unknown:
            msg = f"sink {self.name!r}: unknown kinds {unknown}; known: {list(ALERT_KINDS)}"
            raise ValueError(msg)
        for key in ("rate_limit_per_minute", "timeout_seconds", "resend_seconds"):
            _positive(f"sink {self.name!r}: {key}", getattr(self, key))


class AlertsConfig(_Section):
    """Alert delivery: sinks, outbox timing, report links (docs/alerts.md)."""

    sinks: tuple[AlertSinkConfig, ...] = ()
    #: Prefix of the report links in alerts, as on-call reaches the daemon (e.g. through
    #: an ingress). Defaults to http://<http.host>:<http.port>.
    base_url: str | None = None
    #: Transitions of one model committed within this long are one message.
    group_wait_seconds: float = 5.0
    #: An alert still undelivered this long after its incident transition is given up
    #: (recorded in the outbox and counted).
    give_up_after_seconds: float = 86_400.0
    backoff_initial_seconds: float = 1.0
    backoff_max_seconds: float = 300.0
    poll_seconds: float = 1.0
    #: Delivered and given-up messages are kept this long for audits.
    retention_days: float = 7.0

    def __post_init__(self) -> None:
        names = [s.name for s in self.sinks]
        if len(set(names)) != len(names):
            msg = f"alerts.sinks: names must be unique, got {names}"
            raise ValueError(msg)
        if "mlflow-reports" in names:
            msg = ("alerts.sinks: the name 'mlflow-reports' is reserved for the model registry's "
                   "report archive")
            raise ValueError(msg)
        if self.group_wait_seconds < 0:
            msg = f"alerts.group_wait_seconds must be >= 0, got {self.group_wait_seconds}"
            raise ValueError(msg)
        for key in ("give_up_after_seconds", "backoff_initial_seconds", "backoff_max_seconds",
                    "poll_seconds", "retention_days"):
            _positive(f"alerts.{key}", getattr(self, key))
        if self.base_url is not None and not re.match(r"^https?://[^/@\s]+(/\S*)?$", self.base_url):
            msg = f"alerts.base_url must be an http(s) URL without credentials, got {self.base_url!r}"
            raise ValueError(msg)


class MlflowConfig(_Section):
    """The MLflow tracking server and model registry (docs/mlflow.md)."""

    #: e.g. http://mlflow:5000. None: no registry; references come from
    #: monitor.reference_dir or are bootstrapped from traffic.
    tracking_uri: str | None = None
    #: Bound on one request, and retries of a failed one (0, 2, 4 ... s apart): the
    #: analysis retries a failed reference lookup on its next window anyway.
    request_timeout_seconds: int = 10
    max_retries: int = 2
    #: A bearer token for the tracking server (MLFLOW_TRACKING_TOKEN), from a variable
    #: or a file; or basic auth from username_* and password_* (docs/security.md).
    token_env: str | None = None
    token_file: str | None = None
    username_env: str | None = None
    username_file: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    #: PEM CA bundle for a tracking server behind a private CA.
    ca_file: str | None = None

    def __post_init__(self) -> None:
        if self.tracking_uri is not None and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$",
                                                          self.tracking_uri):
            msg = f"mlflow.tracking_uri must be a URI such as http://mlflow:5000, got {self.tracking_uri!r}"
            raise ValueError(msg)
        token = _secret_source(self, "mlflow", "token")
        user = _secret_source(self, "mlflow", "username")
        password = _secret_source(self, "mlflow", "password")
        if token and (user or password):
            msg = "mlflow.token_env/token_file and mlflow.username_*/password_* are both set: give one"
            raise ValueError(msg)
        if user != password:
            missing = "mlflow.password_env/password_file" if user else "mlflow.username_env/username_file"
            msg = f"{missing} is required: basic auth needs both a username and a password"
            raise ValueError(msg)
        if (token or user) and self.tracking_uri is None:
            msg = "mlflow credentials are set but mlflow.tracking_uri is not"
            raise ValueError(msg)
        if self.ca_file:
            _existing_file("mlflow.ca_file", self.ca_file)
        _positive("mlflow.request_timeout_seconds", self.request_timeout_seconds)
        if self.max_retries < 0:
            msg = f"mlflow.max_retries must be >= 0, got {self.max_retries}"
            raise ValueError(msg)


class KubernetesLaunchConfig(_Section):
    """Training runs as Kubernetes Jobs (docs/retraining.md)."""

    namespace: str = "driftloop"
    #: The training image (deploy/Dockerfile's CUDA variant).
    image: str = "driftloop:cuda"
    gpus: int = 1
    service_account: str = "driftloop-trainer"

    def __post_init__(self) -> None:
        if self.gpus < 0:
            msg = f"retrain.kubernetes.gpus must be >= 0, got {self.gpus}"
            raise ValueError(msg)


class RetrainConfig(_Section):
    """When and how to fine-tune (docs/retraining.md has every default's reason)."""

    enabled: bool = False
    #: Incidents of these kinds trigger a run (when at least min_severity).
    incident_kinds: tuple[str, ...] = ("performance_drop", "prediction_drift", "feature_drift")
    min_severity: Literal["info", "warning", "critical"] = "warning"
    cooldown_seconds: float = 6 * 3600.0
    #: Matured labelled predictions since the last run's window (or ever) needed to start one.
    min_fresh_labels: int = 5000
    max_jobs_per_day: int = 6
    manual_bypasses_cooldown: bool = True
    #: The training data: the newest matured stretch of this length.
    window_seconds: float = 24 * 3600.0
    budget_seconds: float = 1800.0
    search_trials: int = 1
    min_rows: int = 1000
    #: Hyperparameters for the trainer (docs/trainer.md), e.g. {lr: 0.002}.
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    trainer: str = "retrain.ctr_trainer:CTRTrainer"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    launcher: Literal["local", "torchrun", "kubernetes"] = "local"
    #: The job's entry point for the local and torchrun launchers (a module run with
    #: ``python -m``): a deployment's own wrapper around retrain.job, say.
    entry_module: str = "retrain.job"
    torchrun_nproc_per_node: int = 1
    kubernetes: KubernetesLaunchConfig = msgspec.field(default_factory=KubernetesLaunchConfig)
    #: model name -> crontab expression (UTC), e.g. {ctr: "0 3 * * *"}.
    schedule: dict[str, str] = msgspec.field(default_factory=dict)
    #: Where job specs, logs and results go; default <storage.data_dir>/jobs.
    workdir: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        # Never retrain on retraining's own outcomes.
        triggers = [k for k in ALERT_KINDS if k not in ("training_failed", "model_promoted",
                                                        "model_rollback", "monitor_stalled")]
        unknown = sorted(set(self.incident_kinds) - set(triggers))
        if unknown:
            msg = f"retrain.incident_kinds: unknown kinds {unknown}; known: {triggers}"
            raise ValueError(msg)
        if self.cooldown_seconds < 0:
            msg = f"retrain.cooldown_seconds must be >= 0 (0: no cooldown), got {self.cooldown_seconds}"
            raise ValueError(msg)
        for key in ("window_seconds", "budget_seconds"):
            _positive(f"retrain.{key}", getattr(self, key))
        if self.min_fresh_labels < 0:
            msg = f"retrain.min_fresh_labels must be >= 0, got {self.min_fresh_labels}"
            raise ValueError(msg)
        for key in ("max_jobs_per_day", "search_trials", "min_rows", "torchrun_nproc_per_node"):
            if getattr(self, key) < 1:
                msg = f"retrain.{key} must be >= 1, got {getattr(self, key)}"
                raise ValueError(msg)
        if ":" not in self.trainer:
            msg = f"retrain.trainer must be 'module:Class', got {self.trainer!r}"
            raise ValueError(msg)
        if not all(part.isidentifier() for part in self.entry_module.split(".")):
            msg = f"retrain.entry_module must be a dotted module name, got {self.entry_module!r}"
            raise ValueError(msg)


class PromotionConfig(_Section):
    """Which challengers become champion, the live watch after, the canary (docs/promotion.md)."""

    enabled: bool = True
    #: Promote a challenger from a successful training job when it passes the gate.
    auto: bool = True
    min_auc_gain: float = 0.005
    confidence: float = 0.95
    max_logloss_increase: float = 0.0
    calibration_band: tuple[float, float] = (0.8, 1.25)
    #: The challenger fails on calibration only when this confidence interval of its
    #: ratio lies outside the band (retrain.promote.PromotionSpec.calibration_level).
    calibration_level: float = 0.95
    max_size_ratio: float = 1.5
    max_latency_ratio: float = 2.0
    min_auc: float = 0.55
    #: After a promotion the new champion's labels are tested against the previous
    #: champion's live rate for this many labelled events; a significant drop rolls back.
    watch_events: int = 200_000
    watch_arl0_events: float = 1e6
    #: The previous champion's live rate is taken over its last this many labelled events.
    baseline_events: int = 100_000
    #: Two versions of one model serving at once are compared live (mSPRT).
    canary: bool = True
    canary_alpha: float = 0.05
    canary_min_events: int = 2000
    #: How often the champion alias is read, to notice promotions made elsewhere.
    poll_seconds: float = 30.0
    #: Who may move aliases: a lease in <data_dir>/promotion.db (one machine), or a
    #: PostgreSQL advisory lock (several replicas; with storage.state_url set, an
    #: advisory lock on that database is used without this).
    lock: Literal["sqlite", "postgres"] = "sqlite"
    lock_dsn_env: str | None = None

    def __post_init__(self) -> None:
        for key in ("watch_events", "baseline_events", "canary_min_events"):
            if getattr(self, key) < 1:
                msg = f"promotion.{key} must be >= 1, got {getattr(self, key)}"
                raise ValueError(msg)
        for key in ("watch_arl0_events", "poll_seconds"):
            _positive(f"promotion.{key}", getattr(self, key))
        if not 0.0 < self.canary_alpha < 1.0:
            msg = f"promotion.canary_alpha must be in (0, 1), got {self.canary_alpha}"
            raise ValueError(msg)
        if self.lock == "postgres" and not self.lock_dsn_env:
            msg = "promotion.lock: postgres needs lock_dsn_env (the variable holding the DSN)"
            raise ValueError(msg)
        try:
            self.spec()
        except ValueError as exc:
            msg = f"promotion: {exc}"
            raise ValueError(msg) from None

    def spec(self) -> Any:
        from retrain.promote import PromotionSpec

        return PromotionSpec(min_auc_gain=self.min_auc_gain, confidence=self.confidence,
                             max_logloss_increase=self.max_logloss_increase,
                             calibration_band=self.calibration_band,
                             calibration_level=self.calibration_level, max_size_ratio=self.max_size_ratio,
                             max_latency_ratio=self.max_latency_ratio, min_auc=self.min_auc)


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Config(_Section):
    #: Stable name of this process: owns its spill files across restarts. Defaults to
    #: the host name (a StatefulSet pod name in Kubernetes).
    instance_id: str | None = None
    kafka: KafkaConfig = msgspec.field(default_factory=KafkaConfig)
    windows: WindowConfig = msgspec.field(default_factory=WindowConfig)
    checkpoint: CheckpointConfig = msgspec.field(default_factory=CheckpointConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    monitor: MonitorConfig = msgspec.field(default_factory=MonitorConfig)
    mlflow: MlflowConfig = msgspec.field(default_factory=MlflowConfig)
    alerts: AlertsConfig = msgspec.field(default_factory=AlertsConfig)
    retrain: RetrainConfig = msgspec.field(default_factory=RetrainConfig)
    promotion: PromotionConfig = msgspec.field(default_factory=PromotionConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        if self.retrain.enabled and not self.mlflow.tracking_uri:
            msg = ("retrain.enabled needs mlflow.tracking_uri: every training run is logged and "
                   "registered in MLflow")
            raise ValueError(msg)
        size = self.windows.size_seconds
        for name, value in (("monitor.attribution_seconds", self.monitor.attribution_seconds),
                            ("monitor.stats.performance.period_seconds",
                             self.monitor.performance.period_seconds),
                            ("monitor.bootstrap_seconds", self.monitor.bootstrap_seconds)):
            if value % size:
                msg = f"{name} ({value}) must be a multiple of windows.size_seconds ({size})"
                raise ValueError(msg)
        if self.instance_id is not None and not _INSTANCE_RE.match(self.instance_id):
            msg = f"instance_id {self.instance_id!r} must match {_INSTANCE_RE.pattern}"
            raise ValueError(msg)
        if self.instance_id is not None and "--" in self.instance_id:
            # File names are <window>--<instance>--<seq>: instance "a" would take "a--b"'s
            # files for its own when it cleans up after a crash.
            msg = f"instance_id {self.instance_id!r} must not contain '--' (it separates file name parts)"
            raise ValueError(msg)

    @property
    def instance(self) -> str:
        if self.instance_id:
            return self.instance_id
        host = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()))[:64]
        return host or "driftloop"


def _env_overrides(environ: Mapping[str, str]) -> dict[str, tuple[list[str], Any]]:
    """``DRIFTLOOP__KAFKA__GROUP_ID=x`` -> {"DRIFTLOOP__KAFKA__GROUP_ID": (["kafka", "group_id"], "x")}.

    Values are parsed as YAML scalars so ``"100"`` becomes an int and ``"true"`` a bool,
    exactly as they would in the file.
    """
    out = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        out[name] = (path, value)
    return out


#: ``driftloop run --profile trial``: durations short enough to see the first drift
#: verdicts within about three minutes of traffic and the first label verdicts within
#: about five (docs/configuration.md, "A first trial"), consistent with each other:
#: windows of 10 s, a 2-minute reference bootstrap, clicks attributed for a minute,
#: 1-minute drop-test periods. Too short for production statistics; keys the config
#: file or the environment sets win over it.
PROFILES: dict[str, dict[str, Any]] = {
    "trial": {
        "windows": {"size_seconds": 10, "allowed_lateness_seconds": 5, "idle_timeout_seconds": 30},
        "monitor": {"bootstrap_seconds": 120, "bootstrap_min_rows": 200, "bootstrap_min_labels": 10,
                    "attribution_seconds": 60, "labels_stall_seconds": 600, "resolve_after": 2,
                    "stall_seconds": 300, "drift": {"min_rows": 200},
                    "performance": {"period_seconds": 60}},
    },
}


def _under(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` merged over ``base``, section by section."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _under(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def load_config(path: str | Path | None, environ: Mapping[str, str] | None = None, *,
                profile: str | None = None) -> Config:
    """Read, merge and validate the configuration.

    Args:
        profile: a name in `PROFILES`, laid under the file (what the file and the
            environment say wins).

    Raises:
        ConfigError: with one message naming the missing file, the bad key (as
            ``kafka.max_poll_records``) or the environment variable that set it.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if profile is not None and profile not in PROFILES:
        msg = f"--profile {profile!r} is not one of {sorted(PROFILES)}"
        raise ConfigError(msg)
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            msg = f"config file not found: {path}"
            raise ConfigError(msg) from None
        except OSError as exc:
            msg = f"config file {path} cannot be read: {exc.strerror}"
            raise ConfigError(msg) from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            msg = f"config file {path} is not valid YAML{line}: {getattr(exc, 'problem', exc)}"
            raise ConfigError(msg) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            msg = f"config file {path} must hold a mapping at the top, not {type(loaded).__name__}"
            raise ConfigError(msg)
        data = loaded

    if profile is not None:
        data = _under(PROFILES[profile], data)
    env_keys: dict[str, str] = {}
    for var, (keys, value) in _env_overrides(os.environ if environ is None else environ).items():
        if not keys:
            continue
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if not isinstance(child, dict):
                child = {}
                node[k] = child
            node = child
        node[keys[-1]] = value
        env_keys[".".join(keys)] = var

    try:
        return msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(str(exc), source, env_keys)) from None


def _explain(message: str, source: str, env_keys: dict[str, str]) -> str:
    """Rewrite msgspec's ``... - at `$.kafka.port``` into ``kafka.port: ...``."""
    m = re.match(r"^(.*?)(?: - at `\$(.*)`)?$", message)
    detail, where = (m.group(1), m.group(2) or "") if m else (message, "")
    key = where.lstrip(".").replace("`", "")
    unknown = re.match(r"Object contains unknown field `(.+)`", detail)
    if unknown:
        key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
        detail = "unknown key"
    var = env_keys.get(key)
    origin = f"environment variable {var}" if var else f"config {source}"
    return f"{origin}: {key or '(top level)'}: {detail}"
