"""Temporal connection options come from `temporalio.envconfig` (its variable names and its TOML
profile file), the project's former TLS names still work for a release, and the worker waits for
Temporal. The connect arguments are computed, nothing connects."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
from temporalio.service import TLSConfig

from core import temporal_connection
from core.settings import Settings, SettingsError
from core.temporal_connection import connect_config
from workloads.worker import connect_when_up

PROFILES = """
[profile.default]
address = "file-default:7233"
namespace = "from-file"

[profile.cloud]
address = "acme.tmprl.cloud:7233"
namespace = "acme.a1b2c"
api_key = "file-key"

[profile.cloud.tls]
server_name = "acme.tmprl.cloud"
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """Where the tests' profile file goes; absent until a test writes it (so no developer's own
    profile file is ever read)."""
    return tmp_path / "temporal.toml"


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, Path]:
    files = {name: tmp_path / f"{name}.pem" for name in ("cert", "key", "ca", "other")}
    for name, path in files.items():
        path.write_bytes(name.upper().encode())
    return files


def connect_args(config_file: Path, **env: str) -> dict[str, object]:
    return dict(connect_config(Settings.from_env({"TEMPORAL_CONFIG_FILE": str(config_file), **env})))


def test_without_configuration_a_plain_connection_to_the_local_server(config_file: Path) -> None:
    assert connect_args(config_file) == {"target_host": "127.0.0.1:7233", "namespace": "default"}


def test_the_standard_variables_address_namespace_api_key_and_tls(config_file: Path) -> None:
    env = {"TEMPORAL_ADDRESS": "temporal.internal:7233", "TEMPORAL_NAMESPACE": "prod"}
    assert connect_args(config_file, **env) == {"target_host": "temporal.internal:7233", "namespace": "prod"}
    # An API key turns TLS on (Temporal Cloud), unless TLS is explicitly off.
    assert connect_args(config_file, **env, TEMPORAL_API_KEY="k") == {
        "target_host": "temporal.internal:7233",
        "namespace": "prod",
        "api_key": "k",
        "tls": True,
    }
    assert connect_args(config_file, TEMPORAL_API_KEY="k", TEMPORAL_TLS="false")["tls"] is False
    assert connect_args(config_file, TEMPORAL_TLS="1")["tls"] == TLSConfig()  # the system's CAs
    assert "tls" not in connect_args(config_file, TEMPORAL_TLS="")  # empty counts as unset


def test_mtls_reads_the_pem_files_the_standard_variables_name(config_file: Path, pem: dict[str, Path]) -> None:
    tls = connect_args(
        config_file,
        TEMPORAL_TLS_CLIENT_CERT_PATH=str(pem["cert"]),
        TEMPORAL_TLS_CLIENT_KEY_PATH=str(pem["key"]),
        TEMPORAL_TLS_SERVER_CA_CERT_PATH=str(pem["ca"]),
        TEMPORAL_TLS_SERVER_NAME="temporal.internal",
    )["tls"]
    assert tls == TLSConfig(
        client_cert=b"CERT", client_private_key=b"KEY", server_root_ca_cert=b"CA", domain="temporal.internal"
    )


def test_the_former_tls_names_are_deprecated_aliases_of_the_standard_ones(
    config_file: Path, pem: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    aliases = {
        "TEMPORAL_TLS_CERT": str(pem["cert"]),
        "TEMPORAL_TLS_KEY": str(pem["key"]),
        "TEMPORAL_TLS_CA": str(pem["ca"]),
    }
    with caplog.at_level(logging.WARNING, logger="core.settings"):
        tls = connect_args(config_file, **aliases)["tls"]
    assert tls == TLSConfig(client_cert=b"CERT", client_private_key=b"KEY", server_root_ca_cert=b"CA")
    assert [record.getMessage() for record in caplog.records] == [
        f"{alias} is deprecated and will be removed in the next release: set {standard} instead"
        for alias, standard in (
            ("TEMPORAL_TLS_CERT", "TEMPORAL_TLS_CLIENT_CERT_PATH"),
            ("TEMPORAL_TLS_KEY", "TEMPORAL_TLS_CLIENT_KEY_PATH"),
            ("TEMPORAL_TLS_CA", "TEMPORAL_TLS_SERVER_CA_CERT_PATH"),
        )
    ]


def test_the_standard_name_wins_over_its_alias(
    config_file: Path, pem: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    both = {"TEMPORAL_TLS_CERT": str(pem["other"]), "TEMPORAL_TLS_CLIENT_CERT_PATH": str(pem["cert"])}
    tls = connect_args(config_file, **both)["tls"]
    assert isinstance(tls, TLSConfig) and tls.client_cert == b"CERT"
    # Certificate data given inline is the standard name too.
    inline = connect_args(config_file, TEMPORAL_TLS_CERT=str(pem["other"]), TEMPORAL_TLS_CLIENT_CERT_DATA="INLINE")
    assert isinstance(inline["tls"], TLSConfig) and inline["tls"].client_cert == b"INLINE"
    assert "TEMPORAL_TLS_CLIENT_CERT_PATH or TEMPORAL_TLS_CLIENT_CERT_DATA is set too, and is used" in caplog.text


def test_a_profile_file_and_the_profile_it_names(config_file: Path) -> None:
    config_file.write_text(PROFILES, encoding="utf-8")
    assert connect_args(config_file) == {"target_host": "file-default:7233", "namespace": "from-file"}
    assert connect_args(config_file, TEMPORAL_PROFILE="cloud") == {
        "target_host": "acme.tmprl.cloud:7233",
        "namespace": "acme.a1b2c",
        "api_key": "file-key",
        "tls": TLSConfig(domain="acme.tmprl.cloud"),
    }


def test_variables_override_the_profile_field_by_field(config_file: Path) -> None:
    config_file.write_text(PROFILES, encoding="utf-8")
    settings = Settings.from_env(
        {"TEMPORAL_CONFIG_FILE": str(config_file), "TEMPORAL_PROFILE": "cloud", "TEMPORAL_API_KEY": "env-key"}
    )
    assert (settings.temporal_address, settings.temporal_namespace) == ("acme.tmprl.cloud:7233", "acme.a1b2c")
    assert connect_config(settings)["api_key"] == "env-key"
    assert connect_args(config_file, TEMPORAL_ADDRESS="elsewhere:7233")["target_host"] == "elsewhere:7233"


def test_the_settings_address_and_namespace_are_the_ones_connected_to(config_file: Path) -> None:
    # `dev` and the tests replace the address; the profile's other options stay.
    config_file.write_text(PROFILES, encoding="utf-8")
    settings = Settings.from_env({"TEMPORAL_CONFIG_FILE": str(config_file), "TEMPORAL_PROFILE": "cloud"})
    config = connect_config(replace(settings, temporal_address="127.0.0.1:17233", temporal_namespace="n"))
    assert (config["target_host"], config["namespace"], config["api_key"]) == ("127.0.0.1:17233", "n", "file-key")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TEMPORAL_PROFILE": "nope"}, r"TEMPORAL_PROFILE.*Profile 'nope' not found"),
        ({"TEMPORAL_TLS": "yes"}, r"TEMPORAL_TLS must be 1 or 0 \(true or false\), not 'yes'"),
        ({"TEMPORAL_TLS_CLIENT_CERT_PATH": "/nonexistent/client.pem"}, r"Temporal TLS file.*/nonexistent/client.pem"),
    ],
)
def test_bad_temporal_configuration_stops_the_start_naming_it(
    config_file: Path, env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({"TEMPORAL_CONFIG_FILE": str(config_file), **env})


def test_a_malformed_profile_file_stops_the_start_naming_it(config_file: Path) -> None:
    config_file.write_text("address = = 1", encoding="utf-8")
    with pytest.raises(SettingsError, match=rf"TEMPORAL_CONFIG_FILE: {config_file}\): .*TOML parse error"):
        Settings.from_env({"TEMPORAL_CONFIG_FILE": str(config_file)})


async def test_the_worker_waits_for_temporal_instead_of_exiting(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing listening yet, then a proxy that accepts and drops the connection, then the server.
    failures = [
        "Failed client connect: Server connection error: Connection refused",
        "Failed client connect: `get_system_info` call error after connection: Status { code: Cancelled }",
    ]
    attempts: list[str] = []
    client = object()

    async def connect(settings: Settings) -> object:
        attempts.append(settings.temporal_address)
        if len(attempts) <= len(failures):
            raise RuntimeError(failures[len(attempts) - 1])
        return client

    monkeypatch.setattr(temporal_connection, "connect", connect)
    settings = Settings(temporal_address="127.0.0.1:7999")
    assert await connect_when_up(settings, first_delay=0) is client
    assert attempts == ["127.0.0.1:7999"] * 3
    assert [r.getMessage() for r in caplog.records] == [
        f"Temporal at 127.0.0.1:7999 is not reachable ({failure}); retrying in 0.0 s" for failure in failures
    ]


async def test_the_worker_does_not_wait_out_a_refused_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    async def connect(settings: Settings) -> object:
        raise RuntimeError("Failed client connect: Unauthenticated: invalid API key")

    monkeypatch.setattr(temporal_connection, "connect", connect)
    with pytest.raises(RuntimeError, match="invalid API key"):
        await connect_when_up(Settings(), first_delay=0)
