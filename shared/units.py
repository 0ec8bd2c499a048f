"""The one byte-size grammar of every command (`--max-bytes 5MB`), and sizes written for people.

    5000000, 5000000B         bytes
    5kB = 5KB, 5MB, 5GB       powers of 1000 (SI): 5MB = 5,000,000
    5KiB, 5MiB, 5GiB          powers of 1024 (IEC): 5MiB = 5,242,880
    1.5MB                     a fraction is fine if it comes to whole bytes

Units are case-insensitive (`5mb` = `5MB`); a space may sit between number and unit. A bare
`5M`, `5K` or `5G` is refused: half the world reads it as 5,000,000 and the other half as
5,242,880, so the message asks for 5MB or 5MiB.
"""
from __future__ import annotations

import re
from fractions import Fraction

from shared.errors import ByteSizeError

UNITS = {"b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3,
         "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
AMBIGUOUS = {"k", "m", "g", "ki", "mi", "gi"}
MAX_BYTES = 1 << 50                     # 1 PiB: anything larger is a typo, not a budget

_SIZE = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(value: int | str) -> int:
    """A size in bytes from an int or a string in the grammar above; `ByteSizeError` (a
    ValueError) names the value otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _checked(Fraction(value), value)
    if not isinstance(value, str):
        raise ByteSizeError(f"size {value!r}: expected a number of bytes or a string like 5MB")
    match = _SIZE.match(value)
    if match is None:
        hint = "must not be negative" if value.strip().startswith("-") else "not a size"
        raise ByteSizeError(f"size {value!r}: {hint} (write e.g. 5000000, 5MB, 300KB or 1.5MiB)")
    number, unit = Fraction(match["number"]), match["unit"].lower() or "b"
    if unit in AMBIGUOUS:
        n = match["number"]
        raise ByteSizeError(f"size {value!r}: {unit.upper()} is ambiguous; write {n}{unit[0].upper()}B "
                            f"(powers of 1000) or {n}{unit[0].upper()}iB (powers of 1024)")
    if unit not in UNITS:
        raise ByteSizeError(f"size {value!r}: unknown unit {match['unit']!r} "
                            f"(B, kB/KB, MB, GB, KiB, MiB or GiB)")
    return _checked(number * UNITS[unit], value)


def _checked(size: Fraction, value: object) -> int:
    if size.denominator != 1:
        raise ByteSizeError(f"size {value!r}: {float(size):g} is not a whole number of bytes")
    if size < 0:
        raise ByteSizeError(f"size {value!r}: must not be negative")
    if size > MAX_BYTES:
        raise ByteSizeError(f"size {value!r}: over the largest size accepted ({format_bytes(MAX_BYTES)})")
    return int(size)


def format_bytes(n: int) -> str:
    """`n` bytes for people, in IEC units (unambiguous): 512 B, 10.00 KiB, 4.77 MiB, 1.00 GiB."""
    for unit, div in (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20),
                      ("KiB", 1 << 10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"
