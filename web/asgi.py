"""Small ASGI helpers the middlewares and the fast lane share."""

from __future__ import annotations

from connexion.lifecycle import ConnexionResponse
from starlette.types import Message, Receive, Send


async def send_response(send: Send, response: ConnexionResponse) -> None:
    """Send a whole response built by `web.errors` (status, headers, body with its length)."""
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()]
    headers.append((b"content-length", str(len(response.body)).encode()))
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


def replay(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that gives the next app `messages` (already read from the client) first, then
    what `receive` gives."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed
