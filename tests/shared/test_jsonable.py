"""shared.jsonable: one converter for reports (JSON) and bus bodies (msgpack)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import msgpack
import numpy as np

from shared.jsonable import jsonable
from shared.messages import Message, decode, encode


@dataclass
class Slot:
    name: str
    size: np.int64

    def as_dict(self) -> dict:
        return asdict(self)


def test_numpy_paths_tuples_and_as_dict_become_plain_values():
    value = {1: np.float32(0.5), "n": np.int64(7), "ok": np.bool_(True), "arr": np.arange(3, dtype=np.uint8),
             "grid": np.eye(2), "path": Path("/tmp/x"), "pair": (1, "a"), "slot": Slot("a", np.int64(2))}
    out = jsonable(value)
    assert out == {"1": 0.5, "n": 7, "ok": True, "arr": [0, 1, 2], "grid": [[1.0, 0.0], [0.0, 1.0]],
                   "path": "/tmp/x", "pair": [1, "a"], "slot": {"name": "a", "size": 2}}
    assert type(out["n"]) is int and type(out["ok"]) is bool and type(out["1"]) is float
    assert json.loads(json.dumps(out, allow_nan=False)) == out
    assert msgpack.unpackb(msgpack.packb(out), raw=False) == out


def test_nan_and_infinities_become_none_wherever_they_sit():
    value = {"a": math.nan, "b": np.float64(np.inf), "c": np.array([1.0, np.nan, -np.inf]),
             "d": [np.float32(np.nan), 2.0]}
    assert jsonable(value) == {"a": None, "b": None, "c": [1.0, None, None], "d": [None, 2.0]}


def test_the_input_is_not_changed():
    value = {"x": [np.float32(1.5)], "y": (2,)}
    jsonable(value)
    assert isinstance(value["x"][0], np.float32) and value["y"] == (2,)


def test_a_converted_body_travels_on_the_bus():
    stats = {"fractions": {"cloud": np.float32(0.25), "clear": np.float64(np.nan)},
             "components": np.array([[3, 4]], np.int32)}
    msg = Message("decision", {"frame_id": "f", "keep": True, "priority": 1, "reason": "r",
                               "stats": jsonable(stats)})
    body = decode(encode(msg)).body
    assert body["stats"] == {"fractions": {"cloud": 0.25, "clear": None}, "components": [[3, 4]]}
