"""How every process of the project connects to Temporal: the local dev server, a self-hosted
cluster with (m)TLS, or Temporal Cloud with an API key, all from the settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from temporalio.client import Client
from temporalio.service import TLSConfig

from server.settings import Settings


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def tls_config(settings: Settings) -> TLSConfig | bool:
    """TLS when asked for, or implied by a client certificate or an API key (Temporal Cloud)."""
    if settings.temporal_tls_cert or settings.temporal_tls_ca:
        return TLSConfig(
            client_cert=_read(settings.temporal_tls_cert),
            client_private_key=_read(settings.temporal_tls_key),
            server_root_ca_cert=_read(settings.temporal_tls_ca),
        )
    return settings.temporal_tls or settings.temporal_api_key is not None


async def connect(settings: Settings, **options: Any) -> Client:
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        tls=tls_config(settings),
        api_key=settings.temporal_api_key,
        **options,
    )
