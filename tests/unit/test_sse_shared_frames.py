"""An update's frame is encoded once and shared by every stream that sends it."""

from __future__ import annotations

from web.sse.framing import encode_frame, encode_update_event


def test_the_same_entry_gives_every_stream_the_same_bytes() -> None:
    data = b'{"timestamp":1,"message":"shared"}'
    first = encode_update_event(("message", "1-0", data))
    second = encode_update_event(("message", "1-0", data))
    assert first == b"id: 1-0\ndata: " + data + b"\n\n"
    assert second is first  # not encoded again


def test_another_entry_is_encoded_anew() -> None:
    encode_update_event(("message", "1-0", b'{"a":1}'))
    assert encode_update_event(("message", "2-0", b'{"a":1}')) == b'id: 2-0\ndata: {"a":1}\n\n'
    assert encode_update_event(("message", "2-0", b'{"a":2}')) == b'id: 2-0\ndata: {"a":2}\n\n'


def test_data_with_line_breaks_is_split_and_then_shared() -> None:
    data = b"one\ntwo"
    first = encode_update_event(("message", "3-0", data))
    assert first == encode_frame(data, event_id="3-0") == b"id: 3-0\ndata: one\ndata: two\n\n"
    assert encode_update_event(("message", "3-0", data)) is first


def test_other_events_are_not_taken_from_the_shared_frame() -> None:
    data = b'{"reason":"truncated"}'
    encode_update_event(("message", "4-0", data))
    assert encode_update_event(("truncated", "", data)) == b"event: truncated\ndata: " + data + b"\n\n"
    assert encode_update_event(("message", "4-0", data), retry_ms=10) == b"retry: 10\nid: 4-0\ndata: " + data + b"\n\n"
