"""The daemon's HTTP endpoints: /healthz, /readyz, /metrics, /status.

The standard library's threading server is enough for probes and a Prometheus
scrape, and keeps a web framework out of the daemon. Handlers only call the
callables they are given, which read snapshots; nothing here blocks ingestion.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["ControlServer"]

log = logging.getLogger(__name__)
_json = msgspec.json.Encoder(enc_hook=str)
_decode = msgspec.json.Decoder()


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
    ) -> None:
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
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
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
                path = self.path.split("?", 1)[0]
                action = posts.get(path)
                length = int(self.headers.get("Content-Length") or 0)
                if action is None:
                    code, doc = 404, {"error": "not found"}
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
