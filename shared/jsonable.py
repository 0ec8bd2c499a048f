"""The one converter to JSON- and msgpack-ready values (reports, ACK results, DECISION bodies)."""
from __future__ import annotations

import math
from pathlib import PurePath
from typing import Any

import numpy as np


def jsonable(value: Any) -> Any:
    """A copy of `value` built from dicts (string keys), lists, str, int, float, bool and None.

    numpy scalars and arrays become Python numbers and lists, an object with `as_dict()` its
    dict, a path its string, tuples lists; NaN and infinities become None (JSON has no such
    numbers, and a peer's finite-number check would refuse them).
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "as_dict"):
        return jsonable(value.as_dict())
    return value
