"""Bus messages: msgpack envelopes with typed bodies and zero-copy array frames.

A message travels as a ZeroMQ multipart message:

    frame 0   msgpack map {"type", "schema", "id", "ref", "ts", "source", "body",
                           "arrays": [{"name", "dtype", "shape"}, ...]}
    frame 1.. one raw C-order little-endian buffer per entry of "arrays"

`encode(msg)` returns that list (array frames are memoryviews of the arrays: send them with
`copy=False`); `decode(frames, limits)` checks the header, the body schema of its type, every
array's dtype (allowlist), shape and byte count against the frame it came in, all before it
builds anything, and returns arrays that are read-only views of the received frames.
Everything wrong raises `MessageError` (an EoedgeError, code `bad_message`), whose `.field`
names what was wrong. An ERROR carries a `code`, and so does an ACK: "ok" (ACK_OK) when it
accepts or reports success, else the error's code.

Every integer and string is bounded (shared.limits: integers in int64, ids and `frame_id` at
most 64 characters, names 64, any other text 4096, free maps 32 levels and 10,000 values), and an
error message repeats at most a short, escaped prefix of the input (`shared.limits.quote`).
docs/protocol.md is the wire format for a client in another language.

To add a message type, add one entry to `BODY_SCHEMAS` (fields and, if any, array rules).
"""
from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterable, Mapping, Sequence

import msgpack
import numpy as np

from shared.errors import MessageError
from shared.limits import (INT64_MAX, INT64_MIN, MAX_BANDS, MAX_CHAIN_STEPS, MAX_CLASSES,
                           MAX_ID_CHARS, MAX_NAME_CHARS, MAX_SOURCE_CHARS, MAX_TEXT_CHARS,
                           int_problem, quote, str_problem, tree_problem)

SCHEMA_VERSION = 1

# Only plain little-endian numeric dtypes travel: no objects, strings, structured or complex types
# (an "O" dtype from a peer would let it name arbitrary Python objects), and no bool: a byte other
# than 0/1 read as numpy bool is undefined. Masks travel as uint8.
ALLOWED_DTYPES: frozenset[str] = frozenset({
    "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
    "float16", "float32", "float64",
})

# An array may travel as several consecutive parts (`parts` in its spec; encode's max_part_bytes):
# at most this many, whatever the header says.
MAX_ARRAY_PARTS = 1024


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts; checked before anything is allocated."""

    max_header_bytes: int = 1 << 20           # the msgpack envelope
    max_array_bytes: int = 256 << 20          # all arrays of one message together
    max_arrays: int = 32
    max_ndim: int = 8


DEFAULT_LIMITS = Limits()


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Message:
    """One bus message. `arrays` maps a name to an array or bytes (each sent as its own frame;
    bytes arrive as a 1-D uint8 array)."""

    type: str
    body: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    id: str = field(default_factory=new_id)
    ref: str | None = None
    ts: float = field(default_factory=time.time)
    schema: int = SCHEMA_VERSION
    source: str = ""

    def reply(self, type: str, body: dict, arrays: Mapping[str, np.ndarray] | None = None,
              source: str = "") -> "Message":
        """A new message answering this one (`ref` = this message's id)."""
        return Message(type, body, dict(arrays or {}), ref=self.id, source=source)


# ---------------------------------------------------------------------------------------------
# Body schemas: one small validator per field type, one registry entry per message type.

Validator = Callable[[Any, str], None]


def _fail(path: str, expected: str, value: Any) -> None:
    raise MessageError(path, f"expected {expected}, got {type(value).__name__}")


def STR(value: Any, path: str, limit: int = MAX_TEXT_CHARS) -> None:
    """A string of at most `limit` characters (MAX_TEXT_CHARS unless a bounded_str says less)."""
    if not isinstance(value, str):
        _fail(path, "a string", value)
    problem = str_problem(value, limit)
    if problem:
        raise MessageError(path, problem)


def bounded_str(limit: int, nonempty: bool = False) -> Validator:
    """A string of at most `limit` characters (and not empty, with `nonempty`)."""
    def check(value: Any, path: str) -> None:
        STR(value, path, limit)
        if nonempty and not value:
            raise MessageError(path, "must not be empty")
    return check


def NONEMPTY_STR(value: Any, path: str) -> None:
    STR(value, path)
    if not value:
        raise MessageError(path, "must not be empty")


def INT(value: Any, path: str) -> None:
    """An integer in int64 (what every msgpack library packs and reads)."""
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(path, "an integer", value)
    problem = int_problem(value, INT64_MIN, INT64_MAX)
    if problem:
        raise MessageError(path, problem)


def NONNEG_INT(value: Any, path: str) -> None:
    INT(value, path)
    if value < 0:
        raise MessageError(path, f"must be >= 0, got {value}")


def FLOAT(value: Any, path: str) -> None:
    """A finite number (an integer is fine: msgpack keeps 1.0 and 1 apart, senders may not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        _fail(path, "a number", value)
    if not math.isfinite(value):
        raise MessageError(path, f"must be finite, got {value}")


def POSITIVE_FLOAT(value: Any, path: str) -> None:
    FLOAT(value, path)
    if value <= 0:
        raise MessageError(path, f"must be > 0, got {value}")


def BOOL(value: Any, path: str) -> None:
    if not isinstance(value, bool):
        _fail(path, "true or false", value)


def MAP(value: Any, path: str) -> None:
    """A map with string keys (its values are not looked at)."""
    if not isinstance(value, dict):
        _fail(path, "a map", value)
    for key in value:
        if not isinstance(key, str):
            raise MessageError(path, f"map keys must be strings, got {type(key).__name__}")


def DICT(value: Any, path: str) -> None:
    """A free map (stats, args, a result): string keys, and every value inside bounded
    (shared.limits.tree_problem: int64 integers, finite floats, strings, depth, count)."""
    MAP(value, path)
    problem = tree_problem(value)
    if problem:
        raise MessageError(f"{path}{problem[0]}", problem[1])


MAX_CODE_CHARS = 64


def CODE(value: Any, path: str) -> None:
    """An error code: a non-empty string of at most MAX_CODE_CHARS characters (`queue_full`)."""
    NONEMPTY_STR(value, path)
    if len(value) > MAX_CODE_CHARS:
        raise MessageError(path, f"longer than {MAX_CODE_CHARS} characters")


ID = bounded_str(MAX_ID_CHARS, nonempty=True)          # frame_id, like an envelope id
NAME = bounded_str(MAX_NAME_CHARS, nonempty=True)      # a band, a command
SHORT = bounded_str(MAX_SOURCE_CHARS)                  # a scene name, a field path


# ---------------------------------------------------------------------------------------------
# Georeference: where a frame lies on Earth (the payload's knowledge, carried into its products).

MAX_CRS_CHARS = 8192          # a WKT2 projected CRS with its ids is 1-4 KB; an EPSG code ~10
MAX_DATETIME_CHARS = 64
_EPSG = re.compile(r"EPSG:[0-9]{1,6}", re.IGNORECASE)
_WKT = re.compile(r"[A-Z][A-Z0-9_]*\[.*\]", re.DOTALL)      # PROJCS[...], PROJCRS[...], GEOGCRS[...]


def CRS(value: Any, path: str) -> None:
    """A coordinate reference system: `EPSG:<code>` or WKT (1 or 2), at most MAX_CRS_CHARS;
    the receiver's projection library parses it, this only bounds and shapes it."""
    STR(value, path, MAX_CRS_CHARS)
    if _EPSG.fullmatch(value):
        return
    if not _WKT.fullmatch(value) or value.count("[") != value.count("]"):
        raise MessageError(path, f"expected 'EPSG:<code>' or a WKT CRS (KEYWORD[...]), got {quote(value)}")


def TRANSFORM(value: Any, path: str) -> None:
    """An affine pixel-to-CRS transform in rasterio order (a, b, c, d, e, f): 6 finite numbers,
    not singular (a*e - b*d != 0: a pixel has an area)."""
    LIST(value, path)
    if len(value) != 6:
        raise MessageError(path, f"expected 6 numbers (a, b, c, d, e, f), got {len(value)}")
    for i, v in enumerate(value):
        FLOAT(v, f"{path}[{i}]")
    a, b, _, d, e, _ = value
    area = a * e - b * d
    if area == 0 or not math.isfinite(area):
        raise MessageError(path, f"a pixel's area a*e - b*d must be finite and not 0, got {area}")


def parse_datetime(text: str) -> datetime:
    """An ISO 8601 date and time, `Z` for UTC included (Python 3.10's fromisoformat lacks it);
    raises ValueError."""
    return datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)


def DATETIME(value: Any, path: str) -> None:
    """An ISO 8601 date and time with its UTC offset (`2026-12-02T10:31:07.123Z`)."""
    STR(value, path, MAX_DATETIME_CHARS)
    try:
        parsed = parse_datetime(value)
    except ValueError:
        raise MessageError(path, f"expected an ISO 8601 date-time, got {quote(value)}") from None
    if parsed.tzinfo is None:
        raise MessageError(path, f"needs a UTC offset ('Z' or '+00:00'), got {quote(value)}")


def record(required: Mapping[str, Validator], optional: Mapping[str, Validator]) -> Validator:
    """A map with exactly these fields (an unknown key is an error: it would be silently lost)."""
    def check(value: Any, path: str) -> None:
        MAP(value, path)
        for name in value:
            if name not in required and name not in optional:
                raise MessageError(f"{path}.{name}", f"unknown field (known: "
                                   f"{', '.join([*required, *optional])})")
        for name, inner in required.items():
            if name not in value:
                raise MessageError(f"{path}.{name}", "missing")
            inner(value[name], f"{path}.{name}")
        for name, inner in optional.items():
            if name in value:
                inner(value[name], f"{path}.{name}")
    return check


GEOREF = record({"crs": CRS, "transform": TRANSFORM},
                {"datetime": DATETIME, "scene_id": bounded_str(MAX_SOURCE_CHARS)})


def LIST(value: Any, path: str) -> None:
    if not isinstance(value, list):
        _fail(path, "a list", value)


def list_of(item: Validator, nonempty: bool = False, max_items: int | None = None) -> Validator:
    def check(value: Any, path: str) -> None:
        LIST(value, path)
        if nonempty and not value:
            raise MessageError(path, "must not be empty")
        if max_items is not None and len(value) > max_items:
            raise MessageError(path, f"more than {max_items} items ({len(value)})")
        for i, v in enumerate(value):
            item(v, f"{path}[{i}]")
    return check


# A model chain's accounting (DECISION and PRODUCT `chain`): per step, in chain order, its
# model, the cells it ran on of the frame's cells and its milliseconds; a PRODUCT adds each
# step's classes and the part holding its mask, and the value of a cell it did not run on.
CHAIN_STEP = record({"name": NAME, "model_id": NAME, "version": NONNEG_INT, "cells_run": NONNEG_INT,
                     "cells_total": NONNEG_INT, "ms": FLOAT},
                    {"classes": list_of(NAME, max_items=MAX_CLASSES), "mask": NAME})
CHAIN = record({"steps": list_of(CHAIN_STEP, nonempty=True, max_items=MAX_CHAIN_STEPS)},
               {"nodata": NONNEG_INT})


# A learning sample (SAMPLE `samples`): its window in the frame (row, col of the top-left pixel,
# side in frame pixels) and the model's uncertainty there (shared.samples.SCORES).
MAX_SAMPLES = 64
MODEL_REF = record({"model_id": NAME, "version": NONNEG_INT}, {})
SAMPLE = record({"row": NONNEG_INT, "col": NONNEG_INT, "size": NONNEG_INT, "entropy": FLOAT,
                 "ambiguous": FLOAT}, {})


def _sample_check(body: Mapping) -> None:
    for i, s in enumerate(body["samples"]):
        if s["size"] < 1:
            raise MessageError(f"body.samples[{i}].size", f"must be >= 1, got {s['size']}")
        for score in ("entropy", "ambiguous"):
            if not 0.0 <= s[score] <= 1.0:
                raise MessageError(f"body.samples[{i}].{score}", f"must be in 0..1, got {s[score]!r}")


def optional(inner: Validator) -> Validator:
    """`inner`, or None."""
    def check(value: Any, path: str) -> None:
        if value is not None:
            inner(value, path)
    return check


@dataclass(frozen=True)
class ArrayRule:
    """What one named array of a message type must look like."""

    dtypes: frozenset[str] = ALLOWED_DTYPES
    ndim: int | None = None
    required: bool = True


@dataclass(frozen=True)
class BodySchema:
    required: Mapping[str, Validator]
    optional: Mapping[str, Validator] = field(default_factory=dict)
    # Named arrays with rules; `other_arrays` says whether arrays with other names may come too.
    arrays: Mapping[str, ArrayRule] = field(default_factory=dict)
    other_arrays: bool = False
    # Cross-field rule on the body, after the fields are checked.
    check: Callable[[dict], None] | None = None


ACK_OK = "ok"     # the `code` of an ACK that accepts a frame or reports a command done


def _ack_check(body: dict) -> None:
    if "ok" not in body and "accepted" not in body:
        raise MessageError("body.ok", "an ack carries 'ok' (command) or 'accepted' (frame)")
    if body.get("ok") is False and "error" not in body:
        raise MessageError("body.error", "a failed ack must say why")
    if "code" in body:
        success = body.get("ok", body.get("accepted"))
        if success and body["code"] != ACK_OK:
            raise MessageError("body.code", f"an ack that succeeds carries code {ACK_OK!r}, "
                                            f"got {body['code']!r}")
        if not success and body["code"] == ACK_OK:
            raise MessageError("body.code", "a failed ack carries the error's code, not 'ok'")


BODY_SCHEMAS: dict[str, BodySchema] = {
    # Payload -> daemon: one image frame. reflectance = value * scale. `georef` when the payload
    # knows where the frame lies: {crs, transform, datetime?, scene_id?} (GEOREF).
    "frame": BodySchema(
        required={"frame_id": ID, "bands": list_of(NAME, nonempty=True, max_items=MAX_BANDS),
                  "scale": POSITIVE_FLOAT},
        optional={"scene": SHORT, "index": INT, "acquired": FLOAT, "georef": GEOREF},
        arrays={"data": ArrayRule(frozenset({"uint16", "int16", "float32"}), ndim=3)},
    ),
    # Daemon -> payload: the outcome of an accepted frame (`chain`: a model chain's steps;
    # `uncertainty`: with a `learning` policy, the frame's tile scores summarised and the samples
    # chosen: {tiles, samples, entropy: {mean, p50, p90, max}, ambiguous: {...}}).
    "decision": BodySchema(
        required={"frame_id": ID, "keep": BOOL, "priority": INT, "reason": STR},
        optional={"stats": DICT, "tile_decisions": list_of(DICT), "timings_ms": DICT,
                  "model": optional(DICT), "georef": GEOREF, "chain": CHAIN, "uncertainty": DICT},
        other_arrays=True,
    ),
    # Daemon -> downlink: what is kept of a frame (compressed mask, tiles, quicklook; a chain's
    # later steps' masks `mask_<step>`, named in `chain`).
    "product": BodySchema(
        required={"frame_id": ID, "priority": INT},
        optional={"scene": SHORT, "index": INT, "reason": STR, "stats": DICT, "classes": list_of(STR),
                  "tiles": list_of(DICT), "model": optional(DICT), "acquired": FLOAT,
                  "georef": GEOREF, "bands": list_of(NAME, max_items=MAX_BANDS),
                  "scale": POSITIVE_FLOAT, "chain": CHAIN},
        other_arrays=True,
    ),
    # Daemon -> downlink: a frame's learning samples (shared.samples): raw tiles of the model's
    # bands, chosen by the policy's `learning` block (the tiles the model was least sure of, or
    # drawn at random), with the model that chose them; sent whatever the frame's decision.
    "sample": BodySchema(
        required={"frame_id": ID, "priority": INT, "model": MODEL_REF, "selection": NAME,
                  "bands": list_of(NAME, nonempty=True, max_items=MAX_BANDS), "scale": POSITIVE_FLOAT,
                  "samples": list_of(SAMPLE, nonempty=True, max_items=MAX_SAMPLES)},
        optional={"scene": SHORT, "index": INT, "acquired": FLOAT, "georef": GEOREF},
        arrays={"tiles": ArrayRule(frozenset({"uint16", "int16", "float32"}), ndim=4)},
        check=_sample_check,
    ),
    # Any side: something failed; for a frame this is its outcome (ref = the frame's message id).
    "error": BodySchema(
        required={"code": CODE, "message": STR},
        optional={"frame_id": optional(bounded_str(MAX_ID_CHARS)), "field": optional(SHORT), "details": DICT},
    ),
    # Operator -> daemon: {name, args}; upload_chunk carries its bytes as one array.
    "command": BodySchema(
        required={"name": NAME},
        optional={"args": DICT},
        other_arrays=True,
    ),
    # Daemon -> sender: a frame ack {accepted, code, queue_depth} or a command ack
    # {ok, code, result | error}; code is "ok", or the error's code as in an ERROR.
    "ack": BodySchema(
        required={},
        optional={"ok": BOOL, "accepted": BOOL, "code": CODE, "queue_depth": NONNEG_INT,
                  "result": DICT, "error": STR, "frame_id": ID},
        check=_ack_check,
    ),
    # Daemon -> anyone subscribed: the heartbeat (`learning`: the tile uncertainty of recent
    # frames and the learning samples sent, once a `learning` policy has scored a frame).
    "telemetry": BodySchema(
        required={"seq": NONNEG_INT, "uptime": FLOAT, "queue_depth": NONNEG_INT},
        optional={"model": optional(DICT), "frames": DICT, "latency_ms": DICT, "rss_mb": FLOAT,
                  "learning": DICT},
    ),
}

MESSAGE_TYPES: tuple[str, ...] = tuple(BODY_SCHEMAS)


def validate_body(type_: str, body: Any) -> None:
    """Check `body` against the schema of `type_`; raises MessageError naming the field."""
    schema = BODY_SCHEMAS.get(type_) if isinstance(type_, str) else None
    if schema is None:
        raise MessageError("type", f"unknown message type {quote(type_)}; known: {', '.join(MESSAGE_TYPES)}")
    MAP(body, "body")
    for name, check in schema.required.items():
        if name not in body:
            raise MessageError(f"body.{name}", f"missing (required for a {type_} message)")
        check(body[name], f"body.{name}")
    for name, check in schema.optional.items():
        if name in body:
            check(body[name], f"body.{name}")
    if schema.check is not None:
        schema.check(body)


def _check_array_names(type_: str, names: Sequence[str]) -> None:
    schema = BODY_SCHEMAS[type_]
    for name, rule in schema.arrays.items():
        if rule.required and name not in names:
            raise MessageError(f"arrays.{name}", f"missing (required for a {type_} message)")
    if not schema.other_arrays:
        for name in names:
            if name not in schema.arrays:
                raise MessageError(f"arrays.{name}", f"a {type_} message carries no array named {quote(name)}")


def _check_array_rule(type_: str, name: str, dtype: str, ndim: int) -> None:
    rule = BODY_SCHEMAS[type_].arrays.get(name)
    if rule is None:
        return
    if dtype not in rule.dtypes:
        raise MessageError(f"arrays.{name}.dtype",
                           f"{dtype} not allowed for {type_}; allowed: {', '.join(sorted(rule.dtypes))}")
    if rule.ndim is not None and ndim != rule.ndim:
        raise MessageError(f"arrays.{name}.shape", f"expected {rule.ndim} dimensions, got {ndim}")


# ---------------------------------------------------------------------------------------------
# Encode

def _packable(value: Any) -> Any:
    # msgpack raises on numpy scalars; senders (telemetry, stats) often hold them.
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot pack {type(value).__name__}")


def encode(msg: Message, max_part_bytes: int | None = None) -> list[bytes | memoryview]:
    """Header frame, then one memoryview per array (zero-copy; send with copy=False).

    `max_part_bytes`: an array larger than that travels as several consecutive parts (views of
    it, no copy; its spec says how many in `parts`). Over CURVE, libzmq encrypts a message part
    by part into copies of its own as it writes them: small parts bound that memory.

    Raises MessageError for a message the receiver would reject (unknown type, bad body,
    disallowed dtype), so a sender's bug surfaces where it is made.
    """
    if not isinstance(msg.type, str) or msg.type not in BODY_SCHEMAS:
        validate_body(msg.type, msg.body)          # raises, naming the known types
    if not isinstance(msg.arrays, Mapping):
        raise MessageError("arrays", "expected a mapping of name -> array")
    _check_array_names(msg.type, list(msg.arrays))
    specs, frames = [], []
    for name, arr in msg.arrays.items():
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
            raise MessageError("arrays", f"array names must be strings of 1..{MAX_NAME_CHARS} "
                                         f"characters, got {quote(name)}")
        if isinstance(arr, (bytes, bytearray, memoryview)):   # e.g. a PNG: travels as uint8
            arr = np.frombuffer(arr, dtype=np.uint8)
        arr = np.asarray(arr)
        dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        if dtype.name not in ALLOWED_DTYPES or not dtype.isnative:
            raise MessageError(f"arrays.{name}.dtype",
                               f"{arr.dtype} cannot travel; allowed: {', '.join(sorted(ALLOWED_DTYPES))}")
        _check_array_rule(msg.type, name, dtype.name, arr.ndim)
        if arr.dtype != dtype or not arr.flags.c_contiguous:
            arr = np.array(arr, dtype=dtype, order="C")     # (ascontiguousarray would make 0-d 1-d)
        spec = {"name": name, "dtype": dtype.name, "shape": list(arr.shape)}
        flat = memoryview(arr.reshape(-1).view(np.uint8))
        if max_part_bytes and flat.nbytes > max_part_bytes:
            chunks = [flat[i:i + max_part_bytes] for i in range(0, flat.nbytes, max_part_bytes)]
            spec["parts"] = len(chunks)
            frames.extend(chunks)
        else:
            frames.append(flat)
        specs.append(spec)
    header = {"type": msg.type, "schema": msg.schema, "id": msg.id, "ref": msg.ref, "ts": msg.ts,
              "source": msg.source, "body": msg.body, "arrays": specs}
    try:
        packed = msgpack.packb(header, default=_packable, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        where = tree_problem(msg.body) if isinstance(msg.body, dict) else None
        if where is not None:                 # name the value, not only msgpack's complaint
            raise MessageError(f"body{where[0]}", f"cannot be packed: {where[1]}") from None
        raise MessageError("body", f"cannot be packed: {exc}") from None
    if len(packed) > DEFAULT_LIMITS.max_header_bytes:
        raise MessageError("header", f"{len(packed)} bytes exceeds the default limit of "
                                     f"{DEFAULT_LIMITS.max_header_bytes}: move data into arrays")
    # Check what the receiver will see (tuples become lists, numpy scalars numbers).
    seen = msgpack.unpackb(packed, raw=False, strict_map_key=False)
    _check_envelope(seen)
    validate_body(msg.type, seen["body"])
    return [packed, *frames]


# ---------------------------------------------------------------------------------------------
# Decode

_PLAIN = (str, int, float, bool, bytes, type(None))


def _reject_ext(code: int, data: bytes) -> Any:
    raise MessageError("header", f"msgpack extension type {code} not allowed")


def _check_plain(value: Any) -> None:
    """Only maps, lists and scalars (iterative: a deep nest must not hit Python's recursion limit)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif not isinstance(v, _PLAIN):
            raise MessageError("header", f"{type(v).__name__} values are not allowed")


def _as_buffer(frame: Any, index: int) -> memoryview:
    try:
        mv = memoryview(frame)
    except TypeError:
        raise MessageError(f"frames[{index}]", f"expected bytes, got {type(frame).__name__}") from None
    if mv.ndim != 1 or mv.itemsize != 1:
        if not mv.c_contiguous:
            raise MessageError(f"frames[{index}]", "buffer is not contiguous")
        mv = mv.cast("B")
    return mv


def _header_str(header: dict, key: str, nullable: bool = False, max_len: int = MAX_SOURCE_CHARS) -> None:
    value = header.get(key)
    if nullable and value is None:
        return
    if not isinstance(value, str):
        _fail(key, "a string", value)
    problem = str_problem(value, max_len)
    if problem:
        raise MessageError(key, problem)


def _decode_header(buf: memoryview, limits: Limits) -> dict:
    if buf.nbytes > limits.max_header_bytes:
        raise MessageError("header", f"{buf.nbytes} bytes exceeds the limit of {limits.max_header_bytes}")
    try:
        header = msgpack.unpackb(buf, raw=False, strict_map_key=True, use_list=True,
                                 ext_hook=_reject_ext, timestamp=0)
    except MessageError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise MessageError("header", f"not a valid msgpack envelope: {exc}") from None
    if not isinstance(header, dict):
        _fail("header", "a msgpack map", header)
    _check_plain(header)
    _check_envelope(header)
    return header


def _check_envelope(header: dict) -> None:
    """The envelope fields around the body (sender and receiver check the same)."""
    schema = header.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool) or schema != SCHEMA_VERSION:
        raise MessageError("schema", f"unsupported schema version {quote(schema)} (this end speaks {SCHEMA_VERSION})")
    if not isinstance(header.get("type"), str) or header["type"] not in BODY_SCHEMAS:
        raise MessageError("type", f"unknown message type {quote(header.get('type'))}; known: {', '.join(MESSAGE_TYPES)}")
    _header_str(header, "id", max_len=MAX_ID_CHARS)
    if not header["id"]:
        raise MessageError("id", "must not be empty")
    _header_str(header, "ref", nullable=True, max_len=MAX_ID_CHARS)
    _header_str(header, "source")
    FLOAT(header.get("ts"), "ts")
    LIST(header.get("arrays"), "arrays")
    if "body" not in header:
        raise MessageError("body", "missing")


def _array_specs(header: dict, limits: Limits, n_frames: int) -> list[tuple[str, np.dtype, tuple, int, int]]:
    """Check every array entry (name, dtype, shape, bytes, parts) without building any array."""
    entries = header["arrays"]
    if len(entries) > limits.max_arrays:
        raise MessageError("arrays", f"{len(entries)} arrays exceeds the limit of {limits.max_arrays}")
    out, total, seen, n_parts = [], 0, set(), 0
    for i, entry in enumerate(entries):
        where = f"arrays[{i}]"
        DICT(entry, where)
        name = entry.get("name")
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
            raise MessageError(f"{where}.name", f"expected a string of 1..{MAX_NAME_CHARS} "
                                                f"characters, got {quote(name)}")
        if name in seen:
            raise MessageError(f"{where}.name", f"duplicate array name {quote(name)}")
        seen.add(name)
        dtype_name = entry.get("dtype")
        if not isinstance(dtype_name, str) or dtype_name not in ALLOWED_DTYPES:
            raise MessageError(f"arrays.{name}.dtype",
                               f"{quote(dtype_name)} not allowed; allowed: {', '.join(sorted(ALLOWED_DTYPES))}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or len(shape) > limits.max_ndim:
            raise MessageError(f"arrays.{name}.shape", f"expected a list of at most {limits.max_ndim} sizes")
        for d in shape:
            if not isinstance(d, int) or isinstance(d, bool) or d < 0:
                raise MessageError(f"arrays.{name}.shape", f"sizes must be integers >= 0, got {quote(d)}")
        dtype = np.dtype(dtype_name).newbyteorder("<")
        nbytes = math.prod(shape) * dtype.itemsize      # Python ints: a lying shape cannot overflow
        total += nbytes
        if total > limits.max_array_bytes:
            raise MessageError(f"arrays.{name}.shape",
                               f"arrays total {total} bytes, over the limit of {limits.max_array_bytes}")
        _check_array_rule(header["type"], name, dtype_name, len(shape))
        parts = entry.get("parts", 1)
        if not isinstance(parts, int) or isinstance(parts, bool) or not 1 <= parts <= MAX_ARRAY_PARTS:
            raise MessageError(f"arrays.{name}.parts", f"expected an integer 1..{MAX_ARRAY_PARTS}, "
                                                       f"got {quote(parts)}")
        n_parts += parts
        out.append((name, dtype, tuple(shape), nbytes, parts))
    if n_parts != n_frames:
        raise MessageError("arrays", f"header lists {n_parts} array parts but {n_frames} array frames came")
    _check_array_names(header["type"], [o[0] for o in out])
    return out


def decode(frames: Sequence[Any] | Iterable[Any], limits: Limits = DEFAULT_LIMITS) -> Message:
    """Parse and validate a multipart message (bytes, memoryviews or zmq.Frame objects).

    Arrays come back as read-only views of the frames (no copy).
    """
    if isinstance(frames, (bytes, bytearray, memoryview, str)):
        raise MessageError("frames", "expected a list of frames, got a single buffer")
    try:
        frames = list(frames)
    except TypeError:
        raise MessageError("frames", f"expected a list of frames, got {type(frames).__name__}") from None
    if not frames:
        raise MessageError("frames", "empty message")
    header = _decode_header(_as_buffer(frames[0], 0), limits)
    specs = _array_specs(header, limits, len(frames) - 1)
    validate_body(header["type"], header["body"])
    arrays: dict[str, np.ndarray] = {}
    i = 1
    for name, dtype, shape, nbytes, parts in specs:
        bufs = [_as_buffer(frames[j], j) for j in range(i, i + parts)]
        i += parts
        got = sum(b.nbytes for b in bufs)
        if got != nbytes:
            raise MessageError(f"arrays.{name}",
                               f"{'frame has' if parts == 1 else f'{parts} parts have'} {got} bytes, "
                               f"header says {nbytes} ({dtype.name} {list(shape)})")
        # one part: a view of it; several: joined once into one buffer (its size checked above)
        buf = bufs[0] if parts == 1 else memoryview(b"".join(bufs))
        arrays[name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
    return Message(type=header["type"], body=header["body"], arrays=arrays, id=header["id"],
                   ref=header.get("ref"), ts=header["ts"], schema=header["schema"], source=header["source"])
