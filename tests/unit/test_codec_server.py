"""The codec server: Temporal's remote codec protocol on /encode and /decode (also under a namespace
segment), its Authorization check, CORS for the Web UI's origins, its body limit, and JSON errors
that echo nothing of what was sent."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from temporalio.api.common.v1 import Payload

from workloads.codec import ENCODING, KEY_ID_KEY, EncryptionCodec, key_id_of
from workloads.codec_server import CORS_REQUEST_HEADERS, MAX_PAYLOADS_PER_REQUEST, create_codec_app

KEY = bytes(range(32))
AUTH = "Bearer codec-test-secret"
UI = "http://localhost:8233"
OTHER = "https://evil.example.net"
LIMIT = 4096
JSON_HEADERS = {"Content-Type": "application/json", "Authorization": AUTH, "X-Namespace": "default"}


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def wire(payload: Payload) -> dict[str, Any]:
    return {"metadata": {k: b64(v) for k, v in payload.metadata.items()}, "data": b64(payload.data)}


def unwire(item: dict[str, Any]) -> Payload:
    metadata = {k: base64.b64decode(v) for k, v in item.get("metadata", {}).items()}
    return Payload(metadata=metadata, data=base64.b64decode(item.get("data", "")))


def body(*payloads: Payload) -> bytes:
    return orjson.dumps({"payloads": [wire(p) for p in payloads]})


PLAIN = Payload(metadata={"encoding": b"json/plain"}, data=b'{"documentId":"d-1"}')


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    app = create_codec_app(KEY, auth=AUTH, cors_origins=[UI], max_body_bytes=LIMIT)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://codec") as client:
        yield client


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    document: dict[str, Any] = response.json()
    assert document["status"] == status and document["message"]
    return document


@pytest.mark.parametrize("prefix", ["", "/default", "/another-namespace"])
async def test_encode_then_decode_round_trips(http: httpx.AsyncClient, prefix: str) -> None:
    encoded = await http.post(f"{prefix}/encode", content=body(PLAIN, PLAIN), headers=JSON_HEADERS)
    assert encoded.status_code == 200
    sealed = [unwire(item) for item in encoded.json()["payloads"]]
    assert [p.metadata["encoding"] for p in sealed] == [ENCODING, ENCODING]
    assert all(p.metadata[KEY_ID_KEY] == key_id_of(KEY).encode() for p in sealed)
    assert b"d-1" not in sealed[0].data

    decoded = await http.post(f"{prefix}/decode", content=body(*sealed), headers=JSON_HEADERS)
    assert decoded.status_code == 200
    assert [unwire(item) for item in decoded.json()["payloads"]] == [PLAIN, PLAIN]


async def test_what_the_workers_codec_writes_the_server_decodes(http: httpx.AsyncClient) -> None:
    sealed = await EncryptionCodec(KEY).encode([PLAIN])
    decoded = await http.post("/decode", content=body(*sealed), headers=JSON_HEADERS)
    assert [unwire(item) for item in decoded.json()["payloads"]] == [PLAIN]


async def test_payloads_it_cannot_decrypt_come_back_as_they_were(http: httpx.AsyncClient) -> None:
    foreign = (await EncryptionCodec(bytes(32)).encode([PLAIN]))[0]
    mine = (await EncryptionCodec(KEY).encode([PLAIN]))[0]
    decoded = await http.post("/decode", content=body(foreign, mine, PLAIN), headers=JSON_HEADERS)
    assert decoded.status_code == 200
    assert [unwire(item) for item in decoded.json()["payloads"]] == [foreign, PLAIN, PLAIN]


async def test_an_empty_batch_answers_an_empty_batch(http: httpx.AsyncClient) -> None:
    answer = await http.post("/decode", content=b'{"payloads": []}', headers=JSON_HEADERS)
    assert answer.status_code == 200 and answer.json() == {"payloads": []}


@pytest.mark.parametrize("given", [None, "Bearer wrong", AUTH + "x", "codec-test-secret"])
async def test_a_request_without_the_configured_authorization_is_refused(
    http: httpx.AsyncClient, given: str | None
) -> None:
    headers = {"Content-Type": "application/json", "Origin": UI}
    if given is not None:
        headers["Authorization"] = given
    answer = await http.post("/decode", content=body(PLAIN), headers=headers)
    error_of(answer, 401)
    assert answer.headers["www-authenticate"].startswith("Bearer")
    # The page of an allowed origin can read the refusal.
    assert answer.headers["access-control-allow-origin"] == UI
    assert "codec-test-secret" not in answer.text


async def test_without_auth_configured_no_authorization_is_needed() -> None:
    app = create_codec_app(KEY, auth=None, cors_origins=[], max_body_bytes=LIMIT)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://codec") as http:
        answer = await http.post("/decode", content=body(PLAIN), headers={"Content-Type": "application/json"})
    assert answer.status_code == 200


async def test_a_preflight_from_the_ui_origin_allows_x_namespace_and_authorization(http: httpx.AsyncClient) -> None:
    answer = await http.options(
        "/default/decode",
        headers={
            "Origin": UI,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-namespace,authorization",
        },
    )
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == UI
    assert "POST" in answer.headers["access-control-allow-methods"]
    allowed = {h.strip().lower() for h in answer.headers["access-control-allow-headers"].split(",")}
    assert {"x-namespace", "authorization", "content-type"} <= allowed
    assert {h.lower() for h in CORS_REQUEST_HEADERS} <= allowed
    assert "access-control-allow-credentials" not in answer.headers


async def test_a_preflight_from_another_origin_is_refused(http: httpx.AsyncClient) -> None:
    answer = await http.options(
        "/decode",
        headers={
            "Origin": OTHER,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-namespace",
        },
    )
    document = error_of(answer, 400)
    assert "origin" in document["message"]
    assert "access-control-allow-origin" not in answer.headers


async def test_a_post_from_another_origin_carries_no_cors_header(http: httpx.AsyncClient) -> None:
    answer = await http.post("/decode", content=body(PLAIN), headers={**JSON_HEADERS, "Origin": OTHER})
    assert "access-control-allow-origin" not in answer.headers


async def test_a_post_from_the_ui_origin_is_readable_by_its_page(http: httpx.AsyncClient) -> None:
    answer = await http.post("/decode", content=body(PLAIN), headers={**JSON_HEADERS, "Origin": UI})
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == UI


async def test_a_body_over_the_limit_is_refused_with_413(http: httpx.AsyncClient) -> None:
    big = Payload(metadata={"encoding": b"json/plain"}, data=b"x" * LIMIT)
    document = error_of(await http.post("/encode", content=body(big), headers=JSON_HEADERS), 413)
    assert str(LIMIT) in document["message"]


async def test_a_chunked_body_over_the_limit_is_refused_with_413(http: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"payloads": [{"data": "'
        for _ in range(LIMIT // 512 + 1):
            yield b"A" * 512
        yield b'"}]}'

    error_of(await http.post("/encode", content=chunks(), headers=JSON_HEADERS), 413)


@pytest.mark.parametrize(
    "sent",
    [
        b"not json",
        b"[1, 2]",
        b'{"payloads": {"data": "AA=="}}',
        b'{"payloads": [{"data": "%%%not-base64%%%"}]}',
        b'{"payloads": [{"metadata": {"encoding": 5}}]}',
        b'{"payloads": ["secret-token-xyz"]}',
    ],
)
async def test_a_malformed_body_is_refused_with_400_and_not_echoed(http: httpx.AsyncClient, sent: bytes) -> None:
    answer = await http.post("/decode", content=sent, headers=JSON_HEADERS)
    error_of(answer, 400)
    assert "secret-token-xyz" not in answer.text and "not-base64" not in answer.text


async def test_a_body_that_is_not_json_by_its_media_type_is_refused(http: httpx.AsyncClient) -> None:
    answer = await http.post("/decode", content=body(PLAIN), headers={**JSON_HEADERS, "Content-Type": "text/plain"})
    error_of(answer, 415)


async def test_a_body_without_a_media_type_is_refused_so_no_page_posts_it_without_a_preflight(
    http: httpx.AsyncClient,
) -> None:
    headers = {name: value for name, value in JSON_HEADERS.items() if name.lower() != "content-type"}
    error_of(await http.post("/decode", content=body(PLAIN), headers=headers), 415)


async def test_more_payloads_than_a_request_may_carry_are_refused_before_any_is_built() -> None:
    app = create_codec_app(KEY, auth=None, cors_origins=[], max_body_bytes=1_000_000)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://codec")
    many = b'{"payloads": [' + b",".join([b"{}"] * (MAX_PAYLOADS_PER_REQUEST + 1)) + b"]}"
    document = error_of(await http.post("/decode", content=many, headers=JSON_HEADERS), 413)
    assert str(MAX_PAYLOADS_PER_REQUEST) in document["message"]
    at_the_bound = b'{"payloads": [' + b",".join([b"{}"] * MAX_PAYLOADS_PER_REQUEST) + b"]}"
    assert len((await http.post("/decode", content=at_the_bound, headers=JSON_HEADERS)).json()["payloads"]) == (
        MAX_PAYLOADS_PER_REQUEST
    )


async def test_other_paths_and_methods_answer_json_errors(http: httpx.AsyncClient) -> None:
    error_of(await http.post("/a/b/decode", content=body(PLAIN), headers=JSON_HEADERS), 404)
    wrong_method = await http.get("/decode", headers=JSON_HEADERS)
    error_of(wrong_method, 405)
    assert "POST" in wrong_method.headers["allow"]
