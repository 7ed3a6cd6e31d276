"""Swagger UI in a real browser: headless Debian Chromium, driven by Playwright, against the live server.

What a person sees at /api/v1/ui/: the page loads with nothing fetched from anywhere but the server, shows
the document (title, OAS 3.1 badge, all 8 operations), takes a bearer token through "Authorize", and
"Try it out" + "Execute" on listWorkflowRuns shows a 200 with runs. Screenshots are kept in
build/swagger-ui.png (the whole page) and build/swagger-ui-list-runs.png (the executed operation).

Playwright never downloads a browser here: it drives /usr/bin/chromium (`make browser-deps` installs
Debian's `chromium` when it is missing), with the flags that keep Chromium off the network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from playwright.sync_api import BrowserContext, FloatRect, Locator, Page, Request, expect, sync_playwright

from tests.support.live import LiveApi
from tests.support.waits import wait_for

pytestmark = pytest.mark.services

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
SCREENSHOT = Path(__file__).resolve().parents[2] / "build" / "swagger-ui.png"
# No sandbox as root; no GPU, QUIC, first-run, background networking, component updates or sync: without
# these Chromium tries Google's hosts at start, which this closed network refuses.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OPERATIONS = {
    "Runs": {"listWorkflowRuns", "getWorkflowRun", "applyWorkflowRunAction", "signalWorkflowRun"},
    "Updates": {"getWorkflowRunUpdates", "streamWorkflowRunUpdates", "postWorkflowRunUpdate"},
    "Conversations": {"listConversations"},
}


@dataclass(frozen=True)
class UiProject:
    token: str
    run_id: str


@pytest.fixture(scope="module")
def ui_project(live_api: LiveApi) -> UiProject:
    """A project of its own with one completed run, already visible in listings: what the UI must list."""
    project, document_id = f"ui-{uuid.uuid4().hex[:8]}", f"doc-ui-{uuid.uuid4().hex[:8]}"
    cli = [sys.executable, "-m", "cli.main", "start", "StandardContentIngestion", "--project", project]
    out = subprocess.run(
        [*cli, "--user", "u-ui", "--input", json.dumps({"documentId": document_id}), "--document-id", document_id],
        env=live_api.env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    run_id: str = json.loads(out.stdout)["run_id"]
    token = live_api.token(project=project, user="u-ui")
    with httpx.Client(base_url=live_api.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        wait_for(lambda: run_id in {r["run_id"] for r in http.post("/workflows/runs", json={}).json()["runs"]})
    return UiProject(token=token, run_id=run_id)


@pytest.fixture(scope="module")
def browser() -> Iterator[BrowserContext]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser-deps` (installs Debian's chromium)")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile,  # a fresh --user-data-dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()


def check_document(page: Page) -> None:
    """The document: title, the OAS 3.1 badge and all 8 operations, under their tags; no render error."""
    expect(page.locator(".info .title").first).to_contain_text("Workflow Runs API")
    expect(page.locator(".info .version-stamp")).to_contain_text("OAS 3.1")
    expect(page.locator(".opblock")).to_have_count(8)
    for tag, operation_ids in OPERATIONS.items():
        for operation_id in operation_ids:
            expect(page.locator(f"#operations-{tag}-{operation_id}")).to_have_count(1)
    assert not page.locator(".errors-wrapper").is_visible(), page.locator(".errors-wrapper").inner_text()


def authorize(page: Page, token: str) -> None:
    """Give a bearer token through the "Authorize" dialog of the bearerAuth scheme."""
    page.locator(".auth-wrapper button.authorize").click()
    dialog = page.locator(".dialog-ux .modal-ux")
    expect(dialog).to_contain_text("bearerAuth")
    dialog.locator("input").fill(token)
    dialog.locator(".auth-btn-wrapper button.authorize").click()
    expect(dialog.locator(".auth-btn-wrapper")).to_contain_text("Logout")
    dialog.locator("button.btn-done").click()
    expect(dialog).to_have_count(0)


def pick_this_server(page: Page, base_url: str) -> None:
    """The server Swagger UI sends requests to: this one, picked in "Servers" as a person would. The list comes
    from the served document's `servers`; a relative URL there means the server that serves the document."""
    servers = page.locator(".servers select")
    options: list[str] = servers.locator("option").evaluate_all("options => options.map(o => o.value)")
    here = [value for value in options if urljoin(page.url, value).rstrip("/") == base_url]
    assert here, (
        f"Swagger UI offers no server for this server ({base_url}), only {options}: "
        "Execute would send every request elsewhere (the served document's `servers` list)"
    )
    servers.select_option(here[0])


def execute_list_runs(page: Page, run_id: str) -> Locator:
    """listWorkflowRuns: "Try it out" with the "every run" example body, "Execute", a 200 listing the run."""
    operation = page.locator("#operations-Runs-listWorkflowRuns")
    operation.locator(".opblock-summary").first.click()
    operation.locator("button.try-out__btn").click()
    operation.locator(".opblock-section-request-body select.examples-select-element").select_option("ListRunsAll")
    expect(operation.locator("textarea.body-param__text")).to_have_value("{}")
    operation.locator("button.execute").click()

    live = operation.locator(".live-responses-table .response")
    expect(live.locator(".response-col_status")).to_contain_text("200", timeout=30_000)
    body = live.locator(".response-col_description .highlight-code")
    expect(body).to_contain_text(run_id)
    expect(body).to_contain_text('"has_more"')
    return operation


def screenshot_operation(page: Page, operation: Locator, path: Path) -> None:
    """The executed request and its live answer: from the operation's header down to the live response.
    Bounding boxes are relative to the viewport, a full-page clip to the page: hence the scroll offset."""
    top, bottom = operation.bounding_box(), operation.locator(".live-responses-table").bounding_box()
    assert top is not None and bottom is not None
    scroll_y: float = page.evaluate("window.scrollY")
    height = bottom["y"] + bottom["height"] - top["y"]
    clip: FloatRect = {"x": top["x"], "y": top["y"] + scroll_y, "width": top["width"], "height": height}
    page.screenshot(path=str(path), full_page=True, clip=clip)


def test_swagger_ui_renders_authorizes_and_lists_runs(
    live_api: LiveApi, browser: BrowserContext, ui_project: UiProject
) -> None:
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(live_api.base_url))
    requests: list[Request] = []

    def record(request: Request) -> None:  # Playwright wants a Python function here, not a bound builtin
        requests.append(request)

    browser.on("request", record)
    page = browser.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    try:
        page.goto(f"{live_api.base_url}/ui/")
        check_document(page)
        authorize(page, ui_project.token)
        pick_this_server(page, live_api.base_url)
        operation = execute_list_runs(page, ui_project.run_id)
        screenshot_operation(page, operation, SCREENSHOT.with_name("swagger-ui-list-runs.png"))
    finally:
        page.screenshot(path=str(SCREENSHOT), full_page=True)  # also when a step failed: what the page showed

    # The request Swagger UI sent: to this server, with the token from "Authorize".
    executed = [r for r in requests if r.method == "POST" and r.url == f"{live_api.base_url}/workflows/runs"]
    assert executed, f"no POST /workflows/runs from the page; requests: {[r.url for r in requests]}"
    assert executed[-1].headers.get("authorization") == f"Bearer {ui_project.token}"

    # Nothing was fetched from anywhere but the server (Swagger UI is served locally, no CDN).
    network = [r.url for r in requests if urlsplit(r.url).scheme in ("http", "https", "ws", "wss")]
    elsewhere = [url for url in network if not url.startswith(origin + "/")]
    assert not elsewhere, f"requests left {origin}: {elsewhere}"
    assert f"{live_api.base_url}/openapi.json" in network
    assert not page_errors, page_errors
