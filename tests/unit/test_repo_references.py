"""The repository stands alone, and what its text points at exists.

Every text file git knows (tracked, or new and not ignored), except generated/, lock files and
binaries, must not

(a) point at a local path outside the repository (`../x` climbing above the root, `/work/...`);
(b) mention the design notes that live outside the repository;
(c) cite an issue or pull-request number: the tracker is not part of the repository (an upstream
    project's `owner/repo#123` is a public reference and stays);
(d) name a repository path or module that does not exist: backticked paths (`web/app.py`,
    `openapi/`, `app.py`), Markdown links to local files, and backticked dotted names under one
    of the project's packages (`web.sse.frames`, `handlers.deps.Deps`: the module part must be a
    .py file or a package, and the first name after it must occur in that module). Paths git
    ignores (`build/...`, `.venv/...`) are outputs, not repository files, and are not checked.

The detectors are tested on examples below (so this file, which holds them, is not scanned), and
the scan must have checked many references: a clean tree means they looked, not that they missed.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
THIS_FILE = Path(__file__).resolve().relative_to(REPO).as_posix()  # holds the detectors' examples

LOCK_FILES = frozenset({"package-lock.json", "poetry.lock", "uv.lock", "Pipfile.lock", "go.sum"})
# Notes kept outside the repository while it was being built: nothing here may lean on them.
# Their names are spelt in parts, like the examples below.
OUTSIDE_NOTE_NAMES = ("DES" + "IGN", "REFER" + "ENCE", "TOOL" + "ING")
OUTSIDE_NOTES = re.compile(rf"\b(?:{'|'.join(OUTSIDE_NOTE_NAMES)})\.md\b", re.IGNORECASE)
# Packages that moved away in the one-way-layers refactor: any name under them is stale.
FORMER_PACKAGES = frozenset({"server"})
# Endings of the files this repository holds, for backticked names without a folder.
FILE_SUFFIXES = frozenset(
    {".py", ".md", ".yaml", ".yml", ".toml", ".json", ".txt", ".mk", ".ts", ".go", ".sh", ".cfg", ".ini", ".lua"}
)

OUTSIDE_WORK = re.compile(r"(?<![\w./-])/work(?![\w-])[^\s'\"`)\]>,;:]*")
CLIMB = re.compile(r"(?<![\w.])(?:\.\./)+[^\s'\"`)\]>,;:]*")
ISSUE_WORD = re.compile(r"\b(?:issues?|tickets?|PRs?|pull requests?)\s*#?\s*\d+\b", re.IGNORECASE)
# `#12` alone: not in a word or URL (`repo#12`, `page#12`, `&#12;`), not a Markdown heading `# 12`.
HASH_NUMBER = re.compile(r"(?<![\w&#/.-])#(\d+)\b")
COLOUR_DIGITS = frozenset({3, 4, 6, 8})
BACKTICKED = re.compile(r"`([^`\s]+)`")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
# Backticked text with any of these is a pattern, a placeholder or code, not one path.
NOT_A_PATH = re.compile(r"[<>{}*$?|=~@%\[\]()\"',;!\\]")
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    kind: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.kind}: {self.text}"


# -- the files ------------------------------------------------------------------------------------


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


@cache
def known_files() -> tuple[str, ...]:
    """What git tracks plus new files it does not ignore, as they are in the work tree."""
    listed = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    return tuple(sorted(path for path in set(listed) if path and (REPO / path).is_file()))


@cache
def known_dirs() -> frozenset[str]:
    return frozenset(str(parent) for path in known_files() for parent in Path(path).parents if str(parent) != ".")


@cache
def known_basenames() -> frozenset[str]:
    return frozenset(Path(path).name for path in known_files())


def skipped(path: str) -> bool:
    parts = Path(path).parts
    return (
        path == THIS_FILE
        or parts[0] == "generated"
        or "node_modules" in parts
        or Path(path).name in LOCK_FILES
        or path.endswith(".lock")
    )


def text_of(path: str) -> str | None:
    """The file's text; None for a binary file."""
    raw = (REPO / path).read_bytes()
    if b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def scanned_files() -> Iterator[tuple[str, str]]:
    for path in known_files():
        if not skipped(path) and (text := text_of(path)) is not None:
            yield path, text


# -- the detectors --------------------------------------------------------------------------------


def outside_paths(path: str, line: str) -> Iterator[str]:
    """(a) Local paths outside the repository."""
    for match in OUTSIDE_WORK.finditer(line):
        yield match.group(0)
    for match in CLIMB.finditer(line):
        target = os.path.normpath(os.path.join(os.path.dirname(path), match.group(0)))
        if target == ".." or target.startswith("../"):
            yield match.group(0)


def outside_notes(line: str) -> Iterator[str]:
    """(b) The notes outside the repository."""
    for match in OUTSIDE_NOTES.finditer(line):
        yield match.group(0)


def issue_citations(line: str) -> Iterator[str]:
    """(c) the word issue, ticket or PR followed by a number, or a bare hash and number in
    parentheses or at a line's start; not a colour (`color: #333`), not a Markdown heading."""
    for match in ISSUE_WORD.finditer(line):
        yield match.group(0)
    for match in HASH_NUMBER.finditer(line):
        before = line[: match.start()].rstrip()
        colour = len(match.group(1)) in COLOUR_DIGITS and before.endswith((":", "=", '"', "'", ","))
        if not colour:
            yield match.group(0)


def dangling_references(path: str, line: str) -> Iterator[str]:
    """(d) Backticked paths and modules, and Markdown links, that name nothing in the repository."""
    for match in BACKTICKED.finditer(line):
        if reference_holds(path, match.group(1)) is False:
            yield f"`{match.group(1)}`"
    if path.endswith(".md"):
        for match in MARKDOWN_LINK.finditer(line):
            if link_holds(path, match.group(1)) is False:
                yield f"({match.group(1)})"


def link_holds(path: str, target: str) -> bool | None:
    """A Markdown link's local target exists, relative to the file (None: not a local file)."""
    target = target.split("#", 1)[0].split("?", 1)[0]
    if not target or SCHEME.match(target):
        return None
    return exists(os.path.join(os.path.dirname(path), target))


def reference_holds(path: str, token: str) -> bool | None:
    """Whether a backticked token that names a repository path or module names an existing one;
    None when it names neither (a URL, a media type, a command, code)."""
    token = token.split("::", 1)[0]  # a pytest node id: its file
    module, _, attribute = token.partition(":")  # `web.app:app_from_env`, uvicorn's spelling
    if DOTTED.fullmatch(module) and Path(module).suffix not in FILE_SUFFIXES:
        return module_holds(module.split(".") + ([attribute] if attribute else []))
    token = token.removeprefix("./")
    if SCHEME.match(token) or NOT_A_PATH.search(token) or token.startswith(("/", "...")):
        return None  # a URL or `name:value`, a pattern or placeholder, an absolute (URL) path
    return path_holds(path, token) if path_like(path, token) else None


def path_holds(path: str, token: str) -> bool | None:
    here = os.path.dirname(path)
    if token.startswith("../"):
        # Written from a file below this one (a split document's own files): from one of them.
        return any(exists(os.path.join(folder, token)) for folder in [here, *known_dirs()] if under(folder, here))
    if "/" in token:
        return exists(token) or exists(os.path.join(here, token))
    if Path(token).suffix in {".py", ".md"}:
        # A module or document by its name alone: it lives somewhere here. (Other bare names are
        # often outputs, such as `schema.d.ts` of a generated client.)
        return exists(token) or exists(os.path.join(here, token)) or token in known_basenames()
    return None


def path_like(path: str, token: str) -> bool:
    """A token with a file ending, a trailing slash, or a first folder the repository has (else a
    media type such as `text/event-stream`, or prose such as `and/or`)."""
    if token.endswith("/") or Path(token).suffix in FILE_SUFFIXES:
        return True
    if "/" not in token:
        return False
    first = token.split("/", 1)[0]
    return first in known_dirs() or os.path.join(os.path.dirname(path), first) in known_dirs()


def under(folder: str, parent: str) -> bool:
    return not parent or folder == parent or folder.startswith(parent + "/")


def exists(relative: str) -> bool:
    """A file or folder of the repository, or a path git ignores (build output, the venv)."""
    normal = os.path.normpath(relative)
    if normal == "." or normal in known_files() or normal in known_dirs():
        return True
    # Kept as a folder when written as one: git matches `build/`-style patterns to folders only.
    return not normal.startswith("..") and ignored(normal + "/" if relative.endswith("/") else normal)


@cache
def ignored(relative: str) -> bool:
    result = subprocess.run(
        ["git", "check-ignore", "-q", "--no-index", relative], cwd=REPO, capture_output=True, check=False
    )
    return result.returncode == 0


def module_holds(names: list[str]) -> bool | None:
    """`package.module.Name` under one of the project's packages: the module part is a .py file
    or a package, and the first name after it occurs in that module. None outside the project."""
    if names[0] in FORMER_PACKAGES:
        return False
    if names[0] not in project_packages():
        return None
    folder = REPO / names[0]
    for index, name in enumerate(names[1:], start=1):
        if (folder / name).is_dir() and any((folder / name).glob("*.py")):
            folder = folder / name  # a package, or a folder of modules (namespace package)
        elif (folder / f"{name}.py").is_file():
            rest = names[index + 1 :]
            return not rest or mentions(folder / f"{name}.py", rest[0])
        else:
            return mentions(folder / "__init__.py", name)
    return True


@cache
def project_packages() -> frozenset[str]:
    return frozenset(path.split("/")[0] for path in known_files() if re.fullmatch(r"[a-z_]+/__init__\.py", path))


def mentions(module: Path, name: str) -> bool:
    return module.is_file() and re.search(rf"\b{re.escape(name)}\b", module.read_text(encoding="utf-8")) is not None


def prose(path: str, text: str) -> Iterator[tuple[int, str]]:
    """The lines of `text` that are prose: all of them, but for Python only its comments and
    docstrings (an ordinary string literal is data: `"Answer #1"` is no citation)."""
    if not path.endswith(".py"):
        yield from enumerate(text.splitlines(), start=1)
        return
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
        elif token.type == tokenize.STRING and token.string.lstrip("rRbBuUfF")[:3] in {'"""', "'''"}:
            yield from enumerate(token.string.splitlines(), start=token.start[0])


def findings(files: Iterable[tuple[str, str]]) -> list[Finding]:
    found: list[Finding] = []
    for path, text in files:
        for number, line in enumerate(text.splitlines(), start=1):
            checks = (
                ("outside the repository", outside_paths(path, line)),
                ("note outside the repository", outside_notes(line)),
                ("dangling reference", dangling_references(path, line)),
            )
            found += [Finding(path, number, kind, hit) for kind, hits in checks for hit in hits]
        found += [
            Finding(path, number, "issue number", hit)
            for number, line in prose(path, text)
            for hit in issue_citations(line)
        ]
    return sorted(found, key=lambda finding: (finding.path, finding.line))


def checked_references(files: Iterable[tuple[str, str]]) -> int:
    """How many backticked paths and modules, and local links, the scan checked."""
    count = 0
    for path, text in files:
        for line in text.splitlines():
            count += sum(reference_holds(path, m.group(1)) is not None for m in BACKTICKED.finditer(line))
            if path.endswith(".md"):
                count += sum(link_holds(path, m.group(1)) is not None for m in MARKDOWN_LINK.finditer(line))
    return count


# -- the detectors on examples ----------------------------------------------------------------------

# The examples below are assembled from parts, so that this file itself holds no line the
# detectors (or any reader looking for such references) would take for a real one.
ISSUE, HASH, SHARED = "iss" + "ue", "#", "sha" + "red"


@pytest.mark.parametrize(
    ("path", "line"),
    [
        ("README.md", f"Shared notes are in ../{SHARED}/notes.md."),
        ("docs/decisions/README.md", "see ../../../other-project/x.md"),
        ("web/app.py", "# copied from /work/main/server/app.py"),
    ],
)
def test_paths_outside_the_repository_are_found(path: str, line: str) -> None:
    assert list(outside_paths(path, line))


@pytest.mark.parametrize(
    ("path", "line"),
    [
        ("openapi/paths/runs.yaml", "$ref: '../components/schemas/Run.yaml'"),
        ("docs/decisions/0001-x.md", "[index](../../README.md)"),
        ("README.md", "`.../openapi.yaml`, /workflows/runs, /api/v1/work"),
    ],
)
def test_paths_that_stay_inside_are_not(path: str, line: str) -> None:
    assert not list(outside_paths(path, line))


def test_the_outside_notes_are_found() -> None:
    design, reference, tooling = (f"{name}.md" for name in OUTSIDE_NOTE_NAMES)
    assert list(outside_notes(f"as {design} says")) == [design]
    assert list(outside_notes(f"see {tooling.lower()} and {reference}")) == [tooling.lower(), reference]
    assert not list(outside_notes("see README.md and docs/decisions/0001-x.md"))


@pytest.mark.parametrize(
    "line",
    [
        f"fixed in {ISSUE} 12",
        f"see {ISSUE.title()} {HASH}12",
        f"the race ({HASH}14) is gone",
        f"{HASH}7: retry the hub",
        "as P" + "R 31 did",
        f"closes {HASH}123456 too",
    ],
)
def test_issue_citations_are_found(line: str) -> None:
    assert list(issue_citations(line))


@pytest.mark.parametrize(
    "line",
    [
        "color: #333;",
        'fill="#000000"',
        "  # 12 retries at most",
        "stoplightio/spectral#2655 misreports refs",
        "&#160; and page.html#12",
        "$ref: '#/components/schemas/Run'",
        "three issues, 12 runs",  # a count, not a citation: no number right after the word
        "the 12th issue",
    ],
)
def test_colours_comments_and_upstream_references_are_not_issue_citations(line: str) -> None:
    assert not list(issue_citations(line))


@pytest.mark.parametrize(
    ("path", "line"),
    [
        ("README.md", "See `server/app.py` for the app."),
        ("README.md", "The app is in `server/`."),
        ("README.md", "`tests/unit/test_nothing_here.py`"),
        ("ARCHITECTURE.md", "[decision](docs/decisions/0999-never-written.md)"),
        ("web/app.py", "# `web.sse.framez` frames it"),
        ("web/app.py", "# `handlers.deps.NoSuchThing`"),
        ("web/app.py", "# `server.app.create_app`"),
        ("web/app.py", "# `web.app:no_such_factory`"),
        ("README.md", "`no_such_module.py`"),
    ],
)
def test_dangling_references_are_found(path: str, line: str) -> None:
    assert list(dangling_references(path, line))


@pytest.mark.parametrize(
    ("path", "line"),
    [
        ("README.md", "`web/app.py`, `openapi/`, `./Makefile` and `fast_lane.py`"),
        ("README.md", "`tests/unit/test_operations.py::test_every_operation`"),
        ("README.md", "`web.sse.frames`, `handlers.deps.Deps`, `web.app:app_from_env`, `handlers.HANDLERS`"),
        ("README.md", "[tests](tests/unit/) and [the API](https://example.org/x.md) and [top](#layout)"),
        ("README.md", "`build/openapi.yaml`, `.venv/bin/pytest`, `.data/`"),  # outputs git ignores
        ("README.md", "`text/event-stream`, `and/or`, `request.state.deps`, `asyncio.timeout`"),
        ("README.md", "`tests/**/*.py`, `build/clients/<lang>/`, `$(BIN)/pytest`, `/health/ready`"),
        ("web/app.py", "`make -f make/spec.mk lint-spec` is run by a shell, `date`"),
    ],
)
def test_existing_references_and_non_references_pass(path: str, line: str) -> None:
    assert not list(dangling_references(path, line))


# -- the tree ------------------------------------------------------------------------------------


def test_the_scan_reads_the_repository_and_checks_its_references() -> None:
    scanned = dict(scanned_files())
    assert "README.md" in scanned and "web/app.py" in scanned
    assert not any(path.startswith("generated/") for path in scanned)
    checked = checked_references(scanned.items())
    assert checked > 150, checked  # far more than the examples above: it looked


def test_python_prose_is_its_comments_and_docstrings() -> None:
    source = f'"""See {ISSUE} 3."""\n\nANSWER = "Answer {HASH}1"  # fixed in {HASH}2\n'
    assert [hit for _, line in prose("x.py", source) for hit in issue_citations(line)] == [f"{ISSUE} 3", f"{HASH}2"]


def test_no_file_points_outside_the_repository_or_at_something_missing() -> None:
    found = findings(scanned_files())
    assert not found, "\n".join(map(str, found))
