"""How handlers reach the request's principal and the backends.

Handlers declare a `token_info` parameter (Connexion fills it from `server.auth.decode_token`) and
call `backends()` for the adapters the lifespan built; nothing else is global. (The fast lane,
outside Connexion, reads the same two from the request's lifespan state and passes them in.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from connexion import request

from backends.protocol import Principal, RunsBackend, UpdatesBackend
from server.settings import Settings


@dataclass(frozen=True)
class Backends:
    runs: RunsBackend
    updates: UpdatesBackend
    settings: Settings


def backends() -> Backends:
    state_backends: Backends = request.state.backends
    return state_backends


def principal_of(token_info: dict[str, Any]) -> Principal:
    principal: Principal = token_info["principal"]
    return principal
