"""Translate the list inputs into a Temporal visibility query, safely.

Pure functions, no I/O: the Temporal backend calls `build_query`, the unit tests call it directly.
(Page tokens, which carry a digest of the query, are `backends.page_tokens`.)

Safety rests on three rules:

1. Every value a caller sends becomes a single-quoted string literal written by `quote`, which
   escapes backslashes and quotes, so no value can end its literal early.
2. Every value must reach the visibility store as it was sent (`check_value`): no control
   character (Temporal's SQL stores fail on a NUL, and answer with their own error text), and no
   single quote at either end (Temporal strips those, so `'` would become an empty prefix that
   matches every run).
3. The caller's custom `query` is tokenized and parsed with the grammar of Temporal's visibility
   language, then written back from the parse tree (identifiers checked, strings re-quoted,
   every group parenthesized) and ANDed with the scope clauses. Anything the parser does not
   accept (unbalanced parentheses or quotes, comments, semicolons, ORDER BY, LIMIT, references to
   the attributes that scope a caller) is refused with `InvalidInput`: it can narrow a listing,
   never widen it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone

from core.errors import Forbidden, InvalidInput
from core.protocols import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, MIN_PAGE_SIZE, RunFilters

# The document says the same (ListRunsRequest): 256 characters for a filter value, 2000 for `query`.
MAX_VALUE_LENGTH = 256
MAX_QUERY_LENGTH = 2000
MAX_NESTING = 32

# C0 and C1 control characters, DEL, and lone surrogates (which no JSON body can carry, but a
# caller in Python could): none can be matched by the visibility store, a NUL even fails its SQL.
_UNCARRIABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

# Attributes that decide what a caller may see: a custom query must not mention them (TenantId
# too, which the live service scopes on, should a cluster register it).
SCOPING_ATTRIBUTES = frozenset({"ProjectId", "AccountId", "TenantId", "Visibility", "InitiatedBy", "IsConversation"})
_SCOPING_LOWER = frozenset(name.lower() for name in SCOPING_ATTRIBUTES)

# What listings show as `initiated_by` for a run whose starter was not recorded.
UNKNOWN_INITIATOR = "unknown"

# The list `status` input (case-insensitive) -> Temporal's ExecutionStatus value.
STATUS_VALUES: dict[str, str] = {
    "running": "Running",
    "completed": "Completed",
    "failed": "Failed",
    "canceled": "Canceled",
    "cancelled": "Canceled",
    "terminated": "Terminated",
    "continued_as_new": "ContinuedAsNew",
    "continuedasnew": "ContinuedAsNew",
    "timed_out": "TimedOut",
    "timedout": "TimedOut",
    "paused": "Paused",
}

# Escapes understood by Temporal's query tokenizer (MySQL's string-literal escapes).
_ESCAPES = {
    "\\": "\\\\",
    "'": "\\'",
    "\x00": "\\0",
    "\b": "\\b",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\x1a": "\\Z",
}
_ESCAPE_RE = re.compile("[\\\\'\x00\b\n\r\t\x1a]")
_UNESCAPES = {"0": "\x00", "b": "\b", "n": "\n", "r": "\r", "t": "\t", "Z": "\x1a"}


def quote(value: str) -> str:
    """`value` as a single-quoted string literal of the visibility language."""
    return "'" + _ESCAPE_RE.sub(lambda m: _ESCAPES[m.group(0)], value) + "'"


def value_problem(value: str) -> str | None:
    """Why `value` cannot be sent to the visibility store as a string, or None when it can.

    Temporal reads a string value with its quotes trimmed (`strings.Trim(v, "'")`), so quotes at
    either end are lost: `'` alone would become the empty string, a prefix of every run."""
    if _UNCARRIABLE.search(value):
        return "must not contain control characters"
    if value.startswith("'") or value.endswith("'"):
        return "cannot begin or end with a single quote (') (Temporal's visibility store drops such quotes)"
    return None


def check_value(name: str, value: str) -> str:
    """`value`, or InvalidInput naming `name` when the visibility store could not match it exactly."""
    problem = value_problem(value)
    if problem is not None:
        raise InvalidInput(f"{name} {problem}.")
    return value


# ---------------------------------------------------------------------------------------------
# Plain inputs


def _text(name: str, value: object, limit: int = MAX_VALUE_LENGTH) -> str | None:
    """A filter value: None when absent or blank; InvalidInput unless a reasonable string."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be a string.")
    if _UNCARRIABLE.search(value):
        raise InvalidInput(f"{name} must not contain control characters.")
    if not value.strip():
        return None
    if len(value) > limit:
        raise InvalidInput(f"{name} is longer than {limit} characters.")
    return value


# The one shape `start` and `end` take, as the document's pattern states it (a test holds the two
# equal): a date, or a date-time with seconds, an optional fraction of up to 9 digits and an
# optional offset (`Z` or +hh:mm / -hh:mm). RFC 3339 lets `T` and `Z` be lower case.
TIME_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}([Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})?)?$"
)
_TIME = re.compile(
    r"(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})"
    r"(?:[Tt](?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2})(?:\.(?P<fraction>[0-9]{1,9}))?"
    r"(?P<offset>[Zz]|(?P<sign>[+-])(?P<offset_hours>[0-9]{2}):(?P<offset_minutes>[0-9]{2}))?)?"
)


def parse_time(name: str, value: str, *, end_of_day: bool = False) -> datetime:
    """A date or date-time of the documented shape (`TIME_PATTERN`) as an aware UTC datetime.

    A date alone means the start of that day (UTC), or its last microsecond when `end_of_day`
    (so `end: "2024-05-01"` includes runs started during May 1st). A date-time without an offset
    is read as UTC; a fraction beyond microseconds is cut (Temporal keeps no more)."""
    match = _TIME.fullmatch(value)
    try:
        if match is None:
            raise ValueError("not of the documented shape")
        day = date.fromisoformat(match["date"])
        if match["hour"] is None:
            return datetime.combine(day, time.max if end_of_day else time.min, tzinfo=UTC)
        zone = UTC
        if match["sign"] is not None:
            if int(match["offset_minutes"]) > 59:
                raise ValueError("offset minutes beyond 59")
            offset = timedelta(hours=int(match["offset_hours"]), minutes=int(match["offset_minutes"]))
            zone = timezone(-offset if match["sign"] == "-" else offset)  # ValueError from 24:00 on
        moment = datetime.combine(
            day,
            time(
                int(match["hour"]),
                int(match["minute"]),
                int(match["second"]),
                int((match["fraction"] or "0")[:6].ljust(6, "0")),
            ),
            tzinfo=zone,
        ).astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: an offset that moves it out of years 1-9999
        raise InvalidInput(
            f"{name} must be a date (2024-05-01) or a date-time (2024-05-01T12:00:00Z; without an offset, UTC).",
            details=f"got {value!r}",
        ) from None
    return moment


def rfc3339(moment: datetime) -> str:
    """`moment` in UTC as RFC 3339 with microseconds (`isoformat` writes every year with 4 digits)."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def status_value(value: str) -> str:
    key = value.strip().lower().replace("-", "_")
    try:
        return STATUS_VALUES[key]
    except KeyError:
        raise InvalidInput(
            "status must be one of: running, completed, failed, canceled, terminated, continued_as_new, timed_out,"
            " paused.",
            details=f"got {value!r}",
        ) from None


def page_size_of(value: object) -> int:
    if value is None:
        return DEFAULT_PAGE_SIZE
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_PAGE_SIZE <= value <= MAX_PAGE_SIZE:
        raise InvalidInput(f"page_size must be an integer from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}.")
    return value


def visibility_clause(principal_ref: str) -> str:
    """Private runs are seen only by whoever started them (runs without the attribute are project
    runs, the documented default)."""
    return f"(Visibility IS NULL OR Visibility != 'private' OR InitiatedBy = {quote(principal_ref)})"


def initiated_by_clause(principal_ref: str) -> str:
    """The `initiated_by` filter. Listings show a run whose attribute is absent or empty as
    `unknown` (`backends.run_view.RunScope`), so `unknown` matches those runs too, not only the
    attribute's literal value."""
    literal = f"InitiatedBy = {quote(principal_ref)}"
    if principal_ref == UNKNOWN_INITIATOR:
        return f"(InitiatedBy IS NULL OR InitiatedBy = '' OR {literal})"
    return literal


def scope_clauses(project_id: str, principal_ref: str, *, superadmin: bool, conversations_only: bool) -> list[str]:
    """What the caller may see: its project, conversations when asked, the private-run rule."""
    for scope_value in (project_id, principal_ref):
        if value_problem(scope_value) is not None:
            # From the token: a project id the store would read as another one must list nothing.
            raise Forbidden("The token's project or principal id cannot be used to list runs.")
    clauses = [f"ProjectId = {quote(project_id)}"]
    if conversations_only:
        clauses.append("IsConversation = true")
    if not superadmin:
        clauses.append(visibility_clause(principal_ref))
    return clauses


def build_query(
    filters: RunFilters,
    *,
    project_id: str,
    principal_ref: str,
    superadmin: bool = False,
    conversations_only: bool = False,
) -> str:
    """The complete visibility query for one listing: the caller's scope, then each filter."""
    clauses = scope_clauses(project_id, principal_ref, superadmin=superadmin, conversations_only=conversations_only)

    for name, attribute in (
        ("document_id", "DocumentId"),
        ("event_name", "EventName"),
        ("rule_id", "RuleId"),
    ):
        value = _text(name, getattr(filters, name))
        if value is not None:
            clauses.append(f"{attribute} = {quote(check_value(name, value))}")

    initiated_by = _text("initiated_by", filters.initiated_by)
    if initiated_by is not None:
        clauses.append(initiated_by_clause(check_value("initiated_by", initiated_by)))

    workflow_type = _text("type", filters.type)
    if workflow_type is not None:
        literal = quote(check_value("type", workflow_type))
        clauses.append(f"(WorkflowType = {literal} OR VertesiaWorkflowType = {literal})")

    status = _text("status", filters.status)
    if status is not None:
        clauses.append(f"ExecutionStatus = {quote(status_value(status))}")

    start_raw, end_raw = _text("start", filters.start), _text("end", filters.end)
    start = parse_time("start", start_raw) if start_raw is not None else None
    end = parse_time("end", end_raw, end_of_day=True) if end_raw is not None else None
    if start is not None and end is not None and start > end:
        raise InvalidInput("start must not be after end.")
    if start is not None:
        clauses.append(f"StartTime >= {quote(rfc3339(start))}")
    if end is not None:
        clauses.append(f"StartTime <= {quote(rfc3339(end))}")

    term = _text("search_term", filters.search_term)
    if term is not None:
        # Matched literally: `quote` escapes the quotes, Temporal escapes `%`, `_` and its own LIKE
        # escape character in a STARTS_WITH, and `check_value` refuses what the store would change.
        literal = quote(check_value("search_term", term.strip()))
        clauses.append(
            f"(WorkflowType = {literal} OR VertesiaWorkflowType = {literal} OR WorkflowId = {literal}"
            f" OR RunId = {literal} OR WorkflowId STARTS_WITH {literal} OR WorkflowType STARTS_WITH {literal}"
            f" OR VertesiaWorkflowType STARTS_WITH {literal})"
        )

    custom = _text("query", filters.query, MAX_QUERY_LENGTH)
    if custom is not None:
        clauses.append(f"({confine_custom_query(custom)})")
    return " AND ".join(clauses)


# ---------------------------------------------------------------------------------------------
# The custom query: a small lexer and recursive-descent parser of Temporal's visibility language


KEYWORDS = frozenset({"AND", "OR", "NOT", "IN", "BETWEEN", "STARTS_WITH", "IS", "NULL", "TRUE", "FALSE"})
# Words that would change what the query is rather than which runs it matches.
_REFUSED_WORDS = frozenset(
    {"ORDER", "BY", "LIMIT", "OFFSET", "GROUP", "HAVING", "SELECT", "FROM", "WHERE", "UNION", "LIKE"}
)
_COMPARISONS = frozenset({"=", "!=", "<>", "<", "<=", ">", ">="})


@dataclass(frozen=True)
class Token:
    kind: str  # IDENT, KEYWORD, STRING, NUMBER, OP, LPAREN, RPAREN, COMMA
    text: str  # the keyword upper-cased, the decoded string, the identifier, number or operator
    position: int


def _refuse(message: str, position: int | None = None) -> InvalidInput:
    where = f" (at character {position + 1})" if position is not None else ""
    return InvalidInput(f"query cannot be used: {message}{where}.")


def _string(token: Token) -> str:
    """A string literal of the query, re-quoted, once the store could match it exactly."""
    problem = value_problem(token.text)
    if problem is not None:
        raise _refuse(f"a string value {problem}", token.position)
    return quote(token.text)


def _read_string(text: str, start: int) -> tuple[str, int]:
    """Decode the quoted literal starting at `start`; return it and the index after it."""
    delimiter = text[start]
    out: list[str] = []
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            if i + 1 >= len(text):
                break
            nxt = text[i + 1]
            out.append(_UNESCAPES.get(nxt, nxt))
            i += 2
        elif ch == delimiter:
            if i + 1 < len(text) and text[i + 1] == delimiter:  # a doubled quote stands for one
                out.append(delimiter)
                i += 2
            else:
                return "".join(out), i + 1
        else:
            out.append(ch)
            i += 1
    raise _refuse("unbalanced quote", start)


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


_PUNCTUATION = {"(": "LPAREN", ")": "RPAREN", ",": "COMMA"}


def _word(text: str, start: int) -> tuple[Token, int] | None:
    """A number, keyword or identifier starting at `start`, with the index after it."""
    if (number := _NUMBER.match(text, start)) is not None:
        return Token("NUMBER", number.group(0), start), number.end()
    if (ident := _IDENT.match(text, start)) is None:
        return None
    word = ident.group(0)
    upper = word.upper()
    if upper in _REFUSED_WORDS:
        raise _refuse(f"{upper} is not allowed, only conditions can be combined", start)
    token = Token("KEYWORD", upper, start) if upper in KEYWORDS else Token("IDENT", word, start)
    return token, ident.end()


def tokenize(text: str) -> Iterator[Token]:
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in "'\"":
            value, i_next = _read_string(text, i)
            yield Token("STRING", value, i)
            i = i_next
        elif ch in _PUNCTUATION:
            yield Token(_PUNCTUATION[ch], ch, i)
            i += 1
        elif ch in "=<>!":
            two = text[i : i + 2]
            op = two if two in _COMPARISONS else ch
            if op not in _COMPARISONS:
                raise _refuse(f"unexpected {ch!r}", i)
            yield Token("OP", op, i)
            i += len(op)
        elif (found := _word(text, i)) is not None:
            yield found[0]
            i = found[1]
        elif ch == ";":
            raise _refuse("semicolons are not allowed", i)
        else:
            raise _refuse(f"unexpected {ch!r}", i)


class _Parser:
    """expr := and (OR and)* ; and := unary (AND unary)* ; unary := NOT unary | '(' expr ')' | predicate
    predicate := IDENT ( cmp value | [NOT] IN '(' value (',' value)* ')' | [NOT] BETWEEN value AND value
                        | [NOT] STARTS_WITH string | IS [NOT] NULL )
    The output is written from what was parsed: every literal re-quoted, every group parenthesized."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = list(tokenize(text))
        self.index = 0
        self.depth = 0

    def peek(self) -> Token | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def take(self) -> Token:
        token = self.peek()
        if token is None:
            raise _refuse("it ends too early")
        self.index += 1
        return token

    def at_keyword(self, *words: str) -> bool:
        token = self.peek()
        return token is not None and token.kind == "KEYWORD" and token.text in words

    def expect_keyword(self, word: str) -> None:
        token = self.take()
        if token.kind != "KEYWORD" or token.text != word:
            raise _refuse(f"expected {word}", token.position)

    def parse(self) -> str:
        if not self.tokens:
            raise _refuse("it is empty")
        out = self.expression()
        extra = self.peek()
        if extra is not None:
            if extra.kind == "RPAREN":
                raise _refuse("unbalanced parentheses", extra.position)
            raise _refuse(f"unexpected {extra.text!r}", extra.position)
        return out

    def expression(self) -> str:
        parts = [self.conjunction()]
        while self.at_keyword("OR"):
            self.take()
            parts.append(self.conjunction())
        return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"

    def conjunction(self) -> str:
        parts = [self.unary()]
        while self.at_keyword("AND"):
            self.take()
            parts.append(self.unary())
        return parts[0] if len(parts) == 1 else "(" + " AND ".join(parts) + ")"

    def unary(self) -> str:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise _refuse("it is nested too deeply")
        try:
            token = self.take()
            if token.kind == "KEYWORD" and token.text == "NOT":
                operand = self.unary()
                return f"NOT ({operand})"
            if token.kind == "LPAREN":
                inner = self.expression()
                closing = self.peek()
                if closing is None or closing.kind != "RPAREN":
                    raise _refuse("unbalanced parentheses", token.position)
                self.take()
                return f"({inner})"
            if token.kind == "RPAREN":
                raise _refuse("unbalanced parentheses", token.position)
            if token.kind != "IDENT":
                raise _refuse(f"expected a search attribute name, got {token.text!r}", token.position)
            return self.predicate(token)
        finally:
            self.depth -= 1

    def predicate(self, attribute: Token) -> str:
        name = attribute.text
        if name.lower() in _SCOPING_LOWER:
            raise _refuse(f"{name} decides which runs you may see and cannot be used in a query", attribute.position)
        token = self.take()
        if token.kind == "OP":
            return f"{name} {token.text} {self.value()}"
        if token.kind != "KEYWORD":
            raise _refuse(f"expected an operator after {name}", token.position)
        if token.text == "IS":
            null_negated = self.at_keyword("NOT")
            if null_negated:
                self.take()
            self.expect_keyword("NULL")
            return f"{name} IS NOT NULL" if null_negated else f"{name} IS NULL"
        negated = token.text == "NOT"
        if negated:
            token = self.take()
            if token.kind != "KEYWORD" or token.text not in {"IN", "BETWEEN", "STARTS_WITH"}:
                raise _refuse("NOT must be followed by IN, BETWEEN or STARTS_WITH here", token.position)
        return self.set_predicate(f"{name} NOT" if negated else name, token)

    def set_predicate(self, prefix: str, token: Token) -> str:
        """`IN (...)`, `BETWEEN a AND b` or `STARTS_WITH 'x'` after `prefix` (the name, maybe NOT)."""
        if token.text == "IN":
            opening = self.take()
            if opening.kind != "LPAREN":
                raise _refuse("IN needs a parenthesized list", opening.position)
            values = [self.value()]
            while (sep := self.take()).kind == "COMMA":
                values.append(self.value())
            if sep.kind != "RPAREN":
                raise _refuse("unbalanced parentheses in an IN list", sep.position)
            return f"{prefix} IN ({', '.join(values)})"
        if token.text == "BETWEEN":
            low = self.value()
            self.expect_keyword("AND")
            return f"{prefix} BETWEEN {low} AND {self.value()}"
        if token.text == "STARTS_WITH":
            literal = self.take()
            if literal.kind != "STRING":
                raise _refuse("STARTS_WITH needs a string", literal.position)
            return f"{prefix} STARTS_WITH {_string(literal)}"
        raise _refuse(f"unexpected {token.text!r}", token.position)

    def value(self) -> str:
        token = self.take()
        if token.kind == "STRING":
            return _string(token)
        if token.kind == "NUMBER":
            return token.text
        if token.kind == "KEYWORD" and token.text in {"TRUE", "FALSE"}:
            return token.text.lower()
        raise _refuse(f"expected a value, got {token.text!r}", token.position)


def confine_custom_query(text: str) -> str:
    """The caller's query rewritten from its parse tree, or InvalidInput when it cannot be ANDed
    safely with the scope clauses."""
    if len(text) > MAX_QUERY_LENGTH:
        raise InvalidInput(f"query is longer than {MAX_QUERY_LENGTH} characters.")
    return _Parser(text).parse()
