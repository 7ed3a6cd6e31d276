"""Schemathesis hooks of `make fuzz` (loaded through `SCHEMATHESIS_HOOKS`): every generated case
may get hostile strings (`contract_tests.hostile_strings`) written into its JSON body, query and
path parameters.

One `flatmap_case` hook sees the whole case, so a string anywhere in the body (filters, update
message, signal payload, nested `details`, object keys) is a target, with Hypothesis choosing which
and how (so failures shrink). Headers are left alone: a control character is not a legal header
value, so the HTTP layer, not the API, refuses it.

The edited case is re-validated at once (reading `case.meta`; left for later, Schemathesis would take
the edits for the case's starting state): an edit that keeps it within the schema stays a positive
case (the API must accept it or answer a documented status), one that breaks the schema becomes a
negative case (the API must refuse it with a 4xx). A lone surrogate makes the body negative too:
such a JSON text is no Unicode (RFC 8259 section 8.2 leaves its meaning open, I-JSON forbids it),
so the API refuses it with 400 like any body it cannot read. (Relabelling uses Schemathesis
internals: `schemathesis` is pinned in constraints.txt.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import schemathesis
from hypothesis import strategies as st
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation import GenerationMode
from schemathesis.generation.meta import ComponentInfo

from contract_tests.hostile_strings import Mutation, mutations

Path = tuple[str | int, ...]


@schemathesis.hook
def flatmap_case(context: Any, case: Any) -> st.SearchStrategy[Any]:
    return _with_hostile_strings(case)


# Edits to one container: (which string, modulo how many there are; how to change it).
Plan = list[tuple[int, Mutation]]


def _plan(*, json_body: bool) -> st.SearchStrategy[Plan]:
    return st.lists(st.tuples(st.integers(0, 2**16), mutations(json_body=json_body)), min_size=1, max_size=3)


@st.composite
def _with_hostile_strings(draw: st.DrawFn, case: Any) -> Any:
    # Every draw is made whatever the case holds, and none depends on it: Hypothesis replays choice
    # sequences, and the values under them change during a run (pools of earlier responses).
    untouched = draw(st.integers(0, 3)) == 0  # one case in four goes out as generated
    body_plan, query_plan = draw(_plan(json_body=True)), draw(_plan(json_body=False))
    # Less often in the path: most operations are pinned to a seeded run, which an edited id misses.
    path_plan = draw(_plan(json_body=False)) if draw(st.integers(0, 3)) == 0 else []
    if untouched:
        return case
    generated = case.body, case.query, case.path_parameters
    if isinstance(case.body, dict | list | str):
        case.body = _edited(case.body, body_plan, only_strings=True)
    if case.query:
        case.query = _edited(case.query, query_plan, only_strings=False)
    if case.path_parameters and path_plan:
        case.path_parameters = _edited(case.path_parameters, path_plan, only_strings=False)
    try:
        meta = case.meta
    except UnicodeEncodeError:
        # jsonschema-rs cannot match a `pattern` against a lone surrogate (it has no UTF-8 form):
        # this case goes out as generated (and its labels, maybe half updated, are computed again).
        case.body, case.query, case.path_parameters = generated
        _ = case.meta
        return case
    if meta is not None:
        _label_what_schemathesis_does_not(case, meta, query=generated[1], path_parameters=generated[2])
    return case


def _label_what_schemathesis_does_not(case: Any, meta: Any, *, query: Any, path_parameters: Any) -> None:
    """Labels for the edits Schemathesis' re-validation leaves alone: parameters pinned by the
    configuration (the seeded run's ids) are no generated component, so it never judges them; and
    it takes a lone surrogate for a valid string."""
    for location, before, after in (
        (ParameterLocation.QUERY, query, case.query),
        (ParameterLocation.PATH, path_parameters, case.path_parameters),
    ):
        if location not in meta.components and after != before:
            valid = case._validate_component(location, after, case.operation.schema.adapter.jsonschema_validator_cls)
            meta.components[location] = ComponentInfo(
                mode=GenerationMode.POSITIVE if valid else GenerationMode.NEGATIVE
            )
    if ParameterLocation.BODY in meta.components and _has_lone_surrogate(case.body):
        meta.components[ParameterLocation.BODY] = ComponentInfo(mode=GenerationMode.NEGATIVE)
    if not all(info.mode.is_positive for info in meta.components.values()):
        meta.generation.mode = GenerationMode.NEGATIVE


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any("\ud800" <= character <= "\udfff" for character in value)
    if isinstance(value, dict):
        return any(_has_lone_surrogate(key) or _has_lone_surrogate(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(item) for item in value)
    return False


def _edited(value: Any, plan: Plan, *, only_strings: bool) -> Any:
    """`value` with the strings (values or object keys) the plan picks made hostile."""
    for pick, mutation in plan:
        slots = list(_slots(value, (), only_strings=only_strings))  # again: a key edit moves paths
        if not slots:
            return value
        path, is_key = slots[pick % len(slots)]
        value = _write(value, path, mutation.apply(_read(value, path, is_key=is_key)), is_key=is_key)
    return value


def _slots(value: Any, path: Path, *, only_strings: bool) -> Iterator[tuple[Path, bool]]:
    """Every place a string can go: `(path, True)` for an object key, `(path, False)` for a value."""
    if isinstance(value, dict):
        for key, item in value.items():
            if path:  # top-level keys are parameter or field names: unknown ones are a plain 400
                yield (*path, key), True
            yield from _slots(item, (*path, key), only_strings=only_strings)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _slots(item, (*path, index), only_strings=only_strings)
    elif isinstance(value, str) or (not only_strings and isinstance(value, int | float) and path):
        yield path, False


def _read(value: Any, path: Path, *, is_key: bool) -> str:
    if is_key:
        return str(path[-1])
    for step in path:
        value = value[step]
    return value if isinstance(value, str) else str(value).lower()


def _write(value: Any, path: Path, new: str, *, is_key: bool) -> Any:
    """A copy of `value` with the key or value at `path` replaced (containers along it copied)."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, list):
        assert isinstance(head, int)
        return [*value[:head], _write(value[head], rest, new, is_key=is_key), *value[head + 1 :]]
    assert isinstance(value, dict)
    if is_key and not rest:
        return {(new if key == head else key): item for key, item in value.items()}
    return {key: (_write(item, rest, new, is_key=is_key) if key == head else item) for key, item in value.items()}
