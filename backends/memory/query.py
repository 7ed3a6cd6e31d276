"""The visibility query evaluated in memory: what Temporal would match, for mock mode's listings.

The caller's `query` is first confined exactly as for Temporal (`confine_custom_query`: the same
refusals, the same 400s). The confined text, which only the grammar of `backends.visibility_query`
can have produced, is then compiled once (`compile_query`), before any run is looked at, the way
Temporal's SQL visibility store (the dev server's, 1.32) converts it: every attribute must be one
it declares (`ATTRIBUTE_TYPES`), every literal must be of the attribute's declared type, every
operator allowed for that type. What it refuses is refused here with the real backend's words for
Temporal's INVALID_ARGUMENT (`REFUSED`), whether or not a run would have been compared:

- Keyword: a string; any operator (ranges compare the text, STARTS_WITH its prefix).
- ExecutionStatus: a status name (`Running`, `WORKFLOW_EXECUTION_STATUS_RUNNING`) or its number
  (0 to 8), compared as the number; no STARTS_WITH.
- Datetime: RFC 3339 with a zone (`2024-05-01T12:00:00Z`, up to nanoseconds) or epoch
  nanoseconds; no STARTS_WITH.
- Int: an integer; ExecutionDuration also a duration string (Temporal's `ParseExecutionDurationStr`:
  nanoseconds as digits, Go durations with a `d` unit such as `1h30m`, `1.5d`, `300ms`, or
  `hh:mm:ss`), compared in nanoseconds; no STARTS_WITH.

A number with a fraction, or beyond 64 bits, is a float to Temporal and fits none of these types.
Evaluation is SQL's: a comparison with a missing value (NULL) is unknown, NOT of unknown is
unknown, and a run matches only when the whole query is true.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from backends.visibility_query import Token, tokenize
from core.errors import InvalidInput
from core.search_attributes import SEARCH_ATTRIBUTES

# What a run's attribute holds: text, or an integer (a status's number, nanoseconds), or nothing.
Value = str | int | None
# The compiled query: a run's attributes -> True, False or None (SQL's unknown).
Predicate = Callable[[Mapping[str, Value]], bool | None]

# The words of the Temporal backend when Temporal refuses a listing's filters (INVALID_ARGUMENT):
# `backends.temporal_runs` maps every such refusal to them, so the mock answers the same.
REFUSED = (
    "Temporal refused this listing's filters: check `query` (an unknown search attribute,"
    " or a value of the wrong type for its attribute)."
)

KEYWORD, STATUS, DATETIME, INT, DURATION = "Keyword", "ExecutionStatus", "Datetime", "Int", "Duration"

# The attributes Temporal declares (its system ones, and the project's custom ones), by type. The
# mock holds a value for those `MemoryRun.search_attributes` fills; the rest are NULL on every run,
# as on a top-level run no batch, schedule or parent started. (KeywordList and Bool system
# attributes are not declared here: a query naming them is refused by the mock only.)
ATTRIBUTE_TYPES: dict[str, str] = {
    "WorkflowId": KEYWORD,
    "RunId": KEYWORD,
    "WorkflowType": KEYWORD,
    "TaskQueue": KEYWORD,
    "ParentWorkflowId": KEYWORD,
    "ParentRunId": KEYWORD,
    "RootWorkflowId": KEYWORD,
    "RootRunId": KEYWORD,
    "BatcherUser": KEYWORD,
    "TemporalScheduledById": KEYWORD,
    "ExecutionStatus": STATUS,
    "StartTime": DATETIME,
    "ExecutionTime": DATETIME,
    "CloseTime": DATETIME,
    "TemporalScheduledStartTime": DATETIME,
    "ExecutionDuration": DURATION,
    "HistoryLength": INT,
    "HistorySizeBytes": INT,
    "StateTransitionCount": INT,
} | {name: KEYWORD for name, kind in SEARCH_ATTRIBUTES.items() if kind == "Keyword"}

# Temporal's WorkflowExecutionStatus numbers; the visibility store compares statuses by number.
STATUS_CODES: dict[str, int] = {
    "Unspecified": 0,
    "Running": 1,
    "Completed": 2,
    "Failed": 3,
    "Canceled": 4,
    "Terminated": 5,
    "ContinuedAsNew": 6,
    "TimedOut": 7,
    "Paused": 8,
}
_STATUS_NAMES = STATUS_CODES | {
    "WORKFLOW_EXECUTION_STATUS_" + re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper(): code
    for name, code in STATUS_CODES.items()
}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _refused() -> InvalidInput:
    return InvalidInput(REFUSED)


# -- literals ----------------------------------------------------------------------------------


def _integer(text: str) -> int | None:
    """A NUMBER token as Go's `strconv.ParseInt` reads it, or None when Temporal reads a float."""
    if not re.fullmatch(r"-?[0-9]+", text):
        return None
    value = int(text)
    return value if INT64_MIN <= value <= INT64_MAX else None


_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:Z|([+-])([0-9]{2}):([0-9]{2}))"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def rfc3339_nanos(text: str) -> int | None:
    """Epoch nanoseconds of `text` as Go's `time.Parse(time.RFC3339Nano, ...)` reads it, or None."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, sign, zone_hours, zone_minutes = match.groups()
    try:
        zone = UTC
        if sign is not None:
            if int(zone_hours) > 23 or int(zone_minutes) > 59:
                return None
            offset = timedelta(hours=int(zone_hours), minutes=int(zone_minutes))
            zone = timezone(-offset if sign == "-" else offset)
        moment = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=zone)
    except ValueError:
        return None
    seconds = (moment - _EPOCH) // timedelta(seconds=1)
    return seconds * 1_000_000_000 + int((fraction or "0")[:9].ljust(9, "0"))


_GO_UNITS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign
    "\u03bcs": 1_000,  # Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_GO_NUMBER = re.compile(r"([0-9]*)(?:\.([0-9]*))?")
_GO_UNIT = re.compile(r"[^0-9.]*")
_DAYS = re.compile(r"([0-9]+(\.[0-9]*)?|(\.[0-9]+))d")
_HHMMSS = re.compile(r"[ \t\r]*([+-]?[0-9]+):[ \t\r]*([+-]?[0-9]+):[ \t\r]*([+-]?[0-9]+)")


def _go_component(rest: str) -> tuple[int, str] | None:
    """The first `<number><unit>` of a Go duration: its nanoseconds and what follows, or None."""
    number = _GO_NUMBER.match(rest)
    assert number is not None  # it matches the empty string
    whole, fraction = number.group(1), number.group(2)
    if not whole and not fraction:
        return None
    unit_match = _GO_UNIT.match(rest, number.end())
    assert unit_match is not None  # it matches the empty string
    unit = _GO_UNITS.get(unit_match.group(0))
    if unit is None or int(whole or "0") > 2**63 // unit:
        return None
    value = int(whole or "0") * unit
    if fraction:
        # Go adds float64(fraction) * (unit / scale), dropping the digits beyond int64.
        digits = fraction
        while int(digits) > INT64_MAX:
            digits = digits[:-1]
        value += int(float(int(digits)) * (float(unit) / float(10 ** len(digits))))
    return value, rest[unit_match.end() :]


def _go_duration(text: str) -> int | None:
    """Nanoseconds of `text` as Go's `time.ParseDuration` reads it, or None where it errs."""
    negative = text[:1] == "-"
    rest = text[1:] if text[:1] in ("-", "+") else text
    if rest == "0":
        return 0
    total: int | None = None
    while rest:
        part = _go_component(rest)
        if part is None or (total or 0) + part[0] > 2**63:
            return None
        total, rest = (total or 0) + part[0], part[1]
    if total is None or (not negative and total > INT64_MAX):
        return None
    return -total if negative else total


def _wrap64(value: int) -> int:
    """`value` as Go's int64 arithmetic leaves it (it wraps on overflow)."""
    return (value + 2**63) % 2**64 - 2**63


def duration_nanos(text: str) -> int | None:
    """Nanoseconds of an ExecutionDuration string as Temporal reads it (`ParseExecutionDurationStr`:
    an integer of nanoseconds, a Go duration with `d` for 24 hours, or `hh:mm:ss`), or None."""
    if re.fullmatch(r"[+-]?[0-9]+", text):
        value = int(text)
        return value if INT64_MIN <= value <= INT64_MAX else None
    days = _DAYS.sub(lambda match: "%fh" % (24 * float(match.group(0)[:-1])), text)
    parsed = _go_duration(days)
    if parsed is not None:
        return parsed
    # fmt.Sscanf("%d:%d:%d"): what follows the seconds is not read.
    match = _HHMMSS.match(text)
    if match is None:
        return None
    hours, minutes, seconds = (int(part) for part in match.groups())
    if any(not INT64_MIN <= part <= INT64_MAX for part in (hours, minutes, seconds)):
        return None
    if hours < 0 or not 0 <= minutes <= 59 or not 0 <= seconds <= 59:
        return None
    return _wrap64(_wrap64(hours * 3_600_000_000_000) + minutes * 60_000_000_000 + seconds * 1_000_000_000)


def literal(kind: str, token: Token) -> Value:
    """The query's literal as a value of an attribute of type `kind`; REFUSED when Temporal refuses
    it for that type."""
    if token.kind == "STRING":
        value: int | None
        if kind == KEYWORD:
            return token.text
        if kind == STATUS:
            value = _STATUS_NAMES.get(token.text)
        elif kind == DATETIME:
            value = rfc3339_nanos(token.text)
        elif kind == DURATION:
            value = duration_nanos(token.text)
        else:
            value = None
        if value is None:
            raise _refused()
        return value
    if token.kind == "NUMBER" and kind != KEYWORD:
        number = _integer(token.text)
        if number is None or (kind == STATUS and number not in STATUS_CODES.values()):
            raise _refused()
        return number
    raise _refused()  # TRUE / FALSE, or a number for a Keyword


# -- the compiled query ------------------------------------------------------------------------

_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "=": operator.eq,
    "!=": operator.ne,
    "<>": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def _not(result: bool | None) -> bool | None:
    return None if result is None else not result


class _Compiler:
    """The grammar of `visibility_query._Parser`, compiled to a predicate instead of written back."""

    def __init__(self, text: str) -> None:
        self.tokens = list(tokenize(text))
        self.index = 0

    def take(self) -> Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def at(self, *words: str) -> bool:
        if self.index >= len(self.tokens):
            return False
        token = self.tokens[self.index]
        return token.kind == "KEYWORD" and token.text in words

    def expression(self) -> Predicate:
        parts = [self.conjunction()]
        while self.at("OR"):
            self.take()
            parts.append(self.conjunction())
        return parts[0] if len(parts) == 1 else _any(parts)

    def conjunction(self) -> Predicate:
        parts = [self.unary()]
        while self.at("AND"):
            self.take()
            parts.append(self.unary())
        return parts[0] if len(parts) == 1 else _all(parts)

    def unary(self) -> Predicate:
        token = self.take()
        if token.kind == "KEYWORD" and token.text == "NOT":
            operand = self.unary()
            return lambda attributes: _not(operand(attributes))
        if token.kind == "LPAREN":
            inner = self.expression()
            self.take()  # the closing parenthesis
            return inner
        return self.predicate(token.text)

    def predicate(self, name: str) -> Predicate:
        kind = ATTRIBUTE_TYPES.get(name)
        if kind is None:
            raise _refused()  # Temporal: "invalid search attribute"
        token = self.take()
        if token.kind == "OP":
            compare = _OPERATORS[token.text]
            value = literal(kind, self.take())
            return lambda attributes: _known(attributes.get(name), lambda current: bool(compare(current, value)))
        if token.text == "IS":
            negated = self.at("NOT")
            if negated:
                self.take()
            self.take()  # NULL
            return lambda attributes: (attributes.get(name) is None) != negated
        negated = token.text == "NOT"
        if negated:
            token = self.take()
        test: Callable[[Any], bool]
        if token.text == "IN":
            self.take()  # (
            values = [literal(kind, self.take())]
            while self.take().kind == "COMMA":
                values.append(literal(kind, self.take()))
            test = values.__contains__
        elif token.text == "BETWEEN":
            low = literal(kind, self.take())
            self.take()  # AND
            high = literal(kind, self.take())
            test = lambda current: low <= current <= high  # noqa: E731
        else:  # STARTS_WITH: a Keyword's prefix; Temporal refuses it for every other type
            prefix = literal(kind, self.take())
            if kind != KEYWORD or not isinstance(prefix, str):
                raise _refused()
            test = lambda current: current.startswith(prefix)  # noqa: E731
        if negated:
            return lambda attributes: _known(attributes.get(name), lambda current: not test(current))
        return lambda attributes: _known(attributes.get(name), test)


def _known(current: Value, test: Callable[[Any], bool]) -> bool | None:
    """SQL's comparison: unknown (None) for a missing value."""
    return None if current is None else test(current)


def _all(parts: list[Predicate]) -> Predicate:
    def conjunction(attributes: Mapping[str, Value]) -> bool | None:
        results = [part(attributes) for part in parts]
        if False in results:
            return False
        return None if None in results else True

    return conjunction


def _any(parts: list[Predicate]) -> Predicate:
    def disjunction(attributes: Mapping[str, Value]) -> bool | None:
        results = [part(attributes) for part in parts]
        if True in results:
            return True
        return None if None in results else False

    return disjunction


def compile_query(confined: str) -> Callable[[Mapping[str, Value]], bool]:
    """The confined query as a test of a run's search attributes: True when it matches. Refuses
    (`InvalidInput`, `REFUSED`) what Temporal refuses, whatever runs there are."""
    predicate = _Compiler(confined).expression()
    return lambda attributes: predicate(attributes) is True
