"""The payload's link to the daemon: frames out, acks and outcomes back, nothing lost.

A DEALER with a fixed routing id (the daemon recognises it after reconnects) sends FRAME
messages. The payload keeps every frame until its outcome (a DECISION, or an ERROR that is final)
arrives, and the rules for getting there are explicit here:

- a window of at most `window` frames in flight (sent, outcome not yet in): credit-based flow,
  the rest wait in the payload's own buffer (its mass memory);
- ERROR `queue_full` / `shutdown` / `no_model` are refusals, not outcomes: the frame goes back to
  the front of the buffer and is sent again after `retry_s` or as soon as another outcome frees
  a place in the daemon's queue;
- no ACK within `ack_timeout_s`, or no outcome within `outcome_timeout_s`: sent again;
- `peer_restarted()` (the supervisor saw the daemon come back): every frame in flight is sent
  again, since the dead process took its queue with it;
- every send is an attempt with its own message id; the first final outcome for a frame, from
  whichever attempt, is its outcome, later ones are counted as duplicates and ignored;
- a kept frame's pixels stay until its PRODUCT has arrived (`product_arrived`): if the daemon
  dies between the DECISION and the PRODUCT, `reprocess_lost_products()` sends it again.

Sockets are not thread-safe: the scenario's loop calls `pump()` and `handle()` from one thread.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Callable

import msgpack
import numpy as np
import zmq

from flight_sim.camera import CapturedFrame
from flight_sim.errors import ScenarioError
from shared.curve import ClientKeys
from shared.messages import SCHEMA_VERSION, Message, MessageError, decode, encode, new_id

RETRYABLE = frozenset({"queue_full", "shutdown", "no_model"})


@dataclass
class FrameState:
    frame: CapturedFrame
    attempts: int = 0
    current: str | None = None          # message id of the attempt in flight
    acked: bool = False
    first_sent: float | None = None     # time.monotonic()
    last_sent: float | None = None
    acked_at: float | None = None
    outcome: str | None = None          # "decision" | "error" | "gave_up"
    outcome_at: float | None = None
    body: dict | None = None            # the DECISION or final ERROR body
    refusals: list[str] = field(default_factory=list)
    resends: collections.Counter = field(default_factory=collections.Counter)
    awaiting_product: bool = False      # kept, product not yet in: the pixels stay

    @property
    def in_flight(self) -> bool:
        return self.current is not None and self.outcome is None


def malformed_parts(frame: CapturedFrame, kind: str) -> list[bytes]:
    """A FRAME message broken in the way `kind` names, header still carrying id and frame_id so
    the daemon's error can be matched to it. Built by hand: `encode` refuses such messages."""
    data = frame.data
    body = frame.body()
    arrays = [{"name": "data", "dtype": data.dtype.name, "shape": list(data.shape)}]
    payload = [np.ascontiguousarray(data).tobytes()]
    if kind == "band_count":               # 1 band name fewer than planes
        body["bands"] = body["bands"][:-1]
    elif kind == "truncated":              # fewer bytes than the header's shape says
        payload = [payload[0][: len(payload[0]) // 2]]
    elif kind == "no_scale":               # a required body field missing
        body.pop("scale")
    elif kind == "unknown_band":           # a band name that does not exist
        body["bands"] = body["bands"][:-1] + ["B13"]
    elif kind == "not_finite":             # float32 reflectance with NaN in it
        f = data.astype(np.float32) * np.float32(frame.scale)
        f[:, :4, :4] = np.nan
        body["scale"] = 1.0
        arrays = [{"name": "data", "dtype": "float32", "shape": list(f.shape)}]
        payload = [f.tobytes()]
    elif kind == "bad_dtype":              # a dtype a frame may not carry
        arrays = [{"name": "data", "dtype": "float64", "shape": list(data.shape)}]
        payload = [data.astype(np.float64).tobytes()]
    else:
        raise ScenarioError(f"faults.malformed: unknown kind {kind!r}; known: {', '.join(MALFORMED_KINDS)}")
    header = {"type": "frame", "schema": SCHEMA_VERSION, "id": new_id(), "ref": None,
              "ts": time.time(), "source": "payload", "body": body, "arrays": arrays}
    return [msgpack.packb(header, use_bin_type=True), *payload]


MALFORMED_KINDS = ("band_count", "truncated", "no_scale", "unknown_band", "not_finite", "bad_dtype")


class Payload:
    def __init__(self, ctx: zmq.Context, endpoint: str, routing_id: bytes = b"payload-1", *,
                 window: int = 6, retry_s: float = 0.25, ack_timeout_s: float = 10.0,
                 outcome_timeout_s: float = 300.0, max_attempts: int = 200,
                 on_event: Callable[[str, FrameState, dict], None] | None = None,
                 keys: ClientKeys | None = None):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        self.sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:             # the payload role's CURVE keys (shared.curve)
            keys.apply(self.sock)
        # Queue only on a live connection: while the daemon is down a send fails at once and
        # the frame stays in our buffer, instead of sitting in a pipe that a restart may drop.
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.connect(endpoint)
        self.window, self.retry_s = window, retry_s
        self.ack_timeout_s, self.outcome_timeout_s = ack_timeout_s, outcome_timeout_s
        self.max_attempts = max_attempts
        self.on_event = on_event or (lambda kind, state, info: None)
        self.states: dict[str, FrameState] = {}          # frame_id -> state, in send order
        self.buffer: collections.deque[str] = collections.deque()   # frame ids waiting to go
        self._by_msg: dict[str, str] = {}               # message id of any attempt -> frame_id
        self._raw: dict[str, str] = {}                  # frame_id -> malformed kind
        self._hold_until = 0.0                          # after a refusal: pause sending
        self.duplicates = 0
        self.unmatched = 0
        self.refusals: collections.Counter = collections.Counter()
        self.resent: collections.Counter = collections.Counter()
        self.max_buffer = 0
        self.send_failures = 0

    # ------------------------------------------------------------------ intake
    def add(self, frame: CapturedFrame, malformed: str | None = None) -> None:
        if frame.frame_id in self.states:
            raise ValueError(f"frame {frame.frame_id} already added")
        if malformed:
            frame.kind = malformed
            self._raw[frame.frame_id] = malformed
        self.states[frame.frame_id] = FrameState(frame)
        self.buffer.append(frame.frame_id)
        self.max_buffer = max(self.max_buffer, len(self.buffer))

    @property
    def in_flight(self) -> int:
        return sum(1 for s in self.states.values() if s.in_flight)

    @property
    def unresolved(self) -> int:
        return sum(1 for s in self.states.values() if s.outcome is None)

    # ------------------------------------------------------------------ sending
    def pump(self, now: float | None = None) -> int:
        """Send what the window and the daemon's last refusal allow; returns frames sent."""
        now = time.monotonic() if now is None else now
        self._check_timeouts(now)
        sent = 0
        while self.buffer and now >= self._hold_until and self.in_flight < self.window:
            frame_id = self.buffer[0]
            state = self.states[frame_id]
            if state.outcome is not None:               # resolved while waiting (late outcome)
                self.buffer.popleft()
                continue
            if not self._send(state, now):
                self._hold_until = now + self.retry_s   # no connection: the daemon is down
                break
            self.buffer.popleft()
            sent += 1
        return sent

    def _send(self, state: FrameState, now: float) -> bool:
        frame = state.frame
        if frame.frame_id in self._raw:
            parts = malformed_parts(frame, self._raw[frame.frame_id])
            msg_id = msgpack.unpackb(parts[0], raw=False)["id"]
        else:
            msg = Message("frame", frame.body(), {"data": frame.data}, source="payload")
            parts, msg_id = encode(msg), msg.id
        try:
            self.sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.send_failures += 1
            return False
        state.attempts += 1
        state.current, state.acked = msg_id, False
        state.first_sent = state.first_sent or now
        state.last_sent = now
        self._by_msg[msg_id] = frame.frame_id
        self.on_event("sent", state, {"attempt": state.attempts})
        return True

    def _requeue(self, state: FrameState, why: str, front: bool = True) -> None:
        state.current = None
        if state.attempts >= self.max_attempts:
            self._resolve(state, "gave_up", {"code": "gave_up", "message":
                                             f"{state.attempts} attempts, last refusal {why}"})
            return
        state.resends[why] += 1
        self.resent[why] += 1
        (self.buffer.appendleft if front else self.buffer.append)(state.frame.frame_id)
        self.max_buffer = max(self.max_buffer, len(self.buffer))

    def _check_timeouts(self, now: float) -> None:
        for state in list(self.states.values()):
            if not state.in_flight:
                continue
            if not state.acked and now - state.last_sent > self.ack_timeout_s:
                self._requeue(state, "ack_timeout")
            elif state.acked and now - state.last_sent > self.outcome_timeout_s:
                self._requeue(state, "outcome_timeout")

    def peer_restarted(self) -> int:
        """The daemon process was replaced: resend every frame that was in flight, oldest first."""
        lost = [s for s in self.states.values() if s.in_flight]
        for state in reversed(lost):
            self._requeue(state, "daemon_restart")
        self._hold_until = 0.0
        return len(lost)

    # ------------------------------------------------------------------ receiving
    def handle(self, parts: list) -> None:
        try:
            msg = decode(parts)
        except MessageError:
            self.unmatched += 1
            return
        frame_id = self._by_msg.get(msg.ref or "")
        if frame_id is None:
            self.unmatched += 1
            return
        state = self.states[frame_id]
        current = msg.ref == state.current
        if msg.type == "ack":
            if current:
                state.acked, state.acked_at = True, time.monotonic()
            return
        if state.outcome is not None:                 # an older attempt answered too
            self.duplicates += 1
            return
        if msg.type == "error" and msg.body.get("code") in RETRYABLE:
            self.refusals[msg.body["code"]] += 1
            if current:
                state.refusals.append(msg.body["code"])
                self._hold_until = time.monotonic() + self.retry_s
                self._requeue(state, msg.body["code"])
                self.on_event("refused", state, {"code": msg.body["code"]})
            return
        if msg.type in ("decision", "error"):
            self._resolve(state, msg.type, msg.body)
            self._hold_until = 0.0                    # a place in the daemon's queue is free
            return
        self.unmatched += 1

    def _resolve(self, state: FrameState, outcome: str, body: dict) -> None:
        state.outcome, state.outcome_at, state.body = outcome, time.monotonic(), dict(body)
        state.current = None
        if outcome == "decision" and body.get("keep") and state.frame.data is not None:
            state.awaiting_product = True          # its product may yet be lost with the daemon
        else:
            state.frame.release_data()
        self.on_event(outcome, state, {})

    def product_arrived(self, frame_id: str) -> None:
        state = self.states.get(frame_id)
        if state is not None and state.awaiting_product:
            state.awaiting_product = False
            state.frame.release_data()

    def reprocess_lost_products(self) -> int:
        """After the daemon died: kept frames whose product never came are sent again (their
        outcome is reopened; the new decision replaces the lost one)."""
        lost = [s for s in self.states.values() if s.awaiting_product]
        for state in reversed(lost):
            state.awaiting_product = False
            state.outcome = state.outcome_at = state.body = None
            self._requeue(state, "product_lost")
        return len(lost)

    # ------------------------------------------------------------------ end
    def close(self) -> None:
        self.sock.close(linger=0)

    def accounting(self) -> dict:
        """What happened to every frame handed to the payload."""
        outcomes = collections.Counter(s.outcome or "pending" for s in self.states.values())
        error_codes = collections.Counter(s.body.get("code", "?") for s in self.states.values()
                                          if s.outcome == "error")
        sent = sum(1 for s in self.states.values() if s.attempts > 0)
        return {"frames": len(self.states), "sent": sent, "decided": outcomes["decision"],
                "errored": outcomes["error"], "gave_up": outcomes["gave_up"],
                "pending": outcomes["pending"], "error_codes": dict(error_codes),
                "attempts": sum(s.attempts for s in self.states.values()),
                "refusals": dict(self.refusals), "resent": dict(self.resent),
                "duplicates_ignored": self.duplicates, "unmatched_replies": self.unmatched,
                "max_buffer": self.max_buffer,
                "balanced": sent == len(self.states) and outcomes["pending"] == 0
                and outcomes["decision"] + outcomes["error"] + outcomes["gave_up"] == sent}
