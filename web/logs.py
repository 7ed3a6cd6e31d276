"""Structured (one JSON object per line) logging, with the request id of the request being served."""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import logging
import logging.handlers
import queue
import sys
import threading
import time
from typing import IO, Any

import orjson

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def entry(ts: float, level: str, logger: str, msg: str, request_id: str | None) -> dict[str, object]:
    """The fields every log line starts with, the access log's included."""
    line: dict[str, object] = {"ts": round(ts, 3), "level": level, "logger": logger, "msg": msg}
    if request_id:
        line["request_id"] = request_id
    return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = entry(
            record.created,
            record.levelname.lower(),
            record.name,
            record.getMessage(),
            getattr(record, "request_id", None),
        )
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def _with_request_id(record: logging.LogRecord) -> bool:
    # Taken while still in the request's context: the record is formatted on another thread.
    record.request_id = request_id_var.get()
    return True


# Lines waiting for the writer thread, at most; and the characters of a client-chosen field kept.
MAX_PENDING_LINES = 20_000
MAX_FIELD_CHARS = 1024


def clip(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """`text` cut to `limit` characters (a request path or query can be as long as a whole head)."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


class AccessLog:
    """The access log: one JSON line per request, in the same shape as the other log lines.

    It is written on every request, so it skips `logging` (a record, a copy, a format and a thread
    wake-up per line: ~17% of the CPU of a run-details request, measured): the request serialises
    its line with orjson and queues the bytes; a background thread wakes every `interval` seconds
    and writes whatever has queued in one write. A slow terminal or pipe never stalls the loop.
    Until `start` is called (tests, library use), lines are dropped.

    The queue is bounded: with the output blocked (a pipe nobody reads) it would otherwise grow
    with every request. Beyond `max_pending` lines, new lines are dropped and counted, and the
    count is written as a line of its own once the output takes lines again. With the fields the
    middleware clips (`clip`), that is at most a few tens of MB."""

    def __init__(self, interval: float = 0.05, max_pending: int = MAX_PENDING_LINES) -> None:
        self.interval = interval
        self.max_pending = max_pending
        self._dropped = 0  # counted on the event loop, reported (and reset) by the writer: approximate
        self._lines: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._output: IO[bytes] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Lock()

    def write(self, message: str, fields: dict[str, Any]) -> None:
        if self._output is None:
            return
        if self._lines.qsize() >= self.max_pending:
            self._dropped += 1
            return
        line = entry(time.time(), "info", "workflow_runs.access", message, request_id_var.get())
        line.update(fields)
        self._lines.put(orjson.dumps(line, default=str))

    def start(self, output: IO[bytes]) -> None:
        if self._thread is not None:
            return
        self._output = output
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()
        atexit.register(self.stop)

    def stop(self) -> None:
        """Write what is queued and stop; later lines are dropped."""
        with self._stopping:
            if self._thread is None:
                return
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.flush()
            self._output = None

    def flush(self) -> None:
        batch = []
        with contextlib.suppress(queue.Empty):
            while True:
                batch.append(self._lines.get_nowait())
        dropped, self._dropped = self._dropped, 0
        if dropped:
            message = f"{dropped} access log lines dropped: the log output did not keep up"
            batch.append(orjson.dumps(entry(time.time(), "warning", "workflow_runs.access", message, None)))
        output = self._output
        if batch and output is not None:
            try:
                output.write(b"\n".join(batch) + b"\n")
                output.flush()
            except (OSError, ValueError):
                # A closed or broken stderr loses these lines, as `logging` would, but never the
                # thread: the next batch is tried again.
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()


access_log = AccessLog()


def configure(level: str = "INFO") -> None:
    """JSON lines on stderr, written by background threads so that a slow terminal or pipe never
    stalls the event loop (see `AccessLog` for the one line per request)."""
    if logging.getLevelName(level) <= logging.INFO:  # access lines are at INFO
        access_log.start(sys.stderr.buffer)
    output = logging.StreamHandler(sys.stderr)
    output.setFormatter(JsonFormatter())
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    enqueue = logging.handlers.QueueHandler(records)
    enqueue.addFilter(_with_request_id)
    listener = logging.handlers.QueueListener(records, output)
    listener.start()
    atexit.register(listener.stop)
    root = logging.getLogger()
    root.handlers[:] = [enqueue]
    root.setLevel(level)
    # uvicorn's access log would print raw query strings (and so `access_token`): ours redacts it.
    logging.getLogger("uvicorn.access").disabled = True


def monotonic_ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)
