"""Bearer JWT verification and the principal it yields.

Connexion calls `decode_token` (wired into the runtime view of the document by `web.app`) for
every operation, and the fast lane calls `token_info`. Returning None makes Connexion answer 401,
which `web.errors` turns into the JSON error body with `WWW-Authenticate: Bearer`; keys that
cannot be fetched from JWKS_URL are a 503.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, TypeGuard

import jwt

from core.errors import BackendUnavailable
from core.principals import Principal
from core.settings import Settings

# A fixed allow-list: never `none`, never an algorithm the configured key was not meant for.
HMAC_ALGORITHMS = ["HS256"]
ASYMMETRIC_ALGORITHMS = ["RS256", "ES256"]

VERIFIED_CACHE_SIZE = 10_000
# RFC 7519 NumericDate claims. PyJWT reads them with `int(...)`, so it takes "1999999999" (a string)
# and `true` (a bool) for numbers: a token carrying either is refused here instead.
NUMERIC_DATE_CLAIMS = ("exp", "nbf", "iat")
# Beyond 2^53 seconds a number is not exact in every JSON reader (nor convertible to a float at all
# past ~1e308): no real token needs a date 285 million years away.
MAX_NUMERIC_DATE = 2**53

log = logging.getLogger(__name__)


class TokenVerifier:
    """Verifies tokens with the key material the settings name: JWT_SECRET (HS256), or
    JWT_PUBLIC_KEY / JWKS_URL (RS256, ES256). JWKS keys are fetched by PyJWT's client, which caches
    them; the fetch is blocking, so it runs in a worker thread (see `token_info`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._jwks = (
            jwt.PyJWKClient(settings.jwks_url, cache_keys=True, lifespan=300, timeout=settings.backend_timeout_seconds)
            if settings.jwks_url
            else None
        )
        self._verified: dict[str, tuple[dict[str, Any], float]] = {}
        if not (settings.jwt_secret or settings.jwt_public_key or self._jwks):
            raise RuntimeError("no JWT key configured: set JWT_SECRET, JWT_PUBLIC_KEY or JWKS_URL")

    def _key_and_algorithms(self, token: str) -> tuple[Any, list[str]]:
        if self._jwks is not None:
            return self._jwks.get_signing_key_from_jwt(token).key, ASYMMETRIC_ALGORITHMS
        if self.settings.jwt_public_key:
            return self.settings.jwt_public_key, ASYMMETRIC_ALGORITHMS
        return self.settings.jwt_secret, HMAC_ALGORITHMS

    def verify(self, token: str) -> dict[str, Any] | None:
        """The token's claims, or None when it is malformed, badly signed, expired, not for us,
        or names no user (see `info`)."""
        info = self.info(token)
        return None if info is None else info["claims"]

    def info(self, token: str) -> dict[str, Any] | None:
        """The token's info, `{"sub", "principal", "claims"}`, or None when the token is not
        acceptable.

        A client sends the same token on every request, and verifying a signature costs about as
        much as the rest of a small request: the info of a verified token is remembered until the
        token expires (bounded; only acceptable tokens are kept, so garbage cannot fill it).
        Raises `BackendUnavailable` when the keys of JWKS_URL cannot be fetched."""
        cached = self._verified.get(token)
        if cached is not None:
            if time.time() < cached[1]:
                return cached[0]
            del self._verified[token]
        claims = self._verify(token)
        principal = None if claims is None else principal_from_claims(claims)
        if claims is None or principal is None:
            return None
        info = {"sub": principal.user_id, "principal": principal, "claims": claims}
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.pop(next(iter(self._verified)))  # the oldest entry
        self._verified[token] = (info, float(claims["exp"]))
        return info

    def _verify(self, token: str) -> dict[str, Any] | None:
        try:
            key, algorithms = self._key_and_algorithms(token)
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self.settings.jwt_audience,
                issuer=self.settings.jwt_issuer,
                leeway=self.settings.jwt_leeway_seconds,
                options={"require": ["exp"], "verify_aud": self.settings.jwt_audience is not None},
            )
        except jwt.PyJWKClientConnectionError as exc:
            # The key server is down: the token may well be valid, so this is ours to retry (503),
            # not the caller's fault (401).
            log.warning("the signing keys of JWKS_URL could not be fetched: %s", exc)
            raise BackendUnavailable("JWKS_URL did not answer.", backend="jwks") from exc
        except (jwt.PyJWTError, ValueError):
            return None
        if not all(is_numeric_date(claims[name]) for name in NUMERIC_DATE_CLAIMS if name in claims):
            return None
        return claims


def is_numeric_date(value: object) -> TypeGuard[int | float]:
    """An RFC 7519 NumericDate: a JSON number of seconds (not a string, a boolean or null)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return (math.isfinite(value) if isinstance(value, float) else True) and abs(value) <= MAX_NUMERIC_DATE


def principal_from_claims(claims: dict[str, Any]) -> Principal | None:
    user = claims.get("user_id") or claims.get("sub")
    if not isinstance(user, str) or not user:
        return None
    project, account, permissions = claims.get("project"), claims.get("account"), claims.get("permissions", [])
    return Principal(
        user_id=user,
        kind=str(claims.get("type") or "user"),
        project_id=_id_of(project),
        account_id=_id_of(account),
        permissions=frozenset(p for p in permissions if isinstance(p, str))
        if isinstance(permissions, list)
        else frozenset(),
        expires_at=float(exp) if is_numeric_date(exp := claims.get("exp")) else None,
    )


def _id_of(claim: object) -> str | None:
    if isinstance(claim, dict) and isinstance(claim.get("id"), str) and claim["id"]:
        return str(claim["id"])
    return None


async def decode_token(token: str, request: Any) -> dict[str, Any] | None:
    """Connexion's `x-bearerInfoFunc`: the claims plus the principal handlers use, or None (401)."""
    return await token_info(request.state.verifier, token)


async def token_info(verifier: TokenVerifier, token: str) -> dict[str, Any] | None:
    """The token's claims and principal, or None when the token is not acceptable. Verification may
    fetch JWKS keys (blocking I/O), so that case runs in a worker thread."""
    if verifier.settings.jwks_url:
        import anyio.to_thread

        info: dict[str, Any] | None = await anyio.to_thread.run_sync(verifier.info, token)
        return info
    return verifier.info(token)
