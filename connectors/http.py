"""The daemon's HTTP endpoints: /healthz, /readyz, /metrics, /status.

The standard library's threading server is enough for probes and a Prometheus
scrape, and keeps a web framework out of the daemon. Handlers only call the
callables they are given, which read snapshots; nothing here blocks ingestion.

State-changing requests (every POST) can be tied to a bearer token
(docs/security.md): the probes and a Prometheus scrape stay open unless asked.

The port may face more than the kubelet and Prometheus, so a client cannot hold the
server: each request has a deadline, connections are bounded, a body that cannot be
delimited is refused, and a client that goes away costs no traceback.
"""

from __future__ import annotations

import hmac
import io
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from email.message import Message
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
#: The largest POST body read; a larger one is refused before it is read.
MAX_BODY = 65_536
#: Sent from the accept loop to a connection over the bound, without a thread.
_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
         b"Retry-After: 1\r\nConnection: close\r\n\r\nserver busy\n")


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
        timeout_s: a request's line, headers and body must all arrive within this many
            seconds of the connection being taken up, or it is closed without an answer;
            each write of the answer gets as long. One deadline for the whole request, not
            one per read: a client sending a byte a second must not hold a thread.
        max_connections: connections served at once. One more gets 503 from the accept
            loop and is closed, so that a flood costs no threads; the probes share the
            bound (a reserved slot would be one more for a flood to take).

    A request whose body cannot be delimited is refused before the token is checked,
    and the connection closed: 411 with Transfer-Encoding (chunked bodies are not
    read), 400 with a Content-Length that is not digits or that appears more than once,
    even with equal values (no client sends two, and a proxy may have kept the other).
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
        timeout_s: float = 10.0,
        max_connections: int = 32,
    ) -> None:
        if not timeout_s > 0 or max_connections < 1:
            msg = f"timeout_s must be > 0 and max_connections >= 1, not {timeout_s!r} and {max_connections!r}"
            raise ValueError(msg)
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
            #: Read by StreamRequestHandler.setup: the socket timeout of every write.
            timeout = timeout_s

            def setup(self) -> None:
                super().setup()
                self.rfile.close()
                self._reader = _DeadlineReader(self.connection, timeout_s)
                self.rfile = io.BufferedReader(self._reader)

            def handle_one_request(self) -> None:
                self._reader.restart()
                super().handle_one_request()

            def parse_request(self) -> bool:
                """Refuses what cannot be delimited before anything else reads the stream."""
                if not super().parse_request():
                    return False
                problem = _framing_problem(self.headers)
                if problem is None:
                    return True
                self._refuse(*problem)
                return False

            def _refuse(self, code: int, error: str, headers: Mapping[str, str] | None = None) -> None:
                """Answers ``{"error": ...}`` and closes the connection."""
                out = _json.encode({"error": error})
                self.send_response(code)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(out)
                self.close_connection = True

            def _length(self) -> int:
                return int(self.headers.get("Content-Length") or 0)  # digits: see parse_request

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
                pending = self._length()
                if 0 < pending <= MAX_BODY:
                    self.rfile.read(pending)
                challenge = 'Bearer realm="driftloop"' + (', error="invalid_token"' if given else "")
                self._refuse(401, "a valid bearer token is required", {"WWW-Authenticate": challenge})
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
                length = self._length()
                if action is None:
                    code, doc = 404, {"error": "not found"}
                elif length > MAX_BODY:
                    code, doc = 400, {"error": "body too large"}
                else:
                    # Outside any try: a TimeoutError must reach handle_one_request, which closes.
                    raw = self.rfile.read(length)
                    if len(raw) < length:
                        code, doc = 400, {"error": "the body is shorter than its Content-Length"}
                    else:
                        code, doc = _act(action, raw, path)
                out = _json.encode(doc)
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # probes every few seconds would drown the structured log

            def log_error(self, format: str, *args: Any) -> None:
                # Timeouts and malformed requests: the client's doing, not an operator's.
                log.debug("HTTP request not served: " + format, *args,
                          extra={"fields": {"client": self.client_address[0]}})

        self._server = _BoundedServer((host, port), Handler, max_connections)
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


def _act(action: Callable[[dict[str, Any]], tuple[int, dict[str, Any]]], raw: bytes,
         path: str) -> tuple[int, dict[str, Any]]:
    """Runs an action on a body already read; its failure is a 500, never a dropped connection."""
    try:
        body = _decode.decode(raw or b"{}")
    except Exception:
        body = None
    if not isinstance(body, dict):
        return 400, {"error": "the body must be a JSON object"}
    try:
        return action(body)
    except Exception:
        log.exception("HTTP action failed", extra={"fields": {"path": path}})
        return 500, {"error": "internal error"}


def _framing_problem(headers: Message) -> tuple[int, str] | None:
    """(status, reason) when the body's end cannot be found with certainty, else None.

    Guessing (the first Content-Length, a body read as if not chunked) is how a
    request is read differently here and in a proxy in front.
    """
    if headers.get("Transfer-Encoding") is not None:
        return 411, "Transfer-Encoding is not supported: send the body with a Content-Length"
    lengths = headers.get_all("Content-Length") or []
    if len(lengths) > 1:
        return 400, "Content-Length must appear once"
    if lengths and not (lengths[0].strip().isascii() and lengths[0].strip().isdigit()):
        return 400, "Content-Length must be a non-negative integer"
    return None


class _DeadlineReader(io.RawIOBase):
    """A connection's bytes, each read given only what is left of the request's time.

    A plain socket timeout is per read, and a client that trickles its headers never
    trips it. Between reads the socket keeps the full timeout, which bounds the writes.
    """

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        super().__init__()
        self._sock = sock
        self._timeout_s = timeout_s
        self._deadline = time.monotonic() + timeout_s

    def restart(self) -> None:
        self._deadline = time.monotonic() + self._timeout_s

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            msg = f"the request did not arrive within {self._timeout_s:g}s"
            raise TimeoutError(msg)
        self._sock.settimeout(left)
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(self._timeout_s)


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, up to a bound; a client's disconnect is not an error.

    socketserver prints a traceback to stderr for anything a handler raises, a reset
    or a broken pipe included; the bugs left after those go to the log instead.
    """

    daemon_threads = True
    #: socketserver's 5 drops the SYNs of a burst (probes, a scrape, the CLI), each retried a second later.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 max_connections: int) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self._limit = max_connections
        self._turned_away = 0
        self._warned_at = -float("inf")
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._turn_away(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()  # no thread started to give it back
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            # Before the close: a client that saw it may be back at once, and find its slot.
            self._slots.release()
            self.shutdown_request(request)

    def _turn_away(self, request: socket.socket) -> None:
        """503 without blocking the accept loop; the FIN goes out before any reset."""
        try:
            request.setblocking(False)
            request.send(_BUSY)
            request.shutdown(socket.SHUT_WR)
            request.recv(65_536)  # what already came: unread bytes turn the close into a reset
        except OSError:
            pass
        request.close()
        self._turned_away += 1
        now = time.monotonic()
        if now - self._warned_at >= 60:  # a flood must not flood the log too
            log.warning("HTTP connections refused with 503: too many open", extra={"fields": {
                "max_connections": self._limit, "refused": self._turned_away}})
            self._warned_at, self._turned_away = now, 0

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        client = client_address[0] if client_address else None
        if isinstance(exc, ConnectionError | TimeoutError):
            log.debug("HTTP client went away: %r", exc, extra={"fields": {"client": client}})
        else:
            log.error("HTTP request failed", exc_info=True, extra={"fields": {"client": client}})
