"""Bus envelopes: round trips for every type, and every kind of bad input is a MessageError."""
from __future__ import annotations

import math
from datetime import timezone

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared import messages as m
from shared.errors import EoedgeError
from shared.messages import MESSAGE_TYPES, Limits, Message, MessageError, decode, encode

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------------------------
# Strategies

text = st.text(max_size=12)
ident = st.text(min_size=1, max_size=12)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
int64 = st.integers(-(2**63), 2**63 - 1)
scalars = st.none() | st.booleans() | int64 | finite | text | st.binary(max_size=8)
plain = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3)
                     | st.dictionaries(text, kids, max_size=3), max_leaves=8)
plain_map = st.dictionaries(text, plain, max_size=4)
error_code = ident.filter(lambda c: c != "ok")
WKT_UTM33 = ('PROJCS["WGS 84 / UTM zone 33N",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",'
             '6378137,298.257223563]],PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],'
             'PROJECTION["Transverse_Mercator"],PARAMETER["central_meridian",15],UNIT["metre",1],'
             'AUTHORITY["EPSG","32633"]]')
transform6 = st.lists(st.floats(-1e7, 1e7), min_size=6, max_size=6).filter(
    lambda t: t[0] * t[4] - t[1] * t[3] != 0)
georefs = st.fixed_dictionaries(
    {"crs": st.sampled_from(["EPSG:32633", "epsg:4326", WKT_UTM33]), "transform": transform6},
    optional={"datetime": st.datetimes(timezones=st.just(timezone.utc)).map(lambda d: d.isoformat()),
              "scene_id": text})


def body(required: dict, optional: dict | None = None):
    """A body with the required fields, any subset of the optional ones, and unknown extra fields
    (allowed: a newer sender may add fields an older receiver ignores)."""
    known = set(required) | set(optional or {})
    extras = st.dictionaries(text.filter(lambda k: k not in known), plain, max_size=2)
    return st.builds(lambda b, e: {**e, **b},
                     st.fixed_dictionaries(required, optional=optional or {}), extras)


BODIES = {
    "frame": body({"frame_id": ident, "bands": st.lists(ident, min_size=1, max_size=4),
                   "scale": st.floats(min_value=1e-6, max_value=1e6)},
                  {"scene": text, "index": int64, "acquired": finite, "georef": georefs}),
    "decision": body({"frame_id": ident, "keep": st.booleans(), "priority": int64, "reason": text},
                     {"stats": plain_map, "tile_decisions": st.lists(plain_map, max_size=3),
                      "timings_ms": plain_map, "model": st.none() | plain_map, "georef": georefs}),
    "product": body({"frame_id": ident, "priority": int64},
                    {"scene": text, "index": int64, "reason": text, "stats": plain_map,
                     "classes": st.lists(text, max_size=3), "tiles": st.lists(plain_map, max_size=2),
                     "georef": georefs, "bands": st.lists(ident, max_size=4),
                     "scale": st.floats(min_value=1e-6, max_value=1e6)}),
    "sample": body({"frame_id": ident, "priority": int64,
                    "model": st.fixed_dictionaries({"model_id": ident, "version": st.integers(0, 2**40)}),
                    "selection": st.sampled_from(["uncertainty", "random"]),
                    "bands": st.lists(ident, min_size=1, max_size=4),
                    "scale": st.floats(min_value=1e-6, max_value=1e6),
                    "samples": st.lists(st.fixed_dictionaries(
                        {"row": st.integers(0, 2**31), "col": st.integers(0, 2**31), "size": st.integers(1, 4),
                         "entropy": st.floats(0, 1), "ambiguous": st.floats(0, 1)}), min_size=1, max_size=3)},
                   {"scene": text, "index": int64, "acquired": finite, "georef": georefs}),
    "error": body({"code": ident, "message": text},
                  {"frame_id": st.none() | text, "field": st.none() | text, "details": plain_map}),
    "command": body({"name": ident}, {"args": plain_map}),
    "ack": st.one_of(
        body({"ok": st.just(True)}, {"result": plain_map, "code": st.just("ok")}),
        body({"ok": st.just(False), "error": text}, {"code": error_code}),
        body({"accepted": st.just(True)}, {"queue_depth": st.integers(0, 2**31), "code": st.just("ok")}),
        body({"accepted": st.just(False)}, {"queue_depth": st.integers(0, 2**31), "code": error_code})),
    "telemetry": body({"seq": st.integers(0, 2**40), "uptime": finite, "queue_depth": st.integers(0, 999)},
                      {"model": st.none() | plain_map, "frames": plain_map, "latency_ms": plain_map,
                       "rss_mb": finite}),
}
assert set(BODIES) == set(MESSAGE_TYPES), "every message type needs a strategy here"

allowed_dtypes = st.sampled_from(sorted(m.ALLOWED_DTYPES)).map(np.dtype)
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
any_array = allowed_dtypes.flatmap(lambda dt: hnp.arrays(dt, shapes))
frame_array = st.sampled_from(["uint16", "int16", "float32"]).flatmap(
    lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=3, max_dims=3, min_side=0, max_side=6)))

sample_tiles = st.sampled_from(["uint16", "int16", "float32"]).flatmap(
    lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=4, max_dims=4, min_side=1, max_side=3)))


@st.composite
def messages(draw, types=st.sampled_from(MESSAGE_TYPES)):
    type_ = draw(types)
    b = draw(BODIES[type_])
    if type_ == "frame":
        arrays = {"data": draw(frame_array)}
    elif type_ == "sample":
        arrays = {"tiles": draw(sample_tiles)}
    elif m.BODY_SCHEMAS[type_].other_arrays:
        arrays = draw(st.dictionaries(ident, any_array, max_size=3))
    else:
        arrays = {}
    return Message(type_, b, arrays, ref=draw(st.none() | st.just(m.new_id())), source=draw(text))


def frame_message(data=None, **body):
    data = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4) if data is None else data
    b = {"frame_id": "f1", "bands": ["B02", "B03"], "scale": 1e-4, **body}
    return Message("frame", b, {"data": data}, source="payload")


def header_of(msg: Message) -> dict:
    return msgpack.unpackb(encode(msg)[0], raw=False)


def with_header(msg: Message, header: dict) -> list:
    return [msgpack.packb(header, use_bin_type=True), *encode(msg)[1:]]


def lying_frame(key: str, value) -> list:
    """A good frame message whose header says `value` for its data array's `key`."""
    msg = frame_message()
    h = header_of(msg)
    h["arrays"][0][key] = value
    return with_header(msg, h)


def assert_same(a: Message, b: Message) -> None:
    assert (a.type, a.body, a.id, a.ref, a.ts, a.source, a.schema) == \
           (b.type, b.body, b.id, b.ref, b.ts, b.source, b.schema)
    assert list(a.arrays) == list(b.arrays)
    for name in a.arrays:
        x, y = np.asarray(a.arrays[name]), b.arrays[name]
        assert y.dtype == x.dtype and y.shape == x.shape
        assert y.tobytes() == x.tobytes()       # bytewise: NaNs compare equal


# ------------------------------------------------------------------------------------------------
# Round trips

@SETTINGS
@given(messages())
def test_round_trip_every_type(msg):
    assert_same(msg, decode(encode(msg)))


@pytest.mark.parametrize("type_", MESSAGE_TYPES)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_round_trip_each_type_explicitly(type_, data):
    msg = data.draw(messages(st.just(type_)))
    assert_same(msg, decode(encode(msg)))


def test_non_contiguous_and_big_endian_arrays_arrive_as_c_order_little_endian():
    a = np.arange(60, dtype=">u2").reshape(3, 4, 5)[:, ::2, 1:]
    out = decode(encode(frame_message(a, bands=["a", "b", "c"]))).arrays["data"]
    assert out.dtype == np.dtype("<u2") and np.array_equal(out, a)


def test_bytes_travel_as_uint8_and_numpy_scalars_in_body_are_packed():
    png = b"\x89PNG\r\n\x1a\n..."
    msg = Message("product", {"frame_id": "f", "priority": np.int64(3), "stats": {"cloud": np.float32(0.5)}},
                  {"mask_png": png})
    out = decode(encode(msg))
    assert out.arrays["mask_png"].dtype == np.uint8 and out.arrays["mask_png"].tobytes() == png
    assert out.body["priority"] == 3 and out.body["stats"]["cloud"] == 0.5


def test_zero_copy_both_ways():
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    frames = encode(frame_message(data))
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), data)     # encode: no copy
    received = [frames[0], bytearray(frames[1])]
    out = decode(received).arrays["data"]
    received[1][:4] = np.float32(42).tobytes()                              # decode: a view
    assert out[0, 0, 0] == 42


def test_reply_refers_to_the_message():
    msg = frame_message()
    ack = msg.reply("ack", {"accepted": True, "queue_depth": 1}, source="daemon")
    out = decode(encode(ack))
    assert out.ref == msg.id and out.id != msg.id and out.body["queue_depth"] == 1


def test_over_a_real_zmq_socket_pair_with_copy_false(tmp_path):
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind(f"ipc://{tmp_path}/m.ipc")
        b.connect(f"ipc://{tmp_path}/m.ipc")
        msg = frame_message(np.random.default_rng(0).integers(0, 10000, (2, 64, 64), dtype=np.uint16))
        a.send_multipart(encode(msg), copy=False)
        assert b.poll(5000)
        assert_same(msg, decode(b.recv_multipart(copy=False)))
    finally:
        a.close(0)
        b.close(0)


# ------------------------------------------------------------------------------------------------
# Bad input: always a MessageError naming the field, never anything else

def raises_field(frames, field: str | None = None, limits: Limits = m.DEFAULT_LIMITS) -> MessageError:
    with pytest.raises(MessageError) as info:
        decode(frames, limits)
    if field is not None:
        assert info.value.field.startswith(field), info.value
    return info.value


def decode_or_message_error(frames, limits: Limits = m.DEFAULT_LIMITS):
    try:
        return decode(frames, limits)
    except MessageError:
        return None


@SETTINGS
@given(st.binary(max_size=200))
def test_garbage_header_bytes(raw):
    raises_field([raw])


@SETTINGS
@given(st.lists(st.binary(max_size=40), max_size=5))
def test_garbage_frame_lists(frames):
    if frames:
        raises_field(frames)
    else:
        raises_field(frames, "frames")


@SETTINGS
@given(plain)
def test_any_msgpack_value_as_header(value):
    decode_or_message_error([msgpack.packb(value, use_bin_type=True)])


@SETTINGS
@given(messages(), st.data())
def test_truncated_frames(msg, data):
    frames = [bytes(f) for f in encode(msg)]
    candidates = [i for i, f in enumerate(frames) if len(f) > 0]
    i = data.draw(st.sampled_from(candidates))
    cut = data.draw(st.integers(0, len(frames[i]) - 1))
    frames[i] = frames[i][:cut]
    raises_field(frames)


@SETTINGS
@given(messages(), st.data())
def test_missing_or_extra_frames(msg, data):
    frames = [bytes(f) for f in encode(msg)]
    if len(frames) > 1 and data.draw(st.booleans()):
        del frames[data.draw(st.integers(1, len(frames) - 1))]
    else:
        frames.append(data.draw(st.binary(max_size=16)))
    raises_field(frames, "arrays")


@SETTINGS
@given(st.lists(st.integers(-(2**63), 2**64 - 1), max_size=6), st.binary(max_size=64))
def test_lying_shapes(shape, payload):
    frames = [lying_frame("shape", shape)[0], payload]
    out = decode_or_message_error(frames)
    if out is not None:   # only an honest header decodes
        assert len(shape) == 3 and out.arrays["data"].nbytes == len(payload) == math.prod(shape) * 2


def test_shape_claiming_more_bytes_than_sent():
    err = raises_field(lying_frame("shape", [2, 3, 5]), "arrays.data")
    assert "48 bytes" in str(err) and "60" in str(err)


@pytest.mark.parametrize("shape", [[2**40, 2**40, 2**40], [2**62, 4, 1], [-1, 3, 4], [2, 3, True], [2, 3, 4.0],
                                   "234", [[2], 3, 4], list(range(1, 12))])
def test_huge_negative_and_malformed_shapes(shape):
    raises_field(lying_frame("shape", shape), "arrays.data.shape")


def test_array_limit_is_checked_before_allocation():
    msg = frame_message()
    raises_field(lying_frame("shape", [13, 100000, 100000]), "arrays.data.shape")   # 260 GB: refused
    raises_field(encode(msg), "arrays.data.shape", Limits(max_array_bytes=47))
    assert decode(encode(msg), Limits(max_array_bytes=48)).arrays["data"].shape == (2, 3, 4)


@pytest.mark.parametrize("dtype", ["object", "O", "<U4", "S3", "complex128", "V8", "bool", ">u2", "float128",
                                   "datetime64[s]", "", None, 7, ["uint8"]])
def test_disallowed_dtypes(dtype):
    raises_field(lying_frame("dtype", dtype), "arrays.data.dtype")


def test_frame_data_rules_by_type():
    good = frame_message()
    raises_field(lying_frame("dtype", "uint8"), "arrays.data.dtype")   # fine on the bus, not for frame data
    with pytest.raises(MessageError, match="arrays.data.shape"):
        encode(frame_message(np.zeros((3, 4), np.uint16)))
    with pytest.raises(MessageError, match="arrays.data"):
        encode(Message("frame", good.body, {}))
    with pytest.raises(MessageError, match="arrays.extra"):
        encode(Message("frame", good.body, {"data": np.zeros((2, 1, 1), np.uint16), "extra": np.zeros(1)}))


@pytest.mark.parametrize("version", [0, 2, "1", None, True, 1.0])
def test_wrong_schema_version(version):
    msg = frame_message()
    h = header_of(msg)
    h["schema"] = version
    raises_field(with_header(msg, h), "schema")


@pytest.mark.parametrize("key", ["type", "schema", "id", "ts", "source", "body", "arrays"])
def test_missing_header_fields(key):
    msg = frame_message()
    h = header_of(msg)
    del h[key]
    raises_field(with_header(msg, h), key)


@pytest.mark.parametrize("type_", MESSAGE_TYPES)
def test_missing_required_body_fields(type_):
    good = Message(type_, _minimal_body(type_), _minimal_arrays(type_))
    for name in m.BODY_SCHEMAS[type_].required:
        h = header_of(good)
        del h["body"][name]
        raises_field(with_header(good, h), f"body.{name}")


def _minimal_arrays(type_: str) -> dict:
    return {"frame": {"data": np.zeros((1, 1, 1), np.uint16)},
            "sample": {"tiles": np.zeros((1, 1, 2, 2), np.uint16)}}.get(type_, {})


def _minimal_body(type_: str) -> dict:
    return {"frame": {"frame_id": "f", "bands": ["B02"], "scale": 1.0},
            "decision": {"frame_id": "f", "keep": True, "priority": 1, "reason": ""},
            "product": {"frame_id": "f", "priority": 1},
            "error": {"code": "queue_full", "message": "full"},
            "command": {"name": "status"},
            "ack": {"ok": True},
            "telemetry": {"seq": 0, "uptime": 1.0, "queue_depth": 0},
            "sample": {"frame_id": "f", "priority": 9, "model": {"model_id": "m", "version": 1},
                       "selection": "random", "bands": ["B02"], "scale": 1e-4,
                       "samples": [{"row": 0, "col": 0, "size": 2, "entropy": 0.5, "ambiguous": 0.0}]}}[type_]


@pytest.mark.parametrize("type_,field,value", [
    ("frame", "frame_id", 7), ("frame", "frame_id", ""), ("frame", "bands", "B02"), ("frame", "bands", []),
    ("frame", "bands", ["B02", 3]), ("frame", "scale", "1"), ("frame", "scale", 0), ("frame", "scale", True),
    ("frame", "index", 1.5), ("frame", "acquired", float("nan")),
    ("decision", "keep", 1), ("decision", "priority", "high"), ("decision", "stats", [1]),
    ("decision", "tile_decisions", [1]), ("error", "code", None), ("command", "args", []),
    ("ack", "ok", "yes"), ("ack", "queue_depth", -1), ("ack", "code", 5), ("ack", "code", ""),
    ("ack", "code", "x" * 65), ("error", "code", "x" * 65),
    ("telemetry", "seq", -3), ("telemetry", "uptime", float("inf")),
    ("sample", "model", {"model_id": "m"}), ("sample", "samples", []),
    ("sample", "samples", [{"row": 0, "col": 0, "size": 0, "entropy": 0.5, "ambiguous": 0.0}]),
    ("sample", "samples", [{"row": 0, "col": 0, "size": 2, "entropy": 1.5, "ambiguous": 0.0}]),
])
def test_wrong_body_field_types(type_, field, value):
    b = {**_minimal_body(type_), field: value}
    arrays = _minimal_arrays(type_)
    with pytest.raises(MessageError) as info:
        encode(Message(type_, b, arrays))                          # the sender is told ...
    assert info.value.field.startswith(f"body.{field}")
    good = Message(type_, _minimal_body(type_), arrays)
    h = header_of(good)
    h["body"] = b
    raises_field(with_header(good, h), f"body.{field}")            # ... and so is the receiver


def test_non_string_map_keys():
    with pytest.raises(MessageError, match="body.args"):
        encode(Message("command", {"name": "x", "args": {1: 2}}))
    h = header_of(Message("command", {"name": "x"}))
    h["body"]["args"] = {1: 2}
    raises_field([msgpack.packb(h)], "header")


def test_ack_needs_ok_or_accepted_and_a_reason_to_fail():
    for b in ({}, {"ok": False}, {"result": {}}):
        with pytest.raises(MessageError, match="body"):
            encode(Message("ack", b))


@pytest.mark.parametrize("ack", [{"ok": True, "code": "busy"}, {"ok": False, "error": "x", "code": "ok"},
                                 {"accepted": True, "code": "queue_full"}, {"accepted": False, "code": "ok"}])
def test_ack_code_is_ok_exactly_when_it_succeeds(ack):
    with pytest.raises(MessageError) as info:
        encode(Message("ack", ack))
    assert info.value.field == "body.code"
    h = header_of(Message("ack", {"ok": True}))
    h["body"] = ack
    raises_field([msgpack.packb(h)], "body.code")


def test_ack_code_round_trips():
    for ack in ({"ok": True, "code": "ok", "result": {}}, {"ok": False, "code": "busy", "error": "busy: x"},
                {"accepted": True, "code": "ok", "queue_depth": 1}, {"ok": True}):
        assert decode(encode(Message("ack", ack))).body == ack


def test_message_error_is_an_eoedge_error_and_still_a_value_error():
    with pytest.raises(MessageError) as info:
        decode([b"\x00"])
    assert isinstance(info.value, EoedgeError) and isinstance(info.value, ValueError)
    assert info.value.code == "bad_message" and info.value.as_dict()["message"].startswith("header")


@pytest.mark.parametrize("field,value", [("id", ""), ("id", None), ("ref", 5), ("ts", None),
                                         ("ts", float("nan")), ("source", b"x"), ("schema", 2)])
def test_encode_checks_the_envelope_as_the_receiver_would(field, value):
    msg = Message("command", {"name": "status"})
    setattr(msg, field, value)
    with pytest.raises(MessageError) as info:
        encode(msg)
    assert info.value.field == field


def test_encode_refuses_a_header_the_receiver_would_refuse():
    with pytest.raises(MessageError, match="move data into arrays"):
        encode(Message("command", {"name": "x", "args": {"blob": b"\0" * (2 << 20)}}))


def test_unknown_type_names_the_known_ones():
    with pytest.raises(MessageError, match="known: frame"):
        encode(Message("telemetri", {}))


def test_msgpack_extension_and_timestamp_values_are_refused():
    h = header_of(Message("command", {"name": "status"}))
    h["body"]["args"] = {"t": msgpack.ExtType(5, b"xx")}
    raises_field([msgpack.packb(h)], "header")
    h["body"]["args"] = {"t": msgpack.Timestamp(1, 0)}
    raises_field([msgpack.packb(h)], "header")


def test_deep_nesting_is_a_message_error():
    raw = b"\x91" * 5000 + b"\x90"       # 5000 nested one-element arrays, built without recursion
    raises_field([raw], "header")
    h = header_of(Message("command", {"name": "status"}))
    nested = {"name": "status", "args": {"x": None}}
    cur = nested["args"]
    for _ in range(900):                 # inside msgpack's own stack limit: our checks must not recurse
        cur["x"] = {"x": None}
        cur = cur["x"]
    h["body"] = nested
    decode_or_message_error([msgpack.packb(h)])


def test_header_size_limit_and_non_buffer_frames():
    frames = encode(frame_message())
    raises_field(frames, "header", Limits(max_header_bytes=10))
    raises_field([frames[0], 12345], "frames[1]")
    raises_field([object()], "frames[0]")
    raises_field(b"\x80", "frames")
    raises_field(None, "frames")


@SETTINGS
@given(messages(), st.data())
def test_any_header_field_replaced_by_any_value(msg, data):
    """Fuzz: replace one header entry (or one body entry) with an arbitrary value."""
    h = header_of(msg)
    where = data.draw(st.sampled_from(sorted(h) + ["body." + k for k in h["body"]]))
    value = data.draw(plain)
    if where.startswith("body."):
        h["body"][where[5:]] = value
    else:
        h[where] = value
    frames = [msgpack.packb(h, use_bin_type=True), *encode(msg)[1:]]
    decode_or_message_error(frames)


# ------------------------------------------------------------------------------------------------
# The frame's georeference (optional; carried into DECISION and PRODUCT)

GOOD_GEOREF = {"crs": "EPSG:32633", "transform": [10.0, 0.0, 500000.0, 0.0, -10.0, 5200000.0],
               "datetime": "2026-12-02T10:31:07.5Z", "scene_id": "S2B_MSIL1C_20261202"}


@pytest.mark.parametrize("type_", ["frame", "decision", "product"])
def test_georef_round_trips_on_frame_decision_and_product(type_):
    body = {"frame": {"frame_id": "f1", "bands": ["B02"], "scale": 1e-4},
            "decision": {"frame_id": "f1", "keep": True, "priority": 1, "reason": "r"},
            "product": {"frame_id": "f1", "priority": 1}}[type_]
    arrays = {"data": np.zeros((1, 2, 2), np.uint16)} if type_ == "frame" else {}
    for georef in (GOOD_GEOREF, {"crs": WKT_UTM33, "transform": [10, 0, 0, 0, -10, 0]}):
        out = decode(encode(Message(type_, {**body, "georef": georef}, arrays)))
        assert out.body["georef"] == georef


@pytest.mark.parametrize("change, field, words", [
    ({"crs": "UTM 33"}, "body.georef.crs", "EPSG"),
    ({"crs": "EPSG:"}, "body.georef.crs", "EPSG"),
    ({"crs": "PROJCS[\"x\",GEOGCS[\"y\"]"}, "body.georef.crs", "WKT"),     # unbalanced
    ({"crs": ""}, "body.georef.crs", ""),
    ({"crs": 32633}, "body.georef.crs", "string"),
    ({"crs": "PROJCS[" + "A" * 9000 + "]"}, "body.georef.crs", "8192"),
    ({"transform": [10.0, 0.0, 500000.0, 0.0, -10.0]}, "body.georef.transform", "6 numbers"),
    ({"transform": [10.0] * 7}, "body.georef.transform", "6 numbers"),
    ({"transform": [10.0, 0.0, 5.0, 0.0, 0.0, 5.0]}, "body.georef.transform", "area"),
    ({"transform": [10.0, 0.0, "5", 0.0, -10.0, 5.0]}, "body.georef.transform[2]", "number"),
    ({"transform": [1e300, 0.0, 0.0, 0.0, -1e300, 0.0]}, "body.georef.transform", "finite"),
    ({"transform": "10,0,0,0,-10,0"}, "body.georef.transform", "list"),
    ({"datetime": "yesterday"}, "body.georef.datetime", "ISO 8601"),
    ({"datetime": "2026-12-02T10:31:07"}, "body.georef.datetime", "UTC offset"),
    ({"datetime": "2026-12-02T10:31:07Z" + " " * 60}, "body.georef.datetime", "64"),
    ({"scene_id": "s" * 300}, "body.georef.scene_id", "256"),
    ({"elevation": 3}, "body.georef.elevation", "unknown field"),
])
def test_bad_georef_is_refused_naming_the_field(change, field, words):
    georef = {**GOOD_GEOREF, **change}
    with pytest.raises(MessageError) as err:
        encode(frame_message(georef=georef))
    assert err.value.field == field
    assert words in str(err.value)
    # the receiver refuses the same body packed by hand (a peer that does not use encode)
    msg = frame_message()
    h = header_of(msg)
    h["body"]["georef"] = georef
    with pytest.raises(MessageError) as err:
        decode(with_header(msg, h))
    assert err.value.field == field


@pytest.mark.parametrize("georef, field", [({"transform": [1, 0, 0, 0, -1, 0]}, "body.georef.crs"),
                                           ({"crs": "EPSG:4326"}, "body.georef.transform"),
                                           ("EPSG:4326", "body.georef"), (None, "body.georef")])
def test_georef_needs_crs_and_transform(georef, field):
    with pytest.raises(MessageError) as err:
        encode(frame_message(georef=georef))
    assert err.value.field == field


def test_a_large_array_travels_as_several_parts_and_arrives_whole():
    """encode(max_part_bytes=...) splits an array into views (no copy); decode joins them."""
    tile = np.arange(3 * 100 * 100, dtype=np.uint16).reshape(3, 100, 100)     # 60,000 bytes
    msg = Message("product", {"frame_id": "f", "priority": 1}, {"mask_png": b"png", "tile_0": tile})
    frames = encode(msg, max_part_bytes=16384)
    header = msgpack.unpackb(frames[0])
    assert [a.get("parts", 1) for a in header["arrays"]] == [1, 4]
    assert len(frames) == 1 + 1 + 4 and all(len(f) <= 16384 for f in frames[1:])
    assert np.shares_memory(np.frombuffer(frames[2], np.uint8), tile)       # views, not copies
    out = decode([bytes(f) for f in frames])
    np.testing.assert_array_equal(out.arrays["tile_0"], tile)
    assert out.arrays["mask_png"].tobytes() == b"png"
    assert len(encode(msg)) == 3                                             # unsplit by default


@pytest.mark.parametrize("parts, why", [(0, "parts"), (True, "parts"), ("2", "parts"),
                                        (m.MAX_ARRAY_PARTS + 1, "parts"), (3, "array parts but")])
def test_lying_part_counts_are_refused_naming_the_array(parts, why):
    tile = np.zeros(40000, np.uint8)
    frames = encode(Message("product", {"frame_id": "f", "priority": 1}, {"tile_0": tile}),
                    max_part_bytes=20000)
    header = msgpack.unpackb(frames[0])
    header["arrays"][0]["parts"] = parts
    with pytest.raises(MessageError, match=why) as err:
        decode([msgpack.packb(header), *frames[1:]])
    assert "arrays" in err.value.field


def test_parts_that_do_not_add_up_to_the_shape_are_refused():
    tile = np.zeros(40000, np.uint8)
    frames = encode(Message("product", {"frame_id": "f", "priority": 1}, {"tile_0": tile}),
                    max_part_bytes=20000)
    with pytest.raises(MessageError, match="2 parts have 39999 bytes, header says 40000"):
        decode([frames[0], frames[1], bytes(frames[2])[:-1]])
