"""Real HTTP receivers for alert tests: stdlib servers on loopback, no mocking library.

* `Receiver` records every request and answers from a script (a status, headers, a
  body), like a webhook endpoint, Slack, PagerDuty or a flaky proxy would;
* `HangingReceiver` accepts connections, reads, and never answers;
* `standard_webhooks_verify` checks a request the way the Standard Webhooks spec
  says, written from the spec and independent of connectors/alerts.py.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import socket
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclasses.dataclass(frozen=True)
class Request:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float


@dataclasses.dataclass(frozen=True)
class Answer:
    status: int = 200
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    body: bytes = b""


Script = Callable[[Request], Answer]


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client closing its keep-alive connection (httpx does, not reading the body
        # of an answer it does not trust) is not an error worth a traceback.
        pass


class Receiver:
    """``with Receiver(script) as r: ... r.url ... r.requests``.

    ``script(request) -> Answer`` runs on the server's thread for every POST; the
    request is recorded before the script runs, the answer after (`answered`).
    """

    def __init__(self, script: Script | None = None) -> None:
        self.script: Script = script or (lambda _r: Answer())
        self.requests: list[Request] = []
        self.answered: list[tuple[Request, Answer]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                req = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                              time.time())
                with receiver._lock:
                    receiver.requests.append(req)
                try:
                    ans = receiver.script(req)
                except Exception as exc:  # a failing assertion in a script: answer 599
                    ans = Answer(599, body=repr(exc).encode())
                with receiver._lock:
                    receiver.answered.append((req, ans))
                self.send_response(ans.status)
                for k, v in ans.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(ans.body)))
                self.end_headers()
                self.wfile.write(ans.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def accepted(self) -> list[Request]:
        """Requests answered with a 2xx."""
        with self._lock:
            return [r for r, a in self.answered if 200 <= a.status < 300]

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class HangingReceiver:
    """Accepts TCP connections and never answers; says which are still held open."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[tuple[float, socket.socket]] = []
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def _accept(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            with self._lock:
                self.connections += 1
                self._conns.append((time.perf_counter(), conn))  # kept open, never answered

    def held_since(self) -> float | None:
        """perf_counter time of the oldest connection the client still holds open (it
        is waiting on an answer), or None: the client has given up on all of them."""
        with self._lock:
            conns = list(self._conns)
        held = []
        for since, conn in conns:
            try:
                # b"" is the client's FIN; unread request bytes or no bytes at all
                # (BlockingIOError) mean it is still waiting.
                if conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b"":
                    held.append(since)
            except BlockingIOError:
                held.append(since)
            except OSError:
                pass
        return min(held, default=None)

    def __enter__(self) -> HangingReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for _, c in self._conns:
            c.close()
        self._sock.close()


def standard_webhooks_verify(secret: str, headers: Mapping[str, str], body: bytes, *,
                             now: float | None = None, tolerance: float = 300) -> str:
    """Returns the webhook-id, or raises AssertionError saying what is wrong.

    From the Standard Webhooks spec: the key is the base64 part of ``whsec_...``; the
    signed content is ``{id}.{timestamp}.{body}``; the header holds space-separated
    ``v1,<base64 HMAC-SHA256>``; a timestamp more than 5 minutes away is refused.
    """
    msg_id, ts, sig = (headers.get("webhook-id"), headers.get("webhook-timestamp"),
                       headers.get("webhook-signature"))
    assert msg_id and ts and sig, f"missing Standard Webhooks headers in {sorted(headers)}"
    assert abs((time.time() if now is None else now) - int(ts)) <= tolerance, "timestamp too old"
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = base64.b64encode(hmac.new(key, f"{msg_id}.{ts}.".encode() + body,
                                         hashlib.sha256).digest()).decode()
    got = [s.split(",", 1)[1] for s in sig.split() if s.startswith("v1,")]
    assert any(hmac.compare_digest(expected, g) for g in got), "signature mismatch"
    return msg_id
