"""Delivery over the bus: a full queue refuses explicitly, a downlink backlog pushes back, replies
wait for a payload that reconnects, and SIGTERM / shutdown drain with one outcome per frame."""
from __future__ import annotations

import signal
import time

import pytest
import zmq

from test_daemon import (REPLY_TIMEOUT_S, Payload, assert_one_outcome, bundles,  # noqa: F401
                         command, connect, frame, make_daemon, products)

# A hung OpenVINO call or socket wait fails its test instead of stalling the suite.
pytestmark = pytest.mark.timeout(180)


def test_full_queue_refuses_explicitly_and_every_frame_gets_one_outcome(make_daemon):
    daemon = make_daemon([1], queue={"max_frames": 2}).start()
    payload = Payload(daemon.endpoints["frames"])
    downlink = connect(zmq.PULL, daemon.endpoints["products"], "downlink")
    try:
        data = frame("clear", 512)[0]
        ids = [payload.send(f"burst-{i}", data) for i in range(12)]
        outcomes = payload.outcomes(ids, timeout=120)
        final = [assert_one_outcome(outcomes[i]) for i in ids]
        codes = [m.body.get("code") for m in final if m.type == "error"]
        decided = [m for m in final if m.type == "decision"]
        assert codes and set(codes) == {"queue_full"}
        assert len(decided) >= 2 and len(decided) + len(codes) == 12
        for i, m in zip(ids, final):
            acks = [a for a in outcomes[i] if a.type == "ack"]
            if m.type == "error":
                assert not acks and "queue.max_frames" in m.body["message"]
            else:
                assert acks[0].body["queue_depth"] <= 2
    finally:
        payload.close()
        downlink.close(linger=0)


def test_sigterm_finishes_frames_in_flight_and_exits_0(make_daemon):
    daemon = make_daemon([1], queue={"max_frames": 4}).start()
    payload = Payload(daemon.endpoints["frames"])
    try:
        data = frame("cloudy", 1024)[0]
        ids = [payload.send(f"inflight-{i}", data) for i in range(4)]
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while sum(1 for m in payload.inbox if m.type == "ack") < 4 and time.monotonic() < deadline:
            payload._pump(0.1)
        daemon.proc.send_signal(signal.SIGTERM)
        late = payload.send("too-late", frame("clear", 64)[0])
        outcomes = payload.outcomes([*ids, late], timeout=60)
        for i in ids:                                  # accepted before SIGTERM: finished
            final = assert_one_outcome(outcomes[i])
            assert final.type == "decision" and final.body["keep"] is False
        refused = assert_one_outcome(outcomes[late])   # sent after: refused, not dropped
        assert refused.type == "error" and refused.body["code"] == "shutdown"
        assert daemon.wait(30) == 0
        assert "stopped" in daemon.log()
    finally:
        payload.close()


def test_drain_timeout_gives_each_pending_frame_a_shutdown_error(make_daemon):
    daemon = make_daemon([1], queue={"max_frames": 4}, shutdown={"drain_timeout_s": 0}).start()
    payload = Payload(daemon.endpoints["frames"])
    try:
        data = frame("cloudy", 1024)[0]
        ids = [payload.send(f"cut-{i}", data) for i in range(4)]
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while sum(1 for m in payload.inbox if m.type == "ack") < 4 and time.monotonic() < deadline:
            payload._pump(0.1)
        assert command(daemon.endpoints["commands"], "shutdown")["ok"]
        outcomes = payload.outcomes(ids, timeout=30)
        finals = [assert_one_outcome(outcomes[i]) for i in ids]
        assert any(m.type == "error" and m.body["code"] == "shutdown" for m in finals)
        assert all(m.type == "decision" or m.body["code"] == "shutdown" for m in finals)
        assert daemon.wait(30) == 0
    finally:
        payload.close()


def test_outcomes_wait_for_a_payload_that_reconnects(make_daemon):
    daemon = make_daemon([1]).start()
    first = Payload(daemon.endpoints["frames"], routing_id=b"camera")
    data = frame("cloudy", 1024)[0]
    ids = [first.send(f"away-{i}", data) for i in range(2)]
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while sum(1 for m in first.inbox if m.type == "ack") < 2 and time.monotonic() < deadline:
        first._pump(0.05)
    assert not any(m.type == "decision" for m in first.inbox)
    first.close()                                      # the link drops before the decisions
    time.sleep(2.0)                                    # both decided while it is away
    second = Payload(daemon.endpoints["frames"], routing_id=b"camera")
    try:
        outcomes = second.outcomes(ids, timeout=30)
        for i in ids:
            decisions = [m for m in outcomes[i] if m.type == "decision"]
            assert len(decisions) == 1 and decisions[0].body["keep"] is False
    finally:
        second.close()


def test_products_backlog_turns_into_queue_full_until_the_downlink_pulls(make_daemon):
    daemon = make_daemon([1], queue={"max_frames": 4, "max_pending_products": 2}).start()
    payload = Payload(daemon.endpoints["frames"])
    downlink = None
    try:
        clear = frame("clear", 64)[0]
        kept = [payload.outcome(payload.send(f"kept-{i}", clear)) for i in range(2)]
        assert all(m.type == "decision" and m.body["keep"] for m in kept)
        refused = payload.outcome(payload.send("no-room", clear))
        assert refused.type == "error" and refused.body["code"] == "queue_full"
        assert "downlink" in refused.body["message"]
        downlink = connect(zmq.PULL, daemon.endpoints["products"], "downlink")
        assert sorted(p.body["frame_id"] for p in products(downlink, 2)) == ["kept-0", "kept-1"]
        time.sleep(0.3)
        assert payload.outcome(payload.send("room-again", clear)).type == "decision"
        assert [p.body["frame_id"] for p in products(downlink, 1)] == ["room-again"]
    finally:
        payload.close()
        if downlink is not None:
            downlink.close()


def test_shutdown_command_exits_0(make_daemon):
    daemon = make_daemon([1]).start()
    assert command(daemon.endpoints["commands"], "shutdown")["result"] == {"shutting_down": True}
    assert daemon.wait(30) == 0


def test_kept_product_spilled_before_its_decision_survives_kill_9(make_daemon, tmp_path):
    """A kept frame whose PRODUCT never left (no downlink connected) dies with the daemon at
    kill -9: it was on disk before the DECISION said keep, the restarted daemon sends it again,
    and once the ground acknowledges it the spilled copy goes (a later restart sends nothing)."""
    spill = tmp_path / "spill"
    daemon = make_daemon([1], supervision={"spill_dir": str(spill)})
    daemon.start()
    payload = Payload(daemon.endpoints["frames"])
    downlink = None
    try:
        decided = payload.outcome(payload.send("kept-then-killed", frame("clear", 64)[0]))
        assert decided.type == "decision" and decided.body["keep"]
        assert [p.name for p in spill.glob("*.product")] == ["kept-then-killed.product"]
        daemon.stop()                                  # kill -9 with the product still on board
        daemon.start()
        downlink = connect(zmq.PULL, daemon.endpoints["products"], "downlink")
        (again,) = products(downlink, 1)
        assert again.type == "product" and again.body["frame_id"] == "kept-then-killed"
        assert "mask_png" in again.arrays
        ack = command(daemon.endpoints["commands"], "products_received",
                      {"frame_ids": ["kept-then-killed", "never-seen"]})
        assert ack["ok"] and ack["result"] == {"removed": 1, "not_held": 1, "spill": True}
        assert not list(spill.glob("*.product"))
        status = command(daemon.endpoints["commands"], "status")["result"]
        assert status["outboxes"]["products"]["spilled_resent"] == 1
        daemon.stop()
        daemon.start()                                 # acknowledged: nothing comes again
        downlink.close(linger=0)
        downlink = connect(zmq.PULL, daemon.endpoints["products"], "downlink")
        assert products(downlink, 1, timeout=1.5) == []
        bad = command(daemon.endpoints["commands"], "products_received", {"frame_ids": "x"})
        assert not bad["ok"] and bad["code"] == "bad_args" and "args.frame_ids" in bad["error"]
    finally:
        payload.close()
        if downlink is not None:
            downlink.close(linger=0)


def test_spilled_product_is_the_packed_message_parts(tmp_path):
    # Streamed to disk part by part (no copy of a kept frame's pixels), read back as msgpack.
    import msgpack
    import numpy as np
    from onboard.products import read_spilled, spill_product
    frame = np.arange(3 * 70_000, dtype=np.uint16).reshape(3, 70_000)
    parts = [b"header", frame, frame[:, ::2], zmq.Frame(b"x" * 300), b""]
    path = spill_product(tmp_path, "kept/1", parts)
    expected = [b"header", frame.tobytes(), frame[:, ::2].tobytes(), b"x" * 300, b""]
    assert read_spilled(path) == expected
    assert path.read_bytes() == msgpack.packb(expected)
    assert not list(tmp_path.glob(".*tmp"))
