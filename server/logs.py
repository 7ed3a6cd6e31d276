"""Structured (one JSON object per line) logging, with the request id of the request being served."""

from __future__ import annotations

import atexit
import contextvars
import logging
import logging.handlers
import queue
import sys
import time

import orjson

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def _with_request_id(record: logging.LogRecord) -> bool:
    # Taken while still in the request's context: the record is formatted on another thread.
    record.request_id = request_id_var.get()
    return True


def configure(level: str = "INFO") -> None:
    """JSON lines on stderr, written by a background thread so that a slow terminal or pipe never
    stalls the event loop (one access-log line per request otherwise costs the loop a write)."""
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
