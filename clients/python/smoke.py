"""Smoke test of the Python client generated from build/openapi.yaml (openapi-python-client) against a live server:
list runs, run details, signal, updates, and the SSE stream.

Environment: BASE_URL (ends with /api/v1), API_TOKEN, SMOKE_WORKFLOW_ID / SMOKE_RUN_ID (an open AgentConversation
run: the signal target), optionally SMOKE_CLOSED_WORKFLOW_ID / SMOKE_CLOSED_RUN_ID (a closed run whose stream is read
to its `end` event). Prints one `ok ...` line per step and `SMOKE OK python` at the end; any failure exits 1.

The generated package is imported from build/clients/python (PYTHONPATH). Its `stream_workflow_run_updates` is not
used: OpenAPI 3.1 gives text/event-stream no semantics, and the generator parses the whole body as one event object,
which fails. The stream is read over the generated client's own httpx client with the small SSE parser
below, and each `data` becomes the generated `RunUpdate` / `StreamControl` model.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from workflow_runs_client import AuthenticatedClient
from workflow_runs_client.api.runs import get_workflow_run, list_workflow_runs, signal_workflow_run
from workflow_runs_client.api.updates import get_workflow_run_updates
from workflow_runs_client.models import (
    Error,
    ListRunsRequest,
    RunUpdate,
    RunUpdateList,
    SignalRequest,
    SignalResult,
    StreamControl,
    StreamControlReason,
    WorkflowRun,
    WorkflowRunList,
    WorkflowRunStatus,
)

T = TypeVar("T")


@dataclass
class SseEvent:
    """One dispatched Server-Sent Event, as the WHATWG EventSource algorithm builds it."""

    event: str
    data: str
    id: str
    retry: int | None


def read_sse(lines: Iterable[str]) -> Iterator[SseEvent]:
    """A minimal SSE parser over already split lines (httpx splits on CRLF, LF and CR): `:` starts a comment
    (heartbeats), a blank line dispatches the event, and the last `id` and `retry` persist across events."""
    last_id, event, data, retry, saw_field = "", "", list[str](), None, False
    for line in lines:
        if not line:
            if saw_field and data:
                yield SseEvent(event or "message", "\n".join(data), last_id, retry)
            event, data, saw_field = "", [], False  # `retry` persists, as in EventSource
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        saw_field = True
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value
        elif field == "id" and "\0" not in value:
            last_id = value
        elif field == "retry" and value.isdigit():
            retry = int(value)


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"{name} is not set")
    return value


def check(condition: object, message: str) -> None:
    if not condition:
        raise AssertionError(f"check failed: {message}")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30.0) -> T:
    """Poll `probe` until it returns a value (services are eventually consistent); fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def expect(result: T | Error | None, kind: type[T], operation: str) -> T:
    """The generated `sync` returns the documented model, an `Error` or None: insist on the success model."""
    if isinstance(result, Error):
        raise AssertionError(f"{operation}: {result.status} {result.message}")
    if not isinstance(result, kind):
        raise AssertionError(f"{operation}: unexpected answer {result!r}")
    return result


def run_update(data: str, run_id: str) -> RunUpdate:
    update = RunUpdate.from_dict(json.loads(data))
    check(update.workflow_run_id == run_id, "update.workflow_run_id is the run's id")
    check(isinstance(update.timestamp, int), "update.timestamp is an integer")
    return update


def list_runs(client: AuthenticatedClient, run_id: str) -> None:
    """listWorkflowRuns: the run shows up (Temporal's visibility store can lag a little)."""

    def listed() -> WorkflowRunList | None:
        page = expect(
            list_workflow_runs.sync(client=client, body=ListRunsRequest(page_size=200)),
            WorkflowRunList,
            "listWorkflowRuns",
        )
        return page if any(r.run_id == run_id for r in page.runs) else None

    page = wait_for("the run in listWorkflowRuns", listed)
    print(f"ok listWorkflowRuns: {len(page.runs)} runs, including {run_id}, has_more={page.has_more}")


def run_details(client: AuthenticatedClient, workflow_id: str, run_id: str) -> None:
    """getWorkflowRun: typed details of the open conversation, and the typed 404 of an unknown run."""
    run = expect(get_workflow_run.sync(workflow_id, run_id, client=client), WorkflowRun, "getWorkflowRun")
    check(run.run_id == run_id and run.workflow_id == workflow_id, "details are the run's")
    check(run.status is WorkflowRunStatus.RUNNING, f"the signal target is RUNNING (got {run.status})")
    print(f"ok getWorkflowRun: {run.type_} {run.status.value}, {len(run.history)} history events")

    missing = get_workflow_run.sync_detailed(workflow_id, str(uuid.uuid4()), client=client)
    check(missing.status_code == 404 and isinstance(missing.parsed, Error), "an unknown run answers 404")
    code = missing.parsed.error_code if isinstance(missing.parsed, Error) else None
    print(f"ok getWorkflowRun (unknown run): 404 {code or ''}".rstrip())


def signal_and_read_updates(client: AuthenticatedClient, workflow_id: str, run_id: str) -> list[RunUpdate]:
    """signalWorkflowRun (UserInput, with an extra field: SignalRequest allows additional properties), then
    getWorkflowRunUpdates until the conversation's ANSWER to it is there."""
    text = f"hello from python {time.time_ns()}"
    body = SignalRequest(message=text)
    body["data"] = {"client": "python"}
    signalled = expect(
        signal_workflow_run.sync(workflow_id, run_id, "UserInput", client=client, body=body),
        SignalResult,
        "signalWorkflowRun",
    )
    check(signalled.status == "success", "signal status is success")
    print(f"ok signalWorkflowRun: {signalled.message}")

    def answered() -> list[RunUpdate] | None:
        got = expect(
            get_workflow_run_updates.sync(workflow_id, run_id, client=client, since=0),
            RunUpdateList,
            "getWorkflowRunUpdates",
        )
        return got.messages if any(u.type_ == "ANSWER" and text in u.message for u in got.messages) else None

    updates = wait_for("the answer to the signal", answered)
    print(f"ok getWorkflowRunUpdates: {len(updates)} updates, the last: {updates[-1].type_}")
    return updates


def stream_open_run(client: AuthenticatedClient, workflow_id: str, run_id: str, stored: list[RunUpdate]) -> None:
    """streamWorkflowRunUpdates on the open run: the replay of the stored updates, then close (it stays open)."""
    path = f"/workflows/runs/{workflow_id}/{run_id}/stream"
    received: list[RunUpdate] = []
    first_retry: int | None = None
    last_id = ""
    headers = {"Accept": "text/event-stream"}
    with client.get_httpx_client().stream("GET", path, params={"since": 0}, headers=headers, timeout=30) as r:
        check(r.status_code == 200, f"stream answers 200 (got {r.status_code})")
        check(r.headers["content-type"].startswith("text/event-stream"), "stream content type")
        for event in read_sse(r.iter_lines()):
            first_retry = first_retry if first_retry is not None else event.retry
            check(event.event == "message", f"only update events while the run is open (got {event.event})")
            received.append(run_update(event.data, run_id))
            last_id = event.id
            if len(received) >= len(stored):
                break
    check([u.to_dict() for u in received] == [u.to_dict() for u in stored], "the stream replays the stored updates")
    check(first_retry is not None and first_retry > 0, "the first frame carries retry")
    check(last_id.partition("-")[0].isdigit(), "update events carry a log id")
    print(f"ok streamWorkflowRunUpdates: retry {first_retry}, {len(received)} update events, last id {last_id}")


def stream_closed_run(client: AuthenticatedClient, workflow_id: str, run_id: str) -> None:
    """The stream of a closed run replays its updates, sends `end` and is closed by the server."""
    messages, end = 0, None
    with client.get_httpx_client().stream("GET", f"/workflows/runs/{workflow_id}/{run_id}/stream", timeout=30) as r:
        check(r.status_code == 200, f"closed-run stream answers 200 (got {r.status_code})")
        for event in read_sse(r.iter_lines()):
            if event.event == "message":
                run_update(event.data, run_id)
                messages += 1
            elif event.event == "end":
                end = StreamControl.from_dict(json.loads(event.data))
    if end is None or end.reason is not StreamControlReason.RUN_CLOSED:
        raise AssertionError(f"check failed: the stream ends with an `end` event (got {end!r})")
    final = end.status.value if isinstance(end.status, WorkflowRunStatus) else None
    check(final not in (None, "RUNNING"), "the end event carries the final status")
    print(f"ok streamWorkflowRunUpdates (closed run): {messages} update events, end {end.reason.value} {final}")


def main() -> None:
    base_url = env("BASE_URL").rstrip("/")
    workflow_id, run_id = env("SMOKE_WORKFLOW_ID"), env("SMOKE_RUN_ID")
    with AuthenticatedClient(base_url=base_url, token=env("API_TOKEN"), raise_on_unexpected_status=True) as client:
        list_runs(client, run_id)
        run_details(client, workflow_id, run_id)
        updates = signal_and_read_updates(client, workflow_id, run_id)
        stream_open_run(client, workflow_id, run_id, updates)
        closed = os.environ.get("SMOKE_CLOSED_WORKFLOW_ID"), os.environ.get("SMOKE_CLOSED_RUN_ID")
        if closed[0] and closed[1]:
            stream_closed_run(client, closed[0], closed[1])
    print("SMOKE OK python")


if __name__ == "__main__":
    try:
        main()
    except Exception as error:  # report every failure as one line and a non-zero exit
        print(f"SMOKE FAILED python: {type(error).__name__}: {error}", file=sys.stderr)
        raise SystemExit(1) from error
