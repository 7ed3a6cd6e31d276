"""uvicorn's HTTP protocol (httptools), letting a response abort its connection.

ASGI gives an application no way to drop a connection. When a client stops reading an update
stream, the stream gives up after `SSE_SEND_TIMEOUT_SECONDS` (`web.sse.response.EventStreamResponse`);
uvicorn then closes the transport, and asyncio's `close()` waits until everything already written
has been sent, which, to a client that does not read, is never: the socket stayed ESTABLISHED and
counted as an open connection for as long as the client liked. This protocol puts an `abort` in
every request's scope, under `ABORT_EXTENSION`, for such a response to call; nothing
else uses it. It resets the connection: `SO_LINGER` 0, so that closing the socket sends RST and
drops what the kernel still holds (a plain close would leave the kernel trying to deliver it,
behind the client's zero window, for minutes), then the transport's `abort()`.

The same extension lets a response learn that its client is gone without waiting on `receive()`:
`on_disconnect(callback)` has `callback()` called when the connection is lost (at once if it is
already lost or closing), `on_disconnect(None)` forgets it. An update stream uses it to run without
the second task, and its task group, that Starlette's `StreamingResponse` keeps per response only
to wait for `http.disconnect` (`web.sse.response`). A connection answers one request at a time, so
it holds one callback at most.

It only extends `on_message_begin` and `connection_lost`, through `super()`, so it composes in front
of any other subclass of `HttpToolsProtocol` (`class Protocol(AbortableHttpToolsProtocol,
Bounded...)`): the server's protocol class must include it. `tests/unit/test_sse.py` proves the
reset and the disconnect callback over a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from typing import ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# The ASGI scope extension through which a response aborts its connection:
# `scope["extensions"][ABORT_EXTENSION]["abort"]()`, and `...["on_disconnect"](callback | None)`.
ABORT_EXTENSION = "workflow_runs.abort"
_LINGER_ZERO = struct.pack("ii", 1, 0)  # struct linger {l_onoff = 1, l_linger = 0}


def reset(transport: asyncio.Transport) -> None:
    """Close `transport` at once with a TCP reset, dropping whatever is still buffered."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # OSError: the peer already closed it; the abort below is then all there is to do.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    transport.abort()


class AbortableHttpToolsProtocol(HttpToolsProtocol):
    # The callbacks of the connections whose response asked to be told of the disconnect, here
    # rather than in an attribute: uvicorn's protocol keeps its attributes in a dict that stays
    # small only while it has no more keys than uvicorn's own (`web.transport`'s bounds use slots,
    # and a second class with slots in the server's protocol class is not possible).
    _watchers: ClassVar[dict[AbortableHttpToolsProtocol, Callable[[], object]]] = {}

    def on_message_begin(self) -> None:
        super().on_message_begin()
        transport = self.transport
        self.scope.setdefault("extensions", {})[ABORT_EXTENSION] = {
            "abort": lambda: reset(transport),
            "on_disconnect": self._on_disconnect,
        }

    def _on_disconnect(self, callback: Callable[[], object] | None) -> None:
        if callback is None:
            self._watchers.pop(self, None)
        elif self.transport.is_closing():
            # Lost already (`connection_lost` has run), or closing: nothing more will reach the
            # client, and a callback kept now might never be called.
            callback()
        else:
            self._watchers[self] = callback

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        callback = self._watchers.pop(self, None)
        if callback is not None:
            callback()
