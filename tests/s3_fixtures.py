"""Pytest fixtures that give tests a real S3-compatible server (S3Proxy, no mock).

Fixtures:

* ``s3_server`` (session): an :class:`S3Server` started once for the session on a free
  loopback port (deploy/s3/s3proxy.sh resolves its jars with Maven on first use);
  ``DRIFTLOOP_TEST_S3_ENDPOINT`` names an existing server instead, with its credentials
  in ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``.
* ``s3_url`` (function): ``s3://<fresh bucket>/store``, with the ``AWS_*`` environment set
  for that server, as a deployment sets it: the code under test gets the URL only.

Where java, mvn (before the first fetch) or s3fs is missing, tests that use them are
skipped, except under ``CI=true``, where they fail: CI must not turn green by skipping
the only test of the production storage path.

Loaded by tests/conftest.py (``pytest_plugins``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy" / "s3" / "s3proxy.sh"
START_TIMEOUT_S = float(os.environ.get("DRIFTLOOP_S3PROXY_START_TIMEOUT", "60"))


def s3_unavailable(reason: str) -> NoReturn:
    """Skips the test, or fails it under CI=true (where Java, Maven and s3fs must be present)."""
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"CI=true and no S3 server can run: {reason}", pytrace=False)
    pytest.skip(f"no S3 server can run here: {reason}")


@dataclasses.dataclass(frozen=True)
class S3Server:
    endpoint: str
    key: str
    secret: str
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """What a deployment puts in the environment of the daemon and the training job."""
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_DEFAULT_REGION": self.region}

    def storage_options(self) -> dict[str, Any]:
        """The same as fsspec keyword arguments (``FeedbackStore(url, storage_options=...)``)."""
        return {"key": self.key, "secret": self.secret, "endpoint_url": self.endpoint,
                "client_kwargs": {"region_name": self.region}}

    def filesystem(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False,
                                 **self.storage_options())

    def create_bucket(self) -> str:
        name = f"driftloop-{uuid.uuid4().hex[:12]}"
        # CreateBucket directly: s3fs.mkdir probes GetBucketLocation first, which S3Proxy
        # answers for buckets that do not exist, and then refuses to create one.
        self.filesystem().call_s3("create_bucket", Bucket=name)
        return name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(endpoint: str) -> bool:
    try:
        urllib.request.urlopen(endpoint + "/", timeout=2).close()
    except urllib.error.HTTPError:
        return True  # 403 for an unsigned ListBuckets: the S3 API is up
    except OSError:
        return False
    return True


def _start(workdir: Path) -> tuple[subprocess.Popen[bytes], S3Server]:
    fetch = subprocess.run([str(SCRIPT), "fetch"], capture_output=True, text=True, timeout=900)
    if fetch.returncode == 4:
        s3_unavailable(fetch.stderr.strip())
    if fetch.returncode != 0:
        s3_unavailable(f"deploy/s3/s3proxy.sh fetch failed: {fetch.stderr.strip()[-2000:]}")
    log_path = workdir / "s3proxy.log"
    last = ""
    for _attempt in range(3):  # the free port may be taken between choosing and binding
        port = _free_port()
        server = S3Server(f"http://127.0.0.1:{port}", "driftloop-test", uuid.uuid4().hex)
        conf = workdir / "s3proxy.conf"
        conf.write_text("\n".join([
            f"s3proxy.endpoint={server.endpoint}",
            "s3proxy.authorization=aws-v2-or-v4",
            f"s3proxy.identity={server.key}",
            f"s3proxy.credential={server.secret}",
            # In-memory buckets: nothing to clean up, and the session's data dies with it.
            "jclouds.provider=transient-nio2",
            f"jclouds.identity={server.key}",
            f"jclouds.credential={server.secret}",
            "",
        ]))
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([str(SCRIPT), "run", str(conf)], stdout=log, stderr=log,
                                    start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(server.endpoint):
                return proc, server
            time.sleep(0.2)
        _stop(proc)
        last = log_path.read_text(errors="replace")[-2000:]
    s3_unavailable(f"S3Proxy did not start within {START_TIMEOUT_S:.0f} s; its log ends: {last}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One server for the session (a JVM start costs a few seconds); tests isolate
    themselves with a bucket each (``s3_url``)."""
    try:
        import s3fs  # noqa: F401
    except ImportError:
        s3_unavailable("s3fs is not installed (pip install -e '.[s3]')")
    external = os.environ.get("DRIFTLOOP_TEST_S3_ENDPOINT", "").strip()
    if external:
        yield S3Server(external.rstrip("/"), os.environ.get("AWS_ACCESS_KEY_ID", ""),
                       os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
                       os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
        return
    proc, server = _start(tmp_path_factory.mktemp("s3proxy"))
    try:
        yield server
    finally:
        _stop(proc)


@pytest.fixture
def s3_url(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    # Nothing from the developer's own AWS set-up (profiles, instance metadata) may
    # answer instead of the test server.
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    bucket = s3_server.create_bucket()
    yield f"s3://{bucket}/store"
    with contextlib.suppress(Exception):
        fs = s3_server.filesystem()
        fs.rm(bucket, recursive=True)
