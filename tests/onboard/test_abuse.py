"""Abuse of a real daemon process on real sockets (issue 15, items 2-8): each attack is refused,
and afterwards the daemon still decides a good frame and answers `status`.

    memory      1,000 one-MB messages from clients that leave at once: RSS within 50 MB
    2^70        a signed version or policy priority the daemon could not put in a reply
    logs        a forged log line, a flood of refusals (counted, not logged each)
    scaling     values finite on the wire, infinite once scaled
    install     a path outside the uploads folder: one answer, nothing opened
    uploads     concurrent uploads and their announced bytes bounded; abandoned ones expire
    frame_id    64 characters at most, never echoed at length
    fuzz        a seeded loop of malformed messages on both sockets: every one answered, RSS flat
"""
from __future__ import annotations

import random
import time
import uuid

import msgpack
import numpy as np
import pytest
import zmq

from hostile_bundles import resigned, set_default_priority, set_version
from onboard_models import BANDS_6
from shared.limits import quote
from shared.messages import Message, decode
from test_daemon import (DaemonProcess, Payload, assert_one_outcome, bundles,  # noqa: F401 (fixture)
                         command, connect, keys, offline_install)
from test_store import frame

pytestmark = pytest.mark.timeout(300)

HUGE = 2 ** 70
RSS_SLACK_MB = 50
OUTBOX_AGE_S = 1.0


def rss_mb(pid: int) -> float:
    """Resident memory of another process (Linux /proc)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def raw_frame(body: dict, data: np.ndarray | None = None, msg_id: str | None = None) -> list:
    """A FRAME built by hand (encode refuses what a hostile payload sends)."""
    data = frame("clear", 64)[0] if data is None else data
    header = {"type": "frame", "schema": 1, "id": msg_id or uuid.uuid4().hex, "ref": None,
              "ts": time.time(), "source": "hostile", "body": body,
              "arrays": [{"name": "data", "dtype": data.dtype.name, "shape": list(data.shape)}]}
    return [msgpack.packb(header), np.ascontiguousarray(data).tobytes()]


def good_body(frame_id: str = "good") -> dict:
    return {"frame_id": frame_id, "bands": list(BANDS_6), "scale": 1e-4}


@pytest.fixture(scope="module")
def abused(tmp_path_factory, bundles):
    """One daemon serving v1 with small bounds, and a payload on it."""
    root = tmp_path_factory.mktemp("abused")
    offline_install(root / "store", bundles.public, bundles.build(1))
    daemon = DaemonProcess(root, bundles.public, limits={"max_message_bytes": 4 << 20,
                                                         "outbox_max_age_s": OUTBOX_AGE_S},
                           store={"max_uploads": 2, "max_upload_total_bytes": 3 << 20,
                                  "max_upload_bytes": 2 << 20, "max_chunk_bytes": 1 << 20,
                                  "upload_max_age_s": 3.0})
    payload = None
    try:
        daemon.start()
        payload = Payload(daemon.endpoints["frames"], routing_id=b"abuse-payload")
        daemon.downlink = connect(zmq.PULL, daemon.endpoints["products"], "downlink")
        yield daemon, payload
    finally:
        if payload is not None:
            payload.close()
            daemon.downlink.close()
        daemon.cleanup()


def still_serving(daemon: DaemonProcess, payload: Payload) -> dict:
    """A good frame gets its DECISION and `status` answers; the status result. (Products
    kept so far are taken off first, as the downlink would.)"""
    while daemon.downlink.poll(300):
        daemon.downlink.recv_multipart()
    msg_id = payload.send(f"ok-{uuid.uuid4().hex[:8]}", frame("clear")[0])
    decided = assert_one_outcome(payload.outcomes([msg_id])[msg_id])
    assert decided.type == "decision", decided.body
    status = command(daemon.endpoints["commands"], "status")
    assert status["ok"], status
    assert daemon.proc.poll() is None
    return status["result"]


def refusal(payload: Payload, parts: list, timeout: float = 20) -> Message:
    """Send hand-built parts; the one ERROR that answers them (by ref, or the unreferenced one)."""
    msg_id = None
    try:
        msg_id = msgpack.unpackb(parts[0], raw=False).get("id")
    except Exception:
        pass
    payload.send_raw(parts)
    if msg_id is None or len(msg_id) > 64:
        return payload.next_unreferenced(timeout)
    return assert_one_outcome(payload.outcomes([msg_id], timeout)[msg_id])


# ------------------------------------------------------------------------------------ frame_id (8)
def test_frame_id_longer_than_64_is_refused_and_never_echoed(abused):
    daemon, payload = abused
    err = refusal(payload, raw_frame(good_body("f" * 65)))
    assert err.type == "error" and err.body["code"] == "bad_message"
    assert err.body["field"] == "body.frame_id" and "longer than 64" in err.body["message"]
    assert err.body["frame_id"] is None
    huge = refusal(payload, raw_frame(good_body("x" * 900_000)))
    assert huge.body["field"] == "body.frame_id" and huge.body["frame_id"] is None
    assert len(msgpack.packb(huge.body)) < 600          # not the 900 kB it was sent
    still_serving(daemon, payload)


# ------------------------------------------------------------------------------------ logs (4)
def test_log_lines_cannot_be_forged_and_refusals_are_counted_not_logged(abused):
    daemon, payload = abused
    before = len(daemon.log())
    forged = "x\n2026-01-01 00:00:00,000 CRITICAL onboard.daemon: forged"
    err = refusal(payload, raw_frame({**good_body(forged[:64]), "bands": ["B99"] * 6}))
    assert err.body["code"] in ("invalid_frame", "bad_message")
    counted = still_serving(daemon, payload)["refusals"]["total"]
    for i in range(100):                                # 100 refusals of ~1 MB each
        payload.send_raw(raw_frame({**good_body(f"flood-{i}"), "scene": "s" * 1_000_000}))
    deadline = time.monotonic() + 30
    status = {}
    while time.monotonic() < deadline:
        status = command(daemon.endpoints["commands"], "status")["result"]
        if status["refusals"]["total"] >= counted + 100:
            break
        time.sleep(0.2)
    assert status["refusals"]["total"] >= counted + 100
    assert status["refusals"]["not_logged"] >= 80       # at most 10 a minute are logged
    log = (daemon.root / "daemon.stderr").read_text(errors="replace")
    assert not any(line.startswith("2026-01-01") for line in log.splitlines())
    assert "\\n2026-01-01" in log                       # the newline is escaped, on one line
    assert len(log) - before < 20_000, "refusals must not flood the log"
    still_serving(daemon, payload)


# ------------------------------------------------------------------------------------ scaling (5)
@pytest.mark.parametrize("data, scale", [
    (np.full((6, 64, 64), 1000, np.uint16), 1e38),
    (np.full((6, 64, 64), 3e38, np.float32), 10.0),
])
def test_values_infinite_after_scaling_get_an_error_not_a_decision(abused, data, scale):
    daemon, payload = abused
    msg_id = payload.send(f"overflow-{data.dtype}", data, scale=scale)
    out = assert_one_outcome(payload.outcomes([msg_id])[msg_id])
    assert out.type == "error" and out.body["code"] == "not_finite", out.body
    assert "overflow float32 after scaling" in out.body["message"]
    still_serving(daemon, payload)


# ------------------------------------------------------------------------------------ install (6)
def test_install_by_path_outside_the_uploads_folder_says_one_thing(abused, bundles, tmp_path):
    daemon, payload = abused
    ep = daemon.endpoints["commands"]
    outside_bundle = bundles.build(2)                    # a real, valid bundle: still refused
    not_a_bundle = tmp_path / "notes.txt"
    not_a_bundle.write_text("x" * 5000)
    link = daemon.root / "uploads" / "link.tar"          # a symlink inside pointing outside
    link.symlink_to(outside_bundle)
    answers = {}
    for name, path in [("missing", str(tmp_path / "none.tar")), ("not_a_bundle", str(not_a_bundle)),
                       ("bundle", str(outside_bundle)), ("root_only", "/etc/shadow"),
                       ("link", "link.tar"), ("dotdot", "../../../../etc/passwd"),
                       ("newline", "x.tar\n2026-01-01 CRITICAL forged")]:
        ack = command(ep, "install", {"path": path})
        assert ack["ok"] is False and ack["code"] == "not_found", (name, ack)
        answers[name] = ack["error"].replace(quote(path), "PATH")
        assert "5000" not in ack["error"] and "bytes" not in ack["error"]
    assert len(set(answers.values())) == 1, answers       # no difference to learn from
    inside = daemon.root / "uploads" / "junk.tar"
    inside.write_bytes(b"junk")
    assert command(ep, "install", {"path": "junk.tar"})["code"] == "not_a_bundle"
    assert command(ep, "status")["result"]["model"]["version"] == 1
    still_serving(daemon, payload)


# ------------------------------------------------------------------------------------ 2^70 (3)
@pytest.mark.parametrize("change, field", [(set_version(HUGE), "version"),
                                           (set_default_priority(HUGE), "policy.default.priority")])
def test_a_signed_2_70_value_is_refused_by_install(abused, bundles, change, field):
    daemon, payload = abused
    name = f"huge-{field}.tar"
    resigned(bundles.build(3), daemon.root / "uploads" / name, bundles.private, change)
    ack = command(daemon.endpoints["commands"], "install", {"path": name})
    assert ack["ok"] is False and ack["code"] == "invalid_manifest", ack
    assert f"{field}: must be <=" in ack["error"]
    assert still_serving(daemon, payload)["model"]["version"] == 1


def test_set_policy_refuses_out_of_range_priorities(abused):
    daemon, payload = abused
    ep = daemon.endpoints["commands"]
    too_big = command(ep, "set_policy", {"policy": {"default": {"then": "keep", "priority": 2 ** 40}}})
    assert too_big["code"] == "bad_args" and "must be <= 2147483647" in too_big["error"]
    # 2^64 - 1 packs (uint64) but is past int64: refused before any handler sees it
    sock = connect(zmq.DEALER, ep, "operator")
    header = {"type": "command", "schema": 1, "id": "u64", "ref": None, "ts": time.time(),
              "source": "hostile", "arrays": [],
              "body": {"name": "set_policy", "counter": time.time_ns(),
                       "args": {"policy": {"default": {"then": "keep", "priority": 2 ** 64 - 1}}}}}
    try:
        sock.send_multipart([msgpack.packb(header)])
        assert sock.poll(20_000)
        ack = decode(sock.recv_multipart())
    finally:
        sock.close()
    assert ack.ref == "u64" and ack.body["code"] == "bad_message" and "args" in ack.body["error"]
    still_serving(daemon, payload)


# ------------------------------------------------------------------------------------ uploads (7)
def _begin(ep: str, size: int, tag: str) -> dict:
    return command(ep, "upload_begin", {"name": f"{tag}.tar", "size": size,
                                        "sha256": uuid.uuid4().hex * 2, "chunk_size": 1 << 20})


def test_concurrent_uploads_and_their_bytes_are_bounded_and_abandoned_ones_expire(abused):
    daemon, payload = abused
    ep = daemon.endpoints["commands"]
    first, second = _begin(ep, 1 << 20, "a"), _begin(ep, 1 << 20, "b")
    assert first["ok"] and second["ok"]
    third = _begin(ep, 1 << 20, "c")
    assert third["code"] == "too_many_uploads" and "store.max_uploads" in third["error"]
    assert command(ep, "upload_status", {"upload_id": first["result"]["upload_id"]})["ok"]
    limits = command(ep, "status")["result"]["upload_limits"]
    assert limits["in_progress"] == 2 and limits["refused"] >= 1
    time.sleep(3.5)                                       # store.upload_max_age_s = 3
    fourth = _begin(ep, 2 << 20, "d")                     # room again: both expired
    assert fourth["ok"], fourth
    limits = command(ep, "status")["result"]["upload_limits"]
    assert limits["expired"] >= 2 and limits["expired_bytes"] >= 2 << 20
    assert not (daemon.root / "uploads" / first["result"]["upload_id"]).exists()
    over = _begin(ep, 2 << 20, "e")                       # 2 + 2 MiB > 3 MiB announced
    assert over["code"] == "too_many_uploads" and "max_upload_total_bytes" in over["error"]
    many_chunks = command(ep, "upload_begin", {"name": "f.tar", "size": 1 << 20,
                                               "sha256": "0" * 64, "chunk_size": 1})
    assert many_chunks["code"] == "bad_args" and "chunks" in many_chunks["error"]
    still_serving(daemon, payload)


# ------------------------------------------------------------------------------------ memory (2)
def _abandon(endpoint: str, n: int, size: int) -> None:
    """`n` clients that each send a `size`-byte message the daemon refuses, and leave at once."""
    ctx = zmq.Context()
    try:
        for i in range(n):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, f"gone-{i}-{uuid.uuid4().hex[:6]}".encode())
            sock.setsockopt(zmq.LINGER, 2000)        # the message leaves; the reply finds nobody
            keys("payload").apply(sock)
            sock.connect(endpoint)
            sock.send_multipart(raw_frame({**good_body(f"gone-{i}"), "scene": "s" * size},
                                          data=np.zeros((6, 1, 1), np.uint16)))
            sock.close()
    finally:
        ctx.term()


def test_memory_after_1000_abandoned_1mb_replies(abused):
    daemon, payload = abused
    pid = daemon.proc.pid
    _abandon(daemon.endpoints["frames"], 20, 1_000_000)  # warm-up: allocator pools
    still_serving(daemon, payload)
    start = rss_mb(pid)
    _abandon(daemon.endpoints["frames"], 1000, 1_000_000)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = command(daemon.endpoints["commands"], "status")["result"]
        if status["frames"]["rejected"] >= 1020 and status["outboxes"]["frames"]["messages"] == 0:
            break
        time.sleep(0.5)
    time.sleep(OUTBOX_AGE_S + 0.5)
    status = still_serving(daemon, payload)
    assert status["outboxes"]["frames"]["messages"] == 0   # nothing held for the departed
    end = rss_mb(pid)
    print(f"daemon RSS {start:.1f} MB -> {end:.1f} MB after 1,000 abandoned 1 MB messages; "
          f"outbox dropped {status['outboxes']['frames']['dropped']}")
    assert end - start < RSS_SLACK_MB, f"RSS {start:.0f} -> {end:.0f} MB"


# ------------------------------------------------------------------------------------ fuzz (2, 9)
def _mutant(rng: random.Random, kind: str) -> list:
    """One malformed message for the `kind` socket: garbage, a wrong envelope, wrong fields,
    lying arrays, out-of-range numbers."""
    body = good_body(f"fz-{rng.randrange(10 ** 6)}") if kind == "frames" else \
        {"name": rng.choice(["status", "help", "upload_status", "install", "nope", "x" * 70]),
         "args": {"upload_id": rng.choice(["", "0" * 16, "zz", 5])}, "counter": time.time_ns()}
    header = {"type": "frame" if kind == "frames" else "command", "schema": 1,
              "id": uuid.uuid4().hex, "ref": None, "ts": time.time(), "source": "fuzz",
              "body": body, "arrays": []}
    data = b""
    if kind == "frames":
        header["arrays"] = [{"name": "data", "dtype": "uint16", "shape": [6, 4, 4]}]
        data = bytes(6 * 4 * 4 * 2)
    choice = rng.randrange(10)
    values = [None, -1, 2 ** 64 - 1, 1.5, "s" * rng.randrange(200), [], {}, True, b"\x00"]
    if choice == 0:
        return [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))]
    if choice == 1:
        header[rng.choice(["type", "schema", "ts", "source", "arrays", "body"])] = rng.choice(values)
    elif choice == 2:
        key = rng.choice(list(body))
        body[key] = rng.choice(values)
    elif choice == 3 and kind == "frames":
        header["arrays"][0][rng.choice(["name", "dtype", "shape"])] = rng.choice(values)
    elif choice == 4:
        return [msgpack.packb(header), *([data] if data else []), b"extra"]
    elif choice == 5 and kind == "frames":
        return [msgpack.packb(header), data[:-1]]
    elif choice == 6:
        body[f"extra{rng.randrange(9)}"] = rng.choice(values)
    else:
        header["id"] = rng.choice(["", "i" * 65, uuid.uuid4().hex])
    return [msgpack.packb(header), *([data] if data else [])]


@pytest.mark.parametrize("kind", ["frames", "commands"])
def test_seeded_fuzz_every_message_answered_and_rss_flat(abused, kind):
    daemon, payload = abused
    rng = random.Random(15)
    sock = connect(zmq.DEALER, daemon.endpoints[kind], "payload" if kind == "frames" else "operator")
    start = rss_mb(daemon.proc.pid)
    try:
        for i in range(2500):
            sock.send_multipart(_mutant(rng, kind))
            assert sock.poll(20_000), f"message {i} got no answer"
            reply = decode(sock.recv_multipart())
            if reply.type == "ack" and reply.body.get("accepted"):   # a valid frame: its outcome too
                assert sock.poll(20_000)
                decode(sock.recv_multipart())
            assert reply.type in ("ack", "error")
            while sock.poll(0):                      # nothing else may be waiting
                extra = decode(sock.recv_multipart())
                assert extra.type in ("decision", "error"), extra
    finally:
        sock.close()
    end = rss_mb(daemon.proc.pid)
    assert end - start < RSS_SLACK_MB, f"RSS {start:.0f} -> {end:.0f} MB"
    still_serving(daemon, payload)


# ------------------------------------------------------------------------------------ stored state (3)
def test_a_stored_2_70_slot_never_stops_the_daemon(tmp_path, bundles):
    """A slot installed before these bounds existed, whose signed manifest says version 2^70:
    the daemon starts, refuses to serve that slot, falls back to the previous model, and every
    status, telemetry and frame is still answered."""
    import json
    from pathlib import Path
    from shared.bundle import signature_document
    from shared.keys import load_private_key
    from shared.manifest import manifest_bytes
    store = tmp_path / "store"
    offline_install(store, bundles.public, bundles.build(1))
    active = offline_install(store, bundles.public, bundles.build(2))["active"]
    slot = Path(active["path"])
    manifest = json.loads((slot / "manifest.json").read_text())
    manifest["version"] = HUGE
    raw = manifest_bytes(manifest)
    (slot / "manifest.json").write_bytes(raw)
    (slot / "manifest.sig").write_bytes(signature_document(load_private_key(bundles.private), raw))
    daemon = DaemonProcess(tmp_path, bundles.public)
    try:
        daemon.start()
        daemon.downlink = connect(zmq.PULL, daemon.endpoints["products"], "downlink")
        payload = Payload(daemon.endpoints["frames"], routing_id=b"after-huge")
        try:
            for _ in range(3):                # a frame decided (by v1), status answered
                msg_id = payload.send(f"after-{uuid.uuid4().hex[:6]}", frame("clear")[0])
                decided = assert_one_outcome(payload.outcomes([msg_id])[msg_id])
                assert decided.type == "decision" and decided.body["model"]["version"] == 1
                status = command(daemon.endpoints["commands"], "status")
                # the store still lists the bad slot: its ACK names the value it cannot send
                assert status["ok"] or (status["code"] == "internal"
                                        and "previous.version: cannot be packed" in status["error"]), status
                assert daemon.proc.poll() is None
        finally:
            payload.close()
            daemon.downlink.close()
        assert daemon.proc.poll() is None
    finally:
        daemon.cleanup()


def test_a_reply_that_cannot_be_encoded_becomes_an_error_reply():
    from onboard.bus import unencodable_reply
    from shared.errors import MessageError
    from shared.messages import Message, encode
    exc = MessageError("body", "cannot be packed")
    ack = Message("ack", {"ok": True, "code": "ok", "result": {"version": HUGE}}, ref="c1")
    decision = Message("decision", {"frame_id": "f1", "keep": True, "priority": HUGE,
                                    "reason": "r"}, ref="m1")
    for msg in (ack, decision):
        with pytest.raises(MessageError):
            encode(msg)
        reply = decode(encode(unencodable_reply(msg, exc)))
        assert reply.ref == msg.ref and reply.body["code"] == "internal"
    assert decode(encode(unencodable_reply(decision, exc))).body["frame_id"] == "f1"


def test_outbox_drops_only_what_may_go():
    """The outbox's rule without sockets: over its bounds it drops, oldest first, an away peer's
    messages and a connected peer's ACKs; a connected peer's outcomes only once it has taken
    nothing for max_age_s."""
    from onboard.bus import Outbox, OutboxLimits, Pending
    box = Outbox("frames", OutboxLimits(peer_bytes=250, total_bytes=1000, max_age_s=10.0))
    for i in range(3):
        box.append(Pending([b"here"], [b"x" * 100], 100, since=float(i), outcome=True))
    box.append(Pending([b"here"], [b"a" * 100], 100, since=3.0, outcome=False))   # an ACK
    assert box.trim(now=4.0) == 1 and box.dropped == {"messages": 1, "bytes": 100, "outcomes": 0}
    assert [p.outcome for p in box.items] == [True, True, True]    # 300 > 250, but all outcomes
    box.stalled[b"here"] = 0.0                                      # takes nothing since t=0
    assert box.trim(now=5.0) == 0                                   # not for max_age_s yet
    assert box.trim(now=11.0) == 1 and box.bytes == 200             # oldest outcome goes
    box.append(Pending([b"gone"], [b"y" * 50], 50, since=11.0, outcome=True))
    box.away.add(b"gone")
    assert box.trim(now=20.0) == 0 and box.trim(now=21.5) == 1       # away: dropped by age
    assert box.status()["peers"] == 1 and box.status()["away"] == 0
