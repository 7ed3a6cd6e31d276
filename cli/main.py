"""`workflow-runs`: the console command (its subcommands and flags are a stable interface).

dev     the embedded stack: Temporal dev server, Redis, sample worker and the API, in the foreground
mock    the API on in-memory backends seeded from the document's examples (no Temporal, no Redis)
serve   the API only, configured from the environment
worker  the sample Temporal worker
token   mint a development JWT
start   start a sample workflow and print {"workflow_id", "run_id"}
codec-server  the codec server of the samples' encrypted payloads (Temporal's remote codec protocol)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import multiprocess as uvicorn_multiprocess

from cli import stack
from core import tracing
from core.settings import (
    Settings,
    SettingsError,
    create_dev_codec_key,
    create_dev_jwt_secret,
    dev_codec_key_path,
    dev_jwt_secret_path,
)
from core.tokens import DEV_PERMISSIONS, mint_token
from web import logs
from web.collector import FullCollections

if TYPE_CHECKING:
    from web.app import BackendsFactory
    from web.metrics import MetricsServer

DEV_TOKEN_SECONDS = 7 * 24 * 3600
CODEC_PORT = 8081
# The commands that encrypt or decrypt with CODEC_KEY, and so need one (`dev` creates its own).
KEY_COMMANDS = ("worker", "start", "codec-server")


def _no_jwt_secret(settings: Settings) -> str:
    path = dev_jwt_secret_path(settings.data_dir)
    return f"no JWT_SECRET set and no {path}: run `workflow-runs dev` first or set JWT_SECRET"


def serve(settings: Settings, *, port: int, backends_factory: BackendsFactory | None = None) -> None:
    """Run the API on `port` under uvicorn until SIGTERM / Ctrl-C, then shut down gracefully: stop
    accepting, end open update streams with `event: end` `server_shutdown` (clients resume elsewhere
    with `Last-Event-ID`), let in-flight requests finish (at most `shutdown_timeout_seconds`), close
    the backends (the app's lifespan) and exit. The app is built by uvicorn, in its loop, from these
    same `settings`: one process, one settings object, and `backends_factory` (the real backends
    when None)."""
    logs.configure()
    metrics = _start_metrics(settings, multiprocess=False)
    server = graceful_server(settings, port=port, backends_factory=backends_factory)
    try:
        with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run does
            server.run()
    finally:
        if metrics is not None:
            metrics.close()
        tracing.shutdown()
    if not server.started:
        sys.exit(STARTUP_FAILURE)  # the app could not start (port taken, bad settings)


class GracefulServer(uvicorn.Server):
    """uvicorn's server, telling the app's open streams first when a stop signal comes: uvicorn
    waits for open connections *before* the lifespan shutdown, so an open stream would otherwise
    hold it for the whole timeout. With `collector`, the process's full garbage collections are
    run on its loop while it serves (web/collector.py)."""

    def __init__(self, config: uvicorn.Config, collector: FullCollections | None = None) -> None:
        super().__init__(config)
        self.collector = collector

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.collector is not None:
            self.collector.start(asyncio.get_running_loop())

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.collector is not None:
            self.collector.stop()
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        from web.app import begin_shutdown

        try:
            # No app yet when the signal comes while it is being built: nothing to tell.
            begin_shutdown(getattr(self.config, "loaded_app", None))
        finally:
            super().handle_exit(sig, frame)


def graceful_server(
    settings: Settings, *, port: int, backends_factory: BackendsFactory | None = None
) -> GracefulServer:
    """The server `serve` runs, and each worker process of `serve_workers`: the bounded transport
    (web/transport.py) built from the settings, the app built by uvicorn's factory call in its own
    loop, the graceful shutdown."""
    from web import transport
    from web.app import create_app

    tracing.setup(settings, service=tracing.API_SERVICE)

    # Every connection holds a file descriptor: take all the hard limit allows, and cap the
    # connections below it (beyond the cap they are answered 503, health checks excepted).
    fd_limit = transport.raise_fd_limit()
    cap = transport.connection_cap(settings.max_connections, fd_limit)
    if cap < settings.max_connections:
        transport.log.warning(
            "MAX_CONNECTIONS lowered from %d to %d: the open-files limit is %d (%d kept for other files)",
            settings.max_connections,
            cap,
            fd_limit,
            transport.FD_RESERVE,
        )
    if cap <= settings.max_streams_per_process:
        transport.log.warning(
            "the connection cap (%d) leaves no room above MAX_STREAMS_PER_PROCESS (%d): raise the open-files limit",
            cap,
            settings.max_streams_per_process,
        )
    limits = transport.Limits(
        max_header_bytes=settings.max_header_bytes,
        header_timeout=settings.header_timeout_seconds,
        body_timeout=settings.body_timeout_seconds,
        max_connections=cap,
        send_timeout=settings.sse_send_timeout_seconds,  # a client that stops reading any answer
    )
    config = uvicorn.Config(
        functools.partial(create_app, settings, backends_factory),
        factory=True,
        host=settings.host,
        port=port,
        http=transport.protocol_class(limits),  # httptools, with the bounds of web/transport.py
        ws="none",  # the API has no WebSocket endpoint: an Upgrade request stays plain HTTP
        server_header=False,
        timeout_keep_alive=settings.keepalive_timeout_seconds,
        access_log=False,  # web.middleware.RequestContext logs requests, with secrets redacted
        log_config=None,
        timeout_graceful_shutdown=settings.shutdown_timeout_seconds,
    )
    # The server runs the full garbage collections, not CPython's rule, which would run one every
    # few seconds under thousands of open streams and stop them all each time (web/collector.py).
    return GracefulServer(config, FullCollections.install())


class WorkerProcess(uvicorn_multiprocess.Process):
    """One worker process of `serve_workers`, under uvicorn's supervisor: in the child it runs
    `graceful_server` (what `serve` runs) on the socket the parent bound. Only the settings and the
    port cross to the child (pickled: spawned processes share no memory); the rest is built there."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], *, settings: Settings, port: int) -> None:
        self.settings = settings
        self.port = port
        super().__init__(config, sockets)

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = graceful_server(self.settings, port=self.port)
        return self._server

    def target(self, sockets: list[socket.socket] | None = None) -> None:
        # In the child. The server first, before the supervisor's health-check thread asks it.
        logs.configure()
        try:
            server = self.server
        except Exception:
            # As a failed start-up: the supervisor then stops, instead of replacing this worker
            # with one that fails the same way every few seconds.
            logging.getLogger("workflow_runs.cli").exception("a worker could not build its server")
            sys.exit(STARTUP_FAILURE)
        try:
            super().target(sockets)
        finally:
            tracing.shutdown()  # the spans still queued in this worker
        if not server.started:
            sys.exit(STARTUP_FAILURE)  # the supervisor then stops every worker and itself


class WorkerSupervisor(uvicorn_multiprocess.Multiprocess):
    """uvicorn's process manager (workers started, health-checked, a dead one replaced, SIGTERM
    passed on to each, SIGHUP replacing each, SIGTTIN / SIGTTOU adding or stopping one) making
    `WorkerProcess`es; with `metrics_dir`, the live-gauge files of a worker that died, was replaced
    or was stopped are marked dead (prometheus-client's multiprocess mode)."""

    def __init__(
        self, config: uvicorn.Config, sockets: list[socket.socket], *, settings: Settings, metrics_dir: str | None
    ) -> None:
        super().__init__(config, sockets)
        self.settings = settings
        self.metrics_dir = metrics_dir

    def run(self) -> None:
        # uvicorn makes its workers through the module's `Process` (four places): ours instead,
        # for this run. The check fails loudly should a uvicorn upgrade rename it.
        namespace = vars(uvicorn_multiprocess)
        original = namespace["Process"]
        assert original is uvicorn_multiprocess.Process
        namespace["Process"] = functools.partial(WorkerProcess, settings=self.settings, port=self.config.port)
        try:
            super().run()
        finally:
            namespace["Process"] = original

    def keep_subprocess_alive(self) -> None:
        with self._marking_gone_workers_dead():
            super().keep_subprocess_alive()

    def handle_signals(self) -> None:
        # SIGHUP replaces every worker and SIGTTOU stops one: they leave as a crashed one does.
        with self._marking_gone_workers_dead():
            super().handle_signals()

    @contextlib.contextmanager
    def _marking_gone_workers_dead(self) -> Iterator[None]:
        """Around a step of uvicorn's that may end workers: with `metrics_dir`, each worker that
        left `processes` is marked dead, so that its live gauges (its open streams) stop counting."""
        before = {process.pid for process in self.processes}
        try:
            yield
        finally:
            gone = before - {process.pid for process in self.processes}
            if self.metrics_dir is not None and gone:
                from prometheus_client import multiprocess

                mark_dead: Callable[[int, str], None] = multiprocess.mark_process_dead  # untyped upstream
                for pid in gone:
                    if pid is not None:
                        mark_dead(pid, self.metrics_dir)

    @property
    def startup_failed(self) -> bool:
        return any(process.exitcode == STARTUP_FAILURE for process in self.processes)


def worker_count(requested: int | None) -> int:
    """The worker processes `serve` runs: `--workers`, else `WEB_CONCURRENCY` as uvicorn reads it
    (its own convention, which process managers and platforms set), else 1."""
    if requested is not None:
        return requested
    return uvicorn.Config("web.app:app_from_env", log_config=None).workers


def serve_workers(settings: Settings, *, port: int, workers: int) -> None:
    """`serve` in `workers` processes under uvicorn's process manager: the parent binds the port
    once and passes the socket to each worker (the kernel spreads connections among them), keeps
    `workers` alive (a worker that dies is replaced), and on SIGTERM / Ctrl-C passes SIGTERM to
    each, which shuts down as `serve` does (its streams end with `server_shutdown`), then exits 0.
    Every count and cap (connections, streams, rate limits, caches) is per worker process.

    Metrics: before anything imports prometheus-client, here or in a worker, the parent points
    `PROMETHEUS_MULTIPROC_DIR` at a fresh temporary directory (removed on exit); the workers
    write their values there and the parent alone serves METRICS_PORT, summing them."""
    metrics_dir = tempfile.mkdtemp(prefix="workflow-runs-metrics-")
    # Spawned workers inherit the environment: set before the first of them starts, and before this
    # process imports prometheus-client (it reads the variable on import).
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        logs.configure()
        config = uvicorn.Config(
            "web.app:app_from_env",  # not used by the workers, which build `graceful_server`
            host=settings.host,
            port=port,
            workers=workers,
            log_config=None,
            timeout_graceful_shutdown=settings.shutdown_timeout_seconds,
        )
        try:
            sock = config.bind_socket()
        except SystemExit:  # uvicorn logged why (the port is taken, say)
            sys.exit(STARTUP_FAILURE)
        metrics = _start_metrics(settings, multiprocess=True)
        supervisor = WorkerSupervisor(config, [sock], settings=settings, metrics_dir=metrics_dir)
        try:
            supervisor.run()
        finally:
            sock.close()
            if metrics is not None:
                metrics.close()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if supervisor.startup_failed:
        sys.exit(STARTUP_FAILURE)


def _start_metrics(settings: Settings, *, multiprocess: bool) -> MetricsServer | None:
    """The `/metrics` endpoint on METRICS_HOST:METRICS_PORT, when the port is set (None otherwise):
    in the one process of `serve`, or in the parent of `serve_workers` (summing the workers')."""
    if not settings.metrics_port:
        return None
    from web.metrics import start_metrics_server

    return start_metrics_server(settings.metrics_host, settings.metrics_port, multiprocess=multiprocess)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> None:
    if not (settings.jwt_secret or settings.jwt_public_key or settings.jwks_url):
        sys.exit(_no_jwt_secret(settings))
    # The port is uvicorn's bind option, not an app setting.
    port = args.port or settings.port
    try:
        workers = worker_count(args.workers)
    except ValueError:
        print("workflow-runs serve: WEB_CONCURRENCY must be a whole number", file=sys.stderr, flush=True)
        sys.exit(2)
    if workers > 1:
        serve_workers(settings, port=port, workers=workers)
    else:
        serve(settings, port=port)


def _dev_port_conflict(
    args: argparse.Namespace, host: str, port: int, *, own_temporal: bool, own_redis: bool, own_codec: bool = False
) -> str | None:
    """The line `dev` exits with when a port it is about to bind is held by another process (the
    first such port), else None. Checked before anything starts: a child that cannot bind would
    otherwise leave the stack talking to whatever already listens there."""
    wanted: list[tuple[str, int, str, str]] = []  # (host, port, what, the two ways out)
    if own_temporal:  # the dev server is headless: its frontend is its only fixed port
        ways = "point TEMPORAL_ADDRESS at that server on purpose, or pick another port with --temporal-port"
        wanted.append((stack.LOCALHOST, args.temporal_port, "Temporal", ways))
        if args.temporal_ui_port is not None:
            ways = "stop that process, or pick another port with --temporal-ui-port"
            wanted.append((stack.LOCALHOST, args.temporal_ui_port, "the Temporal Web UI", ways))
    if own_redis:
        ways = "point REDIS_URL at that server on purpose, or pick another port with --redis-port"
        wanted.append((stack.LOCALHOST, args.redis_port, "Redis", ways))
    if own_codec:
        ways = "point TEMPORAL_CODEC_ENDPOINT at that server on purpose, or pick another port with --codec-port"
        wanted.append((stack.LOCALHOST, args.codec_port, "the codec server", ways))
    wanted.append((host, port, "the API", "stop that process, or pick another port with --port"))
    for bind_host, bind_port, what, ways in wanted:
        if stack.port_in_use(bind_host, bind_port):
            return f"workflow-runs dev: port {bind_port} ({what}) is in use by another process: {ways}"
    return None


def _dev_exit(message: str, status: int) -> NoReturn:
    print(message, file=sys.stderr, flush=True)
    sys.exit(status)


def cmd_dev(args: argparse.Namespace, settings: Settings) -> None:
    chosen = settings.set_in_environment  # what the user set decides what dev starts and overrides
    port = args.port or settings.port
    # A Temporal address from TEMPORAL_ADDRESS or the Temporal profile, or a REDIS_URL, names a
    # server to use; without one, dev starts its own.
    own_temporal = settings.temporal_profile.address is None
    own_redis = "REDIS_URL" not in chosen
    # SAMPLES_ENCRYPT=1: the worker encrypts, and a codec server (dev's own, unless
    # TEMPORAL_CODEC_ENDPOINT names one) decodes for the API and the Web UI.
    encrypt = settings.samples_encrypt
    own_codec = encrypt and "TEMPORAL_CODEC_ENDPOINT" not in chosen
    conflicts = functools.partial(
        _dev_port_conflict,
        args,
        settings.host,
        port,
        own_temporal=own_temporal,
        own_redis=own_redis,
        own_codec=own_codec,
    )
    conflict = conflicts()
    if conflict is not None:
        _dev_exit(conflict, 2)
    secret = settings.jwt_secret or create_dev_jwt_secret(settings.data_dir)
    codec_key = (settings.codec_key or create_dev_codec_key(settings.data_dir)) if encrypt else settings.codec_key
    if encrypt:
        _check_codec_key(args, codec_key)
    codec_endpoint = f"http://{stack.LOCALHOST}:{args.codec_port}" if own_codec else settings.temporal_codec_endpoint
    settings = replace(
        settings,
        port=port,
        api_url=settings.api_url if "API_URL" in chosen else f"http://127.0.0.1:{port}/api/v1",
        # dev catches document/server drift early, unless VALIDATE_RESPONSES says otherwise
        validate_responses=settings.validate_responses if "VALIDATE_RESPONSES" in chosen else True,
        jwt_secret=secret,
        temporal_address=f"{stack.LOCALHOST}:{args.temporal_port}" if own_temporal else settings.temporal_address,
        redis_url=f"redis://{stack.LOCALHOST}:{args.redis_port}/0" if own_redis else settings.redis_url,
        codec_key=codec_key,
        temporal_codec_endpoint=codec_endpoint,
    )
    ui_port = args.temporal_ui_port if own_temporal else None
    data_dir = Path(settings.data_dir)
    children: list[stack.Child] = []
    # SIGTERM ends the stack like Ctrl-C does: through the `finally` below.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with stack.running(children):
        try:
            if own_codec:
                children.append(stack.start_codec_server(data_dir, _codec_env(settings, ui_port), port=args.codec_port))
            if own_temporal and ui_port is not None:
                children.append(
                    stack.start_temporal(
                        data_dir, port=args.temporal_port, ui_port=ui_port, ui_codec_endpoint=codec_endpoint
                    )
                )
            elif own_temporal:
                children.append(stack.start_temporal(data_dir, port=args.temporal_port))
            if own_redis:
                children.append(
                    stack.start_redis(
                        data_dir,
                        port=args.redis_port,
                        maxmemory=settings.redis_maxmemory,
                        appendfsync=settings.redis_appendfsync,
                    )
                )
        except stack.PortInUse as exc:  # taken since the check above
            _dev_exit(conflicts() or f"workflow-runs dev: {exc}", 2)
        except stack.StartError as exc:  # the child exited at start
            _dev_exit(f"workflow-runs dev: {exc}", 1)
        # The worker builds its settings from its environment: this process's (a child inherits it),
        # with the stack's addresses and secret on top.
        worker_env = {
            **os.environ,
            "TEMPORAL_ADDRESS": settings.temporal_address,
            "REDIS_URL": settings.redis_url,
            "API_URL": settings.api_url,
            "JWT_SECRET": secret,
        }
        if encrypt:
            assert codec_key is not None  # created above
            worker_env |= {"SAMPLES_ENCRYPT": "1", "CODEC_KEY": codec_key}
        children.append(
            stack.spawn("worker", [sys.executable, "-m", "cli.main", "worker"], data_dir / "logs", worker_env)
        )
        token = mint_token(secret, user="dev", project="dev-project", ttl_seconds=DEV_TOKEN_SECONDS)
        base = f"http://127.0.0.1:{port}/api/v1"
        print(
            f"\nWorkflow Runs API on the embedded stack\n"
            f"  API         {base}\n  Swagger UI  {base}/ui/\n  document    {base}/openapi.json\n"
            f"  Temporal    {settings.temporal_address}\n  Redis       {settings.redis_url}\n"
            f"{_dev_codec_lines(settings, encrypt, ui_port)}"
            f"  logs        {data_dir / 'logs'}\n\n"
            f"Dev token (project dev-project, 7 days):\n\n  export TOKEN={token}\n"
            f'  curl -s -X POST {base}/workflows/runs -H "Authorization: Bearer $TOKEN" '
            "-H 'Content-Type: application/json' -d '{}'\n",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            serve(settings, port=port)


def _codec_env(settings: Settings, ui_port: int | None) -> dict[str, str]:
    """The environment of dev's codec server: this process's, with the key, and the Web UI's origins
    allowed (when dev starts the UI and CODEC_CORS_ORIGINS does not say otherwise)."""
    assert settings.codec_key is not None
    env = {**os.environ, "CODEC_KEY": settings.codec_key}
    if ui_port is not None and "CODEC_CORS_ORIGINS" not in settings.set_in_environment:
        env["CODEC_CORS_ORIGINS"] = f"http://{stack.LOCALHOST}:{ui_port},http://localhost:{ui_port}"
    return env


def _dev_codec_lines(settings: Settings, encrypt: bool, ui_port: int | None) -> str:
    """dev's banner lines on encryption and the Web UI."""
    lines = ""
    if ui_port is not None:
        lines += f"  Web UI      http://{stack.LOCALHOST}:{ui_port}\n"
    if encrypt:
        where = "Web UI decodes with it" if ui_port is not None else "Web UI off: --temporal-ui-port turns it on"
        lines += (
            f"  codec       {settings.temporal_codec_endpoint} (payloads encrypted; {where})\n"
            f"  codec key   CODEC_KEY or {dev_codec_key_path(settings.data_dir)}\n"
        )
    return lines


def _check_codec_key(args: argparse.Namespace, key: str | None) -> None:
    """Exit 2 (as for any invalid setting) unless `key` is a codec key."""
    from workloads.codec import CodecKeyError, key_from_setting

    try:
        key_from_setting(key or "")
    except CodecKeyError as exc:
        _dev_exit(f"workflow-runs {args.command}: {exc}", 2)


def mock_settings(settings: Settings, port: int) -> Settings:
    """What `mock` serves with: the dev JWT secret unless JWT_SECRET is set, and responses
    validated against the document unless VALIDATE_RESPONSES says otherwise (as `dev`)."""
    chosen = settings.set_in_environment
    return replace(
        settings,
        port=port,
        jwt_secret=settings.jwt_secret or create_dev_jwt_secret(settings.data_dir),
        validate_responses=settings.validate_responses if "VALIDATE_RESPONSES" in chosen else True,
    )


def mock_backends_factory() -> BackendsFactory:
    """The backends of mock mode: in memory, seeded from the bundled document's examples, one set
    per app (a restart starts again from the examples)."""
    from backends.memory import mock_backends
    from web.app import published_document

    async def factory(settings: Settings) -> Any:
        return mock_backends(published_document(), settings)

    return factory


def mock_banner(settings: Settings, port: int) -> str:
    """What `mock` prints: the URLs, the seeded runs and a dev token that sees them all."""
    from backends.memory import MOCK_PROJECT, seed
    from web.app import published_document

    seeded = seed(published_document())
    kind, _, user = seeded.initiated_by.partition(":")
    assert settings.jwt_secret is not None  # mock_settings set it
    token = mint_token(
        settings.jwt_secret,
        user=user or kind,
        kind=kind if user else "user",
        project=MOCK_PROJECT,
        ttl_seconds=DEV_TOKEN_SECONDS,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
    )
    base = f"http://{settings.host}:{port}/api/v1"
    runs = "\n".join(
        f"  {run.status:<17} {run.workflow_id}/{run.run_id}"
        + (f"  ({len(seeded.updates[run.run_id])} updates)" if run.run_id in seeded.updates else "")
        for run in seeded.runs
    )
    return (
        f"\nWorkflow Runs API in mock mode (in memory, seeded from the document's examples;"
        f" no Temporal, no Redis)\n"
        f"  API         {base}\n  Swagger UI  {base}/ui/\n  document    {base}/openapi.json\n\n"
        f"Runs of project {MOCK_PROJECT} (workflow_id/run_id):\n{runs}\n\n"
        f"Dev token ({seeded.initiated_by}, project {MOCK_PROJECT}, 7 days):\n\n  export TOKEN={token}\n"
        f'  curl -s -X POST {base}/workflows/runs -H "Authorization: Bearer $TOKEN" '
        "-H 'Content-Type: application/json' -d '{}'\n"
    )


def cmd_mock(args: argparse.Namespace, settings: Settings) -> None:
    port = args.port or settings.port
    settings = mock_settings(settings, port)
    print(mock_banner(settings, port), flush=True)
    serve(settings, port=port, backends_factory=mock_backends_factory())


def cmd_worker(args: argparse.Namespace, settings: Settings) -> None:
    from workloads.worker import run_worker

    logs.configure()
    tracing.setup(settings, service=tracing.WORKER_SERVICE)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_worker(settings))
    finally:
        tracing.shutdown()


def cmd_token(args: argparse.Namespace, settings: Settings) -> None:
    if not settings.jwt_secret:
        sys.exit(_no_jwt_secret(settings))
    print(
        mint_token(
            settings.jwt_secret,
            user=args.user,
            project=args.project,
            permissions=args.permission or list(DEV_PERMISSIONS),
            ttl_seconds=args.ttl,
            kind=args.type,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
        )
    )


def cmd_codec_server(args: argparse.Namespace, settings: Settings) -> None:
    """The codec server of the samples' encrypted payloads on HOST and `--port`, for the API
    (TEMPORAL_CODEC_ENDPOINT), the Web UI and the `temporal` CLI."""
    import uvicorn

    from web import transport
    from workloads.codec import key_from_setting
    from workloads.codec_server import create_codec_app

    logs.configure()
    app = create_codec_app(
        key_from_setting(settings.codec_key or ""),  # checked by `main`
        auth=settings.temporal_codec_auth,
        cors_origins=list(settings.codec_cors_origins),
        max_body_bytes=settings.codec_max_body_bytes,
        key_id=settings.codec_key_id,
    )
    # The API's bounded transport (head size and deadlines, connection cap): the codec server may
    # face the Web UI's users as the API does.
    limits = transport.Limits(
        max_header_bytes=settings.max_header_bytes,
        header_timeout=settings.header_timeout_seconds,
        body_timeout=settings.body_timeout_seconds,
        max_connections=transport.connection_cap(settings.max_connections, transport.raise_fd_limit()),
        send_timeout=settings.sse_send_timeout_seconds,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=args.port,
        http=transport.protocol_class(limits),
        ws="none",
        lifespan="off",
        server_header=False,
        timeout_keep_alive=settings.keepalive_timeout_seconds,
        log_config=None,
    )
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        sys.exit(3)


def cmd_start(args: argparse.Namespace, settings: Settings) -> None:
    from core import temporal_connection
    from workloads.starter import start_workflow
    from workloads.worker import sample_data_converter

    async def start(given: dict[str, Any] | None) -> tuple[str, str]:
        # With SAMPLES_ENCRYPT, the input and memo are encrypted as the worker's payloads are.
        client = await temporal_connection.connect(settings, data_converter=sample_data_converter(settings))
        return await start_workflow(
            client,
            args.type,
            project=args.project,
            user=args.user,
            input=given,
            visibility=args.visibility,
            interaction=args.interaction,
            document_id=args.document_id,
            event_name=args.event_name,
            rule_id=args.rule_id,
            task_queue=settings.temporal_task_queue,
        )

    try:
        workflow_id, run_id = asyncio.run(start(_json_object_argument("--input", args.input)))
    except (ValueError, RuntimeError) as exc:  # bad input (exit 2, as argparse), or Temporal unreachable
        print(f"workflow-runs start: error: {exc}", file=sys.stderr, flush=True)
        os._exit(2 if isinstance(exc, ValueError) else 1)
    print(json.dumps({"workflow_id": workflow_id, "run_id": run_id}), flush=True)
    # The Temporal client's Rust runtime threads can call back into Python while the interpreter
    # finalizes ("PyGILState_Release ... finalizing", exit 134, seen once): the work is done and
    # printed, so leave without finalizing.
    os._exit(0)


def _json_object_argument(name: str, raw: str | None) -> dict[str, Any] | None:
    value = json.loads(raw) if raw else None
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object")
    return value


def _positive(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number, 1 or more, not {raw!r}")
    return value


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="workflow-runs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = root.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="run the embedded stack and the API in the foreground")
    dev.add_argument("--port", type=int, help="API port (default $PORT, else 8000)")
    dev.add_argument("--temporal-port", type=int, default=7233)
    dev.add_argument("--redis-port", type=int, default=6379)
    dev.add_argument(
        "--codec-port",
        type=int,
        default=CODEC_PORT,
        help=f"codec server port, with SAMPLES_ENCRYPT=1 (default {CODEC_PORT})",
    )
    dev.add_argument("--temporal-ui-port", type=int, help="serve Temporal's Web UI on this port (default: no Web UI)")
    dev.set_defaults(func=cmd_dev)

    mock = sub.add_parser(
        "mock", help="run the API on in-memory backends seeded from the document's examples (no Temporal, no Redis)"
    )
    mock.add_argument("--port", type=int, help="API port (default $PORT, else 8000)")
    mock.set_defaults(func=cmd_mock)

    srv = sub.add_parser("serve", help="run the API against TEMPORAL_ADDRESS and REDIS_URL")
    srv.add_argument("--port", type=int, help="API port (default $PORT, else 8000)")
    srv.add_argument(
        "--workers",
        type=_positive,
        help="worker processes sharing the port (default $WEB_CONCURRENCY, else 1: one process, no supervisor)",
    )
    srv.set_defaults(func=cmd_serve)

    sub.add_parser("worker", help="run the sample Temporal worker").set_defaults(func=cmd_worker)

    tok = sub.add_parser("token", help="mint a development JWT (HS256, JWT_SECRET or .data/jwt-secret)")
    tok.add_argument("--user", required=True)
    tok.add_argument("--project", required=True)
    tok.add_argument("--permission", action="append", help="repeatable; default: read, run and admin")
    tok.add_argument("--ttl", type=int, default=3600, help="seconds (default 3600)")
    tok.add_argument("--type", default="user", help="principal type: user, apikey, service_account, ...")
    tok.set_defaults(func=cmd_token)

    start = sub.add_parser("start", help="start a sample workflow; prints its ids as JSON")
    start.add_argument("type", choices=["StandardContentIngestion", "AgentConversation", "RetryingActivity"])
    start.add_argument("--project", required=True)
    start.add_argument("--user", required=True)
    start.add_argument("--input", help="JSON argument of the workflow")
    start.add_argument("--visibility", choices=["private", "project"], default="project")
    start.add_argument("--interaction")
    start.add_argument("--document-id")
    start.add_argument("--event-name")
    start.add_argument("--rule-id")
    start.set_defaults(func=cmd_start)

    codec = sub.add_parser(
        "codec-server", help="serve the codec server of the samples' encrypted payloads (CODEC_KEY) on HOST"
    )
    codec.add_argument("--port", type=int, default=CODEC_PORT, help=f"default {CODEC_PORT}")
    codec.set_defaults(func=cmd_codec_server)
    return root


def main(argv: list[str] | None = None) -> None:
    # Connexion imports Starlette's test client at import time, which warns about httpx: noise here.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env()  # once per command, passed down
    except SettingsError as exc:
        print(f"workflow-runs {args.command}: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    if settings.codec_key is not None or (
        args.command in KEY_COMMANDS and (settings.samples_encrypt or args.command == "codec-server")
    ):
        # CODEC_KEY is checked where it is read (core cannot: workloads.codec owns the key's format).
        _check_codec_key(args, settings.codec_key)
    args.func(args, settings)


if __name__ == "__main__":
    main()
