"""Every setting of the service, documented in the README's configuration table.

`Settings` holds plain defaults: `Settings(...)` never reads the environment. `Settings.from_env` is
the one place the environment is read, and it reads every variable, including the Temporal client
options (through `temporalio.envconfig`: its variable names and its TOML profile file), and the dev
JWT secret and codec key that `workflow-runs dev` keeps under the data directory.
"""

from __future__ import annotations

import base64
import logging
import math
import os
import re
import secrets
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from temporalio.envconfig import ClientConfigProfile

log = logging.getLogger(__name__)

APPENDFSYNC_POLICIES = ("always", "everysec", "no")
# The project's former names of the Temporal TLS files, accepted for one more release. Each maps to
# the stem of envconfig's pair `<stem>_PATH` / `<stem>_DATA`; when either is set, it wins.
DEPRECATED_TEMPORAL_ALIASES = {
    "TEMPORAL_TLS_CERT": "TEMPORAL_TLS_CLIENT_CERT",
    "TEMPORAL_TLS_KEY": "TEMPORAL_TLS_CLIENT_KEY",
    "TEMPORAL_TLS_CA": "TEMPORAL_TLS_SERVER_CA_CERT",
}
_TRUE, _FALSE = ("1", "true"), ("0", "false")  # envconfig's spelling of booleans, used for ours too
CODEC_KEY_BYTES = 32  # AES-256 (workloads.codec checks the key itself: core does not import it)


# A post waiting for its run to be listed holds its request open: past this, clients and proxies
# (30 to 60 s is common) give up first.
MAX_VISIBILITY_WAIT_SECONDS = 30.0


class SettingsError(ValueError):
    """The environment holds a value its setting cannot take; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    # Resolved from TEMPORAL_ADDRESS / TEMPORAL_NAMESPACE or the Temporal profile, else these.
    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    # The Temporal client profile as envconfig loaded it (file, then environment): API key, TLS,
    # gRPC metadata. Its address and namespace are the two fields above, which callers may replace.
    temporal_profile: ClientConfigProfile = field(default_factory=ClientConfigProfile)
    temporal_task_queue: str = "workflow-runs-samples"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # JWT_SECRET; from_env falls back to the dev secret file when no key of any kind is configured.
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwks_url: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_seconds: int = 30
    # Response validation costs a lot on large payloads: on in dev, tests and CI, off in production.
    validate_responses: bool = False
    # Three hot operations served without Connexion's middlewares, same answers (web/fast_lane.py).
    fast_lane: bool = True
    max_body_bytes: int = 1_048_576
    sse_heartbeat_seconds: int = 15
    sse_retry_ms: int = 3000
    sse_send_timeout_seconds: int = 30
    backend_timeout_seconds: int = 10
    # Open update streams are the one resource a client holds for as long as it likes: capped per
    # principal (its `ref` within its project) and per process, 429 with Retry-After beyond.
    max_streams_per_principal: int = 1000
    max_streams_per_process: int = 10_000
    # Seconds uvicorn waits, after SIGTERM, for in-flight requests before cancelling them.
    shutdown_timeout_seconds: int = 10
    # The URL the sample workers use to post updates through the API, as the seed says workflows do.
    api_url: str = "http://127.0.0.1:8000/api/v1"
    data_dir: str = ".data"

    # --- Bounds on what one connection or caller may cost (README, "Limits") ---
    # A request head (request line and headers) larger than this is answered 431 and the connection
    # closed, before more of it is buffered.
    max_header_bytes: int = 32_768
    # A request head must arrive whole within this time of the connection opening (or of the previous
    # response on a kept-alive connection once it starts); else the connection is closed.
    header_timeout_seconds: int = 10
    # A request body must arrive whole within this time of its head; else 408 and the connection closed.
    body_timeout_seconds: int = 30
    # An idle kept-alive connection is closed after this long (uvicorn's timeout_keep_alive).
    keepalive_timeout_seconds: int = 5
    # Open connections per process; beyond it a new connection is answered 503 and closed, except
    # for the health checks. Lowered at start-up to what the file-descriptor limit allows.
    max_connections: int = 12_000
    # Stored updates of one run are bounded in bytes as well as in count (oldest dropped first).
    max_update_bytes_per_run: int = 8_388_608
    # Updates may still be posted this long after their run closed (late activities); 409 afterwards.
    post_after_close_seconds: int = 300
    # Run details render at most this many bytes of history events; the rest is left out and marked.
    max_history_bytes: int = 4_194_304
    # `maxmemory` of the embedded Redis (`noeviction`: a full Redis refuses posts with 503).
    redis_maxmemory: str = "1gb"
    # `appendfsync` of the embedded Redis: `always` loses no acknowledged post, even on a crash.
    redis_appendfsync: str = "always"
    # HMAC key of listing page tokens; every replica must share it. Unset: derived from JWT_SECRET
    # (HS256), else a random key per process (page tokens then only work on the process that issued them).
    page_token_secret: str | None = None
    # Per-caller token buckets (principal within its project); 0 turns a bucket off. Operations that
    # reach Temporal take from the first: run reads, listings, actions, signals, stream openings,
    # and update reads and posts of a run this process has not seen.
    rate_limit_temporal_per_second: float = 20
    rate_limit_temporal_burst: int = 60
    rate_limit_updates_per_second: float = 200
    rate_limit_updates_burst: int = 600
    # "Run not found" answers are remembered this long, so repeated unknown run ids cost Temporal
    # nothing; kept short because a just-started run may not be visible yet.
    not_found_cache_seconds: float = 2
    # Temporal's listings (its visibility store) show a run a moment after it starts. An update
    # posted without `workflow_id` finds its run by listing, so a run not listed yet is looked up
    # again, with backoff, for this long before the post is answered 404; 0: answered at once.
    visibility_wait_seconds: float = 5
    # Posts waiting so at once per process; beyond, 429 with Retry-After (each one polls Temporal).
    max_visibility_waits_per_process: int = 100
    # Origins whose pages may call the API from a browser (CORS); empty: no CORS at all, and no
    # middleware for it. ("*",) lets every origin: safe here, as the API reads no cookie and every
    # call needs its bearer token (web/app.py, `cors_middleware`).
    cors_origins: tuple[str, ...] = ()

    # --- Encrypted payloads (workloads/codec.py, workloads/codec_server.py, backends/codec_client.py) ---
    # The codec server the API decodes runs' payloads with (`{namespace}` is replaced by the
    # namespace); unset: payloads are shown as Temporal holds them, at no extra cost.
    temporal_codec_endpoint: str | None = None
    # The Authorization value sent to that codec server (and required by `workflow-runs codec-server`).
    temporal_codec_auth: str | None = field(default=None, repr=False)
    # One call to the codec server, overall; and the largest answer read from it.
    codec_timeout_seconds: float = 5
    codec_max_response_bytes: int = 8_388_608
    # The AES-256 key of the samples' worker, `start` and the codec server, as base64; from_env falls
    # back to the dev key file (`workflow-runs dev` with SAMPLES_ENCRYPT=1 creates it).
    codec_key: str | None = field(default=None, repr=False)
    # The key id written into each encrypted payload; unset: a fingerprint of the key.
    codec_key_id: str | None = None
    # The samples' worker and `workflow-runs start` encrypt every payload (needs CODEC_KEY).
    samples_encrypt: bool = False
    # Origins of the Web UI pages that may call the codec server from a browser (CORS).
    codec_cors_origins: tuple[str, ...] = ()
    # The largest request body the codec server reads (413 beyond).
    codec_max_body_bytes: int = 8_388_608
    # --- Scale: Redis Cluster, worker processes, metrics, traces (docs/operations.md) ---
    # REDIS_URL names one node of a Redis Cluster (redis-py's cluster client finds the others).
    redis_cluster: bool = False
    # Runs' update keys are spread over this many hash-tag groups; a process reads each group it
    # streams from with one connection, so it also bounds the reader connections per process.
    redis_cluster_groups: int = 64
    # A post is acknowledged only once this many replicas hold it (Redis `WAIT`); 503 otherwise.
    redis_min_replicas: int = 0
    # How long a post waits for those replicas before it is answered 503.
    redis_wait_timeout_ms: int = 1000
    # The per-principal stream limit counted across every process through Redis (not per process).
    shared_stream_limits: bool = False
    # The Prometheus `/metrics` endpoint listens on this port, apart from the API; 0: off.
    metrics_port: int = 0
    # ... and on this address, not HOST's: it has no authentication, so it is reachable from another
    # host only when the operator says so here (an API on 0.0.0.0 does not expose it too).
    metrics_host: str = "127.0.0.1"
    # OpenTelemetry traces are exported when either standard variable is set; else no tracing at all.
    otel_exporter_otlp_endpoint: str | None = None
    otel_traces_exporter: str | None = None
    # The variables `from_env` found set (not empty): what the operator chose, as opposed to a default.
    set_in_environment: frozenset[str] = frozenset()

    @property
    def tracing(self) -> bool:
        """Traces are on when the operator configured an exporter (`none` turns them off)."""
        if self.otel_traces_exporter is not None:
            return self.otel_traces_exporter.strip().lower() != "none"
        return self.otel_exporter_otlp_endpoint is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """The settings of `environ` (this process's environment by default); an empty variable
        counts as unset. Raises `SettingsError` naming the first variable whose value is invalid."""
        env = _Env(environ)
        port = env.port("PORT", cls.port)
        data_dir = env.text("DATA_DIR", cls.data_dir)
        temporal = temporal_profile(environ)
        jwt_public_key, jwks_url = env.optional("JWT_PUBLIC_KEY"), env.optional("JWKS_URL")
        jwt_secret = env.optional("JWT_SECRET")
        if not (jwt_secret or jwt_public_key or jwks_url):
            jwt_secret = read_dev_jwt_secret(data_dir)
        return cls(
            host=env.text("HOST", cls.host),
            port=port,
            temporal_address=temporal.address or cls.temporal_address,
            temporal_namespace=temporal.namespace or cls.temporal_namespace,
            temporal_profile=temporal,
            temporal_task_queue=env.text("TEMPORAL_TASK_QUEUE", cls.temporal_task_queue),
            redis_url=env.text("REDIS_URL", cls.redis_url),
            jwt_secret=jwt_secret,
            jwt_public_key=jwt_public_key,
            jwks_url=jwks_url,
            jwt_audience=env.optional("JWT_AUDIENCE"),
            jwt_issuer=env.optional("JWT_ISSUER"),
            jwt_leeway_seconds=env.count("JWT_LEEWAY_SECONDS", cls.jwt_leeway_seconds),
            validate_responses=env.flag("VALIDATE_RESPONSES", cls.validate_responses),
            fast_lane=env.flag("FAST_LANE", cls.fast_lane),
            max_body_bytes=env.count("MAX_BODY_BYTES", cls.max_body_bytes),
            sse_heartbeat_seconds=env.count("SSE_HEARTBEAT_SECONDS", cls.sse_heartbeat_seconds),
            sse_retry_ms=env.count("SSE_RETRY_MS", cls.sse_retry_ms),
            sse_send_timeout_seconds=env.count("SSE_SEND_TIMEOUT_SECONDS", cls.sse_send_timeout_seconds),
            backend_timeout_seconds=env.count("BACKEND_TIMEOUT_SECONDS", cls.backend_timeout_seconds),
            max_streams_per_principal=env.count("MAX_STREAMS_PER_PRINCIPAL", cls.max_streams_per_principal),
            max_streams_per_process=env.count("MAX_STREAMS_PER_PROCESS", cls.max_streams_per_process),
            shutdown_timeout_seconds=env.count("SHUTDOWN_TIMEOUT_SECONDS", cls.shutdown_timeout_seconds),
            api_url=env.text("API_URL", f"http://127.0.0.1:{port}/api/v1"),
            data_dir=data_dir,
            max_header_bytes=env.count("MAX_HEADER_BYTES", cls.max_header_bytes),
            header_timeout_seconds=env.count("HEADER_TIMEOUT_SECONDS", cls.header_timeout_seconds),
            body_timeout_seconds=env.count("BODY_TIMEOUT_SECONDS", cls.body_timeout_seconds),
            keepalive_timeout_seconds=env.count("KEEPALIVE_TIMEOUT_SECONDS", cls.keepalive_timeout_seconds),
            max_connections=env.count("MAX_CONNECTIONS", cls.max_connections),
            max_update_bytes_per_run=env.count("MAX_UPDATE_BYTES_PER_RUN", cls.max_update_bytes_per_run),
            post_after_close_seconds=env.count("POST_AFTER_CLOSE_SECONDS", cls.post_after_close_seconds),
            max_history_bytes=env.count("MAX_HISTORY_BYTES", cls.max_history_bytes),
            redis_maxmemory=env.text("REDIS_MAXMEMORY", cls.redis_maxmemory),
            redis_appendfsync=env.choice("REDIS_APPENDFSYNC", cls.redis_appendfsync, APPENDFSYNC_POLICIES),
            page_token_secret=env.optional("PAGE_TOKEN_SECRET"),
            rate_limit_temporal_per_second=env.rate(
                "RATE_LIMIT_TEMPORAL_PER_SECOND", cls.rate_limit_temporal_per_second
            ),
            rate_limit_temporal_burst=env.count("RATE_LIMIT_TEMPORAL_BURST", cls.rate_limit_temporal_burst),
            rate_limit_updates_per_second=env.rate("RATE_LIMIT_UPDATES_PER_SECOND", cls.rate_limit_updates_per_second),
            rate_limit_updates_burst=env.count("RATE_LIMIT_UPDATES_BURST", cls.rate_limit_updates_burst),
            not_found_cache_seconds=env.rate("NOT_FOUND_CACHE_SECONDS", cls.not_found_cache_seconds),
            visibility_wait_seconds=env.rate(
                "VISIBILITY_WAIT_SECONDS", cls.visibility_wait_seconds, most=MAX_VISIBILITY_WAIT_SECONDS
            ),
            max_visibility_waits_per_process=env.count(
                "MAX_VISIBILITY_WAITS_PER_PROCESS", cls.max_visibility_waits_per_process
            ),
            cors_origins=env.origins("CORS_ORIGINS"),
            temporal_codec_endpoint=env.codec_endpoint("TEMPORAL_CODEC_ENDPOINT"),
            temporal_codec_auth=env.optional("TEMPORAL_CODEC_AUTH"),
            codec_timeout_seconds=env.positive("CODEC_TIMEOUT_SECONDS", cls.codec_timeout_seconds),
            codec_max_response_bytes=env.count("CODEC_MAX_RESPONSE_BYTES", cls.codec_max_response_bytes),
            codec_key=env.optional("CODEC_KEY") or read_dev_codec_key(data_dir),
            codec_key_id=env.optional("CODEC_KEY_ID"),
            samples_encrypt=env.flag("SAMPLES_ENCRYPT", cls.samples_encrypt),
            codec_cors_origins=env.origins("CODEC_CORS_ORIGINS"),
            codec_max_body_bytes=env.count("CODEC_MAX_BODY_BYTES", cls.codec_max_body_bytes),
            redis_cluster=env.flag("REDIS_CLUSTER", cls.redis_cluster),
            redis_cluster_groups=max(1, env.count("REDIS_CLUSTER_GROUPS", cls.redis_cluster_groups)),
            redis_min_replicas=env.count("REDIS_MIN_REPLICAS", cls.redis_min_replicas),
            redis_wait_timeout_ms=env.count("REDIS_WAIT_TIMEOUT_MS", cls.redis_wait_timeout_ms),
            shared_stream_limits=env.flag("SHARED_STREAM_LIMITS", cls.shared_stream_limits),
            metrics_port=env.port("METRICS_PORT", cls.metrics_port),
            metrics_host=env.text("METRICS_HOST", cls.metrics_host),
            otel_exporter_otlp_endpoint=env.optional("OTEL_EXPORTER_OTLP_ENDPOINT"),
            otel_traces_exporter=env.optional("OTEL_TRACES_EXPORTER"),
            set_in_environment=frozenset(env.found),
        )


@dataclass(frozen=True)
class _Env:
    """Typed reads of one environment, each failing with the variable's name and value."""

    environ: Mapping[str, str]
    found: set[str] = field(default_factory=set)  # the names read that were set

    def optional(self, name: str) -> str | None:
        value = self.environ.get(name) or None
        if value is not None:
            self.found.add(name)
        return value

    def text(self, name: str, default: str) -> str:
        return self.optional(name) or default

    def count(self, name: str, default: int) -> int:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            value = -1
        if value < 0:
            raise SettingsError(f"{name} must be a whole number, 0 or more, not {raw!r}")
        return value

    def port(self, name: str, default: int) -> int:
        value = self.count(name, default)
        if value > 65535:
            raise SettingsError(f"{name} must be a port number (0 to 65535), not {value}")
        return value

    def rate(self, name: str, default: float, most: float = math.inf) -> float:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= 0):
            raise SettingsError(f"{name} must be a number, 0 or more, not {raw!r}")
        if value > most:
            raise SettingsError(f"{name} must be {most:g} or less, not {raw!r}")
        return value

    def positive(self, name: str, default: float) -> float:
        value = self.rate(name, default)
        if value <= 0:
            raise SettingsError(f"{name} must be a number above 0, not {self.environ[name]!r}")
        return value

    def codec_endpoint(self, name: str) -> str | None:
        """An http or https URL with a host and nothing after its path, where `{namespace}` may
        stand for the namespace (as the `temporal` CLI's --codec-endpoint takes it)."""
        raw = self.optional(name)
        if raw is None:
            return None
        try:
            url = urllib.parse.urlsplit(raw.replace("{namespace}", "namespace"))
            url.port  # noqa: B018  # raises ValueError for a port that is not a number
        except ValueError:
            url = urllib.parse.urlsplit("")
        if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
            raise SettingsError(
                f"{name} must be an http or https URL such as https://codec.example.com or"
                f" http://127.0.0.1:8081/{{namespace}}, not {raw!r}"
            )
        return raw.rstrip("/")

    def flag(self, name: str, default: bool) -> bool:
        raw = self.optional(name)
        if raw is None:
            return default
        if raw.lower() not in _TRUE + _FALSE:
            raise SettingsError(f"{name} must be 1 or 0 (true or false), not {raw!r}")
        return raw.lower() in _TRUE

    def origins(self, name: str) -> tuple[str, ...]:
        """`*` alone, or a comma-separated list of origins, each exactly as a browser sends it in
        `Origin` (lower case, no path, no default port): anything else would never match, silently."""
        raw = self.optional(name)
        if raw is None:
            return ()
        entries = tuple(entry.strip() for entry in raw.split(","))
        if entries == ("*",):
            return entries
        if "*" in entries:
            raise SettingsError(f"{name} must be * alone (it allows every origin) or a list of origins, not {raw!r}")
        for entry in entries:
            if not _is_origin(entry):
                raise SettingsError(
                    f"{name} must be * or comma-separated origins such as https://app.example.com "
                    f"(scheme://host[:port], lower case, no path, no default port), not {entry!r}"
                )
        return tuple(dict.fromkeys(entries))

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default)
        if value not in choices:
            raise SettingsError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
        return value


# An origin as browsers serialize it (RFC 6454 section 6.2): http or https, a lower-case host name
# (IDNs in their ASCII form), an IPv4 address or a bracketed IPv6 one, and a port other than the
# scheme's default. `null` is refused: any sandboxed page or local file sends it.
_ORIGIN = re.compile(
    r"(?P<scheme>https?)://(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*|\[[0-9a-f:.]+\])"
    r"(?::(?P<port>[1-9][0-9]{0,4}))?"
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _is_origin(value: str) -> bool:
    match = _ORIGIN.fullmatch(value)
    if match is None:
        return False
    port = match["port"]
    return port is None or (int(port) <= 65535 and int(port) != _DEFAULT_PORTS[match["scheme"]])


def temporal_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables envconfig reads (`TEMPORAL_*`, empty ones left out: envconfig would take an
    empty TEMPORAL_TLS for "on"), with the deprecated aliases mapped onto the standard names."""
    env = {name: value for name, value in environ.items() if name.startswith("TEMPORAL_") and value}
    for alias, stem in DEPRECATED_TEMPORAL_ALIASES.items():
        value = env.pop(alias, None)
        if value is None:
            continue
        standard = f"{stem}_PATH"
        overridden = standard in env or f"{stem}_DATA" in env
        # Logged each time the environment is read: once per process, where settings are built once.
        log.warning(
            "%s is deprecated and will be removed in the next release: set %s instead%s",
            alias,
            standard,
            f" ({standard} or {stem}_DATA is set too, and is used)" if overridden else "",
        )
        if not overridden:
            env[standard] = value
    return env


def temporal_profile(environ: Mapping[str, str]) -> ClientConfigProfile:
    """The Temporal client profile, loaded the way Temporal's tools load it: the profile named by
    TEMPORAL_PROFILE (else `default`) of the TOML file at TEMPORAL_CONFIG_FILE (else the platform's
    default location; no file is fine), then the standard TEMPORAL_* variables on top. The TLS
    files it names are read here once (the connection reads them again), so that a missing one
    stops the start-up with its name rather than the first connection."""
    env = temporal_environ(environ)
    tls = env.get("TEMPORAL_TLS")
    if tls is not None and tls.lower() not in _TRUE + _FALSE:
        raise SettingsError(f"TEMPORAL_TLS must be 1 or 0 (true or false), not {tls!r}")
    try:
        profile = ClientConfigProfile.load(override_env_vars=env)
    except RuntimeError as exc:  # envconfig's ConfigError: an unknown profile, a malformed file
        where = env.get("TEMPORAL_CONFIG_FILE", "the default location")
        raise SettingsError(
            f"Temporal client configuration (TEMPORAL_PROFILE, TEMPORAL_CONFIG_FILE: {where}): {exc}"
        ) from exc
    try:
        profile.to_client_connect_config()
    except OSError as exc:
        raise SettingsError(f"Temporal TLS file (TEMPORAL_TLS_* or the profile's tls): {exc}") from exc
    return profile


def dev_jwt_secret_path(data_dir: str) -> Path:
    """Where `workflow-runs dev` keeps the dev JWT secret."""
    return Path(data_dir) / "jwt-secret"


def read_dev_jwt_secret(data_dir: str) -> str | None:
    """The dev JWT secret of `data_dir`, if there is one."""
    try:
        return dev_jwt_secret_path(data_dir).read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def create_dev_jwt_secret(data_dir: str) -> str:
    """The dev JWT secret, generated into `<data_dir>/jwt-secret` (readable by its owner only) when
    there is none yet."""
    path = dev_jwt_secret_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Created with its final mode, never briefly readable by others; O_EXCL: a concurrent
        # `dev` that got there first keeps its secret.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(secrets.token_urlsafe(48))
    secret = read_dev_jwt_secret(data_dir)
    if secret is None:
        raise SettingsError(f"{path} is empty: delete it, and `workflow-runs dev` generates a new secret")
    return secret


def dev_codec_key_path(data_dir: str) -> Path:
    """Where `workflow-runs dev` keeps the codec key of the samples' encrypted payloads."""
    return Path(data_dir) / "codec-key"


def read_dev_codec_key(data_dir: str) -> str | None:
    """The dev codec key of `data_dir`, if there is one."""
    try:
        return dev_codec_key_path(data_dir).read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def create_dev_codec_key(data_dir: str) -> str:
    """The dev codec key (base64 of 32 random bytes), generated into `<data_dir>/codec-key`
    (readable by its owner only) when there is none yet; kept across runs, so that the runs it
    encrypted stay readable."""
    path = dev_codec_key_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # as create_dev_jwt_secret
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(base64.b64encode(secrets.token_bytes(CODEC_KEY_BYTES)).decode("ascii"))
    key = read_dev_codec_key(data_dir)
    if key is None:
        raise SettingsError(f"{path} is empty: delete it, and `workflow-runs dev` generates a new key")
    return key
