"""The HTTP transport (web/transport.py) on a real uvicorn server and real sockets.

Each test starts uvicorn in a thread, on a free port, with the bounded protocol and tiny limits
(a 1 KiB head, deadlines under a second). Most use a trivial ASGI app that reads the body and
answers its length; the chunked-body and client-gone tests use the real application on fake
backends. Waiting is on socket events: a deadline is the behaviour under test, so a read simply
waits (with a generous socket timeout) for the server's answer or its close.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import select
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from core.settings import Settings
from tests.support.fakes import RUN_ID, WORKFLOW_ID, FakeRuns, FakeUpdates, bearer, fake_backends_factory
from web import middleware, transport
from web.app import create_app
from web.transport import Limits

SECRET = "transport-unit-test-secret-" + "x" * 40


def auth() -> dict[str, str]:
    return bearer(SECRET)


WAIT = 10.0  # socket timeout: far longer than any deadline under test
LIMITS = Limits(max_header_bytes=1024, header_timeout=0.5, body_timeout=0.5, max_connections=100)


BIG_PIECES = 64  # `/big` answers 64 pieces of 256 KiB: far more than the kernel buffers hold


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body, answers its length and the path as JSON (`/headers`: the header
    names too). `/early` answers 405 without reading the body; `/big` answers 16 MiB."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == "/early":
        headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 405, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})
        return
    if scope["path"] == "/big":
        piece = b"b" * (256 << 10)
        size = str(len(piece) * BIG_PIECES).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", size)]})
        for _ in range(BIG_PIECES):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    length = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        length += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    answer: dict[str, Any] = {"path": scope["path"], "length": length}
    if scope["path"] == "/headers":
        answer["headers"] = [name.decode() for name, _ in scope["headers"]]
    body = orjson.dumps(answer)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@dataclass
class Running:
    port: int
    protocol: type[transport.BoundedHttpToolsProtocol]

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


@contextlib.contextmanager
def serving(app: Any = echo_app, limits: Limits = LIMITS, keep_alive: float = 5) -> Iterator[Running]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    protocol = transport.protocol_class(limits)
    config = uvicorn.Config(
        app,
        http=protocol,
        ws="none",
        server_header=False,
        timeout_keep_alive=keep_alive,  # type: ignore[arg-type]  # uvicorn declares int, takes float
        log_config=None,
        lifespan="on",
    )
    server = _Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        assert server.ready.wait(WAIT), "the server did not start"
        yield Running(listener.getsockname()[1], protocol)
    finally:
        server.should_exit = True
        thread.join(WAIT)
        listener.close()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = orjson.loads(self.body)
        return value


def read_response(sock: socket.socket) -> Response:
    """One response (with a Content-Length, as every answer here has), and not a byte more: a
    pipelined second response stays in the socket for the next call."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        assert byte, f"closed before a response; got {head!r}"
        head += byte
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = b""
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(int(headers["content-length"]) - len(body))
        assert chunk, "closed mid-body"
        body += chunk
    return Response(int(status_line.split()[1]), headers, body)


def closed(sock: socket.socket) -> bool:
    """Whether the server closed the connection (read until it does, or until WAIT passes)."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def request(path: str = "/", extra: str = "", body: bytes = b"") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    return f"POST {path} HTTP/1.1\r\nHost: t\r\n{length}{extra}\r\n".encode() + body


def head_of_size(size: int) -> bytes:
    """A GET head of exactly `size` bytes."""
    base = b"GET /sized HTTP/1.1\r\nHost: t\r\nX-Pad: \r\n\r\n"
    return base.replace(b"X-Pad: ", b"X-Pad: " + b"p" * (size - len(base)))


def assert_error(response: Response, status: int, code: str) -> None:
    assert response.status == status
    assert response.headers["content-type"] == "application/json"
    assert response.headers["connection"] == "close"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "server" not in response.headers
    body = response.json()
    assert body["status"] == status and body["errorCode"] == code and body["message"]


# --- head size ---


def test_a_head_at_the_limit_is_served_and_one_byte_more_is_431() -> None:
    with serving() as server:
        with server.connect() as sock:
            sock.sendall(head_of_size(1024))
            response = read_response(sock)
            assert response.status == 200 and response.json()["path"] == "/sized"
            assert "server" not in response.headers  # no banner
        with server.connect() as sock:
            sock.sendall(head_of_size(1025))
            assert_error(read_response(sock), 431, "request_header_fields_too_large")
            assert closed(sock)


def test_a_big_head_in_small_pieces_is_refused_once_past_the_limit() -> None:
    with serving() as server, server.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"p" * 700)
        sock.sendall(b"p" * 700)  # never ends the head: the server answers when 1024 bytes are in
        assert_error(read_response(sock), 431, "request_header_fields_too_large")
        assert closed(sock)


def test_a_head_after_a_body_in_the_same_read_is_counted_from_its_own_start() -> None:
    # A large body followed by a small pipelined request: the body's bytes are not the next head's.
    with serving() as server, server.connect() as sock:
        sock.sendall(request("/first", body=b"b" * 4000) + request("/second"))
        assert read_response(sock).json() == {"path": "/first", "length": 4000}
        assert read_response(sock).json() == {"path": "/second", "length": 0}


def _peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _send_until_refused(port: int, data: bytes, outcomes: list[str]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        try:
            sock.sendall(data)
            outcomes.append("sent whole")
        except (BrokenPipeError, ConnectionResetError):
            outcomes.append("refused")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_ten_8_MiB_heads_are_refused_without_being_buffered() -> None:
    head = b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"x" * (8 << 20)  # built before measuring
    limits = replace(LIMITS, max_header_bytes=32768, header_timeout=30)
    with serving(limits=limits) as server:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS to the current RSS
        before = _peak_rss_kib()
        outcomes: list[str] = []
        senders = [threading.Thread(target=_send_until_refused, args=(server.port, head, outcomes)) for _ in range(10)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        grown_mib = (_peak_rss_kib() - before) / 1024
        assert outcomes == ["refused"] * 10  # the server closed each connection mid-head
        assert grown_mib < 8, f"peak RSS grew by {grown_mib:.1f} MiB"
        with server.connect() as sock:  # and still serves
            sock.sendall(request("/after"))
            assert read_response(sock).status == 200


def test_a_big_head_pipelined_behind_a_small_request_in_one_read_is_431() -> None:
    # The second head begins in the read that ends the first request: counted all the same.
    with serving() as server, server.connect() as sock:
        sock.sendall(request("/small") + head_of_size(100_000))
        assert read_response(sock).json() == {"path": "/small", "length": 0}  # the first is answered
        assert_error(read_response(sock), 431, "request_header_fields_too_large")  # then, in turn, 431
        assert closed(sock)


def test_pipelined_requests_beyond_the_depth_limit_are_refused_in_their_turn() -> None:
    limits = replace(LIMITS, max_pipelined=4)
    with serving(limits=limits) as server, server.connect() as sock:
        sock.sendall(b"".join(request(f"/p{n}") for n in range(40)))  # one read: all parsed at once
        # The one being answered, four queued behind it, then the refusal; nothing after it is read.
        for n in range(5):
            assert read_response(sock).json()["path"] == f"/p{n}"
        response = read_response(sock)
        assert_error(response, 503, "too_many_pipelined_requests")
        assert response.headers["retry-after"] == "1"
        assert closed(sock)


# --- chunked trailers ---

CHUNKED_HEAD = b"POST /headers HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_trailers_are_dropped_and_never_reach_the_application() -> None:
    with serving() as server, server.connect() as sock:
        sock.sendall(CHUNKED_HEAD + b"2\r\n{}\r\n0\r\nX-Trailer: t\r\n\r\n")
        answer = read_response(sock).json()
        assert answer["length"] == 2 and answer["headers"] == ["host", "transfer-encoding"]


@pytest.mark.parametrize("shape", ["many lines", "one long line"])
def test_trailers_beyond_the_head_limit_are_431(shape: str) -> None:
    with serving() as server, server.connect() as sock:
        sock.sendall(CHUNKED_HEAD + b"2\r\n{}\r\n0\r\n")
        if shape == "one long line":
            sock.sendall(b"X-Trailer: ")
        line = b"X-T: " + b"a" * 100 + b"\r\n" if shape == "many lines" else b"a" * 100
        outcomes: list[str] = []
        sender = threading.Thread(target=_send_pieces_until_refused, args=(sock, line, outcomes))
        sender.start()
        try:
            assert_error(read_response(sock), 431, "request_header_fields_too_large")
            assert closed(sock)
        finally:
            sender.join()
        assert outcomes == ["refused"]


def _send_pieces_until_refused(sock: socket.socket, piece: bytes, outcomes: list[str]) -> None:
    """Sends `piece` again and again (for far more than any limit here) until the server closes."""
    try:
        for _ in range(100_000):
            sock.send(piece)
        outcomes.append("sent whole")
    except OSError:
        outcomes.append("refused")


# --- head deadline and keep-alive ---


def test_a_connection_that_sends_nothing_is_closed_without_an_answer() -> None:
    with serving() as server, server.connect() as sock:
        assert sock.recv(65536) == b""


def test_a_head_that_does_not_arrive_in_time_is_408() -> None:
    with serving() as server, server.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")  # and never the blank line
        assert_error(read_response(sock), 408, "request_timeout")
        assert closed(sock)


def test_an_idle_kept_alive_connection_is_closed_and_the_next_head_has_its_deadline() -> None:
    with serving(keep_alive=0.3) as server, server.connect() as sock:
        sock.sendall(request("/one"))
        assert read_response(sock).status == 200
        assert closed(sock)  # idle longer than the keep-alive timeout
    with serving(keep_alive=30) as server, server.connect() as sock:
        sock.sendall(request("/one"))
        assert read_response(sock).status == 200
        sock.sendall(b"GET /two HTTP/1.1\r\n")  # the next head starts, and stalls
        assert_error(read_response(sock), 408, "request_timeout")
        assert closed(sock)


# --- body deadline ---


def test_a_body_that_does_not_arrive_in_time_is_408() -> None:
    with serving() as server, server.connect() as sock:
        sock.sendall(b"POST /slow HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nx")
        assert_error(read_response(sock), 408, "request_timeout")
        assert closed(sock)


def test_a_trickled_body_is_cut_off_whatever_its_pace() -> None:
    with serving() as server, server.connect() as sock:
        sock.sendall(b"POST /slow HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
        stop, sent = threading.Event(), []

        def trickle() -> None:
            while not stop.wait(0.02):  # a byte every 20 ms: 20 s for the whole body
                try:
                    sock.send(b"x")
                except OSError:
                    return
                sent.append(1)

        trickler = threading.Thread(target=trickle)
        trickler.start()
        try:
            assert_error(read_response(sock), 408, "request_timeout")
        finally:
            stop.set()
            trickler.join()
        assert 0 < len(sent) < 1000  # bytes kept coming, and the body was still cut off


def test_a_chunked_body_through_the_socket_is_read_whole() -> None:
    with serving() as server, server.connect() as sock:
        sock.sendall(b"POST /chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        sock.sendall(b"5\r\nhello\r\n")
        sock.sendall(b"6\r\n world\r\n0\r\n\r\n")
        assert read_response(sock).json() == {"path": "/chunked", "length": 11}


def test_an_answer_before_the_body_is_whole_is_the_only_answer() -> None:
    # The application answers without reading the body; the body then stalls past its deadline.
    with serving() as server, server.connect() as sock:
        sock.sendall(b"POST /early HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\nx")
        assert read_response(sock).status == 405
        assert closed(sock)  # FIN after the answer, and no 408 at the body deadline
    with serving() as server, server.connect() as sock:
        sock.sendall(b"POST /early HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\n")
        assert read_response(sock).status == 405
        sock.sendall(b"xxxxx" + request("/next"))  # the rest of the body is read; no further request
        assert closed(sock)


# --- clients that do not read ---


def test_an_answer_the_client_does_not_read_is_cut_off_and_its_place_given_back() -> None:
    limits = replace(LIMITS, max_connections=1, overflow_connections=0, send_timeout=0.3)
    with serving(limits=limits) as server:
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.settimeout(WAIT)
        stuck.connect(("127.0.0.1", server.port))
        with stuck:
            stuck.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")  # and never reads
            poller = select.poll()
            poller.register(stuck, select.POLLRDHUP)  # POLLERR / POLLHUP: the reset
            assert poller.poll(WAIT * 1000), "the connection was not reset"
            assert stuck.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
        # The one place under the cap is free again (held, a new connection would get 503).
        with server.connect() as sock:
            sock.sendall(request("/after"))
            assert read_response(sock).json()["path"] == "/after"


def test_bytes_that_are_not_http_get_the_json_400() -> None:
    with serving() as server, server.connect() as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert_error(read_response(sock), 400, "invalid_request")
        assert closed(sock)


# --- connection cap ---


def test_beyond_the_cap_new_connections_get_503_and_health_checks_are_still_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limits = replace(LIMITS, max_connections=2, overflow_connections=1, header_timeout=30, body_timeout=30)
    with serving(limits=limits, keep_alive=30) as server:
        held = [server.connect(), server.connect()]
        for sock in held:  # both accepted and answered: they hold the two places
            sock.sendall(request("/held"))
            assert read_response(sock).status == 200
        with server.connect() as sock:
            sock.sendall(request("/api/v1/workflows/runs"))
            response = read_response(sock)
            assert_error(response, 503, "too_many_connections")
            assert response.headers["retry-after"] == str(transport.RETRY_AFTER_SECONDS)
            assert closed(sock)
        for path in ("/health/live", "/health/ready?x=1"):
            with server.connect() as sock:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                response = read_response(sock)
                assert response.status == 200 and response.headers["connection"] == "close"
                assert closed(sock)
        # Over the cap, first bytes that cannot begin a health check are answered at once.
        with server.connect() as sock:
            sock.sendall(b"POST /api")
            assert_error(read_response(sock), 503, "too_many_connections")
            assert closed(sock)
        # Beyond the one connection that may still be read, a new one is answered at once.
        with server.connect() as waiting, server.connect() as sock:
            assert_error(read_response(sock), 503, "too_many_connections")
            waiting.sendall(b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(waiting).status == 200
        # A place given back is taken again.
        held.pop().close()
        held[0].sendall(request("/sync"))  # the server has seen the close by the time it answers
        assert read_response(held[0]).status == 200
        with server.connect() as sock:
            sock.sendall(request("/again"))
            assert read_response(sock).json()["path"] == "/again"
        held[0].close()
    refusals = [r for r in caplog.records if r.name == "workflow_runs.transport"]
    assert len(refusals) == 1  # four refusals, one line a minute at most
    assert "connection cap of 2 reached" in refusals[0].getMessage()


def test_the_connection_cap_fits_the_file_descriptor_limit() -> None:
    assert transport.connection_cap(12_000, 1_048_576) == 12_000
    assert transport.connection_cap(12_000, 4096) == 4096 - transport.FD_RESERVE
    soft = transport.raise_fd_limit()
    assert soft >= 1024


# --- the real application: chunked bodies and clients that leave ---


def real_app(fast_lane: bool, updates: FakeUpdates) -> Any:
    settings = replace(
        Settings(), jwt_secret=SECRET, jwt_public_key=None, jwks_url=None, fast_lane=fast_lane, max_body_bytes=65536
    )
    return create_app(settings, fake_backends_factory(FakeRuns(status="RUNNING"), updates))


def chunked_post(path: str, parts: list[bytes]) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: {auth()['Authorization']}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    return head + b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


@pytest.mark.parametrize("fast_lane", [True, False], ids=["fast lane", "connexion"])
def test_chunked_bodies_are_read_like_sized_ones_through_the_socket(fast_lane: bool) -> None:
    updates = FakeUpdates()
    with serving(real_app(fast_lane, updates), limits=replace(LIMITS, max_header_bytes=8192)) as server:
        with server.connect() as sock:
            sock.sendall(chunked_post(f"/api/v1/workflows/runs/{RUN_ID}/updates", [b'{"message":', b'"chunked"}']))
            assert read_response(sock).json() == {"success": True}
        assert [orjson.loads(u)["message"] for u in updates.stored] == ["chunked"]
        with server.connect() as sock:
            path = f"/api/v1/workflows/runs/{WORKFLOW_ID}/{RUN_ID}/signal/UserInput"
            sock.sendall(chunked_post(path, [b'{"message":"hi"}']))
            assert read_response(sock).status == 200
        with server.connect() as sock:
            sock.sendall(chunked_post(f"/api/v1/workflows/runs/{RUN_ID}/updates", [b" " * 40000, b"{}" + b" " * 40000]))
            response = read_response(sock)
            assert response.status == 413 and response.json()["errorCode"] == "payload_too_large"


@pytest.mark.parametrize("fast_lane", [True, False], ids=["fast lane", "connexion"])
@pytest.mark.parametrize(
    ("version", "coding"),
    [("1.1", "gzip, chunked"), ("1.1", "gzip\r\nTransfer-Encoding: chunked"), ("1.0", "chunked")],
    ids=["another coding", "two headers", "HTTP/1.0"],
)
def test_a_transfer_coding_other_than_plain_chunked_is_501(fast_lane: bool, version: str, coding: str) -> None:
    updates = FakeUpdates()
    data = chunked_post(f"/api/v1/workflows/runs/{RUN_ID}/updates", [b'{"message":"m"}'])
    data = data.replace(b"HTTP/1.1", f"HTTP/{version}".encode(), 1)
    data = data.replace(b"Transfer-Encoding: chunked", f"Transfer-Encoding: {coding}".encode(), 1)
    limits = replace(LIMITS, max_header_bytes=8192)
    with serving(real_app(fast_lane, updates), limits=limits) as server, server.connect() as sock:
        sock.sendall(data)
        response = read_response(sock)
        assert response.status == 501 and response.json()["errorCode"] == "not_implemented"
        assert response.headers["content-type"] == "application/json"
    assert updates.stored == []


class _AccessLines:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self.written = threading.Event()

    def write(self, message: str, fields: dict[str, Any]) -> None:
        self.lines.append(fields)
        self.written.set()


@pytest.mark.parametrize("fast_lane", [True, False], ids=["fast lane", "connexion"])
@pytest.mark.parametrize("framing", ["sized", "chunked"])
def test_a_client_leaving_mid_body_is_no_500(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fast_lane: bool, framing: str
) -> None:
    access = _AccessLines()
    monkeypatch.setattr(middleware, "access_log", access)
    updates = FakeUpdates()
    head = (
        f"POST /api/v1/workflows/runs HTTP/1.1\r\nHost: t\r\nAuthorization: {auth()['Authorization']}\r\n"
        "Content-Type: application/json\r\n"
    )
    body = b'{"page_size":5}'  # a whole JSON object: only the framing says more was to come
    if framing == "sized":
        data = (head + "Content-Length: 100\r\n\r\n").encode() + body
    else:
        data = (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"%x\r\n%s\r\n" % (len(body), body)
    with serving(real_app(fast_lane, updates), limits=replace(LIMITS, max_header_bytes=8192, body_timeout=30)) as srv:
        for path in ("/api/v1/workflows/runs", f"/api/v1/workflows/runs/{RUN_ID}/updates"):
            access.written.clear()
            with srv.connect() as sock:
                sock.sendall(data.replace(b"/api/v1/workflows/runs ", path.encode() + b" ", 1))
            assert access.written.wait(WAIT)
            assert access.lines[-1]["status"] == middleware.CLIENT_GONE_STATUS
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert updates.stored == []


async def test_the_bounds_keep_their_attributes_out_of_uvicorns_instance_dict() -> None:
    # uvicorn's protocol keeps its own attributes in its instance dict, shared-key and small only
    # while no instance adds keys of its own: the bounds' attributes must be slots.
    config = uvicorn.Config(echo_app, log_config=None)
    config.load()
    loop = asyncio.get_running_loop()
    served = transport.protocol_class(LIMITS)

    async def connected(cls: type[HttpToolsProtocol]) -> HttpToolsProtocol:
        protocol = cls(config, ServerState(), {}, loop)
        ours, theirs = socket.socketpair()
        theirs.close()
        await loop.connect_accepted_socket(lambda: protocol, sock=ours)
        protocol.transport.abort()
        return protocol

    protocol, plain = await connected(served), await connected(HttpToolsProtocol)
    added = set(transport.BoundedHttpToolsProtocol.__slots__)
    assert added and not added & set(vars(protocol))
    assert set(vars(protocol)) == set(vars(plain))  # nothing else added to uvicorn's dict either
    assert all(hasattr(protocol, name) for name in added)  # set, in their slots
