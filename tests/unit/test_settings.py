"""`Settings(...)` is plain data; `Settings.from_env` reads every variable, refuses invalid values
naming the variable, and resolves the dev JWT secret."""

from __future__ import annotations

import base64
import stat
from dataclasses import fields
from pathlib import Path

import pytest

from core.settings import (
    Settings,
    SettingsError,
    create_dev_codec_key,
    create_dev_jwt_secret,
    dev_codec_key_path,
    dev_jwt_secret_path,
)

# A value other than the default for every setting (the Temporal ones are tested with envconfig).
EVERY_VARIABLE = {
    "HOST": "10.0.0.5",
    "PORT": "9000",
    "TEMPORAL_ADDRESS": "temporal.internal:7233",
    "TEMPORAL_NAMESPACE": "prod",
    "TEMPORAL_API_KEY": "key",
    "TEMPORAL_TASK_QUEUE": "queue",
    "REDIS_URL": "redis://redis.internal:6379/1",
    "JWT_SECRET": "s",
    "JWT_PUBLIC_KEY": "PEM",
    "JWKS_URL": "https://issuer/jwks",
    "JWT_AUDIENCE": "aud",
    "JWT_ISSUER": "iss",
    "JWT_LEEWAY_SECONDS": "5",
    "VALIDATE_RESPONSES": "1",
    "FAST_LANE": "0",
    "MAX_BODY_BYTES": "1",
    "SSE_HEARTBEAT_SECONDS": "1",
    "SSE_RETRY_MS": "1",
    "SSE_SEND_TIMEOUT_SECONDS": "1",
    "BACKEND_TIMEOUT_SECONDS": "1",
    "MAX_STREAMS_PER_PRINCIPAL": "1",
    "MAX_STREAMS_PER_PROCESS": "1",
    "SHUTDOWN_TIMEOUT_SECONDS": "1",
    "API_URL": "http://api/v1",
    "DATA_DIR": "/srv/data",
    "MAX_HEADER_BYTES": "1",
    "HEADER_TIMEOUT_SECONDS": "1",
    "BODY_TIMEOUT_SECONDS": "1",
    "KEEPALIVE_TIMEOUT_SECONDS": "1",
    "MAX_CONNECTIONS": "1",
    "MAX_UPDATE_BYTES_PER_RUN": "1",
    "POST_AFTER_CLOSE_SECONDS": "1",
    "MAX_HISTORY_BYTES": "1",
    "REDIS_MAXMEMORY": "2gb",
    "REDIS_APPENDFSYNC": "everysec",
    "PAGE_TOKEN_SECRET": "p",
    "RATE_LIMIT_TEMPORAL_PER_SECOND": "0.5",
    "RATE_LIMIT_TEMPORAL_BURST": "1",
    "RATE_LIMIT_UPDATES_PER_SECOND": "0",
    "RATE_LIMIT_UPDATES_BURST": "1",
    "NOT_FOUND_CACHE_SECONDS": "0",
    "VISIBILITY_WAIT_SECONDS": "0.5",
    "MAX_VISIBILITY_WAITS_PER_PROCESS": "1",
    "CORS_ORIGINS": "https://console.example.com",
    "TEMPORAL_CODEC_ENDPOINT": "https://codec.internal/{namespace}",
    "TEMPORAL_CODEC_AUTH": "Bearer codec",
    "CODEC_TIMEOUT_SECONDS": "0.5",
    "CODEC_MAX_RESPONSE_BYTES": "1",
    "CODEC_KEY": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    "CODEC_KEY_ID": "k1",
    "SAMPLES_ENCRYPT": "1",
    "CODEC_CORS_ORIGINS": "http://localhost:8233",
    "CODEC_MAX_BODY_BYTES": "1",
    "REDIS_CLUSTER": "1",
    "REDIS_CLUSTER_GROUPS": "16",
    "REDIS_MIN_REPLICAS": "1",
    "REDIS_WAIT_TIMEOUT_MS": "500",
    "SHARED_STREAM_LIMITS": "1",
    "METRICS_PORT": "9100",
    "METRICS_HOST": "10.0.0.6",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
    "OTEL_TRACES_EXPORTER": "otlp",
}


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An environment that names no Temporal profile file that exists, and an empty data dir."""
    return {"TEMPORAL_CONFIG_FILE": str(tmp_path / "absent.toml"), "DATA_DIR": str(tmp_path / "data")}


def test_settings_built_in_code_do_not_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9999")
    monkeypatch.setenv("REDIS_URL", "redis://elsewhere/0")
    assert Settings().port == 8000
    assert Settings(port=1).redis_url == "redis://127.0.0.1:6379/0"


def test_from_env_reads_every_setting(env: dict[str, str]) -> None:
    settings = Settings.from_env({**env, **EVERY_VARIABLE})
    defaults = Settings()
    unchanged = [f.name for f in fields(Settings) if getattr(settings, f.name) == getattr(defaults, f.name)]
    assert unchanged == []
    assert (settings.port, settings.fast_lane, settings.redis_appendfsync) == (9000, False, "everysec")
    assert settings.rate_limit_temporal_per_second == 0.5


def test_from_env_without_variables_is_the_defaults(env: dict[str, str]) -> None:
    assert Settings.from_env(env) == Settings(data_dir=env["DATA_DIR"], set_in_environment=frozenset({"DATA_DIR"}))


def test_an_empty_variable_counts_as_unset(env: dict[str, str]) -> None:
    assert Settings.from_env({**env, "PORT": "", "REDIS_URL": "", "FAST_LANE": ""}) == Settings.from_env(env)


def test_the_metrics_endpoint_stays_on_loopback_whatever_host_the_api_binds(env: dict[str, str]) -> None:
    # It has no authentication: exposed only when METRICS_HOST itself says so.
    assert Settings.from_env({**env, "HOST": "10.0.0.5"}).metrics_host == "127.0.0.1"
    assert Settings.from_env({**env, "METRICS_HOST": "::"}).metrics_host == "::"


def test_api_url_follows_the_port_unless_set(env: dict[str, str]) -> None:
    assert Settings.from_env({**env, "PORT": "9001"}).api_url == "http://127.0.0.1:9001/api/v1"
    assert Settings.from_env({**env, "PORT": "9001", "API_URL": "http://x/v1"}).api_url == "http://x/v1"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("PORT", "abc", "PORT must be a whole number, 0 or more, not 'abc'"),
        ("PORT", "70000", r"PORT must be a port number \(0 to 65535\), not 70000"),
        ("MAX_CONNECTIONS", "-1", "MAX_CONNECTIONS must be a whole number, 0 or more, not '-1'"),
        ("JWT_LEEWAY_SECONDS", "1.5", "JWT_LEEWAY_SECONDS must be a whole number, 0 or more, not '1.5'"),
        ("NOT_FOUND_CACHE_SECONDS", "soon", "NOT_FOUND_CACHE_SECONDS must be a number, 0 or more, not 'soon'"),
        ("RATE_LIMIT_UPDATES_PER_SECOND", "inf", "RATE_LIMIT_UPDATES_PER_SECOND must be a number, 0 or more"),
        ("VISIBILITY_WAIT_SECONDS", "-1", "VISIBILITY_WAIT_SECONDS must be a number, 0 or more, not '-1'"),
        ("VISIBILITY_WAIT_SECONDS", "5s", "VISIBILITY_WAIT_SECONDS must be a number, 0 or more, not '5s'"),
        ("VISIBILITY_WAIT_SECONDS", "30.5", "VISIBILITY_WAIT_SECONDS must be 30 or less, not '30.5'"),
        (
            "MAX_VISIBILITY_WAITS_PER_PROCESS",
            "1.5",
            "MAX_VISIBILITY_WAITS_PER_PROCESS must be a whole number, 0 or more, not '1.5'",
        ),
        ("FAST_LANE", "yes", r"FAST_LANE must be 1 or 0 \(true or false\), not 'yes'"),
        ("REDIS_APPENDFSYNC", "sometimes", "REDIS_APPENDFSYNC must be one of always, everysec, no, not 'sometimes'"),
        # An origin as browsers send it, or it would never match: no path or slash, lower case, no default port.
        ("CORS_ORIGINS", "https://app.example.com/", "CORS_ORIGINS must be .* not 'https://app.example.com/'"),
        ("CORS_ORIGINS", "https://App.example.com", "CORS_ORIGINS must be .* not 'https://App.example.com'"),
        ("CORS_ORIGINS", "https://a.example.com:443", "CORS_ORIGINS must be .* not 'https://a.example.com:443'"),
        ("CORS_ORIGINS", "app.example.com", "CORS_ORIGINS must be .* not 'app.example.com'"),
        ("CORS_ORIGINS", "null", "CORS_ORIGINS must be .* not 'null'"),
        ("CORS_ORIGINS", "https://a.example.com,,https://b.example.com", "CORS_ORIGINS must be .* not ''"),
        ("CORS_ORIGINS", "*, https://a.example.com", r"CORS_ORIGINS must be \* alone"),
        ("TEMPORAL_CODEC_ENDPOINT", "codec.internal:8081", "TEMPORAL_CODEC_ENDPOINT must be an http or https URL"),
        ("TEMPORAL_CODEC_ENDPOINT", "grpc://codec.internal", "TEMPORAL_CODEC_ENDPOINT must be an http or https URL"),
        ("TEMPORAL_CODEC_ENDPOINT", "http://:8081", "TEMPORAL_CODEC_ENDPOINT must be an http or https URL"),
        ("TEMPORAL_CODEC_ENDPOINT", "http://h:port", "TEMPORAL_CODEC_ENDPOINT must be an http or https URL"),
        ("TEMPORAL_CODEC_ENDPOINT", "http://h/?ns=1", "TEMPORAL_CODEC_ENDPOINT must be an http or https URL"),
        ("CODEC_TIMEOUT_SECONDS", "0", "CODEC_TIMEOUT_SECONDS must be a number above 0, not '0'"),
        ("CODEC_TIMEOUT_SECONDS", "-1", "CODEC_TIMEOUT_SECONDS must be a number, 0 or more, not '-1'"),
        ("CODEC_MAX_BODY_BYTES", "8M", "CODEC_MAX_BODY_BYTES must be a whole number, 0 or more, not '8M'"),
        ("SAMPLES_ENCRYPT", "yes", r"SAMPLES_ENCRYPT must be 1 or 0 \(true or false\), not 'yes'"),
        ("REDIS_CLUSTER", "yes", r"REDIS_CLUSTER must be 1 or 0 \(true or false\), not 'yes'"),
        ("METRICS_PORT", "70000", r"METRICS_PORT must be a port number \(0 to 65535\), not 70000"),
        (
            "CODEC_CORS_ORIGINS",
            "https://ui.example.com/",
            "CODEC_CORS_ORIGINS must be .* not 'https://ui.example.com/'",
        ),
    ],
)
def test_an_invalid_value_is_refused_naming_its_variable(
    env: dict[str, str], name: str, value: str, message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({**env, name: value})


def test_flags_take_envconfigs_spellings(env: dict[str, str]) -> None:
    assert Settings.from_env({**env, "VALIDATE_RESPONSES": "TRUE", "FAST_LANE": "false"}).validate_responses
    assert not Settings.from_env({**env, "FAST_LANE": "False"}).fast_lane


def test_the_dev_secret_file_is_the_jwt_secret_when_no_key_is_configured(env: dict[str, str]) -> None:
    assert Settings.from_env(env).jwt_secret is None
    secret = create_dev_jwt_secret(env["DATA_DIR"])
    assert Settings.from_env(env).jwt_secret == secret
    assert Settings.from_env({**env, "JWT_SECRET": "explicit"}).jwt_secret == "explicit"
    # A configured public key or key server means tokens are verified with those, not the dev secret.
    assert Settings.from_env({**env, "JWT_PUBLIC_KEY": "PEM"}).jwt_secret is None
    assert Settings.from_env({**env, "JWKS_URL": "https://issuer/jwks"}).jwt_secret is None


def test_the_dev_secret_is_created_once_readable_by_its_owner_only(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "new" / "data")
    secret = create_dev_jwt_secret(data_dir)
    assert len(secret) >= 64
    assert create_dev_jwt_secret(data_dir) == secret
    assert stat.S_IMODE(dev_jwt_secret_path(data_dir).stat().st_mode) == 0o600


def test_the_variables_set_are_known_apart_from_defaults(env: dict[str, str]) -> None:
    """`dev` starts its own Redis unless REDIS_URL names one, even one equal to the default."""
    chosen = Settings.from_env({**env, "REDIS_URL": Settings.redis_url, "API_URL": ""}).set_in_environment
    assert "REDIS_URL" in chosen and "API_URL" not in chosen


def test_cors_origins_are_a_list_of_origins_or_star(env: dict[str, str]) -> None:
    assert Settings.from_env(env).cors_origins == ()
    listed = Settings.from_env(
        {**env, "CORS_ORIGINS": "https://a.example.com, http://localhost:5173,http://[::1]:8080"}
    )
    assert listed.cors_origins == ("https://a.example.com", "http://localhost:5173", "http://[::1]:8080")
    assert Settings.from_env({**env, "CORS_ORIGINS": " * "}).cors_origins == ("*",)


def test_the_codec_endpoint_keeps_its_namespace_template_and_loses_a_trailing_slash(env: dict[str, str]) -> None:
    endpoint = "http://127.0.0.1:8081/{namespace}/"
    assert Settings.from_env({**env, "TEMPORAL_CODEC_ENDPOINT": endpoint}).temporal_codec_endpoint == endpoint[:-1]
    # Not a Temporal client option: envconfig takes the TEMPORAL_* variables and ignores these two.
    settings = Settings.from_env({**env, "TEMPORAL_CODEC_ENDPOINT": endpoint, "TEMPORAL_CODEC_AUTH": "Bearer x"})
    assert settings.temporal_profile == Settings.from_env(env).temporal_profile


def test_the_codec_secrets_stay_out_of_the_settings_repr(env: dict[str, str]) -> None:
    key, auth = "c2VjcmV0LWtleS1ieXRlcy0zMi1sb25nLXh4eHh4eHg=", "Bearer codec-token-value"
    text = repr(Settings.from_env({**env, "CODEC_KEY": key, "TEMPORAL_CODEC_AUTH": auth}))
    assert key not in text and auth not in text


def test_the_dev_codec_key_file_is_the_key_unless_codec_key_is_set(env: dict[str, str]) -> None:
    assert Settings.from_env(env).codec_key is None
    key = create_dev_codec_key(env["DATA_DIR"])
    assert Settings.from_env(env).codec_key == key
    assert Settings.from_env({**env, "CODEC_KEY": "explicit"}).codec_key == "explicit"


def test_the_dev_codec_key_is_32_random_bytes_created_once_readable_by_its_owner_only(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "data")
    key = create_dev_codec_key(data_dir)
    assert len(base64.b64decode(key, validate=True)) == 32
    assert create_dev_codec_key(data_dir) == key
    assert stat.S_IMODE(dev_codec_key_path(data_dir).stat().st_mode) == 0o600
    assert create_dev_codec_key(str(tmp_path / "other")) != key


def test_traces_are_on_only_when_an_exporter_is_configured() -> None:
    assert not Settings().tracing
    assert Settings(otel_exporter_otlp_endpoint="http://collector:4318").tracing
    assert Settings(otel_traces_exporter="console").tracing
    assert not Settings(otel_exporter_otlp_endpoint="http://collector:4318", otel_traces_exporter="none").tracing
