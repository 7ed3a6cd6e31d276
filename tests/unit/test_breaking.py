"""The breaking-change gate (scripts/breaking.py, `make breaking`): api-smart-diff's findings, the release
files, CHANGELOG.md and the allow-list.

The tool runs for real (tools/npm, installed by `make install`) on copies of the bundle; each case gets its
own release folder, CHANGELOG.md and allow-list under tmp_path, so only the change a test makes is found.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts import breaking
from scripts.breaking import Change, Version, check, judge, pointer, read_announced, render_announced, report

ROOT = Path(__file__).resolve().parents[2]
CHANGELOG_2_0_0 = "# Changelog\n\n## [Unreleased]\n\n## [2.0.0] - Unreleased\n\n## [1.0.0] - 2026-11-30\n"
V1, V2 = Version(1, 0, 0), Version(2, 0, 0)
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
Mutation = Callable[[dict[str, Any]], None]
GET_RUN = "/paths/~1workflows~1runs~1{workflowId}~1{runId}/get"
LIST_RUNS = "/paths/~1workflows~1runs/post"
LIST_CONVERSATIONS = "/paths/~1workflows~1conversations/post"
JSON_BODY = "content/application~1json/schema"

try:  # libyaml's dumper when PyYAML has it, as scripts/breaking.py loads
    from yaml import CSafeDumper as SafeDumper
except ImportError:  # pragma: no cover - PyYAML without libyaml
    from yaml import SafeDumper  # type: ignore[assignment]


def _remove_summary_property(name: str) -> Mutation:
    """Drop a property of WorkflowRunSummary, which WorkflowRun and the listings' runs are built on."""

    def mutate(document: dict[str, Any]) -> None:
        summary = document["components"]["schemas"]["WorkflowRunSummary"]
        del summary["properties"][name]
        summary["required"].remove(name)

    return mutate


def _remove_error_message(document: dict[str, Any]) -> None:
    """Drop the error body's `message`: every operation answers that body through #/components/responses."""
    error = document["components"]["schemas"]["Error"]
    del error["properties"]["message"]
    error["required"].remove("message")


def _retype_started_at(document: dict[str, Any]) -> None:
    """`started_at` becomes a string: the tool calls that harmless in an answer, the gate does not."""
    started_at = document["components"]["schemas"]["WorkflowRunSummary"]["properties"]["started_at"]
    started_at.pop("format", None)
    started_at["type"] = "string"


def _add_optional_properties_and_an_operation(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    schemas["WorkflowRunSummary"]["properties"]["labels"] = {
        "type": "array",
        "items": {"type": "string"},
        "description": "Labels of the run.",
    }
    schemas["Error"]["properties"]["hint"] = {"type": "string", "description": "What to try next."}
    # An answer's header may promise more: a bound added to it, another example.
    retry_after = document["components"]["headers"]["RetryAfter"]
    retry_after["schema"]["maximum"] = 86400
    retry_after["example"] = 30
    get_run = copy.deepcopy(document["paths"]["/workflows/runs/{workflowId}/{runId}"]["get"])
    get_run["operationId"] = "getWorkflowRunLabels"
    document["paths"]["/workflows/runs/{workflowId}/{runId}/labels"] = {"get": get_run}


class Sandbox:
    """A release 1.0.0 that is the current bundle, a CHANGELOG.md with 2.0.0 above it, an allow-list."""

    def __init__(self, folder: Path) -> None:
        self.releases = folder / "releases"
        self.releases.mkdir()
        shutil.copyfile(breaking.DOCUMENT, self.releases / "1.0.0.yaml")
        self.changelog = folder / "CHANGELOG.md"
        self.changelog.write_text(CHANGELOG_2_0_0, encoding="utf-8")
        self.announced = self.releases / "announced.yaml"
        self.document = folder / "openapi.yaml"

    def write_document(self, *mutations: Mutation) -> None:
        document = breaking.load(breaking.DOCUMENT)
        for mutate in mutations:
            mutate(document)
        self.document.write_text(yaml.dump(document, Dumper=SafeDumper, sort_keys=False), encoding="utf-8")

    def announce(self, keys: list[str], version: Version = V2) -> None:
        self.announced.write_text(render_announced(dict.fromkeys(keys, version)), encoding="utf-8")

    def check(self) -> breaking.Verdict:
        """The whole gate, through the files."""
        return check(self.document, self.releases, self.announced, self.changelog)

    @cached_property
    def changes(self) -> list[Change]:
        """What the tool finds, once per sandbox: the cases below judge them against other allow-lists."""
        return breaking.diff(self.releases / "1.0.0.yaml", self.document)

    def judge(self, announced: list[str]) -> breaking.Verdict:
        return judge(self.changes, dict.fromkeys(announced, V2), [V2, V1], [V1])


@pytest.fixture(scope="module")
def removed(tmp_path_factory: pytest.TempPathFactory) -> Sandbox:
    """`status` and `closed_at` removed from the runs the read operations answer, `message` from errors;
    `started_at` retyped."""
    sandbox = Sandbox(tmp_path_factory.mktemp("removed"))
    sandbox.write_document(
        _remove_summary_property("status"),
        _remove_summary_property("closed_at"),
        _remove_error_message,
        _retype_started_at,
    )
    return sandbox


def _keys(changes: list[Change], name: str) -> list[str]:
    """The changes that are about property `name`: the property, its keywords, or its entry in `required`."""
    return [change.key for change in changes if f"/properties/{name}" in change.pointer or change.value == f'"{name}"']


def test_the_current_document_passes_with_the_repository_allow_list() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scripts.breaking", "check"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: every breaking change is announced." in result.stdout


def test_a_removed_response_property_fails_the_gate_and_is_named(removed: Sandbox) -> None:
    removed.announce([])
    verdict = removed.check()
    text = report(verdict, removed.document, [V2, V1])

    assert not verdict.ok
    get_run = "/paths/~1workflows~1runs~1{workflowId}~1{runId}/get/responses/200/content/application~1json/schema"
    assert f"remove {get_run}/allOf/0/properties/status" in [change.key for change in verdict.unannounced]
    assert f"[NOT ANNOUNCED] remove {get_run}/allOf/0/properties/status" in text
    # Every operation that answers runs names it, the listings included.
    assert {key.split("/")[2] for key in _keys(verdict.unannounced, "status")} == {
        "~1workflows~1runs~1{workflowId}~1{runId}",
        "~1workflows~1runs",
        "~1workflows~1conversations",
    }
    assert "make breaking-announce VERSION=2.0.0" in text
    # The error answers, shared through #/components/responses, are judged as answers too: on every operation.
    list_runs = "/paths/~1workflows~1runs/post/responses"
    assert f"remove {list_runs}/400/content/application~1json/schema/properties/message" in text
    operations = {
        (pointer([path])[1:], method)
        for path, path_item in breaking.load(removed.document)["paths"].items()
        for method in path_item
        if method in HTTP_METHODS
    }
    assert {tuple(key.split(" ")[1].split("/")[2:4]) for key in _keys(verdict.unannounced, "message")} == operations
    assert f'replace {get_run}/allOf/0/properties/started_at/type = "string"' in [
        change.key for change in verdict.unannounced
    ]


def test_announcing_one_breaking_change_does_not_let_another_through(removed: Sandbox) -> None:
    found = [change for change in removed.changes if change.gated]
    others = _keys(found, "closed_at") + _keys(found, "message") + _keys(found, "started_at")

    verdict = removed.judge(others)

    assert not verdict.ok
    assert [change.key for change in verdict.unannounced] == _keys(found, "status")
    assert set(verdict.announced) == set(others)


def test_announcing_every_breaking_change_under_a_major_version_passes(removed: Sandbox) -> None:
    found = [change for change in removed.changes if change.gated]

    verdict = removed.judge([change.key for change in found])

    assert verdict.ok
    assert verdict.announced == {change.key: V2 for change in found}


def test_a_non_breaking_addition_passes_with_nothing_announced(tmp_path: Path) -> None:
    sandbox = Sandbox(tmp_path)
    sandbox.write_document(_add_optional_properties_and_an_operation)

    verdict = sandbox.check()

    assert verdict.ok
    assert verdict.announced == {}
    added = [change for change in verdict.changes if change.action == "add" and change.judged_here]
    pointers = [change.pointer for change in added]
    assert "/paths/~1workflows~1runs~1{workflowId}~1{runId}~1labels/get" in pointers
    assert f"{LIST_RUNS}/responses/400/{JSON_BODY}/properties/hint" in pointers
    assert f"{LIST_RUNS}/responses/429/headers/Retry-After/schema/maximum" in pointers
    assert {change.kind for change in added} == {"non-breaking"}
    example = f"{LIST_RUNS}/responses/429/headers/Retry-After/example"
    assert [change.kind for change in verdict.changes if change.pointer == example] == ["annotation"]


def test_a_release_becomes_the_baseline_and_takes_its_announcements_along(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sandbox = Sandbox(tmp_path)

    def stamp_2_0_0(document: dict[str, Any]) -> None:
        document["info"]["version"] = "2.0.0"

    sandbox.write_document(_remove_summary_property("status"), stamp_2_0_0)
    sandbox.announce([change.key for change in sandbox.changes if change.gated])
    for name, path in [
        ("RELEASES", sandbox.releases),
        ("ANNOUNCED", sandbox.announced),
        ("CHANGELOG", sandbox.changelog),
    ]:
        monkeypatch.setattr(breaking, name, path)
    release = ["release", "--document", str(sandbox.document)]

    assert breaking.main([*release, "--version", "1.1.0"]) == 1  # breaking changes need a major version
    assert "1.1.0 has breaking changes but is not a major bump over 1.0.0" in capsys.readouterr().err
    assert breaking.main([*release, "--version", "2.0.0"]) == 0

    assert (sandbox.releases / "2.0.0.yaml").read_bytes() == sandbox.document.read_bytes()
    assert read_announced(sandbox.announced) == {}
    capsys.readouterr()
    assert breaking.main(["check", "--document", str(sandbox.document)]) == 0
    assert "against release 2.0.0" in capsys.readouterr().out


# -- the rules, on changes written by hand ---------------------------------------------------------

REMOVED = Change(kind="breaking", action="remove", pointer="/paths/~1a/get/responses/200/content/x/schema/properties/b")


@pytest.mark.parametrize(
    ("announced_in", "changelog", "problem"),
    [
        (Version(1, 1, 0), [Version(1, 1, 0), V1], "1.1.0 is not a major bump over release 1.0.0"),
        (Version(3, 0, 0), [V2, V1], "3.0.0 has no section in CHANGELOG.md"),
    ],
)
def test_an_entry_announces_only_under_a_major_bump_the_changelog_has(
    announced_in: Version, changelog: list[Version], problem: str
) -> None:
    verdict = judge([REMOVED], {REMOVED.key: announced_in}, changelog, [V1])

    assert verdict.unannounced == [REMOVED]
    assert any(problem in line for line in verdict.problems)


def test_an_array_element_is_announced_by_its_value() -> None:
    enum = "/paths/~1a/get/responses/200/content/x/schema/properties/status/enum/7"
    paused = Change(kind="breaking", action="add", pointer=enum, value='"PAUSED"')
    other = Change(kind="breaking", action="add", pointer=enum, value='"ARCHIVED"')

    verdict = judge([other], {paused.key: V2}, [V2, V1], [V1])

    assert paused.key == f'add {enum} = "PAUSED"'
    assert verdict.unannounced == [other]
    assert verdict.unused == [paused.key]


def test_the_baseline_is_the_newest_release_and_entries_it_released_no_longer_count() -> None:
    verdict = judge([REMOVED], {REMOVED.key: V2}, [V2, V1], [V1, V2])

    assert verdict.baseline == V2
    assert verdict.unannounced == [REMOVED]
    assert any("2.0.0 is not a major bump over release 2.0.0" in line for line in verdict.problems)


def test_releases_and_the_changelog_must_agree() -> None:
    assert judge([], {}, [V1], [V1, V2]).problems == [
        "release 2.0.0 has no section in CHANGELOG.md",
        "CHANGELOG.md's top version 1.0.0 is older than the last release 2.0.0",
    ]
    assert judge([], {}, [V2, V1], [V1]).ok


def test_changes_inside_a_referenced_component_are_judged_where_operations_use_them() -> None:
    inside = Change(kind="breaking", action="add", pointer="/components/schemas/Error/properties/status/format")
    renamed = Change(kind="breaking", action="remove", pointer="/components/schemas/NewRunUpdate")
    scheme = Change(kind="breaking", action="replace", pointer="/components/securitySchemes/bearerAuth/scheme")

    verdict = judge([inside, renamed, scheme], {}, [V1], [V1])

    assert verdict.unannounced == [renamed, scheme]


def test_the_allow_list_reads_back_what_it_writes(tmp_path: Path) -> None:
    path = tmp_path / "announced.yaml"
    entries = {"remove /components/schemas/A": V2, "add /paths/~1a~1{id}/get": V2, "remove /x": Version(3, 0, 0)}

    path.write_text(render_announced(entries), encoding="utf-8")

    assert read_announced(path) == entries
    assert read_announced(tmp_path / "missing.yaml") == {}


def test_the_repository_release_1_0_0_is_the_first_bundle() -> None:
    released = breaking.released()
    assert min(released) == V1
    assert released[V1] == breaking.RELEASES / "1.0.0.yaml"
    assert breaking.load(released[V1])["openapi"] == "3.1.0"


# -- what the tool lets through and the gate does not --------------------------------------------------


def _mutated(tmp_path: Path, *mutations: Mutation) -> Path:
    path = tmp_path / "openapi.yaml"
    document = breaking.load(breaking.DOCUMENT)
    for mutate in mutations:
        mutate(document)
    path.write_text(yaml.dump(document, Dumper=SafeDumper, sort_keys=False), encoding="utf-8")
    return path


def test_an_announced_replacement_does_not_announce_another_value_at_the_same_place(tmp_path: Path) -> None:
    """The repository announces a new `status` filter pattern: not any pattern there."""

    def only_running(document: dict[str, Any]) -> None:
        document["components"]["schemas"]["ListRunsRequest"]["properties"]["status"]["pattern"] = "^RUNNING$"

    verdict = check(_mutated(tmp_path, only_running))

    status = f"requestBody/{JSON_BODY}/properties/status/pattern"
    assert not verdict.ok
    assert [change.key for change in verdict.unannounced] == [
        f'replace {LIST_RUNS}/{status} = "^RUNNING$"',
        f'replace {LIST_CONVERSATIONS}/{status} = "^RUNNING$"',
    ]
    announced = [key for key in read_announced() if key.startswith(f"replace {LIST_RUNS}/{status} = ")]
    assert len(announced) == 1  # the announced pattern, by its hash
    assert announced[0] in verdict.unused


def test_a_long_value_is_named_by_its_hash_and_a_short_one_as_it_is() -> None:
    short = breaking._value("replace", ["paths", "pattern"], "^a$", "^b$")
    long_ = breaking._value("replace", ["paths", "pattern"], "^a$", "^" + "x" * 100 + "$")
    other = breaking._value("replace", ["paths", "pattern"], "^a$", "^" + "y" * 100 + "$")

    assert short == '"^b$"'
    assert long_.startswith("sha256:") and len(long_) == len("sha256:") + 12
    assert long_ != other
    assert breaking._value("add", ["paths", "x"], None, {"b": 1, "a": 2}) == breaking._value(
        "add", ["paths", "x"], None, {"a": 2, "b": 1}
    )


def test_a_response_header_retyped_fails_the_gate(tmp_path: Path) -> None:
    """The tool leaves response header changes unclassified; the gate judges them as answers."""
    sandbox = Sandbox(tmp_path)

    def retry_after_as_text(document: dict[str, Any]) -> None:
        document["components"]["headers"]["RetryAfter"]["schema"] = {"type": "string"}

    sandbox.write_document(retry_after_as_text)
    verdict = sandbox.check()

    header = f"{LIST_RUNS}/responses/429/headers/Retry-After/schema"
    keys = [change.key for change in verdict.unannounced]
    assert not verdict.ok
    assert f'replace {header}/type = "string"' in keys
    assert f"remove {header}/minimum" in keys  # a bound dropped: the answer may hold more
    assert all("/headers/" in key for key in keys)
    assert "unclassified" not in {change.kind for change in verdict.changes if change.judged_here}


def test_an_optional_response_property_removed_fails_the_gate(tmp_path: Path) -> None:
    sandbox = Sandbox(tmp_path)

    def remove_topic(document: dict[str, Any]) -> None:
        summary = document["components"]["schemas"]["WorkflowRunSummary"]
        assert "topic" not in summary["required"]
        del summary["properties"]["topic"]

    sandbox.write_document(remove_topic)
    verdict = sandbox.check()

    assert not verdict.ok
    assert {change.key for change in verdict.unannounced} == {
        f"remove {GET_RUN}/responses/200/{JSON_BODY}/allOf/0/properties/topic",
        f"remove {LIST_RUNS}/responses/200/{JSON_BODY}/properties/runs/items/properties/topic",
        f"remove {LIST_CONVERSATIONS}/responses/200/{JSON_BODY}/properties/runs/items/properties/topic",
    }


def test_a_renamed_path_parameter_fails_the_gate(tmp_path: Path) -> None:
    """`{runId}` to `{id}`: the same requests on the wire, other argument names in generated clients."""
    sandbox = Sandbox(tmp_path)

    def rename_run_id(document: dict[str, Any]) -> None:
        document["paths"] = {path.replace("{runId}", "{id}"): item for path, item in document["paths"].items()}
        document["components"]["parameters"]["RunId"]["name"] = "id"

    sandbox.write_document(rename_run_id)
    verdict = sandbox.check()

    keys = [change.key for change in verdict.unannounced]
    assert not verdict.ok
    assert f'rename {GET_RUN.removesuffix("/get")} = "/workflows/runs/{{workflowId}}/{{id}}"' in keys
    assert f'replace {GET_RUN}/parameters/1/name = "id"' in keys
    renamed = {key.split(" ")[1] for key in keys if key.startswith("rename ")}
    baseline = breaking.load(sandbox.releases / "1.0.0.yaml")["paths"]
    assert renamed == {pointer(["paths", path]) for path in baseline if "{runId}" in path}
