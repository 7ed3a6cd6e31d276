"""The breaking-change gate: the bundled OpenAPI document against the last released one.

api-smart-diff (pinned in tools/npm, called through tools/npm/breaking-diff.mjs) lists the changes and
classifies each one; this script decides which of them may pass (docs/decisions/0011-breaking-change-gate.md):

- the baseline is the newest release, `openapi/releases/<version>.yaml`;
- a breaking change passes only when `openapi/releases/announced.yaml` lists it as the gate prints it
  (`<action> <JSON pointer> = <value>`: the value put in place, or a hash of it; a removal names the
  removed array element only) under a version that CHANGELOG.md has and that is a major bump over the
  baseline. An entry announces exactly one change: announcing one never lets another through, not even
  another value at the same place;
- the tool's verdict is overridden where it is wrong for answers and generated clients (`_kind`): a
  replaced `type` or `const`, a removed answer property, a renamed path or path parameter, and the
  response header changes it leaves unclassified.

    python -m scripts.breaking check [--document build/openapi.yaml] [--all]   # make breaking
    python -m scripts.breaking announce --version 2.0.0 [--write]              # make breaking-announce
    python -m scripts.breaking release --version 2.0.0                         # make api-release
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

try:  # libyaml's loader when PyYAML was built with it: the bundle is large
    from yaml import CSafeLoader as SafeLoader
except ImportError:  # pragma: no cover - PyYAML without libyaml
    from yaml import SafeLoader  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = ROOT / "generated" / "openapi.yaml"
RELEASES = ROOT / "openapi" / "releases"
ANNOUNCED = RELEASES / "announced.yaml"
CHANGELOG = ROOT / "CHANGELOG.md"
DIFF_SCRIPT = ROOT / "tools" / "npm" / "breaking-diff.mjs"

BREAKING = "breaking"
SHARED_RESPONSE = "#/components/responses/"
SEMVER = re.compile(r"(\d+)\.(\d+)\.(\d+)")
CHANGELOG_VERSION = re.compile(r"^## \[(\d+\.\d+\.\d+)\]", re.MULTILINE)
# Components that operations reach through `$ref`. The tool judges a change inside one of them with
# request rules wherever the component is used, then reports it again under /paths, judged in the
# direction the operation really uses it. So at /components only a component's own addition or
# removal (its name: a type in generated clients) is judged; what is inside it is judged under /paths.
REFERENCED_COMPONENTS = frozenset(
    {"schemas", "responses", "parameters", "examples", "requestBodies", "headers", "links", "callbacks", "pathItems"}
)
# A value longer than this is named by a hash of it in a change's key (`sha256:` and 12 hex digits).
VALUE_SHOWN = 80
# Keywords that say something about a value without constraining it: a change to one never breaks.
ANNOTATIONS = frozenset(
    {"description", "summary", "title", "example", "examples", "externalDocs", "$comment", "default", "deprecated"}
)
# Bounds that let more through as they grow, and those that let more through as they shrink.
UPPER_BOUNDS = frozenset({"maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties", "maxContains"})
LOWER_BOUNDS = frozenset({"minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties", "minContains"})
PATH_PARAMETER = re.compile(r"\{([^}]*)\}")
ANNOUNCED_HEADER = """\
# Breaking changes announced for the next major version of the API, checked by `make breaking`
# (scripts/breaking.py). Each entry is one change as the gate prints it: `<action> <JSON pointer>`
# and `= <value>`, the value put in place (JSON, or `sha256:` and 12 hex digits of it when it is long)
# or the array element removed. It sits under the CHANGELOG.md version that announces it: that version
# must be a major bump over the last release in openapi/releases/. Written by
# `make breaking-announce VERSION=x.y.z`; emptied by `make api-release VERSION=x.y.z`, when the
# changes become part of the released document.
"""


@dataclass(frozen=True, order=True)
class Version:
    major: int
    minor: int
    patch: int

    @classmethod
    def parse(cls, text: str) -> Version:
        match = SEMVER.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"not a version (major.minor.patch): {text!r}")
        return cls(*(int(part) for part in match.groups()))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


@dataclass(frozen=True)
class Change:
    """One change as api-smart-diff reports it; `key` identifies it in the allow-list."""

    kind: str  # breaking, non-breaking, annotation, unclassified or deprecated
    action: str  # add, remove, replace or rename
    pointer: str  # RFC 6901, into the baseline document for a removal or rename, the current one else
    description: str = ""
    value: str = ""  # what `_value` names: the value put in place, a removed array element, or nothing

    @property
    def key(self) -> str:
        """`<action> <pointer> = <value>`: the place and what was put there (or taken away from an array)."""
        return f"{self.action} {self.pointer}" + (f" = {self.value}" if self.value else "")

    @property
    def judged_here(self) -> bool:
        """False for a change inside a referenced component: it is judged under /paths instead."""
        parts = self.pointer.split("/")[1:]
        return not (len(parts) > 3 and parts[0] == "components" and parts[1] in REFERENCED_COMPONENTS)

    @property
    def gated(self) -> bool:
        return self.kind == BREAKING and self.judged_here


def pointer(path: Iterable[str | int]) -> str:
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


def load(path: Path) -> Any:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=SafeLoader)


def diff(before: Path, after: Path) -> list[Change]:
    """What api-smart-diff finds from `before` to `after` (two bundled documents)."""
    node = shutil.which("node")
    if node is None or not (ROOT / "tools" / "npm" / "node_modules" / "api-smart-diff").is_dir():
        raise RuntimeError("node and tools/npm's api-smart-diff are needed: run make install")
    documents = {"before": _responses_in_place(load(before)), "after": _responses_in_place(load(after))}
    # default=str: YAML timestamps in examples travel as the text they were written as.
    payload = json.dumps(documents, default=str)
    result = subprocess.run([node, str(DIFF_SCRIPT)], input=payload, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"api-smart-diff failed on {before} -> {after}:\n{result.stderr.strip()}")
    return [_change(item) for item in json.loads(result.stdout)]


def _change(item: dict[str, Any]) -> Change:
    path: list[str | int] = item["path"]
    action: str = item["action"]
    before, after = item.get("before"), item.get("after")
    kind = _kind(item["type"], action, path, before, after)
    if action == "rename":
        # The tool reports a renamed key at its parent (`/paths`): the old key says which one it was.
        path = [*path, str(before)]
    return Change(
        kind=kind,
        action=action,
        pointer=pointer(path),
        description=item["description"],
        value=_value(action, path, before, after),
    )


def _responses_in_place(document: dict[str, Any]) -> dict[str, Any]:
    """Each operation's `$ref`-ed response replaced by the response it names.

    api-smart-diff picks answer rules for a schema by where the schema sits: under
    /paths/{path}/{method}/responses. A schema it reaches through #/components/responses gets request
    rules, which call a required property removed from the error body harmless and a `format` added
    to it breaking. In place, the shared responses (every error answer) are judged as answers.
    """
    shared = document.get("components", {}).get("responses", {})
    for path_item in document.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict) or not isinstance(operation.get("responses"), dict):
                continue  # `parameters`, `summary`, ... of the path item
            responses: dict[str, Any] = operation["responses"]
            for code, named in responses.items():
                resolved = named
                while isinstance(resolved, dict) and str(resolved.get("$ref", "")).startswith(SHARED_RESPONSE):
                    resolved = shared[resolved["$ref"].removeprefix(SHARED_RESPONSE)]
                responses[code] = resolved
    return document


def _kind(kind: str, action: str, path: Sequence[str | int], before: Any, after: Any) -> str:
    """The tool's verdict, except where it is wrong for answers or for generated clients.

    - A schema's `type` or `const` replaced: api-smart-diff turns its request verdicts around for
      answers, right for a bound or a list of values, wrong for a value of another kind (`integer`
      becoming `string`) or another constant, which breaks an answer's readers as surely as a
      request's writers.
    - A property removed from an answer, optional or not: the tool calls an optional one harmless, but
      generated clients lose the field.
    - A path renamed with other parameter names (`{runId}` to `{id}`), or a parameter's `name`
      replaced: the tool matches the paths and calls it harmless, but generated clients' arguments
      are named after the parameters (and a query or header parameter's name is on the wire).
    - A response header's change, which the tool leaves unclassified: judged as answers are
      (`_response_header_kind`); any other unclassified change that is not an annotation is breaking.

    (Examples and other annotations are never "non-breaking" to the tool, so a `type` or `properties`
    key inside an example stays as it is.)
    """
    parts = list(path[:-1] if path and isinstance(path[-1], int) else path)  # `type: [a, b]`: its element
    in_answer = len(path) > 4 and path[0] == "paths" and path[3] == "responses"
    if kind == "non-breaking":
        keyword = len(parts) >= 2 and parts[-1] in {"type", "const"} and parts[-2] != "properties"
        property_removed = in_answer and action == "remove" and len(path) >= 2 and path[-2] == "properties"
        parameter = len(path) >= 3 and path[0] == "paths" and path[-3] == "parameters" and path[-1] == "name"
        if (action == "replace" and (keyword or parameter)) or property_removed:
            return BREAKING
        if action == "rename" and path == ["paths"] and _path_parameters(before) != _path_parameters(after):
            return BREAKING
    if kind != "unclassified":
        return kind
    if in_answer and len(path) > 6 and path[5] == "headers":
        return _response_header_kind(action, list(path[7:]), before, after)
    return "annotation" if _annotation(path) else BREAKING


def _path_parameters(template: Any) -> list[str]:
    return PATH_PARAMETER.findall(str(template))


def _annotation(path: Sequence[str | int]) -> bool:
    """Whether `path` is in an annotation keyword (a property of that name is not one) or an extension."""
    return any(
        isinstance(part, str)
        and (part in ANNOTATIONS or part.startswith("x-"))
        and (index == 0 or path[index - 1] != "properties")
        for index, part in enumerate(path)
    )


def _response_header_kind(action: str, rest: list[str | int], before: Any, after: Any) -> str:
    """A change in an answer's header (`rest`: the path below the header), by the rules for answer bodies."""
    if _annotation(rest):
        return "annotation"
    return BREAKING if _answer_widened(action, rest, before, after) else "non-breaking"


def _answer_widened(action: str, rest: list[str | int], before: Any, after: Any) -> bool:
    """Whether an answer may now hold what its readers were not promised.

    An answer may promise more and not less: a header or constraint added is harmless; one removed or
    replaced breaks its readers, and so does a value added to an `enum`, a bound moved outwards, or
    `required` dropped.
    """
    if rest == ["required"]:
        return after is not True
    element = bool(rest) and isinstance(rest[-1], int)
    keyword = rest[-2] if element and len(rest) >= 2 else (rest[-1] if rest else "")
    if element and keyword == "enum":
        return action == "add"
    numbers = isinstance(before, int | float) and isinstance(after, int | float)
    if action == "replace" and numbers and keyword in UPPER_BOUNDS | LOWER_BOUNDS:
        return bool(after > before) == (keyword in UPPER_BOUNDS)
    return action != "add"


def _value(action: str, path: Sequence[str | int], before: Any, after: Any) -> str:
    """What a change's key names besides its place.

    For an addition, replacement or rename, the value put in place: an entry for one value must not
    announce another at the same place. For a removal, the removed element of an array, whose index
    alone does not say which one it was; any other removal is named by its place in the baseline.
    """
    if action == "remove":
        scalar = before is None or isinstance(before, str | int | float | bool)
        return _shown_value(before) if path and isinstance(path[-1], int) and scalar else ""
    return _shown_value(after)


def _shown_value(value: Any) -> str:
    # default=str: YAML timestamps in examples travel as the text they were written as.
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    if len(text) <= VALUE_SHOWN and not isinstance(value, dict | list):
        return text
    canonical = json.dumps(value, ensure_ascii=True, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:12]


def released(releases: Path = RELEASES) -> dict[Version, Path]:
    return {Version.parse(path.stem): path for path in releases.glob("*.yaml") if SEMVER.fullmatch(path.stem)}


def read_changelog(path: Path = CHANGELOG) -> list[Version]:
    """The versions CHANGELOG.md has sections for, top first (`## [Unreleased]` is not one)."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return [Version.parse(found) for found in CHANGELOG_VERSION.findall(text)]


def read_announced(path: Path = ANNOUNCED) -> dict[str, Version]:
    """Announced change keys (`<action> <pointer> = <value>`) and the version announcing each."""
    if not path.exists():
        return {}
    entries = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: a mapping from version to a list of changes is expected")
    return {str(key): Version.parse(str(version)) for version, keys in entries.items() for key in keys or []}


def render_announced(announced: dict[str, Version]) -> str:
    by_version: dict[str, list[str]] = {}
    for key, version in sorted(announced.items(), key=lambda item: (item[1], item[0])):
        by_version.setdefault(str(version), []).append(key)
    body = yaml.safe_dump(by_version, sort_keys=False, width=1000) if by_version else "{}\n"
    return ANNOUNCED_HEADER + body


@dataclass
class Verdict:
    baseline: Version
    changes: list[Change]
    announced: dict[str, Version]  # the gated changes that are announced, and by which version
    unannounced: list[Change]
    problems: list[str] = field(default_factory=list)  # the release files, CHANGELOG or allow-list disagree
    unused: list[str] = field(default_factory=list)  # allow-list entries that match no change

    @property
    def ok(self) -> bool:
        return not self.unannounced and not self.problems


def judge(
    changes: Sequence[Change], announced: dict[str, Version], changelog: Sequence[Version], releases: Iterable[Version]
) -> Verdict:
    """Which breaking changes are announced, and whether the release files, CHANGELOG.md and allow-list agree."""
    versions = sorted(releases)
    if not versions:
        raise ValueError("no release in openapi/releases/: the gate needs a baseline")
    baseline = versions[-1]
    problems = [f"release {version} has no section in CHANGELOG.md" for version in versions if version not in changelog]
    if changelog and changelog[0] < baseline:
        problems.append(f"CHANGELOG.md's top version {changelog[0]} is older than the last release {baseline}")
    for key, version in sorted(announced.items()):
        if version not in changelog:
            problems.append(f"announced.yaml: {version} has no section in CHANGELOG.md ({key})")
        elif version.major <= baseline.major:
            problems.append(f"announced.yaml: {version} is not a major bump over release {baseline} ({key})")
    valid = {
        key: version for key, version in announced.items() if version in changelog and version.major > baseline.major
    }
    gated = [change for change in changes if change.gated]
    found = {change.key for change in gated}
    return Verdict(
        baseline=baseline,
        changes=list(changes),
        announced={change.key: valid[change.key] for change in gated if change.key in valid},
        unannounced=[change for change in gated if change.key not in valid],
        problems=problems,
        unused=sorted(key for key in announced if key not in found),
    )


def next_major(verdict: Verdict, changelog: Sequence[Version]) -> Version:
    if changelog and changelog[0].major > verdict.baseline.major:
        return changelog[0]
    return Version(verdict.baseline.major + 1, 0, 0)


def report(verdict: Verdict, document: Path, changelog: Sequence[Version], *, list_all: bool = False) -> str:
    lines = [f"Breaking-change gate: {_shown(document)} against release {verdict.baseline}"]
    gated = [change for change in verdict.changes if change.gated]
    lines.append(f"Breaking changes: {len(gated)} ({len(verdict.announced)} announced)")
    for change in gated:
        status = f"announced in {verdict.announced[change.key]}" if change.key in verdict.announced else "NOT ANNOUNCED"
        lines.append(f"  [{status}] {change.key}  {change.description}".rstrip())
    others = [change for change in verdict.changes if not change.gated]
    counts = Counter(change.kind for change in others if change.judged_here)
    inside = sum(1 for change in others if not change.judged_here)
    summary = ", ".join(f"{count} {kind}" for kind, count in sorted(counts.items())) or "none"
    lines.append(f"Other changes: {summary}; {inside} inside components, judged where /paths uses them")
    if list_all:
        lines.extend(f"  [{change.kind}] {change.key}  {change.description}".rstrip() for change in others)
    if verdict.unused:
        lines.append(
            f"note: {len(verdict.unused)} announced.yaml entries match no change (make breaking-announce drops them):"
        )
        lines.extend(f"  {key}" for key in verdict.unused)
    lines.extend(f"PROBLEM: {problem}" for problem in verdict.problems)
    if verdict.unannounced:
        target = next_major(verdict, changelog)
        lines += [
            f"FAILED: {len(verdict.unannounced)} breaking change(s) NOT ANNOUNCED since release {verdict.baseline}.",
            "Undo them, or announce them for a new major version:",
            f"  1. CHANGELOG.md: a `## [{target}]` section (a major bump over {verdict.baseline}) saying what breaks;",
            f"  2. make breaking-announce VERSION={target} (lists each change in openapi/releases/announced.yaml).",
        ]
    elif verdict.problems:
        lines.append("FAILED: fix the problems above.")
    else:
        lines.append("OK: every breaking change is announced.")
    return "\n".join(lines)


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _info_version(document: Path) -> str:
    return str(load(document).get("info", {}).get("version", ""))


def check(
    document: Path = DOCUMENT, releases: Path = RELEASES, announced: Path = ANNOUNCED, changelog: Path = CHANGELOG
) -> Verdict:
    """The gate: `document` against the newest release in `releases`, with the allow-list and CHANGELOG.md."""
    versions = released(releases)
    if not versions:
        raise ValueError(f"no release in {_shown(releases)}: the gate needs a baseline")
    return judge(
        diff(versions[max(versions)], document), read_announced(announced), read_changelog(changelog), versions
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.breaking", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["check", "announce", "release"])
    parser.add_argument("--document", type=Path, default=DOCUMENT, help="the bundled document to check")
    parser.add_argument("--version", help="announce, release: the CHANGELOG.md version (major.minor.patch)")
    parser.add_argument("--all", action="store_true", help="check: list the non-breaking changes too")
    parser.add_argument("--write", action="store_true", help="announce: write openapi/releases/announced.yaml")
    args = parser.parse_args(argv)
    # The module's paths are read here, not bound as defaults, so that tests can point them elsewhere.
    changelog = read_changelog(CHANGELOG)
    document = args.document.resolve()
    try:
        verdict = check(document, RELEASES, ANNOUNCED, CHANGELOG)
        if args.command == "check":
            print(report(verdict, document, changelog, list_all=args.all))
            if _info_version(document) in {str(version) for version in released(RELEASES)} and verdict.changes:
                print(f"note: info.version is still the released {_info_version(document)}: set the next version")
            return 0 if verdict.ok else 1
        if args.version is None:
            parser.error(f"{args.command} needs --version")
        version = Version.parse(args.version)
        if args.command == "announce":
            return _announce(verdict, version, changelog, write=args.write)
        return _release(verdict, version, changelog, document)
    except (RuntimeError, ValueError) as error:
        print(f"breaking: {error}", file=sys.stderr)
        return 2


def _announce(verdict: Verdict, version: Version, changelog: list[Version], *, write: bool) -> int:
    """Every breaking change found, under the version already announcing it, else under `version`."""
    if version.major <= verdict.baseline.major:
        print(f"breaking: {version} is not a major bump over release {verdict.baseline}", file=sys.stderr)
        return 2
    announced = {change.key: verdict.announced.get(change.key, version) for change in verdict.changes if change.gated}
    text = render_announced(announced)
    if write:
        ANNOUNCED.write_text(text, encoding="utf-8")
        print(f"{_shown(ANNOUNCED)}: {len(announced)} breaking change(s) announced")
    else:
        print(text, end="")
    if version not in changelog:
        print(f"breaking: CHANGELOG.md needs a `## [{version}]` section saying what breaks", file=sys.stderr)
    return 0


def _release(verdict: Verdict, version: Version, changelog: list[Version], document: Path) -> int:
    """The document becomes release `version`: checked, stamped, copied; its announcements are done."""
    refusals = []
    if not verdict.ok:
        refusals.append("the gate fails (make breaking)")
    if version <= verdict.baseline:
        refusals.append(f"{version} is not newer than release {verdict.baseline}")
    if not changelog or changelog[0] != version:
        refusals.append(f"{version} is not CHANGELOG.md's top version")
    if verdict.announced and version.major <= verdict.baseline.major:
        refusals.append(f"{version} has breaking changes but is not a major bump over {verdict.baseline}")
    if _info_version(document) != str(version):
        refusals.append(f"the document's info.version is {_info_version(document)!r} (openapi/openapi.yaml)")
    if refusals:
        print(f"breaking: not released as {version}: " + "; ".join(refusals), file=sys.stderr)
        return 1
    shutil.copyfile(document, RELEASES / f"{version}.yaml")
    remaining = {key: announced for key, announced in read_announced(ANNOUNCED).items() if announced > version}
    ANNOUNCED.write_text(render_announced(remaining), encoding="utf-8")
    print(f"{_shown(RELEASES / f'{version}.yaml')} written; {_shown(ANNOUNCED)} keeps {len(remaining)} entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
