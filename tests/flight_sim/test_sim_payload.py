"""The payload link against a scripted daemon peer (a ROUTER in this thread): refusals,
restarts, duplicates and malformed messages, each following the bus contract."""
import numpy as np
import pytest

zmq = pytest.importorskip("zmq")

from flight_sim.camera import CameraConfig, PushbroomCamera  # noqa: E402
from flight_sim.payload import MALFORMED_KINDS, Payload, malformed_parts  # noqa: E402
from flight_sim.scenes import ArraySource  # noqa: E402
from shared.messages import Message, MessageError, decode, encode  # noqa: E402
from shared.scene import Scene  # noqa: E402


def frames(n: int, lines: int = 8):
    data = np.random.default_rng(0).random((3, n * lines, 16)).astype(np.float32) * 0.3
    cam = PushbroomCamera([ArraySource(Scene(data, ("B02", "B03", "B04"), name="t"))],
                          CameraConfig(frame_lines=lines))
    return list(cam.frames())


class Peer:
    """The daemon's frames socket, scripted by the test."""

    def __init__(self, ctx, endpoint):
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)

    def recv(self, timeout_ms=2000):
        assert self.sock.poll(timeout_ms), "nothing arrived"
        parts = self.sock.recv_multipart()
        return parts[0], decode(parts[1:])

    def reply(self, route, msg: Message, type_: str, body: dict):
        self.sock.send_multipart([route, *encode(msg.reply(type_, body))])

    def close(self):
        self.sock.close(linger=0)


def pump_until(payload, cond, timeout=2.0):
    import time
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        payload.pump()
        if payload.sock.poll(20):
            payload.handle(payload.sock.recv_multipart())
        if cond():
            return
    raise AssertionError("condition not reached")


def test_queue_full_is_a_refusal_not_an_outcome(ctx):
    peer = Peer(ctx, "inproc://frames-1")
    p = Payload(ctx, "inproc://frames-1", window=2, retry_s=0.05)
    f1, f2 = frames(2)
    p.add(f1)
    p.add(f2)
    assert p.pump() == 2
    route, m1 = peer.recv()
    _, m2 = peer.recv()
    peer.reply(route, m1, "ack", {"accepted": True, "queue_depth": 1})
    peer.reply(route, m2, "error", {"code": "queue_full", "message": "full", "frame_id": f2.frame_id})
    pump_until(p, lambda: p.states[f2.frame_id].refusals == ["queue_full"])
    assert p.states[f2.frame_id].outcome is None and list(p.buffer) == [f2.frame_id]
    peer.reply(route, m1, "decision", {"frame_id": f1.frame_id, "keep": True, "priority": 1, "reason": "r"})
    pump_until(p, lambda: p.states[f1.frame_id].outcome == "decision" and not p.buffer)
    _, again = peer.recv()                         # the refused frame, sent again with a new id
    assert again.body["frame_id"] == f2.frame_id and again.id != m2.id
    np.testing.assert_array_equal(again.arrays["data"], f2.data)
    peer.reply(route, again, "decision", {"frame_id": f2.frame_id, "keep": False, "priority": 0, "reason": "r"})
    pump_until(p, lambda: p.unresolved == 0)
    acc = p.accounting()
    assert acc["balanced"] and acc["decided"] == 2 and acc["attempts"] == 3
    assert acc["refusals"] == {"queue_full": 1}
    assert p.states[f2.frame_id].frame.data is None   # discarded: pixels dropped at the outcome
    assert p.states[f1.frame_id].frame.data is not None   # kept: until its product is in
    p.product_arrived(f1.frame_id)
    assert p.states[f1.frame_id].frame.data is None
    p.close()
    peer.close()


def test_kept_frame_whose_product_died_is_processed_again(ctx):
    peer = Peer(ctx, "inproc://frames-6")
    p = Payload(ctx, "inproc://frames-6")
    f1, f2 = frames(2)
    p.add(f1)
    p.add(f2)
    p.pump()
    route, m1 = peer.recv()
    _, m2 = peer.recv()
    peer.reply(route, m1, "decision", {"frame_id": f1.frame_id, "keep": True, "priority": 1, "reason": "r"})
    peer.reply(route, m2, "decision", {"frame_id": f2.frame_id, "keep": True, "priority": 1, "reason": "r"})
    pump_until(p, lambda: p.unresolved == 0)
    p.product_arrived(f2.frame_id)
    # the daemon dies before f1's product left it: f1 goes again, f2 does not
    assert p.reprocess_lost_products() == 1
    assert p.states[f1.frame_id].outcome is None and p.states[f2.frame_id].outcome == "decision"
    p.pump()
    _, again = peer.recv()
    assert again.body["frame_id"] == f1.frame_id
    np.testing.assert_array_equal(again.arrays["data"], f1.data)
    peer.reply(route, again, "decision", {"frame_id": f1.frame_id, "keep": True, "priority": 1, "reason": "r2"})
    pump_until(p, lambda: p.unresolved == 0)
    acc = p.accounting()
    assert acc["balanced"] and acc["decided"] == 2 and acc["resent"] == {"product_lost": 1}
    p.close()
    peer.close()


def test_restart_resends_in_flight_and_first_outcome_wins(ctx):
    peer = Peer(ctx, "inproc://frames-2")
    p = Payload(ctx, "inproc://frames-2", window=4)
    (f1,) = frames(1)
    p.add(f1)
    p.pump()
    route, first = peer.recv()
    assert p.peer_restarted() == 1                 # the daemon died with the frame in its queue
    p.pump()
    _, second = peer.recv()
    assert second.id != first.id and p.states[f1.frame_id].attempts == 2
    # the old attempt answers after all (it was processed before the crash): that is the outcome
    peer.reply(route, first, "decision", {"frame_id": f1.frame_id, "keep": True, "priority": 2, "reason": "old"})
    pump_until(p, lambda: p.states[f1.frame_id].outcome == "decision")
    peer.reply(route, second, "decision", {"frame_id": f1.frame_id, "keep": True, "priority": 2, "reason": "new"})
    pump_until(p, lambda: p.duplicates == 1)
    acc = p.accounting()
    assert acc["balanced"] and acc["decided"] == 1 and acc["resent"] == {"daemon_restart": 1}
    assert p.states[f1.frame_id].body["reason"] == "old"
    p.close()
    peer.close()


def test_final_error_is_an_outcome_and_unmatched_replies_are_counted(ctx):
    peer = Peer(ctx, "inproc://frames-3")
    p = Payload(ctx, "inproc://frames-3")
    (f1,) = frames(1)
    p.add(f1)
    p.pump()
    route, m = peer.recv()
    peer.sock.send_multipart([route, *encode(Message("error", {"code": "bad_message", "message": "?"}))])
    peer.reply(route, m, "error", {"code": "invalid_frame", "message": "bad", "frame_id": f1.frame_id})
    pump_until(p, lambda: p.unresolved == 0)
    acc = p.accounting()
    assert acc["errored"] == 1 and acc["error_codes"] == {"invalid_frame": 1}
    assert acc["unmatched_replies"] == 1 and acc["balanced"]
    p.close()
    peer.close()


def test_no_daemon_keeps_frames_in_the_buffer(ctx, tmp_path):
    """IMMEDIATE: while nobody listens a send fails at once and the frame stays ours."""
    endpoint = f"ipc://{tmp_path}/frames.sock"
    p = Payload(ctx, endpoint, retry_s=0.01)
    (f1,) = frames(1)
    p.add(f1)
    assert p.pump() == 0 and list(p.buffer) == [f1.frame_id] and p.send_failures == 1
    peer = Peer(ctx, endpoint)
    pump_until(p, lambda: not p.buffer)
    _, m = peer.recv()
    assert m.body["frame_id"] == f1.frame_id
    p.close()
    peer.close()


def test_ack_timeout_resends(ctx):
    peer = Peer(ctx, "inproc://frames-5")
    p = Payload(ctx, "inproc://frames-5", ack_timeout_s=0.05)
    (f1,) = frames(1)
    p.add(f1)
    p.pump()
    peer.recv()
    pump_until(p, lambda: p.states[f1.frame_id].attempts == 2)
    assert p.resent["ack_timeout"] == 1
    p.close()
    peer.close()


@pytest.mark.parametrize("kind, field", [("truncated", "arrays.data"), ("no_scale", "body.scale"),
                                         ("bad_dtype", "arrays.data.dtype")])
def test_malformed_messages_break_the_contract_where_named(kind, field):
    (f1,) = frames(1)
    with pytest.raises(MessageError) as exc:
        decode(malformed_parts(f1, kind))
    assert exc.value.field == field


def test_malformed_frames_that_decode_are_still_wrong():
    (f1,) = frames(1)
    band_count = decode(malformed_parts(f1, "band_count"))
    assert len(band_count.body["bands"]) != band_count.arrays["data"].shape[0]
    assert "B13" in decode(malformed_parts(f1, "unknown_band")).body["bands"]
    nan = decode(malformed_parts(f1, "not_finite"))
    assert np.isnan(nan.arrays["data"]).any()
    assert set(MALFORMED_KINDS) == {"band_count", "truncated", "no_scale", "unknown_band",
                                    "not_finite", "bad_dtype"}
    with pytest.raises(ValueError, match="unknown kind"):
        malformed_parts(f1, "gremlins")
