"""Which Redis failures are a 503, and what the client is told: the API's own words, never Redis'.

The error objects are built as redis-py builds them from the replies Redis sends (it strips the
codes it knows into `status_code`, and a failing command inside a script arrives, on Redis 6,
inside the script's own `ERR`)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from redis import exceptions as redis_errors
from redis._parsers.base import BaseParser

from backends.update_hub import FULL_MESSAGE, FULL_RETRY_AFTER, UNAVAILABLE_MESSAGE, call, reply_code, unavailable
from core.errors import BackendUnavailable

SCRIPT_OOM = (
    "ERR Error running script (call to f_f0d7d46267f514ea9dda8824ff23f183151cf2d7): @user_script:30: "
    "@user_script: 30: -OOM command not allowed when used memory > 'maxmemory'."
)
SCRIPT_READONLY = (
    "ERR Error running script (call to f_0123): @user_script:30: @user_script: 30: "
    "-READONLY You can't write against a read only replica."
)


def parsed(reply: str) -> redis_errors.RedisError:
    """The exception redis-py makes of an error reply (both of its parsers use this)."""
    parse: Callable[[str], object] = BaseParser.parse_error
    error = parse(reply)
    assert isinstance(error, redis_errors.RedisError)
    return error


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        ("OOM command not allowed when used memory > 'maxmemory'.", "OOM"),  # a command; Redis 7 scripts too
        (SCRIPT_OOM, "OOM"),
        ("READONLY You can't write against a read only replica.", "READONLY"),
        (SCRIPT_READONLY, "READONLY"),
        ("BUSY Redis is busy running a script.", "BUSY"),
        ("NOREPLICAS Not enough good replicas to write.", "NOREPLICAS"),
        ("ERR wrong number of arguments for 'xadd' command", "ERR"),
        ("ERR Error running script (call to f_1): @user_script:3: user_script:3: bad argument", "ERR"),
    ],
)
def test_reply_codes_wherever_redis_py_leaves_them(reply: str, code: str) -> None:
    assert reply_code(parsed(reply)) == code


def test_what_is_unavailable() -> None:
    assert unavailable(parsed(SCRIPT_OOM))
    assert unavailable(parsed("READONLY You can't write against a read only replica."))
    assert unavailable(parsed("LOADING Redis is loading the dataset in memory"))
    assert unavailable(redis_errors.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."))
    assert not unavailable(parsed("ERR wrong number of arguments for 'xadd' command"))
    assert not unavailable(parsed("ERR Error running script (call to f_1): @user_script:3: bad argument"))


async def raising(exc: BaseException) -> None:
    raise exc


async def test_a_full_redis_is_503_in_the_apis_words() -> None:
    with pytest.raises(BackendUnavailable) as refused:
        await call(raising(parsed(SCRIPT_OOM)))
    assert refused.value.message == FULL_MESSAGE and refused.value.retry_after == FULL_RETRY_AFTER
    assert "maxmemory" not in refused.value.message and "OOM" not in refused.value.message


@pytest.mark.parametrize(
    "exc",
    [
        redis_errors.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
        redis_errors.TimeoutError("Timeout reading from 10.0.0.5:6379"),
        parsed("READONLY You can't write against a read only replica."),
        parsed(SCRIPT_READONLY),
        OSError(104, "Connection reset by peer"),
    ],
)
async def test_an_unavailable_redis_is_503_in_the_apis_words(exc: BaseException) -> None:
    with pytest.raises(BackendUnavailable) as refused:
        await call(raising(exc))
    assert refused.value.message == UNAVAILABLE_MESSAGE
    assert refused.value.__cause__ is exc  # kept for the log, never shown


async def test_other_redis_errors_are_not_hidden_as_503() -> None:
    error = parsed("ERR wrong number of arguments for 'xadd' command")
    with pytest.raises(redis_errors.ResponseError):
        await call(raising(error))
