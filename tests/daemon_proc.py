"""Run the real daemon as a child process, and the Kafka plumbing tests need around it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

from connectors.store import FeedbackStore

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class DaemonProcess:
    """``driftloop run`` in a child process with a config written for the test."""

    def __init__(self, workdir: Path, bootstrap: str, topics: dict[str, str], *,
                 instance: str = "d1", group: str = "driftloop-test",
                 shared_dir: Path | None = None, overrides: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.instance = instance
        self.port = free_port()
        data = shared_dir or workdir
        cfg: dict[str, Any] = {
            "instance_id": instance,
            "kafka": {"bootstrap_servers": bootstrap, "group_id": group,
                      "predictions_topic": topics["predictions"],
                      "feedback_topic": topics["feedback"],
                      "dead_letter_topic": topics["dead_letter"],
                      "max_message_bytes": 8192,
                      "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000},
            "windows": {"size_seconds": 10, "allowed_lateness_seconds": 1,
                        "idle_timeout_seconds": 2},
            "checkpoint": {"interval_seconds": 0.5},
            "storage": {"data_dir": str(data)},
            "http": {"host": "127.0.0.1", "port": self.port},
        }
        for section, values in (overrides or {}).items():
            cfg.setdefault(section, {}).update(values)
        self.config_path = workdir / f"driftloop-{instance}.yaml"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.log_path = workdir / f"daemon-{instance}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.store = FeedbackStore(data / "store")

    def start(self) -> DaemonProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DRIFTLOOP__")}
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child owns it)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "monitor.service.cli", "run", "--config", str(self.config_path)],
            cwd=REPO, stdout=log, stderr=log, env=env)
        log.close()
        return self

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, b""

    def status(self) -> dict[str, Any] | None:
        code, body = self.get("/status")
        return json.loads(body) if code == 200 else None

    def wait_ready(self, timeout: float = 60) -> None:
        wait_until(lambda: self.get("/readyz")[0] == 200 or self._died(), timeout, "readyz")
        assert not self._died(), self.tail()

    def _died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def produce(bootstrap: str, topic: str, values: Iterable[bytes], *,
            keys: Iterable[bytes | None] | None = None, partition: int | None = None) -> int:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024,
                             acks="all", max_request_size=4 * 1024 * 1024)
    n = 0
    key_iter = iter(keys) if keys is not None else None
    for v in values:
        key = next(key_iter) if key_iter is not None else None
        producer.send(topic, value=v, key=key, partition=partition)
        n += 1
    producer.flush(timeout=120)
    producer.close()
    return n


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
    out = {tp.partition: o for tp, o in consumer.end_offsets(parts).items()}
    consumer.close()
    return out


def read_all(bootstrap: str, topic: str, timeout_s: float = 20) -> list[Any]:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=int(timeout_s * 1000))
    out = list(consumer)
    consumer.close()
    return out


def stored_prediction_ids(store: FeedbackStore) -> list[str]:
    table = store.read("predictions", columns=["prediction_id"])
    return table.column("prediction_id").to_pylist() if table.num_rows else []
