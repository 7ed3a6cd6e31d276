"""Posts that reach Redis together: the appends asked for in one turn of the event loop go out
as one pipeline, on one connection, in the order they were asked for.

Why: under load many posts are ready at once (the server parses every connection that has data
in the same turn of the loop, and each request then runs to its Redis call). Sent one by one,
each pays a pool checkout, a write, and a wake-up for its read: most of what redis-py costs per
call. Sent together they share those. Nothing else changes for a post:

- Redis runs the pipeline's scripts one after another, each atomically, in arrival order: posts
  to one run are stored in the order they were asked, as when sent one by one.
- Each post gets its own reply or its own error (`raise_on_error=False`); a failure of the
  connection fails the posts of that pipeline and no other.
- Nothing is sent twice: the pool does not retry, and `NOSCRIPT` (Redis lost its script cache)
  means that script did not run: the script is loaded and only those posts are sent again, once.
- A post whose caller went away before its pipeline was sent is not sent.
- With `min_replicas` = N the pipeline ends with one `WAIT N timeout`: WAIT counts the replicas
  holding every write made so far on its connection, so one WAIT speaks for every post in it.

Bounds: a pipeline takes at most `max_batch` posts or, past the first, `max_bytes` of arguments;
more start another pipeline (each on a connection of the pool, whose size bounds how many are in
flight, as it bounds single calls). A lone post is sent as the plain script call, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

MAX_BATCH = 64  # posts per pipeline
MAX_BATCH_BYTES = 1 << 20  # argument bytes per pipeline, past its first post


@dataclass(slots=True)
class _Post:
    keys: list[str]
    args: list[bytes | int]
    future: asyncio.Future[Any]
    size: int = field(default=0)


class ScriptBatcher:
    """Runs one Lua script (`source`, known to Redis by `sha`) for many callers, batching the calls
    made in one turn of the loop. `check(reply, acknowledged)` turns a post's reply (or error)
    and the pipeline's WAIT reply (None without `min_replicas`) into its result, or raises."""

    def __init__(
        self,
        client: Redis,
        source: str,
        sha: str,
        *,
        min_replicas: int = 0,
        wait_timeout_ms: int = 1000,
        check: Callable[[Any, Any], Any],
        max_batch: int = MAX_BATCH,
        max_bytes: int = MAX_BATCH_BYTES,
    ) -> None:
        self._client = client
        self._source = source
        self._sha = sha
        self._min_replicas = min_replicas
        self._wait_timeout_ms = wait_timeout_ms
        self._check = check
        self._max_batch = max_batch
        self._max_bytes = max_bytes
        self._pending: list[_Post] = []
        self._pending_bytes = 0
        self._sending: set[asyncio.Task[None]] = set()
        self._closed = False

    async def __call__(self, keys: list[str], args: list[bytes | int]) -> Any:
        if self._closed:
            raise RedisConnectionError("the update store is closing")
        loop = asyncio.get_running_loop()
        post = _Post(keys, args, loop.create_future(), sum(len(a) for a in args if isinstance(a, bytes)))
        if self._pending and (
            len(self._pending) >= self._max_batch or self._pending_bytes + post.size > self._max_bytes
        ):
            self._flush()
        if not self._pending:
            loop.call_soon(self._flush)  # after every request that is ready in this turn
        self._pending.append(post)
        self._pending_bytes += post.size
        return await post.future

    def _flush(self) -> None:
        # Callers that went away before their pipeline left are not sent (their future is cancelled).
        posts = [post for post in self._pending if not post.future.done()]
        self._pending, self._pending_bytes = [], 0
        if posts:
            task = asyncio.get_running_loop().create_task(self._send(posts))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, posts: list[_Post]) -> None:
        try:
            for attempt in range(2):
                replies, acknowledged = await self._run(posts)
                again = []
                for post, reply in zip(posts, replies, strict=True):
                    if isinstance(reply, NoScriptError) and attempt == 0:
                        again.append(post)  # the script did not run: load it, send these once more
                    else:
                        _settle(post.future, self._check, reply, acknowledged)
                if not again:
                    return
                await self._client.script_load(self._source)
                posts = again
        except BaseException as exc:
            failure = exc if isinstance(exc, Exception) else RedisConnectionError("the update store is closing")
            for post in posts:
                if not post.future.done():
                    post.future.set_exception(failure)
            if not isinstance(exc, Exception):
                raise

    async def _run(self, posts: list[_Post]) -> tuple[list[Any], Any]:
        """Each post's reply (an exception for one that failed) and the WAIT reply, if asked."""
        if len(posts) == 1 and not self._min_replicas:
            post = posts[0]
            try:
                reply = await self._client.evalsha(self._sha, len(post.keys), *post.keys, *post.args)
            except ResponseError as exc:  # Redis's answer to this post (NOSCRIPT, OOM, ...), as in a pipeline
                reply = exc
            return [reply], None
        pipe = self._client.pipeline(transaction=False)
        for post in posts:
            pipe.execute_command("EVALSHA", self._sha, len(post.keys), *post.keys, *post.args)
        if self._min_replicas:
            pipe.execute_command("WAIT", self._min_replicas, self._wait_timeout_ms)
        replies = await pipe.execute(raise_on_error=False)
        if self._min_replicas:
            return replies[:-1], replies[-1]
        return replies, None

    async def close(self) -> None:
        """Refuse new posts; wait for the pipelines in flight (each bounded by the pool's timeout)."""
        self._closed = True
        self._flush()
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)


def stored(reply: Any, acknowledged: Any) -> Any:
    """`check` without replicas: the script's reply, or its error raised."""
    if isinstance(reply, BaseException):
        raise reply
    return reply


def _settle(future: asyncio.Future[Any], check: Callable[[Any, Any], Any], reply: Any, acknowledged: Any) -> None:
    if future.done():
        return  # its caller went away meanwhile
    try:
        future.set_result(check(reply, acknowledged))
    except Exception as exc:
        future.set_exception(exc)
