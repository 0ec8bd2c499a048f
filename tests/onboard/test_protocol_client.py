"""A client written from docs/protocol.md alone (raw pyzmq + msgpack + numpy; none of shared's
helpers), against a real daemon process: a frame gets its ACK then its DECISION, a status
command its ACK, a broken frame its ERROR naming the field, telemetry arrives on SUB. If this
test needs more than the page says, the page is wrong."""
from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from test_daemon import KEY_DIR, DaemonProcess, offline_install
from test_store import BundleFactory, frame

pytestmark = pytest.mark.timeout(180)
WAIT_MS = 20_000


def z85_keys(path: Path) -> dict[str, bytes]:
    """The Z85 keys of a ZeroMQ certificate file (`public-key = "..."`, `secret-key = "..."`)."""
    return {k: v.encode() for k, v in re.findall(r'(public-key|secret-key)\s*=\s*"([^"]{40})"',
                                                 path.read_text())}


def curve_socket(kind: int, endpoint: str, role: str, **options) -> zmq.Socket:
    """Section 1: the role's pair and the daemon's public key, set before connecting."""
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    mine, daemon = z85_keys(KEY_DIR / f"{role}.key_secret"), z85_keys(KEY_DIR / "daemon.key")
    sock.setsockopt(zmq.CURVE_PUBLICKEY, mine["public-key"])
    sock.setsockopt(zmq.CURVE_SECRETKEY, mine["secret-key"])
    sock.setsockopt(zmq.CURVE_SERVERKEY, daemon["public-key"])
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name), value)
    sock.connect(endpoint)
    return sock


def envelope(type_: str, body: dict, arrays: list | None = None) -> tuple[str, bytes]:
    """Section 2: (id, part 0)."""
    msg_id = uuid.uuid4().hex
    header = {"type": type_, "schema": 1, "id": msg_id, "ref": None, "ts": time.time(),
              "source": "raw-client", "body": body, "arrays": arrays or []}
    return msg_id, msgpack.packb(header, use_bin_type=True)


def receive(sock: zmq.Socket) -> dict:
    assert sock.poll(WAIT_MS), "no answer"
    parts = sock.recv_multipart()
    header = msgpack.unpackb(parts[0], raw=False)
    assert header["schema"] == 1 and len(parts) == 1 + len(header["arrays"])
    return header


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw-client")
    bundles = BundleFactory(root / "bundles")
    offline_install(root / "store", bundles.public, bundles.build(1))
    d = DaemonProcess(root, bundles.public)
    try:
        yield d.start()
    finally:
        d.cleanup()


def frame_parts(frame_id: str, data: np.ndarray, bands: list[str]) -> tuple[str, list[bytes]]:
    """Section 4, FRAME: the body, and one array `data` [bands, rows, cols] little-endian C order."""
    data = np.ascontiguousarray(data, dtype="<u2")
    msg_id, head = envelope("frame", {"frame_id": frame_id, "bands": bands, "scale": 1e-4},
                            [{"name": "data", "dtype": "uint16", "shape": list(data.shape)}])
    return msg_id, [head, data.tobytes(order="C")]


def test_a_frame_gets_ack_then_decision(daemon):
    sock = curve_socket(zmq.DEALER, daemon.endpoints["frames"], "payload", ROUTING_ID=b"raw-1")
    try:
        data, bands = frame("clear")
        msg_id, parts = frame_parts("raw-0001", data, bands)
        sock.send_multipart(parts)
        ack = receive(sock)
        assert ack["type"] == "ack" and ack["ref"] == msg_id
        assert ack["body"]["accepted"] is True and ack["body"]["code"] == "ok"
        assert ack["body"]["frame_id"] == "raw-0001"
        decision = receive(sock)
        assert decision["type"] == "decision" and decision["ref"] == msg_id
        assert decision["body"]["frame_id"] == "raw-0001" and isinstance(decision["body"]["keep"], bool)
        assert decision["body"]["model"] == {"id": "cloud-test", "version": 1}
        # Section 3: a refusal is the frame's only outcome, naming the field.
        bad_id, parts = frame_parts("f" * 65, data, bands)
        sock.send_multipart(parts)
        error = receive(sock)
        assert error["type"] == "error" and error["ref"] == bad_id
        assert error["body"]["code"] == "bad_message" and error["body"]["field"] == "body.frame_id"
        assert error["body"]["frame_id"] is None
        assert not sock.poll(500)                    # nothing more: no ACK, no second outcome
    finally:
        sock.close()


def test_a_status_command_over_req(daemon):
    sock = curve_socket(zmq.REQ, daemon.endpoints["commands"], "operator")
    try:
        msg_id, head = envelope("command", {"name": "status", "counter": time.time_ns()})
        sock.send_multipart([head])
        ack = receive(sock)
        assert ack["type"] == "ack" and ack["ref"] == msg_id
        assert ack["body"]["ok"] is True and ack["body"]["code"] == "ok"
        assert ack["body"]["result"]["state"] == "serving"
        msg_id, head = envelope("command", {"name": "self_destruct", "counter": time.time_ns()})
        sock.send_multipart([head])
        ack = receive(sock)
        assert ack["ref"] == msg_id and ack["body"]["ok"] is False
        assert ack["body"]["code"] == "unknown_command"
    finally:
        sock.close()


def test_telemetry_on_sub(daemon):
    sock = curve_socket(zmq.SUB, daemon.endpoints["telemetry"], "telemetry", SUBSCRIBE=b"")
    try:
        beat = receive(sock)
        assert beat["type"] == "telemetry" and isinstance(beat["body"]["seq"], int)
        assert {"uptime", "queue_depth", "frames", "outboxes", "refusals"} <= set(beat["body"])
    finally:
        sock.close()
