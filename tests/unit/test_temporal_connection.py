"""Connection settings for a TLS cluster or Temporal Cloud, and the worker's patience."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from temporalio.service import TLSConfig

from backends import temporal_connection
from backends.temporal_connection import tls_config
from server.settings import Settings
from workloads.worker import connect_when_up


def test_plain_by_default_tls_when_asked_or_with_an_api_key() -> None:
    base = replace(Settings(), temporal_api_key=None, temporal_tls=False, temporal_tls_cert=None, temporal_tls_ca=None)
    assert tls_config(base) is False
    assert tls_config(replace(base, temporal_tls=True)) is True
    assert tls_config(replace(base, temporal_api_key="key")) is True


def test_mtls_reads_the_pem_files(tmp_path: Path) -> None:
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_bytes(b"CERT")
    key.write_bytes(b"KEY")
    config = tls_config(
        replace(Settings(), temporal_tls_cert=str(cert), temporal_tls_key=str(key), temporal_tls_ca=None)
    )
    assert isinstance(config, TLSConfig)
    assert (config.client_cert, config.client_private_key, config.server_root_ca_cert) == (b"CERT", b"KEY", None)


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
    settings = replace(Settings(), temporal_address="127.0.0.1:7999")
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
