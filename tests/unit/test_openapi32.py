"""The OpenAPI 3.2 edition (scripts/openapi32.py) and the documents the server serves.

The edition in generated/ is what the script derives from the current bundle (`make generate`
writes it, `make check-generated` compares it), it is valid OpenAPI 3.2, its stream's events are an
`itemSchema`, and the server serves it; every served document puts the relative server first, so
that Swagger UI's "Try it out" calls the server it was loaded from."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_spec_validator import OpenAPIV31SpecValidator, OpenAPIV32SpecValidator
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from scripts import openapi32
from tests.support.fakes import FakeRuns, app_settings, fake_backends_factory
from web.app import BASE_PATH, EDITION_32, create_app, published_document, published_document_32, served_servers

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "generated" / "openapi.yaml"
STREAM = "/workflows/runs/{workflowId}/{runId}/stream"


def bundle() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(BUNDLE.read_text(encoding="utf-8"))
    return document


def edition() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(EDITION_32.read_text(encoding="utf-8"))
    return document


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    app = create_app(app_settings("openapi32-unit-test-secret-" + "x" * 40), fake_backends_factory(FakeRuns()))
    with app.test_client() as test_client:
        yield test_client


# -- the edition in generated/ ---------------------------------------------------------------------


def test_the_edition_is_what_the_script_derives_from_the_current_bundle() -> None:
    assert EDITION_32.read_text(encoding="utf-8") == openapi32.render(openapi32.derive(bundle())), (
        "generated/openapi-3.2.yaml is stale: run make generate"
    )
    assert openapi32.main(["--source", str(BUNDLE), "--output", str(EDITION_32), "--check"]) == 0


def test_check_fails_on_a_stale_edition(tmp_path: Path) -> None:
    stale = tmp_path / "openapi-3.2.yaml"
    stale.write_text(EDITION_32.read_text(encoding="utf-8").replace("3.2.0", "3.2.1", 1), encoding="utf-8")
    assert openapi32.main(["--source", str(BUNDLE), "--output", str(stale), "--check"]) == 1
    assert openapi32.main(["--source", str(BUNDLE), "--output", str(tmp_path / "absent.yaml"), "--check"]) == 1


def test_the_edition_is_valid_openapi_3_2_and_not_3_1() -> None:
    document = edition()
    assert document["openapi"] == "3.2.0"
    OpenAPIV32SpecValidator(document).validate()
    # It uses what only 3.2 has: read as 3.1, the same document is refused.
    with pytest.raises(OpenAPIValidationError):
        OpenAPIV31SpecValidator({**document, "openapi": "3.1.0"}).validate()


def test_the_streams_events_are_its_item_schema() -> None:
    media = edition()["paths"][STREAM]["get"]["responses"]["200"]["content"]["text/event-stream"]
    assert media == {"itemSchema": {"$ref": "#/components/schemas/RunUpdateEvent"}}
    source = bundle()["paths"][STREAM]["get"]["responses"]["200"]["content"]["text/event-stream"]
    assert source["schema"] == media["itemSchema"]


def test_tags_have_their_3_2_fields_and_every_operation_tag_is_declared() -> None:
    document = edition()
    tags = {tag["name"]: tag for tag in document["tags"]}
    assert all(tag["summary"] and tag["kind"] for tag in tags.values())
    assert tags["Conversations"]["parent"] == "Runs"
    assert {tag["parent"] for tag in tags.values() if "parent" in tag} <= set(tags)
    used = {name for item in document["paths"].values() for op in item.values() for name in op.get("tags", [])}
    assert used <= set(tags)
    post = document["paths"]["/workflows/runs/{runId}/updates"]["post"]
    assert tags[post["tags"][-1]]["kind"] == "audience"


def test_only_what_3_2_says_differently_changes() -> None:
    """Apart from the version, the tags and the stream's keyword, the edition is the bundle."""
    source, derived = bundle(), edition()
    for document in (source, derived):
        document.pop("openapi")
        document.pop("tags")
        for item in document["paths"].values():
            for operation in item.values():
                operation.pop("tags", None)
        media = document["paths"][STREAM]["get"]["responses"]["200"]["content"]["text/event-stream"]
        media["schema"] = media.pop("schema", None) or media.pop("itemSchema")
    assert derived == source


# -- the script on other documents -----------------------------------------------------------------


def tiny(**content: Any) -> dict[str, Any]:
    """A 3.1 document with the bundle's tags and one operation answering `content`."""
    operation = {
        "operationId": "postWorkflowRunUpdate",
        "responses": {"200": {"description": "ok", "content": content}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "t", "version": "1"},
        "tags": [{"name": "Runs"}, {"name": "Updates"}, {"name": "Conversations"}],
        "paths": {"/x": {"post": operation}},
    }


def test_every_sequential_media_type_gets_an_item_schema_and_json_keeps_its_schema() -> None:
    schema = {"type": "object"}
    source = tiny(
        **{"application/jsonl": {"schema": schema}, "application/json-seq; charset=utf-8": {"schema": schema}},
        **{"application/json": {"schema": schema}},
    )
    derived = openapi32.derive(source)
    content = derived["paths"]["/x"]["post"]["responses"]["200"]["content"]
    assert content["application/jsonl"] == content["application/json-seq; charset=utf-8"] == {"itemSchema": schema}
    assert content["application/json"] == {"schema": schema}
    assert "itemSchema" not in str(source)  # the source is left as it was


def test_a_serialized_example_of_a_non_json_media_type_becomes_serialized_value() -> None:
    wire = 'id: 1-0\ndata: {"type":"UPDATE"}\n\n'
    source = tiny(
        **{"text/event-stream": {"schema": {}, "examples": {"Wire": {"value": wire}}}},
        **{"application/json": {"examples": {"Data": {"value": {"a": 1}}}}},
    )
    content = openapi32.derive(source)["paths"]["/x"]["post"]["responses"]["200"]["content"]
    assert content["text/event-stream"]["examples"]["Wire"] == {"serializedValue": wire}
    assert content["application/json"]["examples"]["Data"] == {"value": {"a": 1}}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["tags"].append({"name": "Billing"}), "Billing"),
        (lambda d: d["tags"].pop(), "Conversations"),
        (lambda d: d["paths"]["/x"]["post"].update(operationId="renamed"), "postWorkflowRunUpdate"),
        (lambda d: d.update(openapi="3.0.3"), "3.1"),
    ],
    ids=["unknown tag", "missing tag", "missing operation", "not 3.1"],
)
def test_a_bundle_the_tables_do_not_match_stops_the_script(change: Any, message: str) -> None:
    source = tiny()
    change(source)
    with pytest.raises(openapi32.EditionError, match=message):
        openapi32.derive(copy.deepcopy(source))


# -- the served documents --------------------------------------------------------------------------

RELATIVE = {"url": "/api/v1", "description": "here"}
TEMPLATED = {"url": "{scheme}://{host}/api/v1", "variables": {"scheme": {"default": "https"}}}
PRODUCTION = {"url": "https://api.example.com/api/v1"}


@pytest.mark.parametrize(
    ("servers", "served"),
    [
        ([TEMPLATED, RELATIVE, PRODUCTION], [RELATIVE, TEMPLATED, PRODUCTION]),
        ([RELATIVE, TEMPLATED], [RELATIVE, TEMPLATED]),
        ([PRODUCTION], [{"url": BASE_PATH, "description": "The server this document is served from."}, PRODUCTION]),
        ([], [{"url": BASE_PATH, "description": "The server this document is served from."}]),
    ],
    ids=["absolute first", "relative first", "no relative", "none"],
)
def test_the_served_servers_start_with_a_relative_one(servers: Any, served: Any) -> None:
    assert served_servers(servers) == served


def test_every_served_document_names_this_server_first_and_is_otherwise_the_published_one(client: Any) -> None:
    published, edition_32 = bundle(), edition()
    for path, source in (("openapi.json", published), ("openapi.yaml", published), ("openapi-3.2.json", edition_32)):
        response = client.get(f"{BASE_PATH}/{path}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/" + path.rpartition(".")[2])
        served = yaml.safe_load(response.text)  # JSON is YAML too
        assert served["servers"][0]["url"] == BASE_PATH
        assert served == {**source, "servers": served_servers(source.get("servers") or [])}
    assert client.get(f"{BASE_PATH}/openapi-3.2.json").json() == published_document_32()
    assert published_document()["openapi"].startswith("3.1")
