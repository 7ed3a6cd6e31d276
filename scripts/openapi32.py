"""The OpenAPI 3.2 edition of the bundled 3.1 document: derived, never edited by hand.

`make generate` runs `python -m scripts.openapi32` (generated/openapi.yaml -> generated/openapi-3.2.yaml);
`make check-generated` runs it with `--check`, which fails when the edition is not what the current
bundle gives. `openapi/` stays 3.1: Connexion, Swagger UI 5 and the client generators read 3.1 only.

What the edition says that 3.1 cannot (docs/decisions/0012-openapi-3-2-edition.md):

- the `schema` of a sequential media type (`text/event-stream`, JSON Lines, JSON text sequences)
  becomes `itemSchema`. The 3.1 document already writes one item's schema there, by convention, as
  `RunUpdateEvent` states; 3.2 gives that meaning a keyword of its own, and leaves `schema` for the
  whole body;
- a string `value` of an Example Object under a media type that is not JSON becomes `serializedValue`
  (3.2 deprecates `value` for non-JSON targets); JSON examples keep `value`, which 3.2 calls safe for
  JSON and which more tools read than `dataValue`;
- tags get a display `summary`, a `kind` (the OpenAPI tag-kind registry's `nav`, `audience`) and a
  `parent`: conversations are runs, so their tag nests under `Runs`; and the operation meant for
  workflows rather than client applications carries an `audience` tag;
- `openapi: 3.2.0`.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "generated" / "openapi.yaml"
OUTPUT = ROOT / "generated" / "openapi-3.2.yaml"
VERSION = "3.2.0"
HEADER = "# Written by `make generate` (scripts/openapi32.py) from generated/openapi.yaml: never edit by hand.\n"

# Sequential media types whose items 3.2's `itemSchema` describes (3.2.0, "Sequential Media Types").
SEQUENTIAL = frozenset({"text/event-stream", "application/jsonl", "application/x-ndjson", "application/json-seq"})
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace", "query")


@dataclass(frozen=True)
class Tag:
    """What the 3.2 Tag Object adds to a tag: its display name, kind and parent."""

    summary: str
    kind: str
    parent: str | None = None
    description: str | None = None  # only for a tag the edition adds


# By tag name. Each tag of the bundle must be here, and each name here in the bundle (or added
# below): a tag renamed in openapi/ stops `make generate` until this table follows.
TAGS = {
    "Runs": Tag(summary="Workflow runs", kind="nav"),
    "Updates": Tag(summary="Run updates", kind="nav"),
    "Conversations": Tag(summary="Agent conversations", kind="nav", parent="Runs"),
    "Workflow activities": Tag(
        summary="For workflow activities",
        kind="audience",
        description="Operations meant for the workflows themselves (their activities), not for client applications.",
    ),
}
# Tags the edition adds to operations, by operationId.
OPERATION_TAGS = {"postWorkflowRunUpdate": ("Workflow activities",)}


class EditionError(ValueError):
    """The bundle and this script's tables disagree (a tag or an operation was renamed)."""


def derive(bundle: dict[str, Any]) -> dict[str, Any]:
    """The 3.2 edition of `bundle` (a bundled 3.1 document, left untouched)."""
    if not str(bundle.get("openapi", "")).startswith("3.1."):
        raise EditionError(f"the source must be an OpenAPI 3.1 document, not {bundle.get('openapi')!r}")
    document = copy.deepcopy(bundle)
    document["openapi"] = VERSION
    for media_type, media in media_types(document):
        if _essence(media_type) in SEQUENTIAL and "schema" in media:
            media["itemSchema"] = media.pop("schema")
        if not _is_json(media_type):
            for example in (media.get("examples") or {}).values():
                if isinstance(example.get("value"), str):
                    example["serializedValue"] = example.pop("value")
    _tags(document)
    return document


def media_types(document: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every Media Type Object of the request bodies and responses (paths, webhooks, components),
    with its media type. References are skipped: their targets are visited where they are defined."""
    operations = [
        operation
        for items in (document.get("paths") or {}, document.get("webhooks") or {})
        for item in items.values()
        for method in HTTP_METHODS
        if isinstance(operation := item.get(method), dict)
    ]
    components = document.get("components") or {}
    bodies = [op["requestBody"] for op in operations if "requestBody" in op]
    bodies += list((components.get("requestBodies") or {}).values())
    responses = [response for op in operations for response in (op.get("responses") or {}).values()]
    responses += list((components.get("responses") or {}).values())
    for holder in (*bodies, *responses):
        for media_type, media in (holder.get("content") or {}).items():
            if "$ref" not in media:
                yield media_type, media


def _essence(media_type: str) -> str:
    """The media type without its parameters, in lower case."""
    return media_type.partition(";")[0].strip().lower()


def _is_json(media_type: str) -> bool:
    essence = _essence(media_type)
    return essence == "application/json" or essence.endswith("+json")


def _tags(document: dict[str, Any]) -> None:
    """The 3.2 fields of every tag, the tags the edition adds, and their operations."""
    tags: list[dict[str, Any]] = document.setdefault("tags", [])
    names = [tag["name"] for tag in tags]
    unknown = [name for name in names if name not in TAGS]
    if unknown:
        raise EditionError(f"tags {unknown} of the bundle are not in scripts/openapi32.py's TAGS")
    for name, extra in TAGS.items():
        if name not in names:
            if extra.description is None:
                raise EditionError(f"tag {name!r} of scripts/openapi32.py's TAGS is not in the bundle")
            tags.append({"name": name, "description": extra.description})
    for index, tag in enumerate(tags):
        extra = TAGS[tag["name"]]
        added = {"summary": extra.summary, "parent": extra.parent, "kind": extra.kind}
        # In the order the 3.2 specification lists the fields: name, summary, description, ..., parent, kind.
        tags[index] = {
            "name": tag["name"],
            "summary": extra.summary,
            **{key: value for key, value in tag.items() if key not in ("name", *added)},
            **{key: value for key, value in added.items() if key != "summary" and value is not None},
        }
    found = set()
    for items in (document.get("paths") or {}, document.get("webhooks") or {}):
        for item in items.values():
            for method in HTTP_METHODS:
                operation = item.get(method)
                if isinstance(operation, dict) and operation.get("operationId") in OPERATION_TAGS:
                    found.add(operation["operationId"])
                    operation["tags"] = [*operation.get("tags", []), *OPERATION_TAGS[operation["operationId"]]]
    missing = sorted(set(OPERATION_TAGS) - found)
    if missing:
        raise EditionError(f"operations {missing} of scripts/openapi32.py's OPERATION_TAGS are not in the bundle")


# Long lines are kept whole (as the bundle has them) rather than folded: diffs stay one line each.
WIDTH = 1 << 16


class _Dumper(yaml.SafeDumper):
    """YAML as the 3.1 bundle is written: multi-line strings as literal blocks, lists indented."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _string)


def render(document: dict[str, Any]) -> str:
    """The edition's YAML text, byte for byte what `make generate` writes."""
    return HEADER + yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=WIDTH)


def load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.openapi32", description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE, help="the bundled 3.1 document")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where the 3.2 edition is written")
    parser.add_argument("--check", action="store_true", help="fail when --output is not what --source gives")
    args = parser.parse_args(argv)
    try:
        text = render(derive(load(args.source)))
    except EditionError as exc:
        print(f"scripts/openapi32.py: {exc}", file=sys.stderr)
        return 1
    if args.check:
        if not args.output.is_file() or args.output.read_text(encoding="utf-8") != text:
            print(f"{args.output} is stale: run make generate", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
