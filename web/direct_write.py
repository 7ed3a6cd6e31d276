"""uvicorn's HTTP protocol (httptools), letting a streaming response write body chunks straight to
its connection.

An update stream's frames normally travel the ASGI way: the stream's task wakes, its generator
yields the frame, and the frame's `send` goes down through every middleware to uvicorn, which frames
it as a chunk and writes it to the socket. For one update watched by ten thousand streams, that is
ten thousand task switches and ten thousand trips down the middleware chain, most of a core for a
few posts a second. Nothing in that chain looks at a response body chunk, so a stream may skip it:
this protocol puts a `write` under `DIRECT_WRITE_EXTENSION` in every request's scope that frames a
body chunk exactly as uvicorn's `send` does and writes it to the transport, synchronously.

`write(body)` returns False, writing nothing, whenever it cannot stand in for `send`: the response
has not started or is complete, the client is gone, it is not a chunked response, or the
connection's writes are paused (the client reads slower than the stream sends). The caller then
sends that chunk through `send` as usual, which waits for the client under the stream's send
deadline (`web.sse.response`), so a slow reader is found and dropped exactly as before. The caller
must also never call `write` while one of its own `send`s is under way, or chunks could pass each
other; `web.sse.frames` writes only while its generator waits for the next event.

Like `web.abortable`, it only extends a method through `super()` (`on_headers_complete`, where
uvicorn makes the request's response cycle), so it composes in front of the other protocols.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from starlette.types import Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

# `scope["extensions"][DIRECT_WRITE_EXTENSION]["write"](body) -> bool`.
DIRECT_WRITE_EXTENSION = "workflow_runs.direct_write"


class _LastChunk:
    """The chunk of the last body framed: every stream of a run writes the same frame object one
    after another (`web.sse.framing` encodes it once), so it is framed, and copied, once too."""

    __slots__ = ("body", "chunk")

    def __init__(self) -> None:
        self.body = b""
        self.chunk = b""


_last = _LastChunk()


def _chunk(body: bytes) -> bytes:
    last = _last
    if body is not last.body:
        last.body, last.chunk = body, b"%x\r\n%s\r\n" % (len(body), body)  # uvicorn's chunk, in one write
    return last.chunk


def _writer(cycle: RequestResponseCycle) -> Callable[[bytes], bool]:
    # The cycle holds the scope, which holds this function: held strongly, every request would
    # leave garbage that only the collector frees (measured: a young collection every 45 requests,
    # each walking every request in flight). The running request keeps the cycle alive.
    request = weakref.ref(cycle)

    def write(body: bytes) -> bool:
        cycle = request()
        if (
            cycle is None
            or not cycle.response_started
            or cycle.response_complete
            or cycle.disconnected
            or not cycle.chunked_encoding
            or cycle.flow.write_paused
            or cycle.transport.is_closing()
            or not body
        ):
            return False
        cycle.transport.write(_chunk(body))
        return True

    return write


class DirectWriteHttpToolsProtocol(HttpToolsProtocol):
    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        # The cycle uvicorn just made for this request (a refused request has none of its own).
        if cycle is not None and cycle.scope is self.scope:
            self.scope.setdefault("extensions", {})[DIRECT_WRITE_EXTENSION] = {"write": _writer(cycle)}


def direct_writer(scope: Scope) -> Callable[[bytes], bool] | None:
    """The server's direct `write` for this request's body chunks, if it offers one."""
    extension = (scope.get("extensions") or {}).get(DIRECT_WRITE_EXTENSION)
    write = extension.get("write") if isinstance(extension, dict) else None
    return write if callable(write) else None
