"""A JSON body's size in structure, measured on its bytes before any parser sees them.

Parsers spend time and memory per value and per array, and recurse per level of nesting: a 15 MB body of
empty lists cost 2.1 s and 500 MB before anything could refuse it, and 2,000 levels of nesting raised
RecursionError. The service's bodies have a known shape (at most `{"images": [B][C][H][W]}`), so their
depth, number of arrays and number of values are bounded in advance; this checks those bounds with a
few passes of C-level byte operations and refuses the rest before parsing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_KEPT = b'[]{}",'  # brackets, quotes (to find strings) and commas (to count values)
_DROPPED = bytes(b for b in range(256) if b not in _KEPT)
_STRING = re.compile(rb'"[^"]*"')
_EMPTY_PAIR = re.compile(rb"\[\]|\{\}")
_STEPS = np.zeros(256, np.int8)
_STEPS[list(b"[{")] = 1
_STEPS[list(b"]}")] = -1


SMALL_BODY_BYTES = 4096


class JsonTooComplex(ValueError):
    """A JSON body past a structural limit; `status` is the HTTP status that answers it."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class JsonLimits:
    """Bounds on a JSON body's structure."""

    max_depth: int
    """Most levels of nested arrays and objects."""
    max_containers: int
    """Most arrays and objects in all."""
    max_values: int
    """Most values (counted by their separating commas)."""


def check_json_structure(body: bytes, limits: JsonLimits) -> None:
    """Raise JsonTooComplex if `body` nests deeper, or holds more arrays/objects or values, than `limits` allow.

    Strings are skipped (brackets and commas inside them do not count); malformed JSON is left for the parser.
    About one pass over the body in C (a 100 KB body of 16 images costs a fraction of parsing it).
    """
    if len(body) <= min(SMALL_BODY_BYTES, limits.max_values) and body.count(b"[") + body.count(b"{") <= limits.max_depth:
        return  # too few arrays to nest too deep, too short to hold too many values: the common small request
    if b"\\" in body:  # escaped backslashes and quotes go first, so every quote left opens or closes a string
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = body.translate(None, _DROPPED)
    if len(structure) > 2 * (limits.max_values + limits.max_containers):
        raise JsonTooComplex(f"JSON body holds {len(structure):,} values, brackets and quotes; at most "
                             f"{limits.max_values:,} values in {limits.max_containers:,} arrays and objects "
                             "are accepted", 413)
    structure = _STRING.sub(b"", structure)  # now only the brackets and commas outside strings
    values = structure.count(b",") + 1
    if values > limits.max_values:
        raise JsonTooComplex(f"JSON body holds {values:,} values; at most {limits.max_values:,} are accepted", 413)
    containers = structure.count(b"[") + structure.count(b"{")
    if containers > limits.max_containers:
        raise JsonTooComplex(f"JSON body holds {containers:,} arrays and objects; at most "
                             f"{limits.max_containers:,} are accepted", 413)
    brackets = structure.replace(b",", b"")
    nested = brackets
    for _ in range(limits.max_depth):  # each pass removes exactly the innermost level
        nested = _EMPTY_PAIR.sub(b"", nested)
    if nested:  # deeper than allowed, or malformed: measure (a malformed body within the depth goes on to the parser)
        depth = int(np.cumsum(_STEPS[np.frombuffer(brackets, np.uint8)], dtype=np.int64).max())
        if depth > limits.max_depth:
            raise JsonTooComplex(f"JSON body nests {depth} levels deep; at most {limits.max_depth} are accepted", 400)
