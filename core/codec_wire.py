"""Payloads as Temporal's remote codec protocol writes them: `{"payloads": [{"metadata": {name:
base64}, "data": base64}, ...]}`, the body of `POST /encode` and `/decode` and of their answers.

Shared by the codec server (`workloads/codec_server.py`) and the API's client of one
(`backends/codec_client.py`), so both read and write the protocol the same way.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import orjson
from temporalio.api.common.v1 import Payload


def payloads_json(payloads: Sequence[Payload]) -> bytes:
    """The protocol's JSON body holding `payloads`."""
    return orjson.dumps(
        {
            "payloads": [
                {"metadata": {name: _base64(value) for name, value in p.metadata.items()}, "data": _base64(p.data)}
                for p in payloads
            ]
        }
    )


def payload_of(item: Any) -> Payload:
    """One payload of the protocol's list; ValueError when `item` is not one. Base64 is read in
    either alphabet, padded or not (Temporal's Go and TypeScript SDKs write it differently)."""
    if not isinstance(item, dict):
        raise ValueError("a payload must be an object")
    metadata = item.get("metadata", {})
    data = item.get("data", "")
    if not isinstance(metadata, dict) or not isinstance(data, str):
        raise ValueError("a payload's metadata must be an object and its data a string")
    if not all(isinstance(value, str) for value in metadata.values()):
        raise ValueError("a payload's metadata values must be strings")
    return Payload(metadata={name: _unbase64(value) for name, value in metadata.items()}, data=_unbase64(data))


def _unbase64(text: str) -> bytes:
    text = text.replace("-", "+").replace("_", "/")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _base64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")
