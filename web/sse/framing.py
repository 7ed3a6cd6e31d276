"""Server-Sent Events framing: the bytes of each frame an `EventSource` reads (the frames and what
they mean are listed in `web.sse`)."""

from __future__ import annotations

import orjson

from core.protocols import UpdateEvent

PING = b": ping\n\n"


def encode_frame(
    data: bytes | None = None,
    *,
    event_id: str | None = None,
    event: str | None = None,
    retry_ms: int | None = None,
    comment: str | None = None,
) -> bytes:
    """One SSE frame, terminated by the blank line. `data` with line breaks becomes several `data:`
    lines, as the format requires (stored JSON never has any, so an update is one line)."""
    lines: list[bytes] = []
    if retry_ms is not None:
        lines.append(b"retry: %d" % retry_ms)
    if comment is not None:
        lines.append(b": " + _one_line(comment.encode()))
    if event is not None:
        lines.append(b"event: " + _one_line(event.encode()))
    if event_id is not None:
        lines.append(b"id: " + _one_line(event_id.encode()))
    if data is not None:
        lines += [b"data: " + line for line in data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")]
    return b"\n".join(lines) + b"\n\n"


def _one_line(value: bytes) -> bytes:
    return value.replace(b"\r", b" ").replace(b"\n", b" ").replace(b"\0", b"")


class _LastFrame:
    """The frame of the last update encoded. The hub hands every subscriber of a run the same
    `data` object for an entry, and their streams encode it one after another: with this, a
    delivery to ten thousand streams encodes (and scans and copies) the update once, and every
    stream sends the same bytes. Holding `data` keeps its identity from being reused."""

    __slots__ = ("data", "event_id", "frame")

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.event_id = ""
        self.frame = b""


_last = _LastFrame()


def encode_update_event(event: UpdateEvent, *, retry_ms: int | None = None) -> bytes:
    name, event_id, data = event
    if name == "message" and retry_ms is None and event_id:
        return encode_message(event_id, data)
    return encode_frame(data, event_id=event_id or None, event=None if name == "message" else name, retry_ms=retry_ms)


def encode_message(event_id: str, data: bytes) -> bytes:
    """The frame of one update (a `message` event with its id)."""
    last = _last
    if data is last.data and event_id == last.event_id:
        return last.frame
    # The common case in one step, when nothing needs splitting or replacing: the same bytes as
    # `encode_frame`.
    raw_id = event_id.encode()
    if b"\n" not in data and b"\r" not in data and _plain(raw_id):
        frame = b"id: %s\ndata: %s\n\n" % (raw_id, data)
    else:
        frame = encode_frame(data, event_id=event_id)
    last.data, last.event_id, last.frame = data, event_id, frame
    return frame


def _plain(value: bytes) -> bool:
    """No byte that `_one_line` would replace."""
    return b"\n" not in value and b"\r" not in value and b"\0" not in value


def end_frame(status: str, *, retry_ms: int | None = None) -> bytes:
    return encode_frame(orjson.dumps({"reason": "run_closed", "status": status}), event="end", retry_ms=retry_ms)


def shutdown_frame(*, retry_ms: int | None = None) -> bytes:
    return encode_frame(orjson.dumps({"reason": "server_shutdown"}), event="end", retry_ms=retry_ms)


def token_expired_frame() -> bytes:
    return encode_frame(orjson.dumps({"reason": "token_expired"}), event="end")


def ping_frame(*, retry_ms: int | None = None) -> bytes:
    return PING if retry_ms is None else encode_frame(comment="ping", retry_ms=retry_ms)


def open_frame(retry_ms: int) -> bytes:
    return encode_frame(comment="open", retry_ms=retry_ms)
