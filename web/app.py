"""The application: Connexion serving the 3.1 document, with our middlewares, errors and backends.

`workflow-runs serve` and `dev` have uvicorn build the app with `create_app` and the settings the
command built; tests call it with settings and backends of their own. `app_from_env` is the import
string factory for running under a process manager (`uvicorn web.app:app_from_env --factory`):
each process then builds its settings from its environment, once.
"""

from __future__ import annotations

import copy
import functools
import gc
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import yaml
from connexion import AsyncApp
from connexion.decorators import parameter as parameter_decorators
from connexion.exceptions import ProblemException
from connexion.json_schema import resolve_refs
from connexion.middleware import MiddlewarePosition
from connexion.options import SwaggerUIOptions
from connexion.resolver import Resolver
from starlette import routing
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send
from swagger_ui_bundle import swagger_ui_path

from core import tracing
from core.errors import DomainError
from core.protocols import RunsBackend, UpdatesBackend
from core.settings import Settings
from core.shutdown import ServerShutdown
from handlers import HANDLERS
from handlers.deps import Deps
from web import cors, endpoints, errors, openapi31
from web.auth import TokenVerifier
from web.fast_lane import FastLane, Route, lane_routes
from web.health import Readiness
from web.metrics import RequestMetrics
from web.middleware import (
    BodySizeLimit,
    ChunkedBody,
    MediaTypeCase,
    QueryTokenForStreams,
    RequestContext,
    SeedPathOverlap,
)
from web.operations import Operation, compile_operations
from web.tracing import RequestSpans

BUNDLED_DOCUMENT = Path(__file__).resolve().parent.parent / "generated" / "openapi.yaml"
# The OpenAPI 3.2 edition of the same document (scripts/openapi32.py), served next to it.
EDITION_32 = BUNDLED_DOCUMENT.with_name("openapi-3.2.yaml")
BASE_PATH = "/api/v1"
THIS_SERVER = {"url": BASE_PATH, "description": "The server this document is served from."}

BackendsFactory = Callable[[Settings], Awaitable[tuple[RunsBackend, UpdatesBackend]]]


@functools.cache
def published_document() -> dict[str, Any]:
    """The bundled 3.1 document as this server serves it (/openapi.json, /openapi.yaml, Swagger UI):
    the bundle with its relative server first (`served_servers`)."""
    return _served(BUNDLED_DOCUMENT)


@functools.cache
def published_document_32() -> dict[str, Any]:
    """The OpenAPI 3.2 edition as this server serves it (/openapi-3.2.json), servers as above.
    Read on first use: an app that is never asked for it never parses it."""
    return _served(EDITION_32)


def _served(path: Path) -> dict[str, Any]:
    # libyaml's safe loader (the pinned PyYAML wheels include libyaml): the document parses in
    # ~20 ms instead of ~330 ms with the pure-Python one, most of mock mode's start-up.
    document: dict[str, Any] = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.CSafeLoader)
    document["servers"] = served_servers(document.get("servers") or [])
    return document


def served_servers(servers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The document's servers with the relative ones first. Swagger UI's "Try it out" calls the first
    server, and the published bundle may name the production host first; the copy a server serves
    must call that server, wherever it runs (a proxy, a test's free port), so a relative URL (this
    host) leads, and the others keep their order after it. A list without one gets `/api/v1`."""
    relative = [server for server in servers if _is_relative(str(server.get("url", "")))]
    absolute = [server for server in servers if not _is_relative(str(server.get("url", "")))]
    return [*(relative or [dict(THIS_SERVER)]), *absolute]


def _is_relative(url: str) -> bool:
    """A server URL resolved against where the document was fetched: no scheme and no host (a URL
    template such as `{scheme}://{host}/api/v1` is absolute, though no URL parser reads it as one)."""
    return "://" not in url and not url.startswith("//")


@functools.cache
def resolved_document() -> dict[str, Any]:
    """The published document with its references resolved, as the operation table reads it (one
    copy per process, so its compiled schemas are compiled once however many apps are built)."""
    resolved: dict[str, Any] = resolve_refs(copy.deepcopy(published_document()))
    return resolved


def runtime_document(published: dict[str, Any]) -> dict[str, Any]:
    """The published document plus what only the server needs: the token verifier's location."""
    document = copy.deepcopy(published)
    document["components"]["securitySchemes"]["bearerAuth"]["x-bearerInfoFunc"] = "web.auth.decode_token"
    return document


async def real_backends(settings: Settings) -> tuple[RunsBackend, UpdatesBackend]:
    from backends.redis_updates import RedisUpdatesBackend
    from backends.temporal_runs import TemporalRunsBackend

    runs = await TemporalRunsBackend.connect(settings)
    updates = await RedisUpdatesBackend.from_url(settings.redis_url, settings)
    return runs, updates


class WorkflowRunsApp(AsyncApp):  # type: ignore[misc]  # Connexion ships no type information
    """The Connexion app, holding what the process that serves it must reach: its stop signal.

    A request enters through `front`: the project's own middlewares (`_add_middlewares`), in front
    of Connexion's whole stack. They are pure ASGI and need nothing of Connexion, and every layer
    costs each request a frame, most of them a wrapped `send` too (Connexion's entry and its
    `ServerErrorMiddleware`: about a tenth of a lane request's CPU, measured in process). An
    exception in them is answered by `web.middleware.RequestContext`, with the JSON 500."""

    def __init__(self, shutdown: ServerShutdown, **kwargs: Any) -> None:
        super().__init__(__name__, **kwargs)
        self.shutdown = shutdown
        self.front: ASGIApp = self.middleware

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.front(scope, receive, send)


def app_from_env() -> WorkflowRunsApp:
    """uvicorn's factory: the app with the settings of this process's environment."""
    settings = Settings.from_env()
    tracing.setup(settings, service=tracing.API_SERVICE)
    return create_app(settings)


def create_app(
    settings: Settings,
    backends_factory: BackendsFactory | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    document: dict[str, Any] | None = None,
) -> WorkflowRunsApp:
    """The app; `backends_factory` connects its backends in the lifespan (the real ones by
    default), `clock` is its rate limits' (tests pass their own, to refill buckets without waiting),
    `document` the one it routes, validates and serves operations by (the bundled one; tests pass
    altered copies; `/openapi.json` always shows the bundled one).

    Raises `web.fast_lane.LaneUnsupported` when the lane is on and one of its operations uses a
    construct of the document the lane does not implement: the app does not start."""
    published = published_document() if document is None else document
    factory = backends_factory or real_backends
    verifier = TokenVerifier(settings)
    shutdown = ServerShutdown()
    openapi31.install()
    _cache_parameter_names()
    _no_slash_redirects()
    resolved = resolved_document() if document is None else resolve_refs(copy.deepcopy(document))
    operations = compile_operations(resolved, HANDLERS)
    lane = lane_routes(operations, BASE_PATH) if settings.fast_lane else None

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        runs, updates = await factory(settings)
        stream_slots = None
        if settings.shared_stream_limits and backends_factory is None:
            from backends.redis_stream_slots import RedisStreamSlots

            stream_slots = RedisStreamSlots.from_settings(settings)
        deps = Deps(
            runs=runs, updates=updates, settings=settings, shutdown=shutdown, clock=clock, stream_slots=stream_slots
        )
        # Everything built so far lives as long as the process: keep it out of the collector's
        # scans, whose full passes otherwise stall every open stream at once (measured: 200-300 ms).
        gc.collect()
        gc.freeze()
        try:
            yield {"deps": deps, "verifier": verifier, "readiness": Readiness()}
        finally:
            if stream_slots is not None:
                await stream_slots.close()
            await updates.close()
            await runs.close()

    app = WorkflowRunsApp(shutdown, lifespan=lifespan)
    app.add_api(
        runtime_document(published),
        base_path=BASE_PATH,
        resolver=Resolver(function_resolver=_endpoints(operations)),
        pythonic_params=True,
        strict_validation=True,
        validate_responses=settings.validate_responses,
        validator_map=openapi31.VALIDATOR_MAP,
        swagger_ui_options=SwaggerUIOptions(
            serve_spec=False,  # Connexion would serve the runtime view, with internal extensions
            swagger_ui=True,
            swagger_ui_template_dir=str(swagger_ui_path),  # Swagger UI 5 (renders 3.1), no CDN
        ),
    )
    app.add_url_rule(f"{BASE_PATH}/openapi.json", "openapi_json", openapi_json, methods=["GET"])
    app.add_url_rule(f"{BASE_PATH}/openapi.yaml", "openapi_yaml", openapi_yaml, methods=["GET"])
    app.add_url_rule(f"{BASE_PATH}/openapi-3.2.json", "openapi_32_json", openapi_32_json, methods=["GET"])
    app.add_url_rule("/health/live", "health_live", health_live, methods=["GET"])
    app.add_url_rule("/health/ready", "health_ready", health_ready, methods=["GET"])

    app.add_error_handler(ProblemException, errors.on_problem)
    app.add_error_handler(HTTPException, errors.on_http_exception)
    app.add_error_handler(DomainError, errors.on_domain_error)
    app.add_error_handler(Exception, errors.on_unexpected)

    _add_middlewares(app, settings, operations, lane)
    return app


def _add_middlewares(
    app: WorkflowRunsApp, settings: Settings, operations: dict[str, Operation], lane: list[Route] | None
) -> None:
    """Order, outside in: the request's span (only when traces are on), its metrics, request id +
    access log, CORS (when CORS_ORIGINS is set), media types in lower case, the fast lane (it
    answers its own errors, with web.errors): the front, ahead of Connexion's stack. Then inside
    Connexion's: its exception handling, the seed's path overlap, body cap, query token (before
    security reads the Authorization header), chunked bodies given a length (after security,
    before body validation). At one of Connexion's positions, the one added later is inner."""
    app.add_middleware(ChunkedBody, position=MiddlewarePosition.BEFORE_VALIDATION)
    app.add_middleware(QueryTokenForStreams, position=MiddlewarePosition.BEFORE_SECURITY)
    app.add_middleware(SeedPathOverlap, position=MiddlewarePosition.BEFORE_SWAGGER, base_path=BASE_PATH)
    app.add_middleware(BodySizeLimit, position=MiddlewarePosition.BEFORE_SWAGGER, max_bytes=settings.max_body_bytes)
    front: ASGIApp = app.middleware
    if lane is not None:
        front = FastLane(
            front, routes=lane, max_body_bytes=settings.max_body_bytes, validate_responses=settings.validate_responses
        )
    front = MediaTypeCase(front)
    if settings.cors_origins:  # not there at all otherwise: without CORS_ORIGINS a request pays nothing for it
        front = cors.Cors(front, **cors.cors_options(settings.cors_origins))
    front = RequestMetrics(RequestContext(front), base_path=BASE_PATH)
    if settings.tracing:  # outermost; not there at all otherwise
        front = RequestSpans(front, operations=operations, base_path=BASE_PATH)
    app.front = front


def begin_shutdown(asgi_app: Any) -> None:
    """Tell the open streams of the app that `asgi_app` serves (uvicorn's loaded app: ours, maybe
    wrapped in uvicorn's middlewares) that the server is stopping."""
    for _ in range(8):
        if isinstance(asgi_app, WorkflowRunsApp):
            asgi_app.shutdown.trigger()
            return
        asgi_app = getattr(asgi_app, "app", None)


def _endpoints(operations: dict[str, Operation]) -> Callable[[str], endpoints.Endpoint]:
    """Connexion's resolver: each operationId to the endpoint of its entry in the table."""
    table = {operation_id: endpoints.endpoint(operation) for operation_id, operation in operations.items()}
    return table.__getitem__


def _no_slash_redirects() -> None:
    """Starlette's routers answer a path that matches a route but for a trailing slash with a 307
    to an absolute URL built from the client's `Host` header: before authentication, without the
    JSON error body, and to wherever the client said the server was. Connexion builds several
    routers, some only at start-up, all with the default, so the attribute is fixed at `False` on
    the class: such a path is a 404 like any other unknown route. (Swagger UI's `/ui` -> `/ui/`
    is an explicit Connexion route with a relative `Location`, and stays.)"""
    if not isinstance(vars(routing.Router).get("redirect_slashes"), property):
        # A data descriptor on the class overrides the instance attribute `__init__` sets.
        routing.Router.redirect_slashes = property(lambda self: False, lambda self, value: None)  # type: ignore[assignment]


def _cache_parameter_names() -> None:
    """Connexion turns every parameter name into its Python form (`workflowId` -> `workflow_id`)
    with `inflection` and three regexes on every request; the names come from the document (strict
    validation refuses others), so remember the answers. Measured: about 5% of a small request."""
    if not isinstance(parameter_decorators.pythonic, functools._lru_cache_wrapper):
        parameter_decorators.pythonic = functools.lru_cache(maxsize=1024)(parameter_decorators.pythonic)


async def openapi_json(request: Request) -> Response:
    return Response(_rendered("json"), media_type="application/json")


async def openapi_yaml(request: Request) -> Response:
    return Response(_rendered("yaml"), media_type="application/yaml")


async def openapi_32_json(request: Request) -> Response:
    return Response(_rendered("json-3.2"), media_type="application/json")


@functools.cache
def _rendered(form: str) -> bytes:
    """The served documents' bytes, rendered once per process."""
    if form == "yaml":
        return yaml.safe_dump(published_document(), sort_keys=False, allow_unicode=True).encode()
    return orjson.dumps(published_document_32() if form == "json-3.2" else published_document())


async def health_live(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def health_ready(request: Request) -> Response:
    """Ready only when both backends answer; 503 names the one that does not (`web.health`:
    asked at most once a second, whoever polls)."""
    readiness: Readiness = request.state.readiness
    checks = await readiness.checks(request.state.deps)
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
        headers=None if ready else {"Retry-After": "5"},
    )
