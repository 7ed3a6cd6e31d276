"""`generated/` is written only by `make generate`: these fail when it is stale or hand-edited.

(`make check-generated`, part of `make test`, also re-bundles `openapi/` and compares.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
