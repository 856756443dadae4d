"""The daemon's HTTP endpoints: /healthz, /readyz, /metrics, /status.

The standard library's threading server is enough for probes and a Prometheus
scrape, and keeps a web framework out of the daemon. Handlers only call the
callables they are given, which read snapshots; nothing here blocks ingestion.

State-changing requests (every POST) can be tied to a bearer token
(docs/security.md): the probes and a Prometheus scrape stay open unless asked.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["PROBES", "ControlServer", "bearer_header", "read_secret"]

log = logging.getLogger(__name__)
_json = msgspec.json.Encoder(enc_hook=str)
_decode = msgspec.json.Decoder()

#: Never behind the token: kubelet probes carry no credentials.
PROBES = frozenset({"/healthz", "/readyz"})


def read_secret(key: str, env: str | None, file: str | None, environ: Mapping[str, str]) -> str | None:
    """The secret named by ``<key>_env`` or ``<key>_file``, stripped; None when neither is set.

    Read when the process wires itself, not when the config is parsed, so that
    ``check-config`` never touches secrets and the messages name the key to fix.

    Raises:
        ValueError: the variable is unset or empty, or the file is unreadable or empty.
    """
    if env:
        value = (environ.get(env) or "").strip()
        if not value:
            msg = f"{key}_env: environment variable {env} is not set or empty"
            raise ValueError(msg)
        return value
    if file:
        try:
            value = Path(file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            msg = f"{key}_file: cannot read {file}: {exc.strerror}"
            raise ValueError(msg) from None
        if not value:
            msg = f"{key}_file: {file} is empty"
            raise ValueError(msg)
        return value
    return None


def bearer_header(token: str | None) -> dict[str, str]:
    """The request header a client sends to a server started with ``action_token``."""
    return {"Authorization": f"Bearer {token}"} if token else {}


class ControlServer:
    """Serve health, readiness, metrics and status on ``host:port`` in a thread.

    Args:
        host: bind address (loopback by default in the config).
        port: 0 picks a free port; `port` tells which after `start`.
        healthy: returns (ok, reason) for /healthz: the process is making progress.
        ready: returns (ok, reason) for /readyz: it has partitions and a broker.
        status: returns the JSON document for /status.
        registry: the Prometheus registry for /metrics.
        pages: path prefix -> handler of the rest of the path (``/incidents`` serves
            the incident reports); returns (status, content type, body).
        actions: POST path -> handler of the JSON body (a dict); returns (status, JSON
            document). ``/retrain`` asks for a training run. Bodies over 64 KiB, and
            bodies that are not a JSON object, are refused with 400 before a handler runs.
        action_token: when set, every POST needs ``Authorization: Bearer <token>``
            and is refused with 401 otherwise, before its path or body is looked at.
            An attribute of the same name may set it before `start`.
        protect_reads: the token is needed on every GET too, except PROBES.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        healthy: Callable[[], tuple[bool, str]],
        ready: Callable[[], tuple[bool, str]],
        status: Callable[[], dict[str, Any]],
        registry: CollectorRegistry,
        pages: Mapping[str, Callable[[str], tuple[int, str, bytes]]] | None = None,
        actions: Mapping[str, Callable[[dict[str, Any]], tuple[int, dict[str, Any]]]] | None = None,
        action_token: str | None = None,
        protect_reads: bool = False,
    ) -> None:
        self.action_token = action_token
        self.protect_reads = protect_reads
        server = self
        routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
            "/healthz": lambda: _probe(healthy()),
            "/readyz": lambda: _probe(ready()),
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(registry)),
            "/status": lambda: (200, "application/json", _json.encode(status())),
        }

        prefixes = dict(pages or {})
        posts = dict(actions or {})

        def page(path: str) -> Callable[[], tuple[int, str, bytes]] | None:
            for prefix, handler in prefixes.items():
                if path == prefix or path.startswith(prefix + "/"):
                    return lambda: handler(path[len(prefix):])
            return None

        class Handler(BaseHTTPRequestHandler):
            def _authorized(self) -> bool:
                """Checks the bearer token; answers 401 itself when it is missing or wrong."""
                token = server.action_token
                if not token:
                    return True
                scheme, _, given = (self.headers.get("Authorization") or "").strip().partition(" ")
                if scheme.lower() == "bearer" and hmac.compare_digest(
                        given.strip().encode(), token.encode()):
                    return True
                # The header's value is never logged: a near-miss is often the real token.
                log.warning("HTTP request refused: missing or wrong bearer token", extra={"fields": {
                    "method": self.command, "path": self.path.split("?", 1)[0],
                    "client": self.client_address[0], "had_credentials": bool(given)}})
                # Unread request bytes make the close a TCP reset, which can swallow the 401.
                try:
                    pending = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    pending = 0
                if 0 < pending <= 65_536:
                    self.rfile.read(pending)
                challenge = 'Bearer realm="driftloop"' + (', error="invalid_token"' if given else "")
                out = _json.encode({"error": "a valid bearer token is required"})
                self.send_response(401)
                self.send_header("WWW-Authenticate", challenge)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(out)
                self.close_connection = True
                return False

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if server.protect_reads and path not in PROBES and not self._authorized():
                    return
                route = routes.get(path) or page(path)
                if route is None:
                    code, ctype, body = 404, "text/plain", b"not found\n"
                else:
                    try:
                        code, ctype, body = route()
                    except Exception:
                        log.exception("HTTP handler failed", extra={"fields": {"path": self.path}})
                        code, ctype, body = 500, "text/plain", b"internal error\n"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                if ctype.startswith("text/html"):
                    # Reports show producer-supplied strings (escaped); no script may run.
                    self.send_header("Content-Security-Policy",
                                     "default-src 'none'; style-src 'unsafe-inline'; img-src data:")
                    self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                if not self._authorized():
                    return
                path = self.path.split("?", 1)[0]
                action = posts.get(path)
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if action is None:
                    code, doc = 404, {"error": "not found"}
                elif length < 0:
                    # The body cannot be found in the stream: answer and close.
                    code, doc = 400, {"error": "Content-Length must be a non-negative integer"}
                    self.close_connection = True
                elif length > 65_536:
                    code, doc = 400, {"error": "body too large"}
                else:
                    try:
                        body = _decode.decode(self.rfile.read(length) or b"{}")
                    except Exception:
                        body = None
                    if not isinstance(body, dict):
                        code, doc = 400, {"error": "the body must be a JSON object"}
                    else:
                        try:
                            code, doc = action(body)
                        except Exception:
                            log.exception("HTTP action failed", extra={"fields": {"path": path}})
                            code, doc = 500, {"error": "internal error"}
                out = _json.encode(doc)
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # probes every few seconds would drown the structured log

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="driftloop-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _probe(result: tuple[bool, str]) -> tuple[int, str, bytes]:
    ok, reason = result
    return (200 if ok else 503), "text/plain", (reason + "\n").encode()
