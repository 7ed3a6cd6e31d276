"""The visibility query evaluated in memory: what Temporal would match, for mock mode's listings.

The caller's `query` is first confined exactly as for Temporal (`confine_custom_query`: the same
refusals, the same 400s), then the confined text, which only the grammar of
`backends.visibility_query` can have produced, is evaluated against a run's attributes. An
attribute no run has is refused as Temporal refuses it (INVALID_ARGUMENT, a 400 in our words).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from backends.visibility_query import Token, tokenize
from core.errors import InvalidInput

Value = str | int | float | bool | datetime | None

# The message the Temporal backend answers with when Temporal refuses a listing's filters.
REFUSED = (
    "Temporal refused this listing's filters: check `query` (an unknown search attribute,"
    " or a value of the wrong type for its attribute)."
)


def _literal(token: Token, current: Value) -> Value:
    """A literal of the query, read as the attribute it is compared with (times as times)."""
    if token.kind == "NUMBER":
        return float(token.text) if "." in token.text else int(token.text)
    if token.kind == "KEYWORD":
        return token.text == "TRUE"
    if isinstance(current, datetime):
        try:
            return datetime.fromisoformat(token.text.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidInput(REFUSED) from None
    return token.text


_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "=": operator.eq,
    "!=": operator.ne,
    "<>": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def _compare(op: str, left: Value, right: Value) -> bool:
    """SQL's comparison: nothing matches a missing value; values of different kinds are refused."""
    if left is None or right is None:
        return False
    try:
        return bool(_OPERATORS[op](left, right))
    except TypeError:
        raise InvalidInput(REFUSED) from None


class _Evaluator:
    """The grammar of `visibility_query._Parser`, evaluated instead of written back."""

    def __init__(self, text: str, attributes: Mapping[str, Any]) -> None:
        self.tokens = list(tokenize(text))
        self.index = 0
        self.attributes = attributes

    def take(self) -> Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def at(self, *words: str) -> bool:
        if self.index >= len(self.tokens):
            return False
        token = self.tokens[self.index]
        return token.kind == "KEYWORD" and token.text in words

    def expression(self) -> bool:
        result = self.conjunction()
        while self.at("OR"):
            self.take()
            result = self.conjunction() or result
        return result

    def conjunction(self) -> bool:
        result = self.unary()
        while self.at("AND"):
            self.take()
            result = self.unary() and result
        return result

    def unary(self) -> bool:
        token = self.take()
        if token.kind == "KEYWORD" and token.text == "NOT":
            return not self.unary()
        if token.kind == "LPAREN":
            result = self.expression()
            self.take()  # the closing parenthesis
            return result
        return self.predicate(token.text)

    def predicate(self, name: str) -> bool:
        if name not in self.attributes:
            raise InvalidInput(REFUSED)
        current: Value = self.attributes[name]
        token = self.take()
        if token.kind == "OP":
            return _compare(token.text, current, _literal(self.take(), current))
        if token.text == "IS":
            negated = self.at("NOT")
            if negated:
                self.take()
            self.take()  # NULL
            return (current is not None) if negated else (current is None)
        negated = token.text == "NOT"
        if negated:
            token = self.take()
        if token.text == "IN":
            self.take()  # (
            values = [_literal(self.take(), current)]
            while self.take().kind == "COMMA":
                values.append(_literal(self.take(), current))
            matched = current is not None and current in values
        elif token.text == "BETWEEN":
            low = _literal(self.take(), current)
            self.take()  # AND
            high = _literal(self.take(), current)
            matched = _compare(">=", current, low) and _compare("<=", current, high)
        else:  # STARTS_WITH
            prefix = self.take().text
            matched = isinstance(current, str) and current.startswith(prefix)
        return (not matched) if negated and current is not None else (matched and not negated)


def matches(confined: str, attributes: Mapping[str, Any]) -> bool:
    """Whether a run with these search attributes matches the confined query."""
    return _Evaluator(confined, attributes).expression()
