"""Security for production: Kafka over TLS and SASL, MLflow tokens, the daemon's HTTP token.

Everything runs against the real thing: a SASL_SSL Kafka broker with SCRAM users made
when it was formatted (``secure_kafka``), the real ControlServer, and a real MLflow
server behind an HTTP proxy of the test's own that insists on credentials.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from prometheus_client import CollectorRegistry

from connectors.http import ControlServer
from connectors.kafka import (
    DeadLetterProducer,
    KafkaSecurityError,
    Listener,
    client_security,
    make_consumer,
)
from connectors.mlflow_auth import MLFLOW_AUTH_VARIABLES, apply_credentials
from monitor.config import ConfigError, HttpConfig, KafkaConfig, MlflowConfig, load_config
from monitor.testbed.local_kafka import SecureBroker, committed_offsets, create_topics
from tests.daemon_proc import DaemonProcess, stored_prediction_ids, wait_until
from tests.events_gen import BASE_TS_MS, encode, prediction

REPO = Path(__file__).resolve().parents[1]
PASSWORD_VAR = "DRIFTLOOP_TEST_KAFKA_PASSWORD"


def load(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "driftloop.yaml"
    path.write_text(text)
    return load_config(path, environ={})


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items()
            if not k.startswith("DRIFTLOOP__") and k not in MLFLOW_AUTH_VARIABLES}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "monitor.service.cli", *args], capture_output=True,
                          text=True, env=full, timeout=timeout, check=False, cwd=REPO)


# -- configuration ---------------------------------------------------------------------


@pytest.fixture
def pem(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return path


@pytest.mark.parametrize(("kafka", "expected"), [
    ({"security_protocol": "SASL_SSL"}, "kafka.sasl_mechanism is required"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_password_env": "P"},
     "kafka.sasl_username is required"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u"},
     "kafka.sasl_password_env or kafka.sasl_password_file is required"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u",
      "sasl_password_env": "P", "sasl_password_file": "{pem}"},
     "kafka.sasl_password_env and kafka.sasl_password_file are both set"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u",
      "sasl_password_file": "/nonexistent/kafka.password"},
     "kafka.sasl_password_file: /nonexistent/kafka.password does not exist"),
    ({"sasl_mechanism": "SCRAM-SHA-256", "sasl_username": "u", "sasl_password_env": "P"},
     "kafka.sasl_mechanism is set but kafka.security_protocol is PLAINTEXT"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI"}, "kafka.sasl_mechanism"),
    ({"security_protocol": "SSL", "ssl_cafile": "/nonexistent/ca.pem"},
     "kafka.ssl_cafile: /nonexistent/ca.pem does not exist"),
    ({"security_protocol": "SSL", "ssl_certfile": "{pem}", "ssl_keyfile": "/nonexistent/k.pem"},
     "kafka.ssl_keyfile: /nonexistent/k.pem does not exist"),
    ({"ssl_cafile": "{pem}"}, "kafka.ssl_cafile is set but kafka.security_protocol is PLAINTEXT"),
    ({"security_protocol": "SSL", "ssl_keyfile": "{pem}"}, "kafka.ssl_keyfile needs kafka.ssl_certfile"),
    ({"security_protocol": "SSL", "ssl_password_env": "K"}, "kafka.ssl_password_env/ssl_password_file"),
    ({"security_protocol": "TLS"}, "kafka.security_protocol: Invalid enum value 'TLS'"),
])
def test_kafka_security_errors_name_the_key(tmp_path: Path, pem: Path, kafka: dict[str, Any],
                                            expected: str) -> None:
    kafka = {k: v.replace("{pem}", str(pem)) if isinstance(v, str) else v for k, v in kafka.items()}
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, yaml.safe_dump({"kafka": kafka}))
    assert expected in str(exc.value)


@pytest.mark.parametrize(("section", "expected"), [
    ({"http": {"host": "0.0.0.0"}}, "http.token_env (or http.token_file) is required when http.host is "
                                    "'0.0.0.0'"),
    ({"http": {"host": "10.1.2.3"}}, "http.token_env (or http.token_file) is required"),
    ({"http": {"host": "driftloop.internal"}}, "http.token_env (or http.token_file) is required"),
    ({"http": {"token_env": "T", "allow_unauthenticated_actions": True}},
     "http.allow_unauthenticated_actions is true but a token is set"),
    ({"http": {"protect_reads": True}}, "http.protect_reads needs http.token_env"),
    ({"http": {"token_env": "T", "token_file": "/x"}}, "http.token_env and http.token_file are both set"),
    ({"http": {"token_file": "/nonexistent/token"}}, "http.token_file: /nonexistent/token does not exist"),
    ({"mlflow": {"tracking_uri": "http://m:5000", "token_env": "T", "username_env": "U",
                 "password_env": "P"}}, "mlflow.token_env/token_file and mlflow.username_*/password_*"),
    ({"mlflow": {"tracking_uri": "http://m:5000", "username_env": "U"}},
     "mlflow.password_env/password_file is required"),
    ({"mlflow": {"tracking_uri": "http://m:5000", "password_file": "/nonexistent/pw"}},
     "mlflow.password_file: /nonexistent/pw does not exist"),
    ({"mlflow": {"token_env": "T"}}, "mlflow credentials are set but mlflow.tracking_uri is not"),
    ({"mlflow": {"tracking_uri": "http://m:5000", "ca_file": "/nonexistent/ca.pem"}},
     "mlflow.ca_file: /nonexistent/ca.pem does not exist"),
])
def test_http_and_mlflow_security_errors_name_the_key(tmp_path: Path, section: dict[str, Any],
                                                      expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, yaml.safe_dump(section))
    assert expected in str(exc.value)


@pytest.mark.parametrize("http", [
    {}, {"host": "127.0.0.1"}, {"host": "127.0.0.53"}, {"host": "::1"}, {"host": "localhost"},
    {"host": "0.0.0.0", "token_env": "T"}, {"host": "0.0.0.0", "allow_unauthenticated_actions": True},
])
def test_loopback_or_a_token_or_an_explicit_opt_out_is_accepted(tmp_path: Path, http: dict[str, Any]) -> None:
    config = load(tmp_path, yaml.safe_dump({"http": http}))
    assert config.http.host == http.get("host", "127.0.0.1")


def test_client_security_speaks_kafka_pythons_parameter_names(tmp_path: Path, pem: Path) -> None:
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient

    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    settings = KafkaConfig(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-256", sasl_username="u",
                           sasl_password_file=str(secret), ssl_cafile=str(pem), ssl_certfile=str(pem),
                           ssl_keyfile=str(pem), ssl_password_env="KEYPW", ssl_check_hostname=False)
    options = client_security(settings, {"KEYPW": "k"})
    assert options == {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256",
                       "sasl_plain_username": "u", "sasl_plain_password": "s3cret",
                       "ssl_cafile": str(pem), "ssl_certfile": str(pem), "ssl_keyfile": str(pem),
                       "ssl_password": "k", "ssl_check_hostname": False}
    for client in (KafkaConsumer, KafkaProducer, KafkaAdminClient):
        assert set(options) <= set(client.DEFAULT_CONFIG), client.__name__
    assert client_security(KafkaConfig(), {}) == {"security_protocol": "PLAINTEXT"}
    with pytest.raises(ValueError, match=r"kafka\.ssl_password_env: environment variable KEYPW is not set"):
        client_security(settings, {})


def test_run_with_an_unset_password_variable_exits_2_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    kafka = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u",
             "sasl_password_env": "NOPE_UNSET_PW"}
    cfg.write_text(yaml.safe_dump({"kafka": kafka, "storage": {"data_dir": str(tmp_path / "data")}}))
    proc = run_cli("run", "--config", str(cfg), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "driftloop: kafka.sasl_password_env: environment variable NOPE_UNSET_PW is not set or empty"]


# -- the daemon's HTTP endpoints ---------------------------------------------------------


class Retrains:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.bodies.append(body)
        return 202, {"accepted": body.get("model")}


@pytest.fixture
def control() -> Iterator[tuple[ControlServer, Retrains]]:
    retrains = Retrains()
    server = ControlServer("127.0.0.1", 0, healthy=lambda: (True, "ok"), ready=lambda: (True, "ok"),
                           status=lambda: {"ok": True}, registry=CollectorRegistry(),
                           pages={"/incidents": lambda rest: (200, "text/plain", b"report\n")},
                           actions={"/retrain": retrains}, action_token="t0ken-Abc.123")
    server.start()
    try:
        yield server, retrains
    finally:
        server.stop()


def request(port: int, path: str, *, body: dict[str, Any] | None = None,
            auth: str | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": auth} if auth else {}
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers,
                                 method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Bearer t0ken-Abc.12", "Basic dDBrZW4tQWJjLjEyMw==",
                                  "t0ken-Abc.123", "Bearer t0ken-Abc.123x"])
def test_post_without_the_right_bearer_token_is_refused_with_401(
        control: tuple[ControlServer, Retrains], auth: str | None,
        caplog: pytest.LogCaptureFixture) -> None:
    server, retrains = control
    with caplog.at_level(logging.DEBUG):
        code, headers, body = request(server.port, "/retrain", body={"model": "ctr"}, auth=auth)
        # An unknown path is refused the same way: no probing for routes without the token.
        code_unknown, _, _ = request(server.port, "/nope", body={}, auth=auth)
    assert code == 401 and code_unknown == 401
    assert headers["WWW-Authenticate"].startswith('Bearer realm="driftloop"')
    assert ('error="invalid_token"' in headers["WWW-Authenticate"]) == bool(auth and " " in auth)
    assert json.loads(body) == {"error": "a valid bearer token is required"}
    assert retrains.bodies == []
    logged = " ".join(r.getMessage() + json.dumps(getattr(r, "fields", {})) for r in caplog.records)
    assert "refused" in logged
    assert "t0ken" not in logged and (auth is None or auth not in logged)


def test_post_with_the_right_token_runs_the_action_and_gets_stay_open(
        control: tuple[ControlServer, Retrains]) -> None:
    server, retrains = control
    code, _, body = request(server.port, "/retrain", body={"model": "ctr"}, auth="Bearer t0ken-Abc.123")
    assert (code, json.loads(body)) == (202, {"accepted": "ctr"})
    code, _, _ = request(server.port, "/retrain", body={"model": "m2"}, auth="bearer  t0ken-Abc.123 ")
    assert code == 202
    assert [b["model"] for b in retrains.bodies] == ["ctr", "m2"]
    assert request(server.port, "/nope", body={}, auth="Bearer t0ken-Abc.123")[0] == 404
    for path in ("/healthz", "/readyz", "/metrics", "/status", "/incidents/x"):
        assert request(server.port, path)[0] == 200, path


def test_protect_reads_closes_everything_but_the_probes(control: tuple[ControlServer, Retrains]) -> None:
    server, _ = control
    server.protect_reads = True
    for path in ("/metrics", "/status", "/incidents", "/incidents/x"):
        assert request(server.port, path)[0] == 401, path
        assert request(server.port, path, auth="Bearer t0ken-Abc.123")[0] == 200, path
    for path in ("/healthz", "/readyz"):
        assert request(server.port, path)[0] == 200, path


def test_without_a_token_posts_are_open_as_before() -> None:
    retrains = Retrains()
    server = ControlServer("127.0.0.1", 0, healthy=lambda: (True, "ok"), ready=lambda: (True, "ok"),
                           status=dict, registry=CollectorRegistry(), actions={"/retrain": retrains})
    server.start()
    try:
        assert request(server.port, "/retrain", body={"model": "a"})[0] == 202
    finally:
        server.stop()
    assert retrains.bodies == [{"model": "a"}]


def test_cli_retrain_and_status_send_the_configured_token(
        control: tuple[ControlServer, Retrains], tmp_path: Path) -> None:
    server, retrains = control
    token_file = tmp_path / "token"
    token_file.write_text("t0ken-Abc.123\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"http": {"port": server.port, "token_file": str(token_file),
                                            "protect_reads": True}}))
    ok = run_cli("retrain", "ctr", "--reason", "test", "--who", "ana", "--config", str(cfg))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"accepted": "ctr"}
    assert retrains.bodies == [{"model": "ctr", "reason": "test", "who": "ana"}]
    server.protect_reads = True
    status = run_cli("status", "--config", str(cfg))
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) == {"ok": True}

    token_file.write_text("not-the-token\n")
    wrong = run_cli("retrain", "ctr", "--config", str(cfg))
    assert wrong.returncode == 1
    assert "the daemon refused: 401" in wrong.stderr and "is not the daemon's" in wrong.stderr
    assert len(retrains.bodies) == 1

    cfg.write_text(yaml.safe_dump({"http": {"port": server.port, "token_env": "NOPE_UNSET_TOKEN"}}))
    unset = run_cli("retrain", "ctr", "--config", str(cfg))
    assert unset.returncode == 2
    assert "http.token_env: environment variable NOPE_UNSET_TOKEN is not set" in unset.stderr


# -- Kafka over SASL_SSL and mTLS --------------------------------------------------------


def secure_settings(broker: SecureBroker, topics: dict[str, str] | None = None, *,
                    mechanism: str = "SCRAM-SHA-512", password_env: str = PASSWORD_VAR,
                    **more: Any) -> KafkaConfig:
    topics = topics or {"predictions": "p", "feedback": "f", "dead_letter": "d"}
    fields: dict[str, Any] = {
        "bootstrap_servers": broker.bootstrap, "security_protocol": "SASL_SSL", "sasl_mechanism": mechanism,
        "sasl_username": broker.username, "sasl_password_env": password_env,
        "ssl_cafile": str(broker.ca_file), "predictions_topic": topics["predictions"],
        "feedback_topic": topics["feedback"], "dead_letter_topic": topics["dead_letter"]}
    return KafkaConfig(**{**fields, **more})


def secure_topics(broker: SecureBroker, partitions: int = 1) -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    topics = {"predictions": f"pred-{tag}", "feedback": f"fb-{tag}", "dead_letter": f"dlq-{tag}"}
    create_topics(broker.bootstrap, {topics["predictions"]: partitions, topics["feedback"]: 1,
                                     topics["dead_letter"]: 1}, client_config=broker.client_config())
    return topics


def drain(consumer: Any, n: int, timeout_s: float = 30) -> list[Any]:
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=200).values():
            out.extend(records)
    return out


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"])
def test_consumer_and_dead_letter_producer_work_over_sasl_ssl(secure_kafka: SecureBroker,
                                                              mechanism: str) -> None:
    topics = secure_topics(secure_kafka)
    settings = secure_settings(secure_kafka, topics, mechanism=mechanism)
    environ = {PASSWORD_VAR: secure_kafka.password}
    producer = DeadLetterProducer.for_settings(settings, environ)

    class Rec:
        key, value, offset = b"k", b"raw bytes", 7

    from connectors.events import Reason

    producer.send("src", 0, Rec(), next(iter(Reason)), "why")
    producer.flush()
    producer.close()
    security = client_security(settings, environ)
    consumer = make_consumer(KafkaConfig(**{**msgspec.structs.asdict(settings),
                                            "predictions_topic": "x", "feedback_topic": "y",
                                            "group_id": f"g-{uuid.uuid4().hex[:8]}"}),
                             [topics["dead_letter"]], Listener(lambda _: None, lambda _: None), "i1",
                             security=security)
    try:
        got = drain(consumer, 1)
    finally:
        consumer.close()
    assert [(m.key, m.value) for m in got] == [(b"k", b"raw bytes")]


def test_wrong_password_and_wrong_ca_raise_a_clear_security_error(secure_kafka: SecureBroker,
                                                                  tmp_path: Path) -> None:
    listener = Listener(lambda _: None, lambda _: None)
    settings = secure_settings(secure_kafka, request_timeout_ms=4000, session_timeout_ms=3000,
                               heartbeat_interval_ms=1000)
    with pytest.raises(KafkaSecurityError) as exc:
        make_consumer(settings, ["t"], listener, "i1",
                      security=client_security(settings, {PASSWORD_VAR: "no"}))
    message = str(exc.value)
    assert "the broker refused the SASL login" in message
    assert f"kafka.sasl_password_env ({PASSWORD_VAR})" in message and "'driftloop'" in message
    assert secure_kafka.password not in message

    other_ca = tmp_path / "other-ca.pem"
    openssl(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=not-the-ca",
             "-keyout", str(tmp_path / "other-ca.key"), "-out", str(other_ca)])
    wrong_ca = secure_settings(secure_kafka, request_timeout_ms=4000, session_timeout_ms=3000,
                               heartbeat_interval_ms=1000, ssl_cafile=str(other_ca))
    with pytest.raises(KafkaSecurityError) as exc:
        make_consumer(wrong_ca, ["t"], listener, "i1",
                      security=client_security(wrong_ca, {PASSWORD_VAR: secure_kafka.password}))
    assert "the broker's TLS certificate did not verify" in str(exc.value)
    assert "kafka.ssl_cafile" in str(exc.value) and str(other_ca) in str(exc.value)


def openssl(args: list[str]) -> None:
    if shutil.which("openssl") is None:
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail("CI=true and openssl is missing", pytrace=False)
        pytest.skip("openssl is not installed")
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def test_mutual_tls_with_a_client_certificate(secure_kafka: SecureBroker) -> None:
    tag = uuid.uuid4().hex[:8]
    topic = f"mtls-{tag}"
    create_topics(secure_kafka.mtls_bootstrap, {topic: 1}, client_config=secure_kafka.mtls_config())
    settings = KafkaConfig(bootstrap_servers=secure_kafka.mtls_bootstrap, security_protocol="SSL",
                           ssl_cafile=str(secure_kafka.ca_file),
                           ssl_certfile=str(secure_kafka.client_certfile),
                           ssl_keyfile=str(secure_kafka.client_keyfile), dead_letter_topic=topic,
                           group_id=f"g-{tag}")
    producer = DeadLetterProducer.for_settings(settings, {})

    class Rec:
        key, value, offset = None, b"over mtls", 0

    from connectors.events import Reason

    producer.send("src", 0, Rec(), next(iter(Reason)), "why")
    producer.flush()
    producer.close()
    consumer = make_consumer(settings, [topic], Listener(lambda _: None, lambda _: None), "i1",
                             security=client_security(settings, {}))
    try:
        assert [m.value for m in drain(consumer, 1)] == [b"over mtls"]
    finally:
        consumer.close()


def daemon_overrides(broker: SecureBroker, **kafka: Any) -> dict[str, Any]:
    return {"kafka": {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                      "sasl_username": broker.username, "sasl_password_env": PASSWORD_VAR,
                      "ssl_cafile": str(broker.ca_file), **kafka},
            "http": {"token_env": "DRIFTLOOP_TEST_HTTP_TOKEN"}}


def test_daemon_ingests_and_commits_over_sasl_ssl(secure_kafka: SecureBroker, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from kafka import KafkaConsumer, KafkaProducer

    topics = secure_topics(secure_kafka, partitions=2)
    n = 500
    client = secure_kafka.client_config()
    producer = KafkaProducer(bootstrap_servers=secure_kafka.bootstrap, acks="all", linger_ms=20, **client)
    for i in range(n):
        producer.send(topics["predictions"], encode(prediction(i, BASE_TS_MS + i * 100)))
    producer.send(topics["predictions"], b"{not json")
    producer.flush(timeout=60)
    producer.close()

    monkeypatch.setenv(PASSWORD_VAR, secure_kafka.password)
    monkeypatch.setenv("DRIFTLOOP_TEST_HTTP_TOKEN", "http-t0ken")
    daemon = DaemonProcess(tmp_path, secure_kafka.bootstrap, topics, group="driftloop-secure",
                           overrides=daemon_overrides(secure_kafka)).start()
    try:
        daemon.wait_ready(90)
        wait_until(lambda: len(stored_prediction_ids(daemon.store)) >= n or daemon._died(), 90,
                   "stored predictions")
        assert not daemon._died(), daemon.tail()
        ids = stored_prediction_ids(daemon.store)
        assert sorted(ids) == sorted(f"p-{i}" for i in range(n))

        probe = KafkaConsumer(bootstrap_servers=secure_kafka.bootstrap, **client)
        from kafka.structs import TopicPartition

        ends = {tp.partition: o for tp, o in probe.end_offsets(
            [TopicPartition(topics["predictions"], p) for p in (0, 1)]).items()}
        probe.close()
        wait_until(lambda: committed_offsets(secure_kafka.bootstrap, "driftloop-secure",
                                             topics["predictions"], client_config=client) == ends,
                   30, "committed == end")

        # The malformed record went to the dead-letter topic over SASL_SSL as well.
        dlq = KafkaConsumer(topics["dead_letter"], bootstrap_servers=secure_kafka.bootstrap,
                            auto_offset_reset="earliest", consumer_timeout_ms=20_000, **client)
        dead = [m.value for m in dlq]
        dlq.close()
        assert dead == [b"{not json"]

        # The daemon's POST endpoints want the token from http.token_env.
        assert request(daemon.port, "/retrain", body={"model": "ctr"})[0] == 401
        assert request(daemon.port, "/retrain", body={"model": "ctr"}, auth="Bearer http-t0ken")[0] == 409
        assert daemon.get("/status")[0] == 200
        assert daemon.terminate() == 0
    finally:
        daemon.stop_quietly()
    log = daemon.log_path.read_text()
    assert secure_kafka.password not in log and "http-t0ken" not in log


def test_daemon_with_a_wrong_password_logs_why_and_stays_unready(secure_kafka: SecureBroker, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    topics = secure_topics(secure_kafka)
    monkeypatch.setenv(PASSWORD_VAR, "wrong-" + secure_kafka.password[:6])
    monkeypatch.setenv("DRIFTLOOP_TEST_HTTP_TOKEN", "x")
    daemon = DaemonProcess(tmp_path, secure_kafka.bootstrap, topics,
                           overrides=daemon_overrides(secure_kafka, request_timeout_ms=7000)).start()
    try:
        def refused() -> list[dict[str, Any]]:
            assert not daemon._died(), daemon.tail()
            lines = [json.loads(x) for x in daemon.log_path.read_text().splitlines() if x.startswith("{")]
            return [x for x in lines if x.get("msg") == "cannot reach Kafka, retrying"
                    and "the broker refused the SASL login" in x.get("error", "")]

        found = wait_until(refused, 90, "the daemon's log line about the refused login")
        assert "kafka.sasl_password_env" in found[0]["error"]
        assert daemon.get("/healthz")[0] == 200
        code, body = daemon.get("/readyz")
        assert code == 503 and b"not connected to Kafka" in body
        # It keeps trying (a fixed Secret needs no restart) instead of exiting.
        wait_until(lambda: len(refused()) >= 2, 60, "a second attempt")
        assert daemon.proc is not None and daemon.proc.poll() is None
        assert daemon.terminate() == 0
    finally:
        daemon.stop_quietly()
    assert secure_kafka.password[:6] not in daemon.log_path.read_text()


# -- MLflow with credentials -------------------------------------------------------------


class AuthProxy:
    """An HTTP proxy to the MLflow server that refuses requests without the expected credentials."""

    def __init__(self, upstream: str, expected: str) -> None:
        self.expected = expected
        self.seen: list[tuple[str, int]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if self.headers.get("Authorization") != proxy.expected:
                    proxy.seen.append((self.path, 401))
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Bearer realm="mlflow"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "authorization", "content-length", "connection")}
                req = urllib.request.Request(upstream + self.path, data=body, method=self.command,
                                             headers=headers)
                try:
                    with urllib.request.urlopen(req, timeout=30) as resp:
                        code, out, ctype = resp.status, resp.read(), resp.headers.get("Content-Type")
                except urllib.error.HTTPError as exc:
                    code, out, ctype = exc.code, exc.read(), exc.headers.get("Content-Type")
                proxy.seen.append((self.path, code))
                self.send_response(code)
                if ctype:
                    self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _forward

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def clean_mlflow_env() -> Iterator[None]:
    saved = {k: os.environ.pop(k, None) for k in MLFLOW_AUTH_VARIABLES}
    yield
    for k, v in saved.items():
        os.environ.pop(k, None)
        if v is not None:
            os.environ[k] = v


def test_mlflow_token_and_basic_auth_reach_the_server(mlflow_server: str, clean_mlflow_env: None,
                                                      tmp_path: Path) -> None:
    from connectors.registry import ModelRegistry, RegistryError

    proxy = AuthProxy(mlflow_server, "Bearer mlf-t0ken")
    try:
        registry = ModelRegistry(proxy.uri, timeout_s=10, max_retries=0)
        with pytest.raises(RegistryError):
            registry.version_by_alias("m-none", "champion")
        assert proxy.seen and all(code == 401 for _, code in proxy.seen)

        settings = MlflowConfig(tracking_uri=proxy.uri, token_env="MY_MLFLOW_TOKEN")
        assert apply_credentials(settings, {"MY_MLFLOW_TOKEN": "mlf-t0ken"}) == ["MLFLOW_TRACKING_TOKEN"]
        run = registry.start_run(f"exp-{uuid.uuid4().hex[:8]}", "auth-check", tags={"k": "v"})
        registry.log_run_metrics(run.run_id, {"auc": 0.75})
        assert registry.run_data(run.run_id)["metrics"]["auc"] == 0.75
        assert registry.version_by_alias(f"m-{uuid.uuid4().hex[:8]}", "champion") is None
        assert any(code == 200 for _, code in proxy.seen)
    finally:
        proxy.close()

    password = tmp_path / "pw"
    password.write_text("b4sic\n")
    proxy = AuthProxy(mlflow_server, "Basic " + base64.b64encode(b"ana:b4sic").decode())
    try:
        os.environ["MLFLOW_TRACKING_TOKEN"] = "stale-token"
        settings = MlflowConfig(tracking_uri=proxy.uri, username_env="U", password_file=str(password))
        assert apply_credentials(settings, {"U": "ana"}) == ["MLFLOW_TRACKING_PASSWORD",
                                                             "MLFLOW_TRACKING_USERNAME"]
        assert "MLFLOW_TRACKING_TOKEN" not in os.environ
        registry = ModelRegistry(proxy.uri, timeout_s=10, max_retries=0)
        assert registry.version_by_alias(f"m-{uuid.uuid4().hex[:8]}", "champion") is None
        assert proxy.seen and all(code != 401 for _, code in proxy.seen)
    finally:
        proxy.close()

    with pytest.raises(ValueError, match=r"mlflow\.token_env: environment variable MY_MLFLOW_TOKEN"):
        apply_credentials(MlflowConfig(tracking_uri="http://m:5000", token_env="MY_MLFLOW_TOKEN"), {})


def test_cli_rollback_authenticates_with_the_configured_token(mlflow_server: str, tmp_path: Path) -> None:
    proxy = AuthProxy(mlflow_server, "Bearer cli-t0ken")
    try:
        cfg = tmp_path / "c.yaml"
        model = f"m-{uuid.uuid4().hex[:8]}"
        cfg.write_text(yaml.safe_dump({"mlflow": {"tracking_uri": proxy.uri, "token_env": "CLI_MLFLOW_TOKEN",
                                                  "max_retries": 0},
                                       "storage": {"data_dir": str(tmp_path / "data")}}))
        proc = run_cli("rollback", model, "--yes", "--config", str(cfg),
                       env={"CLI_MLFLOW_TOKEN": "cli-t0ken"})
        assert f"{model}: champion=unset previous=unset" in proc.stdout, proc.stderr
        assert f"{model} has no previous version" in proc.stderr
        assert proxy.seen and all(code != 401 for _, code in proxy.seen)

        unset = run_cli("rollback", model, "--yes", "--config", str(cfg))
        assert unset.returncode == 2
        assert "mlflow.token_env: environment variable CLI_MLFLOW_TOKEN is not set" in unset.stderr
    finally:
        proxy.close()


def test_http_config_defaults_to_loopback() -> None:
    assert HttpConfig().host == "127.0.0.1"
    assert HttpConfig().token_env is None and not HttpConfig().allow_unauthenticated_actions


@pytest.mark.parametrize("length", ["abc", "-5", "1e3"])
def test_a_post_whose_content_length_is_not_a_length_gets_400_not_500(
        control: tuple[ControlServer, Retrains], length: str) -> None:
    server, retrains = control
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST /retrain HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken-Abc.123\r\n"
                     f"Content-Length: {length}\r\n\r\n{{}}".encode())
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.split(b"\r\n")[0] == b"HTTP/1.0 400 Bad Request", answer
    assert b"Content-Length must be a non-negative integer" in body
    assert retrains.bodies == []
