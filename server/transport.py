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
- **connection cap**: beyond `max_connections` open connections a new one may send one small
  head within a short deadline: the health checks are served, anything else gets 503 with
  `Retry-After`; beyond that small allowance a new connection is answered 503 at once.

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
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from server.abortable import AbortableHttpToolsProtocol
from server.errors import error_body

log = logging.getLogger("workflow_runs.transport")

# File descriptors kept free under the soft limit for everything that is not a client connection:
# the Redis pool (32) and stream reader, Temporal's gRPC channels, log files, the listening socket,
# the event loop's own, and the connections beyond the cap that are still read for a health check.
FD_RESERVE = 256
HEALTH_PATHS = (b"/health/live", b"/health/ready")
RETRY_AFTER_SECONDS = 5

# Where a connection is in its current request (per connection, checked by the sweep).
_IDLE = 0  # between requests (uvicorn's keep-alive timeout applies), or a request being answered
_HEAD = 1  # reading a request head: its bytes are counted, its deadline runs
_BODY = 2  # reading a request body: its deadline runs

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
        self.tick = min(1.0, max(0.05, min(limits.header_timeout, limits.body_timeout) / 8))

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
        self._head_bytes = 0
        self._head_limit = limits.max_header_bytes
        self._head_timeout = limits.header_timeout
        self._slot = _UNCOUNTED

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
        super().connection_lost(exc)
        if self._slot == _REGULAR:
            self.shared.regular -= 1
        elif self._slot == _OVERFLOW:
            self.shared.overflow -= 1
        self._slot, self._phase = _UNCOUNTED, _IDLE

    # --- reading ---

    def data_received(self, data: bytes) -> None:
        phase = self._phase
        if phase != _BODY:
            if phase == _IDLE:  # the first read of the next request: its head's deadline starts
                self._phase, self._phase_started = _HEAD, self.loop.time()
            room = self._head_limit - self._head_bytes
            if len(data) > room:
                self._feed_past_room(data, room)
                return
            self._head_bytes += len(data)
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
        # begins within the read that ends the previous request is counted and timed from the
        # next read; if none comes, the keep-alive timeout closes the connection.)
        if self._phase == _HEAD and self._head_bytes >= self._head_limit and not self.transport.is_closing():
            self._refuse_head()

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
            if self.transport.is_closing():
                return
            if self._phase == _HEAD and self._head_bytes >= self._head_limit:
                self._refuse_head()
                return

    def _invalid(self) -> None:
        if not self.transport.is_closing():  # else a callback has answered and stopped the parser
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("The request is not valid HTTP/1.1.")

    def _upgrade(self) -> None:
        if self._should_upgrade():
            self.handle_websocket_upgrade()
        else:
            self._unsupported_upgrade_warning()

    # --- parser callbacks (they run on every request: uvicorn's are called directly, without
    # the cost of `super()`) ---

    def on_headers_complete(self) -> None:
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

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        HttpToolsProtocol.on_message_complete(self)

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

    def _refuse_busy(self) -> None:
        self._refuse(
            503,
            "The server has too many open connections; retry later.",
            code="too_many_connections",
            headers=((b"retry-after", str(RETRY_AFTER_SECONDS).encode()),),
        )

    def expire(self) -> None:
        """The sweep found this connection's head or body deadline passed."""
        if self._phase == _BODY:
            seconds, what = self.shared.limits.body_timeout, "body"
        elif self._head_bytes:
            seconds, what = self._head_timeout, "head"
        else:
            self._close()  # nothing of a request came: nobody to answer
            return
        self._refuse(408, f"The request {what} did not arrive within {seconds:g} seconds.", code="request_timeout")

    def _refuse(
        self, status: int, message: str, *, code: str | None = None, headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        """Answer with the JSON error body and close. The answer is written when nothing else is
        being answered on this connection, or when the application has not started to answer the
        request whose body is being read; otherwise the connection is only closed (writing now
        would corrupt the answer under way)."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete or (self._phase == _BODY and not cycle.response_started):
            self._write_error(status, message, code=code, headers=headers)
        self._close()

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
    """Close the connections whose head or body deadline has passed; runs every `tick` seconds
    while connections are open."""
    shared = cls.shared
    if not connections:
        shared.sweeping = False
        return
    now = loop.time()
    body_timeout = shared.limits.body_timeout
    expired = []
    for connection in connections:
        if not isinstance(connection, cls):
            continue
        phase = connection._phase
        if phase == _IDLE:
            continue
        timeout = connection._head_timeout if phase == _HEAD else body_timeout
        # Not while uvicorn itself stopped reading (the application has not taken the body it
        # has, or a pipelined request waits): the client is not the one late.
        if now - connection._phase_started >= timeout and not connection.flow.read_paused:
            expired.append(connection)
    for connection in expired:
        connection.expire()
    loop.call_later(shared.tick, _sweep, cls, loop, connections)


def protocol_class(limits: Limits) -> type[BoundedHttpToolsProtocol]:
    """A protocol class for `uvicorn.Config(http=...)` with `limits` bound (uvicorn instantiates
    it itself, once per connection); one class per server, as it holds the server's counts."""

    # Abortable first: it lets a stream whose client stopped reading reset its connection.
    class Protocol(AbortableHttpToolsProtocol, BoundedHttpToolsProtocol):
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
