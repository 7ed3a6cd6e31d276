"""Token verification: what is accepted, what is refused, and the principal it yields."""

from __future__ import annotations

import socket
import time
from dataclasses import replace

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from core.errors import BackendUnavailable
from core.settings import Settings
from core.tokens import mint_token
from web.auth import TokenVerifier, principal_from_claims

SECRET = "unit-test-secret-" + "x" * 64  # long enough for HS512 too


@pytest.fixture
def settings() -> Settings:
    return replace(
        Settings(), jwt_secret=SECRET, jwt_public_key=None, jwks_url=None, jwt_audience=None, jwt_issuer=None
    )


def test_dev_token_round_trips_to_a_principal(settings: Settings) -> None:
    token = mint_token(SECRET, user="u1", project="p1", permissions=["workflow:read"], kind="apikey")
    claims = TokenVerifier(settings).verify(token)
    assert claims is not None
    principal = principal_from_claims(claims)
    assert principal is not None
    assert (principal.user_id, principal.project_id, principal.ref) == ("u1", "p1", "apikey:u1")
    assert principal.permissions == frozenset({"workflow:read"})


def _claims(**extra: object) -> dict[str, object]:
    return {"sub": "u1", "project": {"id": "p1"}, "exp": int(time.time()) + 60, **extra}


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("not-a-jwt", id="malformed"),
        pytest.param(
            jwt.encode(_claims(), "another-secret-that-is-long-enough-too", algorithm="HS256"), id="wrong-signature"
        ),
        pytest.param(jwt.encode(_claims(), "", algorithm="none"), id="alg-none"),
        pytest.param(jwt.encode(_claims(exp=int(time.time()) - 3600), SECRET, algorithm="HS256"), id="expired"),
        pytest.param(jwt.encode({"sub": "u1"}, SECRET, algorithm="HS256"), id="no-exp"),
        pytest.param(jwt.encode(_claims(), SECRET, algorithm="HS512"), id="algorithm-not-allowed"),
    ],
)
def test_refused_tokens(settings: Settings, token: str) -> None:
    assert TokenVerifier(settings).verify(token) is None


def _raw_token(payload: bytes, key: str = SECRET) -> str:
    """An HS256 token over exactly `payload` (PyJWT's encoder would not write NaN or a huge int)."""
    import base64
    import hashlib
    import hmac

    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    signed = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(payload)
    return (signed + b"." + b64(hmac.new(key.encode(), signed, hashlib.sha256).digest())).decode()


LATER = int(time.time()) + 600


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"exp": str(LATER)}, id="exp-string"),
        pytest.param({"exp": LATER, "nbf": "0"}, id="nbf-string"),
        pytest.param({"exp": LATER, "iat": "0"}, id="iat-string"),
        pytest.param({"exp": LATER, "iat": True}, id="iat-true"),
        pytest.param({"exp": LATER, "iat": False}, id="iat-false"),
        pytest.param({"exp": LATER, "nbf": None}, id="nbf-null"),
        pytest.param({"exp": LATER, "iat": None}, id="iat-null"),
        pytest.param({"exp": LATER, "iat": [0]}, id="iat-array"),
        pytest.param({"exp": LATER, "nbf": {"t": 0}}, id="nbf-object"),
        pytest.param({"exp": 2**53 + 1}, id="exp-beyond-2^53"),
    ],
)
def test_dates_that_are_not_numeric_dates_are_refused(settings: Settings, claims: dict[str, object]) -> None:
    """RFC 7519: exp, nbf and iat are JSON numbers. PyJWT alone accepts "1999999999" and true."""
    token = jwt.encode({"sub": "u1", "project": {"id": "p1"}, **claims}, SECRET, algorithm="HS256")
    assert TokenVerifier(settings).verify(token) is None


@pytest.mark.parametrize("exp", [b"NaN", b"Infinity", b"1" + b"0" * 400])
def test_non_finite_or_huge_exp_is_refused(settings: Settings, exp: bytes) -> None:
    token = _raw_token(b'{"sub":"u1","project":{"id":"p1"},"exp":' + exp + b"}")
    assert TokenVerifier(settings).verify(token) is None


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": LATER},
        {"exp": float(LATER) + 0.5, "iat": int(time.time()) - 10, "nbf": float(int(time.time()) - 10)},
        {"exp": LATER, "iat": 0, "nbf": 0},
    ],
)
def test_numeric_dates_as_integers_or_fractions_are_accepted(settings: Settings, claims: dict[str, object]) -> None:
    token = jwt.encode({"sub": "u1", "project": {"id": "p1"}, **claims}, SECRET, algorithm="HS256")
    assert TokenVerifier(settings).verify(token) is not None


def test_leeway_accepts_small_clock_skew(settings: Settings) -> None:
    token = jwt.encode(_claims(exp=int(time.time()) - 5), SECRET, algorithm="HS256")
    assert TokenVerifier(settings).verify(token) is not None


def test_audience_and_issuer_are_checked_when_configured(settings: Settings) -> None:
    strict = replace(settings, jwt_audience="workflow-runs", jwt_issuer="https://issuer.example")
    good = mint_token(SECRET, user="u", project="p", audience="workflow-runs", issuer="https://issuer.example")
    wrong_aud = mint_token(SECRET, user="u", project="p", audience="other", issuer="https://issuer.example")
    no_iss = mint_token(SECRET, user="u", project="p", audience="workflow-runs")
    verifier = TokenVerifier(strict)
    assert verifier.verify(good) is not None
    assert verifier.verify(wrong_aud) is None
    assert verifier.verify(no_iss) is None


def test_asymmetric_key_and_no_hmac_confusion(settings: Settings) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    verifier = TokenVerifier(replace(settings, jwt_secret=None, jwt_public_key=public_pem.decode()))
    assert verifier.verify(jwt.encode(_claims(), key, algorithm="ES256")) is not None
    # An HS256 token signed with the public key as secret must not pass (algorithm confusion).
    assert verifier.verify(jwt.encode(_claims(), SECRET, algorithm="HS256")) is None


def test_claims_without_user_give_no_principal() -> None:
    assert principal_from_claims({"project": {"id": "p"}}) is None
    principal = principal_from_claims({"sub": "s", "user_id": "u", "permissions": "not-a-list"})
    assert principal is not None
    assert principal.user_id == "u"
    assert principal.project_id is None
    assert principal.permissions == frozenset()


def test_jwks_keys_are_fetched_and_cached(settings: Settings) -> None:
    """RS256 tokens verified with keys from a JWKS endpoint (a real HTTP server on loopback)."""
    import http.server
    import json
    import threading

    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    body = json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]}).encode()
    fetches: list[str] = []

    class Jwks(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fetches.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    server = http.server.HTTPServer(("127.0.0.1", 0), Jwks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
        verifier = TokenVerifier(replace(settings, jwt_secret=None, jwks_url=url))
        token = jwt.encode(_claims(), key, algorithm="RS256", headers={"kid": "k1"})
        assert verifier.verify(token) is not None
        assert verifier.verify(token) is not None
        assert len(fetches) == 1  # cached
        assert verifier.verify(jwt.encode(_claims(), SECRET, algorithm="HS256")) is None
    finally:
        server.shutdown()
        server.server_close()


def test_verified_tokens_are_remembered_until_they_expire(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = TokenVerifier(settings)
    checks: list[str] = []
    verify_signature = verifier._verify

    def counted(token: str) -> dict[str, object] | None:
        checks.append(token)
        return verify_signature(token)

    monkeypatch.setattr(verifier, "_verify", counted)
    token = mint_token(SECRET, user="u1", project="p1", ttl_seconds=60)
    assert verifier.verify(token) is not None
    assert verifier.verify(token) is not None
    assert len(checks) == 1  # the second answer came from the cache
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)  # past `exp`: checked again
    verifier.verify(token)
    assert len(checks) == 2
    assert verifier.verify("garbage") is None
    assert "garbage" not in verifier._verified


def test_an_unreachable_jwks_is_unavailable_not_unauthenticated(settings: Settings) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    url = f"http://127.0.0.1:{closed_port()}/jwks"
    verifier = TokenVerifier(replace(settings, jwt_secret=None, jwks_url=url))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(_claims(), key, algorithm="RS256", headers={"kid": "k1"})
    with pytest.raises(BackendUnavailable) as unavailable:
        verifier.verify(token)
    assert unavailable.value.backend == "jwks"  # answered with the API's sentence for the key server
    assert verifier.verify("not.a.jwt") is None  # garbage is refused without asking the key server


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
