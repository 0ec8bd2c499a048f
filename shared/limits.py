"""The bounds every value from a peer or a bundle must respect, in one place.

A manifest, a policy, a command and a frame are checked against these at validation
(shared.manifest, shared.policy, shared.messages), so `eoedge shared bundle build`, `verify`, the
daemon's `install` and its frame admission refuse the same things, each with an error naming the
field and the limit. They exist because msgpack packs integers only in [-2^63, 2^64): a value
outside that range passes JSON and a signature but cannot travel in a reply, and because an
unbounded string echoed back (an id, a name) costs memory and log lines for every message.

    INT64_MIN .. INT64_MAX    any integer a peer or a manifest sets (what every msgpack and JSON
                              library of other languages reads as a signed 64-bit integer)
    MAX_VERSION               a manifest's `version`, `parent.version`: 2^53 - 1 (exact in a
                              JSON double, so a JavaScript tool reads the same version)
    MAX_PRIORITY              a policy priority (smaller = more urgent): 2^31 - 1
    MAX_COUNT                 a policy's pixel/component counts: 2^53 - 1
    MAX_ID_CHARS              an envelope `id` / `ref`, a FRAME's `frame_id`: 64
    MAX_NAME_CHARS            a message array name, a command name, a class name, a model id,
                              a band name: 64
    MAX_SOURCE_CHARS          an envelope `source`, a frame's `scene`: 256
    MAX_TEXT_CHARS            any other string (a reason, a message, a manifest string): 4096
    MAX_BANDS                 bands of a frame or a manifest: 64
    MAX_CLASSES               classes of a manifest: 256
    MAX_RULES                 rules of a policy: 256
    MAX_TILE_SIZE             a manifest's tile_size: 8192
    MAX_OPENING_RADIUS        a manifest's opening radius: 64 (a kernel of (2r+1)^2 pixels)
    MAX_TREE_DEPTH/ITEMS      a free object (metrics, lineage, stats): 32 levels, 10,000 values
    MIN/MAX_CHAIN_STEPS       the models of a chain bundle (shared.chain): 2..4
    MAX_STEP_NAME_CHARS       a chain step's name ([a-z0-9_-]): 32
    ECHO_CHARS                what an error reply or a log line repeats of a peer's input: 64

`quote(value)` is how input is repeated anywhere (replies, logs): at most ECHO_CHARS characters,
escaped (repr), so a newline in a `frame_id` cannot start a forged log line.
"""
from __future__ import annotations

import math
from typing import Any

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
MAX_VERSION = (1 << 53) - 1
MAX_PRIORITY = (1 << 31) - 1
MAX_COUNT = (1 << 53) - 1
MAX_ID_CHARS = 64
MAX_NAME_CHARS = 64
MAX_SOURCE_CHARS = 256
MAX_TEXT_CHARS = 4096
MAX_BANDS = 64
MAX_CLASSES = 256
MAX_RULES = 256
MAX_TILE_SIZE = 8192
MAX_OPENING_RADIUS = 64
MAX_TREE_DEPTH = 32
MAX_TREE_ITEMS = 10_000
MIN_CHAIN_STEPS = 2
MAX_CHAIN_STEPS = 4
MAX_STEP_NAME_CHARS = 32
ECHO_CHARS = 64
MAX_REPLY_MESSAGE_CHARS = 1024     # the `message`/`error` text of an ERROR or a refused ACK


def quote(value: Any, limit: int = ECHO_CHARS) -> str:
    """`value` as it may be repeated to a peer or a log: escaped (repr), at most `limit`
    characters of it, and its full length when cut (`'abc'... (1048576 chars)`)."""
    if isinstance(value, (list, dict, tuple, set)):
        return f"a {type(value).__name__} of {len(value)} items"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, (bytes, bytearray, memoryview)):
        head, n = bytes(value[:limit]), len(value)
    elif isinstance(value, str):
        head, n = value[:limit], len(value)
    else:
        text = repr(value)
        return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"
    return repr(head) if n <= limit else f"{head!r}... ({n} chars)"


def clip(text: str, limit: int = MAX_REPLY_MESSAGE_CHARS) -> str:
    """A message text cut to `limit` characters (the error text of a reply)."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


# ---------------------------------------------------------------------------------------------
# Checks: each returns None when the value is within bounds, else the reason (the caller raises
# its own error type naming the field).

def int_problem(value: int, lo: int = INT64_MIN, hi: int = INT64_MAX) -> str | None:
    if value < lo or value > hi:
        return f"must be {lo}..{hi}, got {quote(value)}"
    return None


def str_problem(value: str, limit: int) -> str | None:
    if len(value) > limit:
        return f"longer than {limit} characters ({len(value)})"
    return None


def tree_problem(value: Any, max_depth: int = MAX_TREE_DEPTH, max_items: int = MAX_TREE_ITEMS,
                 max_chars: int = MAX_TEXT_CHARS) -> tuple[str, str] | None:
    """(relative path, reason) of the first value out of bounds in a JSON-like tree (maps,
    lists, strings, bytes, numbers, booleans, null), else None. Iterative: a deep nest cannot hit
    Python's recursion limit."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    seen = 0
    while stack:
        v, path, depth = stack.pop()
        seen += 1
        if seen > max_items:
            return path, f"more than {max_items} values"
        if depth > max_depth:
            return path, f"nested deeper than {max_depth} levels"
        if isinstance(v, dict):
            for k, item in v.items():
                if isinstance(k, str) and len(k) > max_chars:
                    return path, f"a key longer than {max_chars} characters"
                stack.append((item, f"{path}.{k}" if isinstance(k, str) else f"{path}[{k!r}]",
                              depth + 1))
        elif isinstance(v, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(v))
        elif isinstance(v, bool) or v is None:
            continue
        elif isinstance(v, int):
            problem = int_problem(v)
            if problem:
                return path, problem
        elif isinstance(v, float):
            if not math.isfinite(v):
                return path, f"must be a finite number, got {v!r}"
        elif isinstance(v, (str, bytes)):
            problem = str_problem(v, max_chars)
            if problem:
                return path, problem
        else:
            return path, f"{type(v).__name__} values are not allowed"
    return None
