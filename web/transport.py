"""The HTTP transport: uvicorn's httptools protocol with bounds on what one connection may cost.

Stock uvicorn with httptools buffers a request head of any size (a 50 MiB header was accepted),
keeps a connection that never finishes its head open for ever, lets a body trickle in for ever and
has no connection cap but `limit_concurrency`, which answers 503 to the health checks too. This
subclass of `HttpToolsProtocol` adds, per connection:

- **head size**: bytes received while the parser is in a request head are counted, and the parser
  is never fed past `max_header_bytes` of one head (httptools buffers header values itself, so the
  only bound is to stop feeding it): 431 with the JSON error body, connection closed;
- **head deadline**: a head must arrive whole within `header_timeout` of the connection opening,
  or of the first read of the next request on a kept-alive connection (408 if part of it came);
- **body deadline**: a body must arrive whole within `body_timeout` of its head (408 if no answer
  started), whatever the pace of its bytes;
- **trailers**: the header lines after a chunked body's last chunk count against
  `max_header_bytes` too (431, or only a close once an answer has started) and are dropped:
  the API reads no trailer, and kept they would grow the request's header list without bound;
- **pipelining**: a head that begins in the read that ends the previous request is counted from
  the parser's callbacks (its bytes are in one read, so bounded by the read size until then);
  at most `max_pipelined` requests wait behind the one being answered: the next one is answered
  503 in its turn, and nothing after it is read;
- **send deadline**: a connection whose writes have been paused (the client does not read what
  it is sent), or which has been closing with data still buffered, for `send_timeout` is reset
  (`web.abortable.reset`): otherwise uvicorn's `send` and asyncio's `close()` wait for ever,
  and the connection keeps its place under the cap and its buffered answer;
- **early answers**: an answer completed before its request's body was whole is followed by a
  half-close (FIN) and the rest of the body is read and discarded until whole or the body
  deadline, then the connection is closed: no second answer (no 408) is ever written after it;
- **connection cap**: beyond `max_connections` open connections a new one may send one small
  head within a short deadline from connecting: the health checks are served, anything else gets
  503 with `Retry-After` (at once, as soon as its first bytes are not `GET /health/`); beyond
  that small allowance a new connection is answered 503 at once.

Per request this costs a few attribute updates and two clock reads: the deadlines are enforced by
one periodic sweep over the open connections, not by a timer per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import resource
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from web.abortable import AbortableHttpToolsProtocol, reset
from web.direct_write import DirectWriteHttpToolsProtocol
from web.errors import error_body

log = logging.getLogger("workflow_runs.transport")

# File descriptors kept free under the soft limit for everything that is not a client connection:
# the Redis pool (32) and stream reader, Temporal's gRPC channels, log files, the listening socket,
# the event loop's own, and the connections beyond the cap that are still read for a health check.
FD_RESERVE = 256
HEALTH_PATHS = (b"/health/live", b"/health/ready")
# What an over-cap connection's first bytes must be: anything else cannot be a health check.
HEALTH_PREFIX = b"GET /health/"
RETRY_AFTER_SECONDS = 5

# Where a connection is in its current request (per connection, checked by the sweep).
_IDLE = 0  # between requests (uvicorn's keep-alive timeout applies), or a request being answered
_HEAD = 1  # reading a request head: its bytes are counted, its deadline runs
_BODY = 2  # reading a request body: its deadline runs
_STOPPED = 3  # a refusal waits its turn behind the answers owed: nothing more is parsed

# Where a chunked body is, to tell trailer lines from chunk data.
_NO_CHUNK = 0  # not a chunked body (or not yet in it)
_CHUNK_DATA = 1  # in or after a chunk's data
_CHUNK_HEADER = 2  # a chunk's size line read, no data yet: a last chunk's trailers may follow
_CHUNK_WATCHED = 3  # as _CHUNK_HEADER, during a read that may show which

# Which count a connection holds a place in.
_UNCOUNTED = 0
_REGULAR = 1
_OVERFLOW = 2


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int
    header_timeout: float
    body_timeout: float
    max_connections: int
    # How long a connection may go without its client taking what it is sent (writes paused, or
    # closing with data buffered) before it is reset.
    send_timeout: float = 30.0
    # Requests that may wait, parsed, behind the one being answered on one connection.
    max_pipelined: int = 16
    # Beyond the cap: how many connections at once may still be read for a health check, the
    # size of the head they may send and how long they have to send it.
    overflow_connections: int = 64
    overflow_header_bytes: int = 8192
    overflow_header_timeout: float = 2.0


class _Refused(Exception):
    """Raised from a parser callback to stop httptools once the connection has been answered."""


class _Shared:
    """State shared by every connection of one server: the counts and the sweep."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.regular = 0
        self.overflow = 0
        self.sweeping = False
        # One log line per minute at most while connections are refused.
        self.refused = 0
        self.last_report = -math.inf
        # Often enough that a deadline is enforced within an eighth of it (within 1 s at most).
        shortest = min(limits.header_timeout, limits.body_timeout, limits.send_timeout)
        self.tick = min(1.0, max(0.05, shortest / 8))

    def note_refusal(self, now: float) -> None:
        self.refused += 1
        if now - self.last_report >= 60:
            log.warning(
                "connection cap of %d reached: new connections answered 503 (%d since the last report)",
                self.limits.max_connections,
                self.refused,
            )
            self.last_report, self.refused = now, 0


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` with the bounds above; `protocol_class` binds the limits."""

    # uvicorn's protocol keeps its own attributes in its instance dict, small (about 300 B) while
    # its keys are shared between instances: on Python 3.11 that holds for uvicorn's own 28 keys
    # and not one more, and the fifteen added here would make it a dict of its own of about
    # 1.5 KiB per connection. As slots they cost a pointer each. (The mixins in front of this
    # class add no attribute: a second class with slots could not be combined with it.)
    __slots__ = (
        "_answered_early",
        "_chunk",
        "_drain_left",
        "_drain_since",
        "_first_bytes",
        "_head_bytes",
        "_head_limit",
        "_head_timeout",
        "_parsed_bytes",
        "_phase",
        "_phase_started",
        "_running",
        "_slot",
        "_trailer_bytes",
        "_write_paused_at",
    )

    shared: ClassVar[_Shared]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = self.shared.limits
        self._phase = _HEAD  # a new connection owes its first head from the moment it opens
        self._phase_started = 0.0
        self._head_bytes = 0  # bytes read in this head (the reads that began in it)
        self._parsed_bytes = 0  # this head's url and headers as the parser hands them over
        self._trailer_bytes = 0  # this body's trailer lines, and reads that held only trailers
        self._chunk = _NO_CHUNK  # where a chunked body is: tells trailers from chunk data
        self._head_limit = limits.max_header_bytes
        self._head_timeout = limits.header_timeout
        self._slot = _UNCOUNTED
        self._first_bytes = b""  # over the cap: the first bytes, until they can be told a health check
        self._answered_early = False  # answered before the body was whole: half-closed
        self._write_paused_at: float | None = None
        self._drain_since: float | None = None  # closing with data buffered: since, and how much
        self._drain_left = 0
        self._running: RequestResponseCycle | None = None  # the request being answered

    # --- connection ---

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        shared, now = self.shared, self.loop.time()
        self._phase_started = now
        if not shared.sweeping:
            shared.sweeping = True
            self.loop.call_later(shared.tick, _sweep, type(self), self.loop, self.connections)
        limits = shared.limits
        if shared.regular < limits.max_connections:
            shared.regular += 1
            self._slot = _REGULAR
            return
        shared.note_refusal(now)
        if shared.overflow < limits.overflow_connections:
            # Read one small head, quickly: a health check is served, anything else refused.
            shared.overflow += 1
            self._slot = _OVERFLOW
            self._head_limit = min(limits.overflow_header_bytes, limits.max_header_bytes)
            self._head_timeout = min(limits.overflow_header_timeout, limits.header_timeout)
            return
        self._refuse_busy()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disconnect_running()
        super().connection_lost(exc)
        self._release()
        self._phase = _IDLE

    def _release(self) -> None:
        """Give back this connection's place under the cap (once)."""
        if self._slot == _REGULAR:
            self.shared.regular -= 1
        elif self._slot == _OVERFLOW:
            self.shared.overflow -= 1
        self._slot = _UNCOUNTED

    # --- writing ---

    def pause_writing(self) -> None:
        # The client does not take what it is sent as fast as it comes: the sweep resets the
        # connection if that lasts `send_timeout`.
        self._write_paused_at = self.loop.time()
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self._write_paused_at = None
        self.flow.resume_writing()

    def stalled(self, now: float, timeout: float) -> bool:
        """Whether the client has taken nothing it was sent for `timeout`: writes paused that
        long, or closing that long with data buffered and none of it sent since."""
        if self._write_paused_at is not None:
            return now - self._write_paused_at >= timeout
        transport = self.transport
        if not transport.is_closing():
            return False
        left = transport.get_write_buffer_size()
        if not left:
            return False  # closing, nothing owed: `connection_lost` is on its way
        if self._drain_since is None or left < self._drain_left:
            self._drain_since, self._drain_left = now, left  # first seen, or some of it went
            return False
        return now - self._drain_since >= timeout

    def reset_stalled(self) -> None:
        """Reset a connection whose client stopped reading: `close()` would wait for ever for
        the buffered data to go. The place under the cap is given back at once."""
        self._release()
        self._phase = _IDLE
        reset(self.transport)
        self._disconnect_running()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self._running = cycle
        HttpToolsProtocol._start_asgi_task(self, cycle, app)

    def _disconnect_running(self) -> None:
        """uvicorn tells only the newest request's cycle that the client is gone; with pipelining
        the one being answered is an earlier one: a `send` of it waiting to drain then wrote to
        the closed transport."""
        cycle = self._running
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()

    # --- reading ---

    def data_received(self, data: bytes) -> None:
        phase = self._phase
        if phase != _BODY:
            if phase == _STOPPED:
                return  # a refusal waits its turn: what comes after it is not read
            if phase == _IDLE:  # the first read of the next request: its head's deadline starts
                self._phase, self._phase_started = _HEAD, self.loop.time()
            if self._slot == _OVERFLOW and not self._may_be_health_check(data):
                self._refuse_busy()
                return
            room = self._head_limit - self._head_bytes
            if len(data) > room:
                self._feed_past_room(data, room)
                return
            self._head_bytes += len(data)
        elif self._chunk != _NO_CHUNK:
            self._chunked_data_received(data)
            return
        # uvicorn's `data_received`, inlined (it runs for every read), quiet when the connection
        # was answered from a callback.
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._invalid()
        except httptools.HttpParserUpgrade:
            self._upgrade()
        # Still in this head with all it may take read: the head is over the limit. (A head that
        # begins within this read after the end of the previous request is counted by the
        # parser's callbacks instead, and by its bytes from the next read on.)
        if self._phase == _HEAD and self._head_bytes >= self._head_limit and not self.transport.is_closing():
            self._refuse_head()

    def _chunked_data_received(self, data: bytes) -> None:
        """A read in a chunked body. A read that holds no chunk data after the last chunk's header
        holds trailers (or the blank line that ends them): its bytes are counted as trailer
        bytes, as httptools keeps an unfinished trailer line until it ends."""
        trailing = self._chunk == _CHUNK_HEADER
        if trailing:
            self._chunk = _CHUNK_WATCHED  # `on_body` or the next chunk header change it
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._invalid()
            return
        if trailing and self._chunk == _CHUNK_WATCHED:
            self._chunk = _CHUNK_HEADER
            self._trailer_bytes += len(data)
            if self._trailer_bytes > self._head_limit and not self.transport.is_closing():
                self._refuse_trailers()

    def _may_be_health_check(self, data: bytes) -> bool:
        """Over the cap: whether the bytes so far could still begin a health check."""
        seen = self._first_bytes
        if len(seen) >= len(HEALTH_PREFIX):
            return True
        seen = self._first_bytes = seen + data[: len(HEALTH_PREFIX) - len(seen)]
        return HEALTH_PREFIX.startswith(seen)

    def _feed_past_room(self, data: bytes, room: int) -> None:
        """More than the head may still take: feed only that much, then the rest if the head
        ended within it."""
        view = memoryview(data)
        self._head_bytes = self._head_limit
        self._unset_keepalive_if_required()
        for part in (view[:room], view[room:]):
            try:
                self.parser.feed_data(part)
            except httptools.HttpParserError:
                self._invalid()
            except httptools.HttpParserUpgrade:
                self._upgrade()
            if self.transport.is_closing() or self._phase == _STOPPED:
                return
            if self._phase == _HEAD and self._head_bytes >= self._head_limit:
                self._refuse_head()
                return

    def _invalid(self) -> None:
        # Else a callback has answered (or queued the answer) and stopped the parser.
        if not self.transport.is_closing() and self._phase != _STOPPED:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("The request is not valid HTTP/1.1.")

    def _upgrade(self) -> None:
        if self._should_upgrade():
            self.handle_websocket_upgrade()
        else:
            self._unsupported_upgrade_warning()

    # --- parser callbacks (they run on every request: uvicorn's are called directly, without
    # the cost of `super()`) ---

    def on_message_begin(self) -> None:
        if self._phase != _HEAD:
            # Begun in the read that ended the previous request: timed from now, and counted by
            # its callbacks until the next read (which is counted whole).
            self._phase, self._phase_started, self._head_bytes = _HEAD, self.loop.time(), 0
        self._parsed_bytes = self._trailer_bytes = 0
        HttpToolsProtocol.on_message_begin(self)

    def on_url(self, url: bytes) -> None:
        self._parsed_bytes += len(url)
        if self._parsed_bytes > self._head_limit:
            self._refuse_head()
            raise _Refused
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + 2  # at least `:` and the line end besides
        if self._phase == _BODY:  # a trailer: counted, and dropped (the API reads none)
            self._trailer_bytes += size
            if self._trailer_bytes > self._head_limit:
                self._refuse_trailers()
                raise _Refused
            return
        self._parsed_bytes += size
        if self._parsed_bytes > self._head_limit:
            self._refuse_head()
            raise _Refused
        HttpToolsProtocol.on_header(self, name, value)

    def on_headers_complete(self) -> None:
        if len(self.pipeline) >= self.shared.limits.max_pipelined:
            # Answered in its turn, and nothing after it is parsed: what uvicorn queues is bounded.
            self._refuse(
                503,
                "Too many pipelined requests on this connection; send the rest on a new one.",
                code="too_many_pipelined_requests",
                headers=((b"retry-after", b"1"),),
            )
            raise _Refused
        self._phase, self._phase_started, self._head_bytes = _BODY, self.loop.time(), 0
        if self._slot != _OVERFLOW:
            HttpToolsProtocol.on_headers_complete(self)
            return
        if self.url.partition(b"?")[0] not in HEALTH_PATHS:
            self._refuse_busy()
            raise _Refused  # stops the parser: nothing more of this connection is read
        HttpToolsProtocol.on_headers_complete(self)
        if self.cycle is not None:
            self.cycle.keep_alive = False  # one health check per connection beyond the cap

    def on_chunk_header(self) -> None:
        self._chunk = _CHUNK_HEADER

    def on_body(self, body: bytes) -> None:
        self._chunk = _NO_CHUNK if self._chunk == _NO_CHUNK else _CHUNK_DATA
        HttpToolsProtocol.on_body(self, body)

    def on_chunk_complete(self) -> None:
        self._chunk = _CHUNK_DATA

    def on_message_complete(self) -> None:
        self._phase, self._chunk = _IDLE, _NO_CHUNK
        if self._answered_early:
            self._close()  # the rest of a body answered early is read: the connection ends
            raise _Refused
        HttpToolsProtocol.on_message_complete(self)

    def on_response_complete(self) -> None:
        if self._phase == _BODY and self.cycle is not None and self.cycle.response_complete:
            # Answered before the body was whole: nothing more will be answered here. FIN after
            # the answer says so; the rest of the body is read (and dropped) until whole or its
            # deadline, then the connection closed: closing with unread data would send a reset,
            # which may destroy the answer before the client reads it.
            self._answered_early = True
            if not self.transport.is_closing() and self.transport.can_write_eof():
                self.transport.write_eof()
        HttpToolsProtocol.on_response_complete(self)

    # --- answers written by the transport itself ---

    def send_400_response(self, msg: str) -> None:
        # uvicorn's own answer to bytes that are not HTTP is text/plain: the JSON error body instead.
        self._refuse(400, msg)

    def _refuse_head(self) -> None:
        self._refuse(
            431,
            f"The request head (request line and headers) exceeds the limit of {self._head_limit} bytes.",
            code="request_header_fields_too_large",
        )

    def _refuse_trailers(self) -> None:
        self._refuse(
            431,
            f"The trailer fields of the chunked body exceed the limit of {self._head_limit} bytes.",
            code="request_header_fields_too_large",
        )

    def _refuse_busy(self) -> None:
        self._refuse(
            503,
            "The server has too many open connections; retry later.",
            code="too_many_connections",
            headers=((b"retry-after", str(RETRY_AFTER_SECONDS).encode()),),
        )

    def expire(self) -> None:
        """The sweep found this connection's head or body deadline passed."""
        cycle = self.cycle
        if self._phase == _BODY:
            if cycle is not None and cycle.response_started:
                self._close()  # answered already (or answering): a second answer has no place
                return
            seconds, what = self.shared.limits.body_timeout, "body"
        elif self._head_bytes or self._parsed_bytes:
            seconds, what = self._head_timeout, "head"
        else:
            self._close()  # nothing of a request came: nobody to answer
            return
        self._refuse(408, f"The request {what} did not arrive within {seconds:g} seconds.", code="request_timeout")

    def _refuse(
        self, status: int, message: str, *, code: str | None = None, headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        """Answer with the JSON error body and close.

        A head refused while earlier requests of this connection are still being answered is
        answered in its turn, after them (`_queue_refusal`). Otherwise the answer is written when
        nothing else is being answered, or when the application has not started to answer the
        request whose body is being read; else the connection is only closed (writing now would
        corrupt the answer under way)."""
        cycle = self.cycle
        owed = cycle is not None and not cycle.response_complete
        if self._phase == _HEAD and (owed or self.pipeline):
            self._queue_refusal(status, message, code, headers)
            return
        if not self.pipeline and (not owed or (self._phase == _BODY and not cycle.response_started)):
            self._write_error(status, message, code=code, headers=headers)
        self._close()

    def _queue_refusal(
        self, status: int, message: str, code: str | None, headers: Iterable[tuple[bytes, bytes]]
    ) -> None:
        """Queue the refusal as one more pipelined request, answered (with `Connection: close`)
        after the requests before it; nothing more of the connection is parsed."""
        body = error_body(status, message, code=code)
        response_headers = [
            *headers,
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"x-content-type-options", b"nosniff"),
            (b"connection", b"close"),
        ]

        async def answer(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": status, "headers": response_headers})
            await send({"type": "http.response.body", "body": body})

        scope: Any = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": self.scheme,
            "path": "",
            "raw_path": b"",
            "query_string": b"",
            "root_path": "",
            "headers": [],
            "server": self.server,
            "client": self.client,
        }
        cycle = RequestResponseCycle(
            scope=scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=False,
            keep_alive=False,
            on_response=self.on_response_complete,
        )
        cycle.more_body = False
        self.pipeline.appendleft((cycle, answer))
        self.flow.pause_reading()
        self._phase = _STOPPED

    def _write_error(
        self, status: int, message: str, *, code: str | None = None, headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        body = error_body(status, message, code=code)
        head = [STATUS_LINE[status]]
        for name, value in (*self.server_state.default_headers, *headers):
            head += [name, b": ", value, b"\r\n"]
        head.append(
            b"content-type: application/json\r\ncontent-length: %d\r\n"
            b"x-content-type-options: nosniff\r\nconnection: close\r\n\r\n" % len(body)
        )
        self.transport.write(b"".join(head) + body)

    def _close(self) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The application sees its client gone at once: what it sends next is dropped rather
            # than written after the transport's own answer (`connection_lost` comes later).
            cycle.disconnected = True
            cycle.message_event.set()
        self._phase = _IDLE
        self.transport.close()


def _sweep(cls: type[BoundedHttpToolsProtocol], loop: asyncio.AbstractEventLoop, connections: set[Any]) -> None:
    """Reset the connections whose client stopped reading, close those whose head or body
    deadline has passed; runs every `tick` seconds while connections are open."""
    shared = cls.shared
    if not connections:
        shared.sweeping = False
        return
    now = loop.time()
    limits = shared.limits
    body_timeout, send_timeout = limits.body_timeout, limits.send_timeout
    expired, stalled = [], []
    for connection in connections:
        if not isinstance(connection, cls):
            continue
        # Most connections are neither paused nor closing: the full check only for those that are.
        if (connection._write_paused_at is not None or connection.transport.is_closing()) and connection.stalled(
            now, send_timeout
        ):
            stalled.append(connection)
            continue
        phase = connection._phase
        if phase in (_IDLE, _STOPPED):
            continue
        timeout = connection._head_timeout if phase == _HEAD else body_timeout
        # Not while uvicorn itself stopped reading (the application has not taken the body it
        # has, or a pipelined request waits): the client is not the one late.
        if now - connection._phase_started >= timeout and not connection.flow.read_paused:
            expired.append(connection)
    for connection in stalled:
        connection.reset_stalled()
    for connection in expired:
        connection.expire()
    loop.call_later(shared.tick, _sweep, cls, loop, connections)


def protocol_class(limits: Limits) -> type[BoundedHttpToolsProtocol]:
    """A protocol class for `uvicorn.Config(http=...)` with `limits` bound (uvicorn instantiates
    it itself, once per connection); one class per server, as it holds the server's counts."""

    # Abortable first: it lets a stream whose client stopped reading reset its connection. Then
    # the direct writes of update streams' frames, in front of the bounds (a refused head gets none).
    class Protocol(AbortableHttpToolsProtocol, DirectWriteHttpToolsProtocol, BoundedHttpToolsProtocol):
        shared = _Shared(limits)

    return Protocol


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        # Refused for an unlimited hard limit above the kernel's nr_open: the soft one stays.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_cap(setting: int, fd_soft_limit: int) -> int:
    """`MAX_CONNECTIONS`, lowered to what the file-descriptor limit leaves after `FD_RESERVE`."""
    return max(1, min(setting, fd_soft_limit - FD_RESERVE))
