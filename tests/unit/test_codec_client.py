"""The API's codec client, against the real codec server app: one request per batch, with the
namespace and the Authorization value; any failure of the server (down, late, refusing, answering
something else than as many payloads) is `BackendUnavailable` without the server's words."""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import httpx
import orjson
import pytest
from temporalio.api.common.v1 import Payload
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.workflow.v1 import WorkflowExecutionInfo
from temporalio.converter import DataConverter

from backends.codec_client import (
    BACKEND,
    CodecClient,
    RemoteCodec,
    decode_in_place,
    decoded_events,
    payloads_in,
)
from core.errors import BackendUnavailable
from web.errors import status_of
from workloads.codec import ENCODING, EncryptionCodec
from workloads.codec_server import create_codec_app

KEY = bytes(range(32))
AUTH = "Bearer client-test-secret"
NAMESPACE = "team-a"
SERVER_WORDS = "internal detail the caller must not read"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


def plain(text: str) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=orjson.dumps(text))


class Recorder:
    """The codec server app, recording each request's path and headers."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.requests: list[tuple[str, dict[str, str]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            self.requests.append((scope["path"], headers))
        await self.app(scope, receive, send)


def answering(status: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()) -> App:
    """A server that answers every request with `body`."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        sent = [(b"content-type", b"application/json"), *headers]
        await send({"type": "http.response.start", "status": status, "headers": sent})
        await send({"type": "http.response.body", "body": body})

    return app


def client(app: App, *, endpoint: str = "http://codec", **options: Any) -> CodecClient:
    options.setdefault("timeout_seconds", 5.0)
    return CodecClient(endpoint, AUTH, NAMESPACE, transport=httpx.ASGITransport(app=app), **options)


@pytest.fixture
def server() -> Recorder:
    return Recorder(create_codec_app(KEY, auth=AUTH, cors_origins=[], max_body_bytes=1 << 20))


@pytest.fixture
async def codec(server: Recorder) -> AsyncIterator[CodecClient]:
    async with client(server) as codec_client:
        yield codec_client


async def unavailable(call: Awaitable[object]) -> BackendUnavailable:
    with pytest.raises(BackendUnavailable) as error:
        await call
    assert error.value.backend == BACKEND
    assert status_of(error.value) == 503
    assert SERVER_WORDS not in error.value.message
    return error.value


async def test_a_batch_is_decoded_in_one_request_with_the_namespace_and_authorization(
    codec: CodecClient, server: Recorder
) -> None:
    originals = [plain(f"value {i}") for i in range(5)]
    sealed = await EncryptionCodec(KEY).encode(originals)
    assert await codec.decode(sealed) == originals
    [(path, headers)] = server.requests
    assert path == "/decode"
    assert headers["x-namespace"] == NAMESPACE
    assert headers["authorization"] == AUTH
    assert headers["content-type"] == "application/json"


async def test_encode_goes_to_the_servers_encode(codec: CodecClient, server: Recorder) -> None:
    sealed = await codec.encode([plain("x")])
    assert sealed[0].metadata["encoding"] == ENCODING
    assert await EncryptionCodec(KEY).decode(sealed) == [plain("x")]
    assert [path for path, _ in server.requests] == ["/encode"]


async def test_nothing_to_decode_sends_nothing(codec: CodecClient, server: Recorder) -> None:
    assert await codec.decode([]) == []
    assert server.requests == []


async def test_the_namespace_fills_the_endpoints_template(server: Recorder) -> None:
    async with client(server, endpoint="http://codec/{namespace}/") as codec_client:
        await codec_client.decode([plain("x")])
    assert [path for path, _ in server.requests] == [f"/{NAMESPACE}/decode"]


async def test_a_down_server_is_unavailable() -> None:
    with socket.socket() as probe:  # a port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with CodecClient(f"http://127.0.0.1:{port}", AUTH, NAMESPACE, timeout_seconds=5.0) as codec_client:
        error = await unavailable(codec_client.decode([plain("x")]))
    assert "ConnectError" in error.message


async def test_a_server_that_does_not_answer_in_time_is_unavailable() -> None:
    never = asyncio.Event()

    async def hanging(scope: Scope, receive: Receive, send: Send) -> None:
        await never.wait()

    async with client(hanging, timeout_seconds=0.05) as codec_client:
        error = await unavailable(codec_client.decode([plain("x")]))
    assert "in time" in error.message


async def test_a_refusal_is_unavailable_without_the_servers_words() -> None:
    refusing = answering(500, orjson.dumps({"message": SERVER_WORDS}))
    async with client(refusing) as codec_client:
        error = await unavailable(codec_client.decode([plain("x")]))
    assert "500" in error.message


async def test_a_wrong_authorization_is_unavailable(server: Recorder) -> None:
    transport = httpx.ASGITransport(app=server)
    async with CodecClient("http://codec", "Bearer wrong", NAMESPACE, transport=transport) as codec_client:
        error = await unavailable(codec_client.decode([plain("x")]))
    assert "401" in error.message


@pytest.mark.parametrize(
    "answer",
    [
        b"<html>" + SERVER_WORDS.encode() + b"</html>",
        b'{"items": []}',
        b'{"payloads": "' + SERVER_WORDS.encode() + b'"}',
        b'{"payloads": [{"data": "%%% ' + SERVER_WORDS.encode() + b'"}]}',
        b'{"payloads": [42]}',
    ],
)
async def test_a_malformed_answer_is_unavailable(answer: bytes) -> None:
    async with client(answering(200, answer)) as codec_client:
        await unavailable(codec_client.decode([plain("x")]))


async def test_an_answer_with_another_number_of_payloads_is_unavailable() -> None:
    one = orjson.dumps({"payloads": [{"metadata": {}, "data": ""}]})
    async with client(answering(200, one)) as codec_client:
        error = await unavailable(codec_client.decode([plain("x"), plain("y")]))
    assert "1 payload(s) for 2" in error.message


async def test_an_answer_over_the_size_bound_is_unavailable(server: Recorder) -> None:
    sealed = await EncryptionCodec(KEY).encode([plain("x" * 2000)])
    async with client(server, max_response_bytes=1000) as codec_client:
        error = await unavailable(codec_client.decode(sealed))
    assert "1000" in error.message


async def test_a_compressed_answer_is_unavailable(server: Recorder) -> None:
    """Compression would let a small answer expand beyond the size bound once read."""
    bomb = gzip.compress(orjson.dumps({"payloads": [{"data": "A" * 4000}]}))
    async with client(answering(200, bomb, ((b"content-encoding", b"gzip"),))) as codec_client:
        error = await unavailable(codec_client.decode([plain("x")]))
    assert "compressed" in error.message
    async with client(server) as codec_client:
        await codec_client.decode([plain("x")])
    assert server.requests[0][1]["accept-encoding"] == "identity"


async def test_remote_codec_plugs_into_a_data_converter(codec: CodecClient) -> None:
    converter = DataConverter(payload_codec=RemoteCodec(codec))
    encoded = await converter.encode([{"documentId": "d-1"}])
    assert encoded[0].metadata["encoding"] == ENCODING
    assert await converter.decode(encoded) == [{"documentId": "d-1"}]


def started(event_id: int, value: str) -> HistoryEvent:
    event = HistoryEvent(event_id=event_id)
    attributes = event.workflow_execution_started_event_attributes
    attributes.input.payloads.append(plain(value))
    attributes.memo.fields["topic"].CopyFrom(plain("topic"))
    attributes.header.fields["trace"].CopyFrom(plain("header"))
    attributes.search_attributes.indexed_fields["ProjectId"].CopyFrom(plain("p1"))
    return event


async def sealed_events(events: list[HistoryEvent]) -> list[HistoryEvent]:
    """`events` with their payloads encrypted as a worker with the codec writes them."""
    codec = EncryptionCodec(KEY)
    out = []
    for event in events:
        copy = HistoryEvent()
        copy.CopyFrom(event)
        for payload in payloads_in(copy):
            payload.CopyFrom(codec.encrypt(payload))
        out.append(copy)
    return out


async def test_payloads_in_skips_headers_and_search_attributes() -> None:
    assert [p.data for p in payloads_in(started(1, "input"))] == [b'"input"', b'"topic"']


async def test_history_events_are_decoded_one_request_per_batch(codec: CodecClient, server: Recorder) -> None:
    plain_events = [started(i, f"input {i}") for i in range(1, 8)]
    encrypted = await sealed_events(plain_events)
    assert encrypted[0].workflow_execution_started_event_attributes.input.payloads[0].metadata["encoding"] == ENCODING
    # Headers and search attributes are left alone: the worker's codec does not encode them either.
    assert (
        encrypted[0].workflow_execution_started_event_attributes.header
        == plain_events[0].workflow_execution_started_event_attributes.header
    )

    async def stream() -> AsyncIterator[HistoryEvent]:
        for event in encrypted:
            yield event

    decoded = [event async for event in decoded_events(stream(), codec, batch_events=3)]
    assert decoded == plain_events
    assert [path for path, _ in server.requests] == ["/decode"] * 3  # 3 + 3 + 1 events


async def test_a_full_batch_is_handed_on_before_the_next_event_is_read(codec: CodecClient) -> None:
    """The caller may stop after a page (the history's size bound): the next page is not fetched first."""
    encrypted = await sealed_events([started(i, f"input {i}") for i in range(1, 5)])
    pulled = 0

    async def stream() -> AsyncIterator[HistoryEvent]:
        nonlocal pulled
        for event in encrypted:
            pulled += 1
            yield event

    seen = []
    async for event in decoded_events(stream(), codec, batch_events=2):
        seen.append((event.event_id, pulled))
        if len(seen) == 2:
            break
    assert seen == [(1, 2), (2, 2)]


async def test_a_batch_also_ends_at_its_byte_bound(codec: CodecClient, server: Recorder) -> None:
    encrypted = await sealed_events([started(i, "x" * 300) for i in range(1, 5)])

    async def stream() -> AsyncIterator[HistoryEvent]:
        for event in encrypted:
            yield event

    decoded = [event async for event in decoded_events(stream(), codec, batch_bytes=900)]
    assert len(decoded) == 4
    assert len(server.requests) == 4  # each event's payloads (~500 bytes as base64) fill a batch


async def test_memos_of_a_listing_are_decoded_in_one_request(codec: CodecClient, server: Recorder) -> None:
    infos = []
    for i in range(3):
        info = WorkflowExecutionInfo()
        info.memo.fields["activity_state"].CopyFrom(EncryptionCodec(KEY).encrypt(plain(f"state {i}")))
        infos.append(info)
    await decode_in_place(codec, [info.memo for info in infos])
    assert [info.memo.fields["activity_state"] for info in infos] == [plain(f"state {i}") for i in range(3)]
    assert len(server.requests) == 1
