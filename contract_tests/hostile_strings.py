"""Strings that break naive code: control characters, unusual Unicode, great lengths.

Hypothesis strategies only (no Schemathesis): `contract_tests.fuzz_hooks` writes them into the
cases `make fuzz` generates. Schemathesis' own alphabet already holds every code point, but spread
over a million of them a given field almost never gets a NUL or a bidi override; these fragments
make the troublesome ones common.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

FRAGMENTS: tuple[str, ...] = (
    # C0 controls, NUL first: C strings, gRPC backends and line-based logs end or split on them.
    "\x00",
    "\x01",
    "\x07",
    "\x08",
    "\t",
    "\n",
    "\r",
    "\r\n",
    "\x0b",
    "\x0c",
    "\x1b[31m",
    "\x1f",
    "\x7f",  # DEL
    # C1 controls: NEL (a line break to some parsers), CSI, APC.
    "\x80",
    "\x85",
    "\x9b",
    "\x9f",
    # Bidirectional controls: marks, embeddings, overrides, isolates ("Trojan Source").
    "\u200e",
    "\u200f",
    "\u061c",
    "\u202a",
    "\u202b",
    "\u202d",
    "\u202e",
    "\u202c",
    "\u2066",
    "\u2067",
    "\u2068",
    "\u2069",
    # Zero-width characters: space, non-joiner, joiner, word joiner, byte order mark.
    "\u200b",
    "\u200c",
    "\u200d",
    "\u2060",
    "\ufeff",
    # Line and paragraph separators: line breaks to JavaScript and some log parsers.
    "\u2028",
    "\u2029",
    # Combining marks, alone (on nothing) and stacked on a letter.
    "\u0301",
    "e\u0301\u0302\u0303\u0304\u0305\u0306\u0307\u0308",
    # Beyond the BMP: surrogate pairs in UTF-16 and in JSON escapes; a ZWJ sequence, a flag, a tag
    # character, the last code point.
    "\U0001f600",
    "\U0001f469\u200d\U0001f469\u200d\U0001f467",
    "\U0001f1fa\U0001f1f8",
    "\U000e0041",
    "\U0010ffff",
    # Noncharacters and the replacement character.
    "\ufffe",
    "\uffff",
    "\ufffd",
    # Case mappings that change the length (İ, ß, ﬃ) and a fullwidth lookalike of `%00`.
    "\u0130",
    "\u00df",
    "\ufb03",
    "\uff05\uff10\uff10",
    # Text a careless decoder turns into a NUL.
    "%00",
    "\\u0000",
    # The quoting characters of Temporal's visibility language (the `query` filter).
    "'",
    '"',
    "\\",
    "`",
)

# Not Unicode scalar values: no UTF-8 spelling, so only a JSON body (`\ud800` escapes) carries them.
LONE_SURROGATES: tuple[str, ...] = ("\ud800", "\udbff", "\udc00", "\udfff", "\udc00\ud800")

# Lengths to fill a value up to: around the document's bounds (64, 128, 256, 2000 characters), the
# server's (65536 bytes of update message, 1 MiB of body) and a little past them.
BODY_LENGTHS: tuple[int, ...] = (64, 65, 128, 129, 256, 257, 2000, 2001, 4096, 16_385, 65_537, 300_000, 1_100_000)
# A URL carries every byte percent-encoded (up to 12 characters for one emoji): kept under the
# request-head limit, whose 431 is the HTTP server's business rather than the API's.
URL_LENGTHS: tuple[int, ...] = (64, 65, 128, 129, 200, 201, 256, 257, 1000)


@dataclass(frozen=True)
class Mutation:
    """One way to make a string hostile, drawn without looking at the string: Hypothesis replays
    a choice sequence and requires the same draws, and the strings it lands on (taken from earlier
    responses, among others) change during a run."""

    kind: str  # insert | wrap | replace | fill
    fragments: tuple[str, ...]
    position: int  # where to insert, modulo the length
    length: int  # what to fill up to

    def apply(self, original: str) -> str:
        text = "".join(self.fragments)
        if self.kind == "insert":
            at = self.position % (len(original) + 1)
            return original[:at] + text + original[at:]
        if self.kind == "wrap":
            return text + original + text
        if self.kind == "replace":
            return text
        return _fill(original + text, self.length)


def mutations(*, json_body: bool) -> st.SearchStrategy[Mutation]:
    """Fragments inserted, around a string, instead of it, or repeated to a great length. Whether
    the result still fits the field's schema is for Schemathesis to judge."""
    return st.builds(
        Mutation,
        kind=st.sampled_from(("insert", "wrap", "replace", "fill")),
        fragments=st.lists(fragments(json_body=json_body), min_size=1, max_size=4).map(tuple),
        position=st.integers(0, 2**16),
        length=st.sampled_from(BODY_LENGTHS if json_body else URL_LENGTHS),
    )


def fragments(*, json_body: bool) -> st.SearchStrategy[str]:
    if json_body:
        return st.sampled_from(FRAGMENTS + LONE_SURROGATES)
    return st.sampled_from(FRAGMENTS)


def _fill(seed: str, length: int) -> str:
    """`seed` repeated to exactly `length` characters (a pair may end up split: deliberate)."""
    return (seed * (length // len(seed) + 1))[:length]
