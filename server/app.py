"""The application: Connexion serving the 3.1 document, with our middlewares, errors and backends.

`create_app()` is what uvicorn runs (`server.app:create_app`, factory mode); tests call it with their
own settings or backends.
"""

from __future__ import annotations

import copy
import functools
import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import yaml
from connexion import AsyncApp
from connexion.decorators import parameter as parameter_decorators
from connexion.exceptions import ProblemException
from connexion.middleware import MiddlewarePosition
from connexion.options import SwaggerUIOptions
from connexion.resolver import Resolver
from starlette import routing
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from swagger_ui_bundle import swagger_ui_path

import handlers
from backends.errors import DomainError
from server import errors, openapi31
from server.auth import TokenVerifier
from server.context import Backends
from server.fast_lane import FastLane
from server.health import Readiness
from server.middleware import (
    BodySizeLimit,
    ChunkedBody,
    MediaTypeCase,
    QueryTokenForStreams,
    RequestContext,
    SeedPathOverlap,
)
from server.settings import Settings

BUNDLED_DOCUMENT = Path(__file__).resolve().parent.parent / "generated" / "openapi.yaml"
BASE_PATH = "/api/v1"

BackendsFactory = Callable[[Settings], Awaitable[Backends]]


@functools.cache
def published_document() -> dict[str, Any]:
    """The bundled 3.1 document exactly as published: what /openapi.json and Swagger UI show."""
    document: dict[str, Any] = yaml.safe_load(BUNDLED_DOCUMENT.read_text(encoding="utf-8"))
    return document


def runtime_document() -> dict[str, Any]:
    """The published document plus what only the server needs: the token verifier's location."""
    document = copy.deepcopy(published_document())
    document["components"]["securitySchemes"]["bearerAuth"]["x-bearerInfoFunc"] = "server.auth.decode_token"
    return document


async def real_backends(settings: Settings) -> Backends:
    from backends.redis_updates import RedisUpdatesBackend
    from backends.temporal_runs import TemporalRunsBackend

    runs = await TemporalRunsBackend.connect(settings)
    updates = await RedisUpdatesBackend.from_url(settings.redis_url, settings)
    return Backends(runs=runs, updates=updates, settings=settings)


def create_app(settings: Settings | None = None, backends_factory: BackendsFactory | None = None) -> AsyncApp:
    settings = settings or Settings()
    factory = backends_factory or real_backends
    verifier = TokenVerifier(settings)
    openapi31.install()
    _cache_parameter_names()
    _no_slash_redirects()

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        backends = await factory(settings)
        # Everything built so far lives as long as the process: keep it out of the collector's
        # scans, whose full passes otherwise stall every open stream at once (measured: 200-300 ms).
        gc.collect()
        gc.freeze()
        try:
            yield {"backends": backends, "verifier": verifier, "readiness": Readiness()}
        finally:
            await backends.updates.close()
            await backends.runs.close()

    app = AsyncApp(__name__, lifespan=lifespan)
    app.add_api(
        runtime_document(),
        base_path=BASE_PATH,
        resolver=Resolver(function_resolver=handlers.resolve),
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
    app.add_url_rule("/health/live", "health_live", health_live, methods=["GET"])
    app.add_url_rule("/health/ready", "health_ready", health_ready, methods=["GET"])

    app.add_error_handler(ProblemException, errors.on_problem)
    app.add_error_handler(HTTPException, errors.on_http_exception)
    app.add_error_handler(DomainError, errors.on_domain_error)
    app.add_error_handler(Exception, errors.on_unexpected)

    # Order, outside in: request id + access log, media types in lower case, the fast lane (it
    # answers its own errors, with server.errors), Connexion's exception handling, the seed's path
    # overlap, body cap, query token (before security reads the Authorization header), chunked
    # bodies given a length (after security, before body validation). At one position, the one
    # added later is inner.
    app.add_middleware(ChunkedBody, position=MiddlewarePosition.BEFORE_VALIDATION)
    app.add_middleware(QueryTokenForStreams, position=MiddlewarePosition.BEFORE_SECURITY)
    app.add_middleware(SeedPathOverlap, position=MiddlewarePosition.BEFORE_SWAGGER, base_path=BASE_PATH)
    app.add_middleware(BodySizeLimit, position=MiddlewarePosition.BEFORE_SWAGGER, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContext, position=MiddlewarePosition.BEFORE_EXCEPTION)
    app.add_middleware(MediaTypeCase, position=MiddlewarePosition.BEFORE_EXCEPTION)
    if settings.fast_lane:
        app.add_middleware(
            FastLane,
            position=MiddlewarePosition.BEFORE_EXCEPTION,
            document=published_document(),
            base_path=BASE_PATH,
            max_body_bytes=settings.max_body_bytes,
            validate_responses=settings.validate_responses,
        )
    return app


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
    return Response(orjson.dumps(published_document()), media_type="application/json")


async def openapi_yaml(request: Request) -> Response:
    return Response(BUNDLED_DOCUMENT.read_bytes(), media_type="application/yaml")


async def health_live(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def health_ready(request: Request) -> Response:
    """Ready only when both backends answer; 503 names the one that does not (`server.health`:
    asked at most once a second, whoever polls)."""
    readiness: Readiness = request.state.readiness
    checks = await readiness.checks(request.state.backends)
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
        headers=None if ready else {"Retry-After": "5"},
    )
