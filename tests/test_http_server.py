"""The control server against clients that misbehave: slow, many, ambiguous, or gone.

A real ControlServer on a loopback port and raw sockets, because what is under test is
what urllib would never send. The deadlines are short so that the tests run fast; the
limits on waiting are generous, because a loaded machine is slow, not broken.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from connectors.http import ControlServer

TOKEN = "t0ken-Abc.123"
#: Long enough that the server, not the test, gives up first; never a measurement.
PATIENCE_S = 20.0


class Retrains:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.bodies.append(body)
        return 202, {"accepted": body.get("model")}


class SlowPage:
    """A page that holds its thread until the test lets it go, then answers 8 MiB."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, rest: str) -> tuple[int, str, bytes]:
        self.entered.set()
        self.release.wait(PATIENCE_S)
        return 200, "text/plain", b"x" * (8 << 20)


def boom(rest: str) -> tuple[int, str, bytes]:
    raise ConnectionResetError("the broker went away")  # the handler's own bug, not the client's


Serve = Callable[..., tuple[ControlServer, Retrains, SlowPage]]


@pytest.fixture
def serve() -> Iterator[Serve]:
    started: list[tuple[ControlServer, SlowPage]] = []

    def start(**kwargs: Any) -> tuple[ControlServer, Retrains, SlowPage]:
        retrains, slow = Retrains(), SlowPage()
        server = ControlServer("127.0.0.1", 0, healthy=lambda: (True, "ok"), ready=lambda: (True, "ok"),
                               status=lambda: {"ok": True}, registry=CollectorRegistry(),
                               pages={"/slow": slow, "/boom": boom}, actions={"/retrain": retrains},
                               action_token=TOKEN, **kwargs)
        server.start()
        started.append((server, slow))
        return server, retrains, slow

    yield start
    for server, slow in started:
        slow.release.set()
        server.stop()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=PATIENCE_S)


def read_to_end(sock: socket.socket) -> bytes:
    """Everything until the server closes; a reset counts as a close. socket.timeout fails the test."""
    answer = b""
    try:
        while chunk := sock.recv(65_536):
            answer += chunk
    except ConnectionResetError:
        pass
    return answer


def exchange(port: int, data: bytes) -> bytes:
    with connect(port) as sock:
        sock.sendall(data)
        return read_to_end(sock)


def status_line(answer: bytes) -> bytes:
    return answer.split(b"\r\n", 1)[0]


def healthz_answers(port: int) -> bool:
    try:
        return status_line(exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")).endswith(b"200 OK")
    except OSError:
        return False


def eventually(condition: Callable[[], bool]) -> bool:
    limit = time.monotonic() + PATIENCE_S
    while not condition():
        if time.monotonic() > limit:
            return False
        time.sleep(0.05)
    return True


def assert_quiet(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing an operator would be paged or puzzled by: no ERROR record, nothing on stderr."""
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert capsys.readouterr().err == ""


def post(body: bytes, *headers: str) -> bytes:
    head = "".join(h + "\r\n" for h in headers)
    start = f"POST /retrain HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
    return (start + head + "\r\n").encode() + body


# -- timeouts ---------------------------------------------------------------------------


def test_headers_trickled_a_byte_at_a_time_are_cut_off(
        serve: Serve, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    # Each byte comes well within the timeout: only a deadline for the whole request ends this.
    server, _, _ = serve(timeout_s=0.5)
    closed = False
    with connect(server.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        limit = time.monotonic() + PATIENCE_S
        while not closed and time.monotonic() < limit:
            try:
                sock.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if select.select([sock], [], [], 0.2)[0]:
                closed = read_to_end(sock) == b""
    assert closed, "a slowloris client still holds its connection"
    assert healthz_answers(server.port)
    assert_quiet(caplog, capsys)


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTTP/1.1\r\n",
                                  b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Half",
                                  b"GET /healthz HTTP/1.1\r\nHost: x\r\n"],
                         ids=["nothing", "request-line", "half-a-header", "no-blank-line"])
def test_a_request_never_finished_is_closed_without_an_answer(
        serve: Serve, sent: bytes, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    server, _, _ = serve(timeout_s=0.5)
    assert exchange(server.port, sent) == b""
    assert_quiet(caplog, capsys)


def test_a_body_shorter_than_its_content_length_frees_the_thread_without_running_the_action(
        serve: Serve, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    server, retrains, _ = serve(timeout_s=0.5, max_connections=1)
    assert exchange(server.port, post(b'{"model":', "Content-Length: 100")) == b""
    assert retrains.bodies == []
    # One connection allowed: the next one is served only if the stuck handler has let go.
    answer = exchange(server.port, post(b'{"model":"ctr"}', "Content-Length: 15"))
    assert status_line(answer).endswith(b"202 Accepted"), answer
    assert retrains.bodies == [{"model": "ctr"}]
    assert_quiet(caplog, capsys)


def test_a_body_cut_short_by_the_client_is_refused_with_400(serve: Serve) -> None:
    server, retrains, _ = serve()
    with connect(server.port) as sock:
        sock.sendall(post(b'{"model":', "Content-Length: 100"))
        sock.shutdown(socket.SHUT_WR)
        answer = read_to_end(sock)
    assert status_line(answer).endswith(b"400 Bad Request"), answer
    assert b"shorter than its Content-Length" in answer
    assert retrains.bodies == []


# -- the bound on connections -----------------------------------------------------------


def test_connections_over_the_bound_get_503_without_a_thread_each(
        serve: Serve, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    server, _, _ = serve(timeout_s=1.5, max_connections=2)
    before = threading.active_count()
    idle = [connect(server.port) for _ in range(2)]
    try:
        answers = [exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") for _ in range(10)]
        assert threading.active_count() <= before + 2
        assert all(status_line(a) == b"HTTP/1.0 503 Service Unavailable" for a in answers), answers
        assert b"Retry-After: 1" in answers[0]
        # The idle ones are timed out, and then the probe gets through again.
        assert [read_to_end(sock) for sock in idle] == [b"", b""]
    finally:
        for sock in idle:
            sock.close()
    assert eventually(lambda: healthz_answers(server.port))
    assert any("refused with 503" in r.getMessage() for r in caplog.records)
    assert_quiet(caplog, capsys)


def test_a_closed_connection_gives_its_slot_back(serve: Serve) -> None:
    server, _, _ = serve(max_connections=1)
    for _ in range(5):
        assert healthz_answers(server.port)


@pytest.mark.parametrize("kwargs", [{"timeout_s": 0}, {"timeout_s": -1.0}, {"max_connections": 0}])
def test_a_bound_that_serves_nothing_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="timeout_s must be > 0 and max_connections >= 1"):
        ControlServer("127.0.0.1", 0, healthy=lambda: (True, "ok"), ready=lambda: (True, "ok"),
                      status=dict, registry=CollectorRegistry(), **kwargs)


# -- a body the server cannot delimit ---------------------------------------------------


@pytest.mark.parametrize(("headers", "body", "expected"), [
    (("Content-Length: 2", "Content-Length: 15"), b'{}{"model":"x"}', b"400 Bad Request"),
    (("Content-Length: 15", "Content-Length: 2"), b'{}{"model":"x"}', b"400 Bad Request"),
    (("Content-Length: 2", "Content-Length: 2"), b"{}", b"400 Bad Request"),
    (("Content-Length: +2",), b"{}", b"400 Bad Request"),
    (("Content-Length: 1_5",), b'{"model":"abcd"}', b"400 Bad Request"),
    (("Transfer-Encoding: chunked",), b'f\r\n{"model":"ctr"}\r\n0\r\n\r\n', b"411 Length Required"),
    (("Transfer-Encoding: chunked", "Content-Length: 2"), b"{}", b"411 Length Required"),
], ids=["two-lengths", "two-lengths-reversed", "two-equal-lengths", "plus-sign", "underscore",
        "chunked", "chunked-and-length"])
def test_a_body_that_cannot_be_delimited_is_refused_and_the_action_not_run(
        serve: Serve, headers: tuple[str, ...], body: bytes, expected: bytes) -> None:
    server, retrains, _ = serve()
    answer = exchange(server.port, post(body, *headers))
    head, _, doc = answer.partition(b"\r\n\r\n")
    assert status_line(head) == b"HTTP/1.0 " + expected, answer
    assert b"Connection: close" in head
    assert "error" in json.loads(doc)
    assert retrains.bodies == []


def test_framing_is_refused_before_the_token_is_looked_at(serve: Serve) -> None:
    server, _, _ = serve()
    answer = exchange(server.port, b"POST /retrain HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                   b"Content-Length: 5\r\n\r\n{}")
    assert status_line(answer) == b"HTTP/1.0 400 Bad Request", answer


def test_the_body_bound_and_a_plain_post_still_hold(serve: Serve) -> None:
    server, retrains, _ = serve()
    big = exchange(server.port, post(b"", "Content-Length: 65537"))
    assert status_line(big) == b"HTTP/1.0 400 Bad Request" and b"body too large" in big
    ok = exchange(server.port, post(b'{"model":"ctr"}', "Content-Length: 15"))
    assert status_line(ok) == b"HTTP/1.0 202 Accepted", ok
    assert retrains.bodies == [{"model": "ctr"}]


# -- a client that goes away ------------------------------------------------------------


def reset(sock: socket.socket) -> None:
    """Close with RST rather than FIN, as a killed client or a load balancer does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("hang_up", [reset, socket.socket.close], ids=["rst", "fin"])
def test_a_client_gone_mid_answer_leaves_no_traceback(
        serve: Serve, hang_up: Callable[[socket.socket], None], caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    server, _, slow = serve()
    before = threading.active_count()
    sock = connect(server.port)
    sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    assert slow.entered.wait(PATIENCE_S)
    with caplog.at_level(logging.DEBUG, logger="connectors.http"):
        hang_up(sock)
        slow.release.set()  # the 8 MiB answer now meets a closed socket
        assert eventually(lambda: threading.active_count() <= before), "the handler thread is still writing"
    assert_quiet(caplog, capsys)
    assert any("went away" in r.getMessage() for r in caplog.records)
    assert healthz_answers(server.port)


def test_clients_that_reset_right_after_asking_leave_no_traceback(
        serve: Serve, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    server, _, _ = serve()
    before = threading.active_count()
    for _ in range(20):
        sock = connect(server.port)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        reset(sock)
    assert eventually(lambda: threading.active_count() <= before)
    assert_quiet(caplog, capsys)


def test_a_bug_in_a_handler_is_still_logged_with_its_traceback(
        serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    # ConnectionResetError on purpose: only the client's own socket is excused, not the handlers'.
    server, _, _ = serve()
    answer = exchange(server.port, b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_line(answer) == b"HTTP/1.0 500 Internal Server Error", answer
    failed = [r for r in caplog.records if r.getMessage() == "HTTP handler failed"]
    assert len(failed) == 1 and failed[0].levelno == logging.ERROR
    assert failed[0].exc_info is not None and failed[0].exc_info[0] is ConnectionResetError
