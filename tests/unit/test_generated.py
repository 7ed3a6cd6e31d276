"""`generated/` is written only by `make generate`: these fail when it is stale or hand-edited.

(`make check-generated`, part of `make test`, also re-bundles `openapi/` and compares.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def test_models_match_the_bundled_document() -> None:
    result = subprocess.run(
        [
            Path(sys.executable).parent / "datamodel-codegen",
            "--input",
            "generated/openapi.yaml",
            "--output",
            "generated/models.py",
            "--check",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_models_cover_every_schema_of_the_document() -> None:
    import yaml

    from generated import models

    schemas = yaml.safe_load((ROOT / "generated" / "openapi.yaml").read_text())["components"]["schemas"]
    missing = [name for name in schemas if not hasattr(models, name)]
    assert not missing


def bundled() -> dict[str, Any]:
    import yaml

    document: dict[str, Any] = yaml.safe_load((ROOT / "generated" / "openapi.yaml").read_text())
    return document


def integer_schemas(node: Any, where: str = "#") -> list[tuple[str, dict[str, Any]]]:
    """Every schema of the document whose type is (or includes) integer, with where it is."""
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        kind = node.get("type")
        if kind == "integer" or (isinstance(kind, list) and "integer" in kind):
            found.append((where, node))
        for key, value in node.items():
            found += integer_schemas(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += integer_schemas(value, f"{where}/{index}")
    return found


INT32_MAX = 2**31 - 1


def test_every_integer_has_a_format_that_holds_its_values() -> None:
    """Typed generators map an integer without `format` to a 32-bit type (openapi-generator's Go:
    int32), which epoch milliseconds overflow. int32 only where the schema bounds the values to it."""
    integers = integer_schemas(bundled())
    assert len(integers) >= 15
    for where, schema in integers:
        assert schema.get("format") in {"int32", "int64"}, where
        if schema["format"] == "int32":
            assert schema.get("maximum", INT32_MAX + 1) <= INT32_MAX, where
            assert schema.get("minimum", -INT32_MAX - 2) >= -INT32_MAX - 1, where


def test_no_schema_name_is_a_generated_constructor_of_another() -> None:
    """openapi-generator's Go client gives each schema X a constructor NewX(): a schema named
    `NewRunUpdate` clashed with `RunUpdate`'s (the body of postWorkflowRunUpdate is `RunUpdateInput`)."""
    names = set(bundled()["components"]["schemas"])
    assert not [name for name in names if name.startswith("New") and name.removeprefix("New") in names]
    assert not [name for name in names if name.endswith("WithDefaults")]
    body = bundled()["paths"]["/workflows/runs/{runId}/updates"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/RunUpdateInput"}


def test_the_published_bundle_lists_an_absolute_server_first_and_the_relative_one_after() -> None:
    """Generators take the first server as the client's default base URL."""
    servers = bundled()["servers"]
    first = servers[0]
    url = first["url"].format(**{name: v["default"] for name, v in first.get("variables", {}).items()})
    assert url.startswith("https://") and url.endswith("/api/v1")
    assert "/api/v1" in [server["url"] for server in servers[1:]]
