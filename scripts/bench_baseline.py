"""The ceiling for the updates figures: a bare Starlette app doing the same Redis work per request.

No Connexion, no authentication, no run look-up, no middleware, no logging: only what a post and
a read must do against Redis, with the project's own storage layout, so that the project's server
is compared with the cheapest possible handler of the same work.

- `POST /api/v1/workflows/runs/{run_id}/updates`: parse the JSON body, build the stored bytes with
  `backends.redis_updates.encode_update` and run the same Lua script (`_APPEND`: XREVRANGE, XLEN, the
  byte counter, XRANGE of the oldest when over a bound, XADD MAXLEN, trim marker and counter, EXPIRE
  x2) on the same keys; answer `{"success":true}`.
- `GET /api/v1/workflows/runs/{workflow_id}/{run_id}/updates?since=`: one XRANGE from `since`,
  the stored JSON passed through untouched inside `{"messages":[...]}`.

The Redis pool has the server's settings (blocking pool of 32 connections, no retries) and uvicorn
runs with the server's settings (`cli.main.serve`: one worker, auto loop and HTTP parser).

    python -m scripts.bench_baseline --port 8101 --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from backends.redis_updates import (
    _APPEND,
    MAX_UPDATES_PER_RUN,
    TTL_SECONDS,
    append_args,
    append_keys,
    encode_update,
    request_pool,
    stream_key,
)
from backends.update_hub import entry_data
from core.settings import Settings

POOL_SIZE = 32  # RedisUpdatesBackend.from_url's default
TIMEOUT_SECONDS = 10.0  # BACKEND_TIMEOUT_SECONDS's default
SUCCESS = b'{"success":true}'


def create_app(redis_url: str) -> Starlette:
    pool = request_pool(redis_url, POOL_SIZE, TIMEOUT_SECONDS, "bench-baseline")
    client = Redis(connection_pool=pool)
    append = client.register_script(_APPEND)

    async def post_update(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        rest = encode_update(run_id, orjson.loads(await request.body()))
        args = append_args(
            rest, max_updates=MAX_UPDATES_PER_RUN, max_bytes=Settings.max_update_bytes_per_run, ttl_seconds=TTL_SECONDS
        )
        await append(keys=append_keys(run_id), args=args)
        return Response(SUCCESS, media_type="application/json")

    async def get_updates(request: Request) -> Response:
        since = int(request.query_params.get("since", "0"))
        entries = await client.xrange(stream_key(request.path_params["run_id"]), f"{max(since, -1) + 1}-0", "+")
        messages = b",".join(entry_data(fields) for _, fields in entries or ())
        return Response(b'{"messages":[' + messages + b"]}", media_type="application/json")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await client.aclose()
            await pool.disconnect()

    return Starlette(
        routes=[
            Route("/api/v1/workflows/runs/{run_id}/updates", post_update, methods=["POST"]),
            Route("/api/v1/workflows/runs/{workflow_id}/{run_id}/updates", get_updates, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    import uvicorn

    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--host", default="127.0.0.1")
    args.add_argument("--port", type=int, required=True)
    args.add_argument("--redis-url", required=True)
    options = args.parse_args()
    # The same uvicorn settings as `cli.main.serve`.
    uvicorn.run(
        create_app(options.redis_url),
        host=options.host,
        port=options.port,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
