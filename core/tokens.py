"""Development tokens: HS256 JWTs with the live service's claim layout, for `workflow-runs token`,
the sample workers, the tests and the benchmarks. (Verification is the HTTP layer's: `web.auth`.)"""

from __future__ import annotations

import time
from typing import Any

import jwt

DEV_PERMISSIONS = ("workflow:read", "workflow:run", "workflow:admin")


def mint_token(
    secret: str,
    *,
    user: str,
    project: str,
    account: str | None = None,
    permissions: tuple[str, ...] | list[str] = DEV_PERMISSIONS,
    ttl_seconds: int = 3600,
    kind: str = "user",
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """A development HS256 token with the live service's claim layout (`sub`, `type`, `account`,
    `project`, `permissions`)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": user,
        "user_id": user,
        "type": kind,
        "project": {"id": project, "name": project},
        "account": {"id": account or f"acct-{project}", "name": account or f"acct-{project}"},
        "permissions": list(permissions),
        "iat": now,
        "exp": now + ttl_seconds,
    }
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")
