"""The API's client of a codec server (TEMPORAL_CODEC_ENDPOINT): it decodes the payloads of runs whose
workers encrypt them, in batches, over Temporal's remote codec protocol
(https://docs.temporal.io/codec-server).

One call is one `POST {endpoint}/decode` (or `/encode`) with every payload given, `X-Namespace`, and
`Authorization` when TEMPORAL_CODEC_AUTH is set; `{namespace}` in the endpoint is replaced by the
namespace, as the `temporal` CLI does. Each call is bounded: an overall deadline, and a bound on the
answer's size. A codec server that is down, late, answers other than 2xx, or answers anything but as
many payloads as were sent raises `BackendUnavailable` (backend `codec`): the caller reads the API's
fixed 503 sentence, and the log gets what happened (never the server's body).

Histories and memos are decoded before they are rendered (`decoded_events`, `decode_in_place`), so
that a whole page of events costs one request; `RemoteCodec` adapts the client to temporalio's
`PayloadCodec` for code that goes through a data converter instead.

Each call is recorded in the metrics (`core.metrics.backend_call_done`, backend `codec`, call
`decode` or `encode`), failed when it raised `BackendUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Any

import httpx
import orjson
from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.api.failure.v1 import Failure
from temporalio.api.history.v1 import HistoryEvent
from temporalio.converter import PayloadCodec

from core.codec_wire import payload_of, payloads_json
from core.errors import BackendUnavailable
from core.metrics import backend_call_done

log = logging.getLogger(__name__)

BACKEND = "codec"
DEFAULT_TIMEOUT_SECONDS = 5.0
# CODEC_MAX_RESPONSE_BYTES: the codec server's default body limit; a decoded answer is smaller than
# the request that asked for it.
DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024
# What `decoded_events` sends in one request at most: a page of history, and (estimated as base64)
# no more than the codec server's default body limit leaves room for.
DEFAULT_BATCH_EVENTS = 1000
DEFAULT_BATCH_BYTES = 6 * 1024 * 1024
# Payloads that are never encoded by a codec (the SDKs skip them), and that the API does not show.
_SKIPPED_MESSAGES = frozenset({"temporal.api.common.v1.SearchAttributes", "temporal.api.common.v1.Header"})
_PAYLOAD = Payload.DESCRIPTOR.full_name
_JSON_PLAIN = b"json/plain"


class _Unavailable(Exception):
    """What went wrong, for the log; turned into `BackendUnavailable` at the edge of a call."""


class CodecClient:
    """A codec server's client. Owns an `httpx.AsyncClient`: close it with `aclose` (or `async with`)."""

    def __init__(
        self,
        endpoint: str,
        auth: str | None,
        namespace: str,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        base = endpoint.replace("{namespace}", urllib.parse.quote(namespace, safe="")).rstrip("/")
        self.endpoint = base
        self.namespace = namespace
        self._timeout = timeout_seconds
        self._max_response_bytes = max_response_bytes
        # Identity only: the size bound then holds for what is read, not for what a decompressor makes of it.
        headers = {"Content-Type": "application/json", "X-Namespace": namespace, "Accept-Encoding": "identity"}
        if auth:
            headers["Authorization"] = auth
        self._http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout_seconds),
            transport=transport,
            follow_redirects=False,
            # Settings come from `Settings` alone: no proxy or CA bundle from the environment.
            trust_env=False,
        )

    async def __aenter__(self) -> CodecClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """The decoded payloads, in order, one for each of `payloads`, in one request."""
        return await self._call("decode", payloads)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """The encoded payloads, in order, one for each of `payloads`, in one request."""
        return await self._call("encode", payloads)

    async def _call(self, operation: str, payloads: Sequence[Payload]) -> list[Payload]:
        if not payloads:
            return []
        body = payloads_json(payloads)
        started = time.perf_counter()
        try:
            # httpx's timeout bounds each phase (connect, each read...); this bounds the whole call,
            # so a server that answers a byte at a time does not hold the request.
            async with asyncio.timeout(self._timeout):
                answer = await self._post(f"{self.endpoint}/{operation}", body)
            decoded = _parse(answer, expected=len(payloads))
        except (_Unavailable, TimeoutError, httpx.HTTPError) as err:
            backend_call_done(BACKEND, operation, started, failed=True)
            reason = str(err) if isinstance(err, _Unavailable) else _describe(err)
            log.warning(
                "codec server %s could not %s %d payload(s): %s", self.endpoint, operation, len(payloads), reason
            )
            raise BackendUnavailable(f"The codec server could not {operation}: {reason}", backend=BACKEND) from err
        backend_call_done(BACKEND, operation, started, failed=False)
        return decoded

    async def _post(self, url: str, body: bytes) -> bytes:
        async with self._http.stream("POST", url, content=body) as response:
            if not response.is_success:
                raise _Unavailable(f"it answered {response.status_code}")
            if response.headers.get("content-encoding", "identity").lower() != "identity":
                raise _Unavailable("its answer is compressed, though identity was asked for")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self._max_response_bytes:
                raise _Unavailable(f"its answer of {declared} bytes exceeds {self._max_response_bytes}")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > self._max_response_bytes:
                    raise _Unavailable(f"its answer exceeds {self._max_response_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)


def _describe(err: BaseException) -> str:
    # The exception's class says what happened (refused, timed out...); its text may quote the server.
    return "no answer in time" if isinstance(err, TimeoutError) else type(err).__name__


def _parse(answer: bytes, *, expected: int) -> list[Payload]:
    """The payloads of a `{"payloads": [...]}` answer in proto JSON (bytes as base64, standard or
    URL-safe alphabet, padding optional); `_Unavailable` for anything else."""
    try:
        document: Any = orjson.loads(answer)
    except orjson.JSONDecodeError:
        raise _Unavailable("its answer is not JSON") from None
    items = document.get("payloads") if isinstance(document, dict) else None
    if not isinstance(items, list):
        raise _Unavailable('its answer has no "payloads" list')
    if len(items) != expected:
        # Counted before any is built: a wrong answer of many tiny items costs nothing to refuse.
        raise _Unavailable(f"it answered {len(items)} payload(s) for {expected}")
    try:
        return [payload_of(item) for item in items]
    except ValueError:  # binascii.Error is one
        raise _Unavailable("its answer holds a malformed payload") from None


class RemoteCodec(PayloadCodec):
    """A `CodecClient` as temporalio's `PayloadCodec` (`DataConverter(payload_codec=RemoteCodec(c))`).

    Each `decode` or `encode` of the converter is one request: fine for a value at a time, wasteful
    for a history (prefer `decoded_events`). Encoding goes to the server's `/encode`, so a client
    built with it can still send signals."""

    def __init__(self, client: CodecClient) -> None:
        super().__init__()
        self.client = client

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return await self.client.encode(payloads)

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return await self.client.decode(payloads)


def payloads_in(message: Message, out: list[Payload] | None = None) -> list[Payload]:
    """Every `Payload` held in `message`, at any depth (inputs, results, memo fields, failure
    details...), except search attributes and headers. The list holds the messages themselves:
    `CopyFrom` on one changes `message`."""
    found = [] if out is None else out
    for field, value in message.ListFields():
        kind = field.message_type
        if kind is None or kind.full_name in _SKIPPED_MESSAGES:
            continue
        if kind.GetOptions().map_entry:
            value_field = kind.fields_by_name["value"]
            if value_field.message_type is not None:
                _collect(value_field.message_type.full_name, value.values(), found)
        elif field.is_repeated:
            _collect(kind.full_name, value, found)
        else:
            _collect(kind.full_name, (value,), found)
    return found


def _collect(type_name: str, messages: Iterable[Any], found: list[Payload]) -> None:
    if type_name in _SKIPPED_MESSAGES:
        return
    for item in messages:
        if type_name == _PAYLOAD:
            found.append(item)
        else:
            payloads_in(item, found)


def apply_encoded_failure_attributes(message: Message) -> None:
    """Put back, in every `Failure` of `message` (at any depth, causes included), the message and
    stack trace a worker moved into `encoded_attributes` (a data converter with
    `encode_common_attributes`, so that the codec encrypts them too), once that payload is decoded
    into JSON; a failure left `Encoded failure` otherwise. As temporalio's failure converter does."""
    for field, value in message.ListFields():
        kind = field.message_type
        if kind is None or kind.full_name in _SKIPPED_MESSAGES or kind.full_name == _PAYLOAD:
            continue
        if kind.GetOptions().map_entry:
            value_type = kind.fields_by_name["value"].message_type
            items: Iterable[Any] = value.values() if value_type is not None else ()
        else:
            items = value if field.is_repeated else (value,)
        for item in items:
            if isinstance(item, Failure):
                _apply_attributes(item)
            if isinstance(item, Message):
                apply_encoded_failure_attributes(item)


def _apply_attributes(failure: Failure) -> None:
    if not failure.HasField("encoded_attributes"):
        return
    attributes = failure.encoded_attributes
    if attributes.metadata.get("encoding") != _JSON_PLAIN:
        return  # still encoded (the codec server could not decode it): leave the failure as it is
    try:
        document: Any = orjson.loads(attributes.data)
    except orjson.JSONDecodeError:
        return
    if isinstance(document, dict):
        if isinstance(document.get("message"), str):
            failure.message = document["message"]
        if isinstance(document.get("stack_trace"), str):
            failure.stack_trace = document["stack_trace"]


async def decode_in_place(codec: CodecClient, messages: Iterable[Message]) -> None:
    """Decode every payload of `messages` (see `payloads_in`) in one request, replacing each where
    it is."""
    found: list[Payload] = []
    for message in messages:
        payloads_in(message, found)
    await _replace(codec, found)


async def _replace(codec: CodecClient, found: list[Payload]) -> None:
    decoded = await codec.decode(found)
    for payload, plain in zip(found, decoded, strict=True):
        payload.CopyFrom(plain)


async def decoded_events(
    events: AsyncIterable[HistoryEvent],
    codec: CodecClient,
    *,
    batch_events: int = DEFAULT_BATCH_EVENTS,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
) -> AsyncIterator[HistoryEvent]:
    """`events`, with their payloads decoded: one request per `batch_events` events (a history page)
    or per `batch_bytes` of payloads estimated as base64, whichever comes first (an event is never
    split, so one larger than `batch_bytes` goes alone)."""
    batch: list[HistoryEvent] = []
    found: list[Payload] = []
    size = 0

    async def flush() -> list[HistoryEvent]:
        nonlocal batch, found, size
        await _replace(codec, found)
        done, batch, found, size = batch, [], [], 0
        return done

    async for event in events:
        held = payloads_in(event)
        held_size = sum(p.ByteSize() for p in held) * 4 // 3
        if batch and size + held_size > batch_bytes:
            for done in await flush():
                yield done
        batch.append(event)
        found += held
        size += held_size
        # A full page goes at once, before the next page is fetched: the caller may stop there.
        if len(batch) >= batch_events:
            for done in await flush():
                yield done
    if batch:
        for done in await flush():
            yield done
