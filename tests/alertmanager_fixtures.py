"""A real Prometheus Alertmanager for the alert tests (no mock).

``alertmanager`` (session): starts the binary of the Debian package
prometheus-alertmanager (or ``DRIFTLOOP_TEST_ALERTMANAGER_BIN``) on loopback with a
free port, clustering off, tests/alertmanager.yml as its config, and a local HTTP
receiver that records the notifications Alertmanager sends (firing and resolved).
``DRIFTLOOP_TEST_ALERTMANAGER_URL`` names a running one instead (its notifications are
then not observed). Where no binary is found the tests are skipped, except under
``CI=true``, where they fail, as the Kafka fixtures do (.ci/run installs the package).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.daemon_proc import free_port
from tests.receivers import Receiver

CONFIG = Path(__file__).with_name("alertmanager.yml")


def alertmanager_unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"CI=true and no Alertmanager can run: {reason}", pytrace=False)
    pytest.skip(f"no Alertmanager here: {reason} (apt-get install prometheus-alertmanager)")


@dataclasses.dataclass
class Alertmanager:
    url: str
    notifications: Receiver | None

    def alerts(self, **labels: str) -> list[dict[str, Any]]:
        """GET /api/v2/alerts filtered by labels: what Alertmanager holds as not resolved."""
        query = urllib.parse.urlencode([("filter", f'{k}="{v}"') for k, v in labels.items()])
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts?{query}", timeout=5) as r:
            return json.load(r)

    def notified(self, **labels: str) -> list[tuple[str, dict[str, Any]]]:
        """(status, alert) of every alert in the webhook notifications it sent."""
        assert self.notifications is not None
        out = []
        for req in self.notifications.requests:
            for alert in json.loads(req.body)["alerts"]:
                if all(alert["labels"].get(k) == v for k, v in labels.items()):
                    out.append((alert["status"], alert))
        return out


def _binary() -> str | None:
    return (os.environ.get("DRIFTLOOP_TEST_ALERTMANAGER_BIN") or shutil.which("prometheus-alertmanager")
            or shutil.which("alertmanager"))


@pytest.fixture(scope="session")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alertmanager]:
    external = os.environ.get("DRIFTLOOP_TEST_ALERTMANAGER_URL", "").strip()
    if external:
        yield Alertmanager(external.rstrip("/"), None)
        return
    binary = _binary()
    if binary is None:
        alertmanager_unavailable("no prometheus-alertmanager binary on PATH")
    tmp = tmp_path_factory.mktemp("alertmanager")
    with Receiver() as notifications:
        port = notifications.url.rsplit(":", 1)[1]
        cfg = tmp / "alertmanager.yml"
        cfg.write_text(CONFIG.read_text().replace("@RECEIVER_PORT@", port))
        web = free_port()
        log = open(tmp / "alertmanager.log", "wb")  # noqa: SIM115 (the child owns it)
        proc = subprocess.Popen(
            [binary, f"--config.file={cfg}", f"--storage.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{web}", "--cluster.listen-address="],
            stdout=log, stderr=log)
        log.close()
        url = f"http://127.0.0.1:{web}"
        try:
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None:
                    alertmanager_unavailable(
                        f"it exited with {proc.returncode}: {(tmp / 'alertmanager.log').read_text()[-800:]}")
                try:
                    with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    alertmanager_unavailable("not ready after 30 s")
                time.sleep(0.1)
            yield Alertmanager(url, notifications)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
