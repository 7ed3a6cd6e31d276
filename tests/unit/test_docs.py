"""`make docs` writes one HTML page that documents the whole API and loads nothing from another host.

The page is built once for the module, into a temporary directory (`make docs DOCS_HTML=...`).
Redoc 3 prerenders only the overview and renders the operations in the browser from the document
embedded in the page, so the operations are checked in that embedded document.
"""

from __future__ import annotations

import json
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# An absolute URL of another host: http(s)://... or protocol-relative //...
REMOTE = re.compile(r"""^\s*['"]?\s*(?:https?:)?//""", re.IGNORECASE)
CSS_URL = re.compile(r"""url\(\s*([^)]*)\)""", re.IGNORECASE)
CSS_IMPORT = re.compile(r"""@import\s+(?:url\(\s*)?([^\s;)]+)""", re.IGNORECASE)
JS_REMOTE_IMPORT = re.compile(r"""(?:\bfrom\s*|\bimport\s*\(\s*)["'`](?:https?:)?//""", re.IGNORECASE)
# Attributes whose URL the browser fetches on its own (a plain <a href> is only a link).
FETCHED_ATTRS = {"src", "srcset", "poster", "data", "background"}
FETCHED_HREF_TAGS = {"link", "use", "image", "script"}


class PageParts(HTMLParser):
    """What a page would load: fetched attributes, style sheets, scripts and its CSP."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.fetched: list[tuple[str, str, str]] = []
        self.styles: list[str] = []
        self.scripts: list[str] = []
        self.script_srcs: list[str] = []
        self.csp: list[str] = []
        self.title = ""
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        for name, value in values.items():
            if name in FETCHED_ATTRS or (name in {"href", "xlink:href"} and tag in FETCHED_HREF_TAGS):
                self.fetched.append((tag, name, value))
            if name == "style":
                self.styles.append(value)
        if tag == "script" and "src" in values:
            self.script_srcs.append(values["src"])
        if tag == "meta" and values.get("http-equiv", "").lower() == "content-security-policy":
            self.csp.append(values.get("content", ""))
        if tag in {"style", "script", "title"}:
            self._in = tag
            if tag != "title":
                (self.styles if tag == "style" else self.scripts).append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == self._in:
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "style":
            self.styles[-1] += data
        elif self._in == "script":
            self.scripts[-1] += data
        elif self._in == "title":
            self.title += data


@pytest.fixture(scope="module")
def html(tmp_path_factory: pytest.TempPathFactory) -> str:
    output = tmp_path_factory.mktemp("docs") / "index.html"
    result = subprocess.run(
        ["make", "--no-print-directory", "docs", f"DOCS_HTML={output}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert output.is_file(), result.stdout + result.stderr
    return output.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def page(html: str) -> PageParts:
    parts = PageParts()
    parts.feed(html)
    parts.close()
    return parts


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "generated" / "openapi.yaml").read_text())
    return loaded


def operations(document: dict[str, Any]) -> dict[str, str]:
    """operationId -> summary of every operation of a document."""
    return {
        operation["operationId"]: operation["summary"]
        for path_item in document["paths"].values()
        for method, operation in path_item.items()
        if method in HTTP_METHODS
    }


def embedded_document(page: PageParts) -> dict[str, Any]:
    marker = "const __redoc_definition = "
    for script in page.scripts:
        start = script.find(marker)
        if start != -1:
            embedded, _ = json.JSONDecoder().raw_decode(script, start + len(marker))
            assert isinstance(embedded, dict)
            return embedded
    raise AssertionError("the page embeds no OpenAPI document")


def is_remote(url: str) -> bool:
    return bool(REMOTE.match(url))


def test_the_page_is_titled_and_prerendered_with_the_api_title(
    page: PageParts, html: str, document: dict[str, Any]
) -> None:
    title = document["info"]["title"]
    assert page.title.strip() == title
    assert f"{title} ({document['info']['version']})" in html  # the prerendered heading


def test_the_page_documents_every_operation(page: PageParts, document: dict[str, Any]) -> None:
    expected = operations(document)
    embedded = embedded_document(page)
    assert embedded["info"]["title"] == document["info"]["title"]
    assert len(expected) >= 8
    assert operations(embedded) == expected


def test_the_renderer_is_inlined(page: PageParts) -> None:
    assert page.script_srcs == []
    assert any("hydrate(" in script for script in page.scripts)
    assert [script for script in page.scripts if JS_REMOTE_IMPORT.search(script)] == []


def test_nothing_is_loaded_from_another_host(page: PageParts) -> None:
    assert page.styles, "the page should carry its style sheets"
    remote_attrs = [item for item in page.fetched if is_remote(item[2])]
    remote_css = [
        target
        for style in page.styles
        for pattern in (CSS_URL, CSS_IMPORT)
        for target in pattern.findall(style)
        if is_remote(target)
    ]
    assert remote_attrs == []
    assert remote_css == []


def test_the_content_security_policy_allows_no_host(page: PageParts) -> None:
    """Redoc's bundle still names Redocly's CDN (its logo); the policy keeps the browser from fetching it."""
    assert len(page.csp) == 1
    directives = {name: sources for name, *sources in (part.split() for part in page.csp[0].split(";") if part.strip())}
    assert directives["default-src"] == ["'none'"]
    for name, sources in directives.items():
        for source in sources:
            assert source.startswith("'") or source in {"data:", "blob:"}, (name, source)
