"""Posts that reach Redis together: the appends asked for in one turn of the event loop go out
as one pipeline, on one connection, in the order they were asked for.

Why: under load many posts are ready at once (the server parses every connection that has data
in the same turn of the loop, and each request then runs to its Redis call). Sent one by one,
each pays a pool checkout, a write, and a wake-up for its read: most of what redis-py costs per
call. Sent together they share those. Nothing else changes for a post:

- Redis runs the pipeline's scripts one after another, each atomically, in arrival order: posts
  to one run in one pipeline are stored in the order they were asked.
- Each post gets its own reply or its own error. When the connection fails partway, the posts
  whose replies were read keep them; only the rest fail.
- Nothing is sent twice: the pool does not retry. `NOSCRIPT` for every post of a pipeline means
  Redis lost its scripts before it ran any: the script is loaded and those posts are sent once
  more. `NOSCRIPT` for only some (the scripts were lost partway) is a 503 for those: sent again,
  they would land after later posts to the same run.
- A post whose caller went away before its pipeline's connection was ready is not sent.
- With `min_replicas` = N the pipeline ends with one `WAIT N timeout`: WAIT counts the replicas
  holding every write made so far on its connection, so one WAIT speaks for every post in it.

Bounds: a pipeline takes at most `max_batch` posts or, past the first, `max_bytes` of arguments;
more start another pipeline (each on a connection of the pool, whose size bounds how many are in
flight, as it bounds single calls). The write, and all of a pipeline's replies together, are each
bounded by the pool's socket timeout.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

MAX_BATCH = 64  # posts per pipeline
MAX_BATCH_BYTES = 1 << 20  # argument bytes per pipeline, past its first post
CLOSING = "the update store is closing"
SCRIPT_NOT_RUN = "Redis did not run the append script (its scripts were flushed): the post was not stored"

# What a caller gets back from its pipeline: the script's reply (or its error) and the WAIT reply.
Outcome = tuple[Any, Any]


@dataclass(slots=True)
class _Post:
    keys: list[str]
    args: list[bytes | int]
    future: asyncio.Future[Outcome]
    size: int


class ScriptBatcher:
    """Runs one Lua script (`source`, known to Redis by `sha`) for many callers, batching the calls
    made in one turn of the loop. `check(reply, acknowledged)`, run in the caller, turns a post's
    reply (or error) and the pipeline's WAIT reply (None without `min_replicas`) into its result,
    or raises."""

    def __init__(
        self,
        client: Redis,
        source: str,
        sha: str,
        *,
        check: Callable[[Any, Any], Any],
        min_replicas: int = 0,
        wait_timeout_ms: int = 1000,
        max_batch: int = MAX_BATCH,
        max_bytes: int = MAX_BATCH_BYTES,
    ) -> None:
        self._client = client
        self._source = source
        self._sha = sha
        self._check = check
        self._min_replicas = min_replicas
        self._wait_timeout_ms = wait_timeout_ms
        self._max_batch = max_batch
        self._max_bytes = max_bytes
        self._pending: list[_Post] = []
        self._pending_bytes = 0
        self._sending: set[asyncio.Task[None]] = set()
        self._closed = False

    async def __call__(self, keys: list[str], args: list[bytes | int]) -> Any:
        if self._closed:
            raise RedisConnectionError(CLOSING)
        loop = asyncio.get_running_loop()
        size = sum(len(arg) for arg in args if isinstance(arg, bytes))
        if self._pending and (len(self._pending) >= self._max_batch or self._pending_bytes + size > self._max_bytes):
            self._flush()
        if not self._pending:
            loop.call_soon(self._flush)  # after every request that is ready in this turn
        future: asyncio.Future[Outcome] = loop.create_future()
        self._pending.append(_Post(keys, args, future, size))
        self._pending_bytes += size
        outcome = await future
        del future  # an error raised below holds this frame: it must not hold the error's future
        try:
            return self._check(*outcome)
        finally:
            del outcome

    def _flush(self) -> None:
        posts, self._pending, self._pending_bytes = self._pending, [], 0
        if posts:
            # A context of its own: the pipeline belongs to no one request (nor its request id).
            task = asyncio.get_running_loop().create_task(self._send(posts), context=contextvars.Context())
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, posts: list[_Post]) -> None:
        try:
            again = await self._send_once(posts, last=False)
            if again:
                await self._client.script_load(self._source)
                await self._send_once(again, last=True)
        except BaseException as exc:
            failure = exc if isinstance(exc, Exception) else RedisConnectionError(CLOSING)
            for post in posts:
                _settle(post.future, _own(failure), None)
            if not isinstance(exc, Exception):
                raise
        finally:
            del posts  # (the frame of a failure's traceback)

    async def _send_once(self, posts: list[_Post], *, last: bool) -> list[_Post]:
        """Send the posts whose callers still wait, settle them, and return those to send again
        (every one answered NOSCRIPT, on the first attempt)."""
        pool = self._client.connection_pool
        connection = await _get_connection(pool)
        try:
            sent = [post for post in posts if not post.future.done()]  # callers gone meanwhile: not sent
            if not sent:
                return []
            commands: list[Sequence[Any]] = [
                ("EVALSHA", self._sha, len(post.keys), *post.keys, *post.args) for post in sent
            ]
            if self._min_replicas:
                commands.append(("WAIT", self._min_replicas, self._wait_timeout_ms))
            replies = await _exchange(connection, commands)
        finally:
            await pool.release(connection)
        acknowledged = replies.pop() if self._min_replicas else None
        lost = [isinstance(reply, NoScriptError) for reply in replies]
        if all(lost) and not last:
            return sent
        for post, reply, not_run in zip(sent, replies, lost, strict=True):
            _settle(post.future, RedisConnectionError(SCRIPT_NOT_RUN) if not_run else reply, _own(acknowledged))
        return []

    async def close(self) -> None:
        """Refuse new posts; send what waits and wait for the pipelines in flight (each bounded by
        the pool's timeouts)."""
        self._closed = True
        self._flush()
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)


def _get_connection(pool: ConnectionPool) -> Awaitable[AbstractConnection]:
    """A connection of the pool, connected (redis-py leaves `get_connection` untyped)."""
    get: Callable[[], Awaitable[AbstractConnection]] = pool.get_connection
    return get()


async def _exchange(connection: AbstractConnection, commands: list[Sequence[Any]]) -> list[Any]:
    """Write the commands at once, then read a reply per command: an error reply is that command's
    alone; a failure of the connection (which redis-py then closes) fails the commands not yet
    answered, and the replies read before it stand. Every reply is read within one socket timeout
    of the first read, as a single call's is, not one timeout per reply: a Redis answering slowly
    holds a batch's callers no longer than it would hold one."""
    await connection.send_packed_command(connection.pack_commands(commands))
    replies: list[Any] = []
    try:
        async with asyncio.timeout(connection.socket_timeout):
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:
                    replies.append(exc)
    except Exception as exc:  # the timeout's TimeoutError too: redis-py has closed the connection
        replies += [_own(exc) for _ in range(len(commands) - len(replies))]
    return replies


def _own(value: Any) -> Any:
    """`value`, or a copy of it when it is an exception: each caller raises its own, since raising
    one object in many tasks would chain their tracebacks onto it."""
    if not isinstance(value, BaseException):
        return value
    try:
        return copy.copy(value)
    except Exception:  # an exception class whose arguments do not rebuild it
        return value


def _settle(future: asyncio.Future[Outcome], reply: Any, acknowledged: Any) -> None:
    if not future.done():  # else its caller went away meanwhile
        future.set_result((reply, acknowledged))


def stored(reply: Any, acknowledged: Any) -> Any:
    """`check` without replicas: the script's reply, or its error raised."""
    if isinstance(reply, BaseException):
        try:
            raise reply
        finally:
            del reply  # (no cycle through this frame: the error is freed when its caller is done)
    return reply
