"""Every setting the service reads from the environment, in one place (documented in README)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else default


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


def _opt(name: str) -> str | None:
    return os.environ.get(name) or None


@dataclass(frozen=True)
class Settings:
    host: str = field(default_factory=lambda: os.environ.get("HOST", "127.0.0.1"))
    port: int = field(default_factory=lambda: _int("PORT", 8000))
    temporal_address: str = field(default_factory=lambda: os.environ.get("TEMPORAL_ADDRESS", "127.0.0.1:7233"))
    temporal_namespace: str = field(default_factory=lambda: os.environ.get("TEMPORAL_NAMESPACE", "default"))
    # Temporal Cloud or a TLS cluster: an API key, and/or mTLS with PEM file paths.
    temporal_api_key: str | None = field(default_factory=lambda: _opt("TEMPORAL_API_KEY"))
    temporal_tls: bool = field(default_factory=lambda: os.environ.get("TEMPORAL_TLS", "0") == "1")
    temporal_tls_cert: str | None = field(default_factory=lambda: _opt("TEMPORAL_TLS_CERT"))
    temporal_tls_key: str | None = field(default_factory=lambda: _opt("TEMPORAL_TLS_KEY"))
    temporal_tls_ca: str | None = field(default_factory=lambda: _opt("TEMPORAL_TLS_CA"))
    temporal_task_queue: str = field(
        default_factory=lambda: os.environ.get("TEMPORAL_TASK_QUEUE", "workflow-runs-samples")
    )
    redis_url: str = field(default_factory=lambda: os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    jwt_secret: str | None = field(default_factory=lambda: _opt("JWT_SECRET"))
    jwt_public_key: str | None = field(default_factory=lambda: _opt("JWT_PUBLIC_KEY"))
    jwks_url: str | None = field(default_factory=lambda: _opt("JWKS_URL"))
    jwt_audience: str | None = field(default_factory=lambda: _opt("JWT_AUDIENCE"))
    jwt_issuer: str | None = field(default_factory=lambda: _opt("JWT_ISSUER"))
    jwt_leeway_seconds: int = field(default_factory=lambda: _int("JWT_LEEWAY_SECONDS", 30))
    # Response validation costs a lot on large payloads: on in dev, tests and CI, off in production.
    validate_responses: bool = field(default_factory=lambda: os.environ.get("VALIDATE_RESPONSES", "0") == "1")
    # Three hot operations served without Connexion's middlewares, same answers (server/fast_lane.py).
    fast_lane: bool = field(default_factory=lambda: os.environ.get("FAST_LANE", "1") == "1")
    max_body_bytes: int = field(default_factory=lambda: _int("MAX_BODY_BYTES", 1_048_576))
    sse_heartbeat_seconds: int = field(default_factory=lambda: _int("SSE_HEARTBEAT_SECONDS", 15))
    sse_retry_ms: int = field(default_factory=lambda: _int("SSE_RETRY_MS", 3000))
    sse_send_timeout_seconds: int = field(default_factory=lambda: _int("SSE_SEND_TIMEOUT_SECONDS", 30))
    backend_timeout_seconds: int = field(default_factory=lambda: _int("BACKEND_TIMEOUT_SECONDS", 10))
    # Open update streams are the one resource a client holds for as long as it likes: capped per
    # principal (its `ref` within its project) and per process, 429 with Retry-After beyond.
    max_streams_per_principal: int = field(default_factory=lambda: _int("MAX_STREAMS_PER_PRINCIPAL", 1000))
    max_streams_per_process: int = field(default_factory=lambda: _int("MAX_STREAMS_PER_PROCESS", 10_000))
    # Seconds uvicorn waits, after SIGTERM, for in-flight requests before cancelling them.
    shutdown_timeout_seconds: int = field(default_factory=lambda: _int("SHUTDOWN_TIMEOUT_SECONDS", 10))
    # The URL the sample workers use to post updates through the API, as the seed says workflows do.
    api_url: str = field(
        default_factory=lambda: os.environ.get("API_URL", f"http://127.0.0.1:{_int('PORT', 8000)}/api/v1")
    )
    data_dir: str = field(default_factory=lambda: os.environ.get("DATA_DIR", ".data"))

    # --- Bounds on what one connection or caller may cost (README, "Limits") ---
    # A request head (request line and headers) larger than this is answered 431 and the connection
    # closed, before more of it is buffered.
    max_header_bytes: int = field(default_factory=lambda: _int("MAX_HEADER_BYTES", 32_768))
    # A request head must arrive whole within this time of the connection opening (or of the previous
    # response on a kept-alive connection once it starts); else the connection is closed.
    header_timeout_seconds: int = field(default_factory=lambda: _int("HEADER_TIMEOUT_SECONDS", 10))
    # A request body must arrive whole within this time of its head; else 408 and the connection closed.
    body_timeout_seconds: int = field(default_factory=lambda: _int("BODY_TIMEOUT_SECONDS", 30))
    # An idle kept-alive connection is closed after this long (uvicorn's timeout_keep_alive).
    keepalive_timeout_seconds: int = field(default_factory=lambda: _int("KEEPALIVE_TIMEOUT_SECONDS", 5))
    # Open connections per process; beyond it a new connection is answered 503 and closed, except
    # for the health checks. Lowered at start-up to what the file-descriptor limit allows.
    max_connections: int = field(default_factory=lambda: _int("MAX_CONNECTIONS", 12_000))
    # Stored updates of one run are bounded in bytes as well as in count (oldest dropped first).
    max_update_bytes_per_run: int = field(default_factory=lambda: _int("MAX_UPDATE_BYTES_PER_RUN", 8_388_608))
    # Updates may still be posted this long after their run closed (late activities); 409 afterwards.
    post_after_close_seconds: int = field(default_factory=lambda: _int("POST_AFTER_CLOSE_SECONDS", 300))
    # Run details render at most this many bytes of history events; the rest is left out and marked.
    max_history_bytes: int = field(default_factory=lambda: _int("MAX_HISTORY_BYTES", 4_194_304))
    # `maxmemory` of the embedded Redis (`noeviction`: a full Redis refuses posts with 503).
    redis_maxmemory: str = field(default_factory=lambda: os.environ.get("REDIS_MAXMEMORY", "1gb"))
    # HMAC key of listing page tokens; every replica must share it. Unset: derived from JWT_SECRET
    # (HS256), else a random key per process (page tokens then only work on the process that issued them).
    page_token_secret: str | None = field(default_factory=lambda: _opt("PAGE_TOKEN_SECRET"))
    # Per-caller token buckets (principal within its project); 0 turns a bucket off. Operations that
    # reach Temporal take from the first: run reads, listings, actions, signals, stream openings,
    # and update reads and posts of a run this process has not seen.
    rate_limit_temporal_per_second: float = field(default_factory=lambda: _float("RATE_LIMIT_TEMPORAL_PER_SECOND", 20))
    rate_limit_temporal_burst: int = field(default_factory=lambda: _int("RATE_LIMIT_TEMPORAL_BURST", 60))
    rate_limit_updates_per_second: float = field(default_factory=lambda: _float("RATE_LIMIT_UPDATES_PER_SECOND", 200))
    rate_limit_updates_burst: int = field(default_factory=lambda: _int("RATE_LIMIT_UPDATES_BURST", 600))
    # "Run not found" answers are remembered this long, so repeated unknown run ids cost Temporal
    # nothing; kept short because a just-started run may not be visible yet.
    not_found_cache_seconds: float = field(default_factory=lambda: _float("NOT_FOUND_CACHE_SECONDS", 2))
