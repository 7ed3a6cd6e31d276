"""The sample worker: `workflow-runs worker` and `workflow-runs dev` run `run_worker`."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import temporalio.converter
from temporalio.client import Client
from temporalio.converter import DataConverter
from temporalio.worker import Worker

from core import temporal_connection
from core.settings import Settings
from workloads.activities import WorkloadActivities
from workloads.codec import EncryptionCodec, key_from_setting
from workloads.workflows import WORKFLOWS

log = logging.getLogger(__name__)

_USE_SETTINGS = "settings"
# Matched case-insensitively: temporalio names a refused server certificate `InvalidCertificate(...)`.
_PERMANENT_CONNECT_ERRORS = ("unauthenticated", "permissiondenied", "certificate")


def build_activities(settings: Settings, *, api_url: str | None = _USE_SETTINGS) -> WorkloadActivities:
    """The activities wired to the API at `api_url` (default: `settings.api_url`; None: do not post),
    signing their tokens with `settings.jwt_secret` (JWT_SECRET, or the dev secret file)."""
    return WorkloadActivities(
        api_url=settings.api_url if api_url == _USE_SETTINGS else api_url,
        secret=settings.jwt_secret,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
    )


def sample_data_converter(settings: Settings) -> DataConverter:
    """The data converter of the samples' worker and of `workflow-runs start`: temporalio's default,
    with every payload encrypted (workloads/codec.py) when SAMPLES_ENCRYPT is on. Raises
    `CodecKeyError` when encryption is on and CODEC_KEY is unset or not a key."""
    default = temporalio.converter.default()
    if not settings.samples_encrypt:
        return default
    codec = EncryptionCodec(key_from_setting(settings.codec_key or ""), key_id=settings.codec_key_id)
    return dataclasses.replace(default, payload_codec=codec)


def create_worker(client: Client, *, task_queue: str, activities: WorkloadActivities) -> Worker:
    # No interceptors of its own: with tracing on, the client (`core.temporal_connection.connect`)
    # carries temporalio's tracing interceptor, which a worker takes from its client.
    return Worker(client, task_queue=task_queue, workflows=WORKFLOWS, activities=activities.all())


async def connect_when_up(
    settings: Settings, *, first_delay: float = 0.5, max_delay: float = 5.0, **options: Any
) -> Client:
    """Connect to Temporal, waiting for it as long as it takes: a worker started before its server
    (or while it restarts) waits instead of exiting, as the API does. `options` go to
    `Client.connect` (the worker passes its data converter)."""
    delay = first_delay
    while True:
        try:
            return await temporal_connection.connect(settings, **options)
        except RuntimeError as exc:
            # temporalio: "Failed client connect: ..." while nothing answers, or a server (or a
            # proxy in front of it) accepts and drops the connection. A refused API key or
            # certificate will not heal by waiting.
            if any(marker in str(exc).lower() for marker in _PERMANENT_CONNECT_ERRORS):
                raise
            log.warning(
                "Temporal at %s is not reachable (%s); retrying in %.1f s", settings.temporal_address, exc, delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)


async def run_worker(
    settings: Settings,
    *,
    client: Client | None = None,
    task_queue: str | None = None,
    api_url: str | None = _USE_SETTINGS,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the sample worker until `stop` is set (or, without `stop`, until cancelled). A `client`
    given brings its own data converter; one connected here has `sample_data_converter`'s."""
    if client is None:
        client = await connect_when_up(settings, data_converter=sample_data_converter(settings))
    queue = task_queue or settings.temporal_task_queue
    async with build_activities(settings, api_url=api_url) as activities:
        if activities.api_url and not settings.jwt_secret:
            # Read once, at start (`Settings.from_env`): say so rather than skip every post silently.
            log.warning(
                "no JWT_SECRET (nor a dev secret under %s): this worker will not post updates to %s",
                settings.data_dir,
                activities.api_url,
            )
        worker = create_worker(client, task_queue=queue, activities=activities)
        log.info("sample worker polling task queue %s on %s", queue, settings.temporal_address)
        codec = client.data_converter.payload_codec
        if isinstance(codec, EncryptionCodec):
            log.info("payloads encrypted with AES-256-GCM under key id %s", codec.key_id)
        if stop is None:
            await worker.run()
        else:
            async with worker:
                await stop.wait()
