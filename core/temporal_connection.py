"""How every process of the project connects to Temporal (the API, the sample worker, `start`):
the local dev server, a self-hosted cluster with (m)TLS, or Temporal Cloud with an API key, all from
the client profile `Settings.from_env` loaded through `temporalio.envconfig`."""

from __future__ import annotations

from typing import Any

from temporalio.client import Client
from temporalio.envconfig import ClientConnectConfig

from core.settings import Settings


def connect_config(settings: Settings) -> ClientConnectConfig:
    """`Client.connect`'s arguments: the profile's (API key, TLS, gRPC metadata) with the settings'
    address and namespace, which callers such as `dev` and the tests may have replaced."""
    config = settings.temporal_profile.to_client_connect_config()
    config["target_host"] = settings.temporal_address
    config["namespace"] = settings.temporal_namespace
    return config


async def connect(settings: Settings, **options: Any) -> Client:
    return await Client.connect(**connect_config(settings), **options)
