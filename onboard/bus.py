"""The daemon's bus: the four sockets named in config, the wake-up pipe, and the outboxes.

    frames      ROUTER  FRAME in; ACK, DECISION, ERROR out (to the payload's routing id)
    commands    ROUTER  COMMAND in; ACK out
    products    PUSH    PRODUCT and SAMPLE out to the downlink
    telemetry   PUB     TELEMETRY out (a slow listener may miss some: by design)

Every socket is a CURVE server whose ZAP domain is its name (onboard.security): only the keys
`[security]` allows for that socket's role connect, and a COMMAND must carry a fresh anti-replay
counter before the daemon sees it. The ZAP handler's socket sits in the same poller.

Only the poller loop's thread touches a socket (they are not thread-safe); other threads wake
it through a pipe the same `zmq.Poller` watches. Nothing sent is dropped silently: a reply to a
payload that is away (ROUTER_MANDATORY says so) and a product the downlink does not pull yet
wait in an outbox, retried every OUTBOX_RETRY_S and at once when a peer speaks again.

The reply outboxes (frames, commands) are bounded per peer and in all, in bytes and in age
(`[limits]` outbox_peer_bytes, outbox_bytes, outbox_max_age_s): past a bound the oldest
messages that may go are dropped, and counted (`outbox_status`, in status and telemetry). A
message may go when its peer is away (its last send was unroutable), or when it is not a
frame's only outcome (an ACK: the DECISION or ERROR follows). A connected payload's outcomes
are never dropped while it reads; one that has taken nothing for outbox_max_age_s (its pipe
full all along) counts as away. The products outbox is bounded by admission
(queue.max_pending_products) instead.

Products go to libzmq one at a time: the next is handed over only once libzmq has let go of
the previous one's buffers (a MessageTracker), because libzmq's pipe (SNDHWM) would otherwise
hold several kept frames' pixels for a downlink that reads slowly. CURVE encrypts each message
part into copies of its own (libzmq's curve_encoding_t::encode: a plaintext copy and the box)
as it writes it, so a product's arrays travel in parts of at most PRODUCT_PART_BYTES
(shared.messages.encode's max_part_bytes: views, no copy): the encryption's copies stay that
small while the frame worker goes on with the next frame on the other core. With a
spill folder a kept frame's product that would wait behind another waits as its path on the
on-board store (`push_spilled`; and at start-up, `resend_spilled`: an earlier process's, not
yet acknowledged) and is read back (onboard.products.read_spilled, one buffer) only when its
turn comes: a backlog costs disk, not memory.

Learning samples (SAMPLE, `push_sample`) share the products outbox, behind the frame's PRODUCT,
but are best effort: never spilled, not counted against admission's product bounds, and a
sample that would make more than MAX_SAMPLES_WAITING samples or MAX_SAMPLE_BYTES_WAITING bytes
of them wait is dropped and counted (`sample_status`: telemetry `learning.samples`).

A reply that cannot be encoded (a value out of bounds that slipped past validation) is answered
with an error reply naming it (`internal`), never an exit: the daemon keeps serving.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import msgpack
import zmq

from onboard.config import DaemonConfig
from onboard.errors import INTERNAL
from onboard.products import read_spilled
from onboard.security import Security
from shared.limits import MAX_ID_CHARS, clip
from shared.messages import Message, MessageError, encode

log = logging.getLogger("onboard.daemon")

POLL_MS = 100                 # longest the loop sleeps: bounds how late a timer or a signal is seen
BACKLOG_POLL_MS = 20          # ... and while an outbox holds messages
MAX_BURST = 64                # messages read from one socket per loop turn (others stay served)
OUTBOX_RETRY_S = 0.25         # unroutable replies are retried this often
PRODUCT_PART_BYTES = 4 << 20  # a product's arrays travel in parts this large at most (CURVE copies per part)
CLOSE_LINGER_MS = 2000        # at exit, queued outgoing messages get this long to leave
PEEK_MAX_BYTES = 1 << 20      # a broken header longer than this is not even peeked at
WAKE = "wake"                 # the name `poll` gives the wake-up pipe's event
MAX_SAMPLES_WAITING = 8       # SAMPLE messages waiting for the downlink at most (best effort)
MAX_SAMPLE_BYTES_WAITING = 64 << 20   # ... and their bytes (one always may wait)


def peek_header(frame: Any) -> tuple[str | None, str | None]:
    """(message id, frame_id) from a header that failed to decode, so even the error about a
    broken message can name which one it was. Never raises."""
    try:
        if len(frame) > PEEK_MAX_BYTES:
            return None, None
        header = msgpack.unpackb(bytes(frame), raw=False)
        msg_id = header.get("id") if isinstance(header.get("id"), str) else None
        body = header.get("body") if isinstance(header.get("body"), dict) else {}
        frame_id = body.get("frame_id") if isinstance(body.get("frame_id"), str) else None
        # An id over the limit is not repeated at all (a prefix would name another frame).
        ok = (lambda v: v if v and len(v) <= MAX_ID_CHARS else None)
        return ok(msg_id), ok(frame_id)
    except Exception:
        return None, None


def peek_parts(parts: list) -> tuple[str | None, str | None]:
    """`peek_header` of a multipart message's first part (None, None for no parts)."""
    return peek_header(parts[0]) if parts else (None, None)


@dataclass
class Pending:
    """One message waiting to leave: its route, encoded parts, size, when it was queued, and
    whether it is a frame's only outcome (a DECISION or ERROR on the frames socket)."""

    route: list
    parts: list
    nbytes: int
    since: float
    outcome: bool = False
    sample_tiles: int = 0       # a SAMPLE's tile count (0: not a SAMPLE)

    @property
    def peer(self) -> bytes:
        return self.route[0] if self.route else b""


@dataclass(frozen=True)
class OutboxLimits:
    peer_bytes: int            # one peer's waiting messages
    total_bytes: int           # every peer's together
    max_age_s: float           # an away peer's message older than this is dropped


@dataclass
class Outbox:
    """Messages waiting to leave one socket, oldest first, with their bytes per peer."""

    name: str
    limits: OutboxLimits | None = None        # None: bounded elsewhere (products)
    items: collections.deque = field(default_factory=collections.deque)
    next_try: float = 0.0
    bytes: int = 0
    peer_bytes: dict = field(default_factory=dict)
    away: set = field(default_factory=set)     # peers whose last send was unroutable
    stalled: dict = field(default_factory=dict)   # connected peer -> since when it takes nothing
    dropped: dict = field(default_factory=lambda: {"messages": 0, "bytes": 0, "outcomes": 0})

    def __len__(self) -> int:
        return len(self.items)

    def append(self, item: Pending) -> None:
        self.items.append(item)
        self._count(item, +1)

    def pop_first(self) -> Pending:
        item = self.items.popleft()
        self._count(item, -1)
        return item

    def take_all(self) -> collections.deque:
        items, self.items = self.items, collections.deque()
        self.bytes, self.peer_bytes = 0, {}
        return items

    def _count(self, item: Pending, sign: int) -> None:
        self.bytes += sign * item.nbytes
        left = self.peer_bytes.get(item.peer, 0) + sign * item.nbytes
        if left > 0:
            self.peer_bytes[item.peer] = left
        else:
            self.peer_bytes.pop(item.peer, None)

    def may_drop(self, item: Pending, now: float) -> bool:
        if item.peer in self.away or not item.outcome:
            return True
        since = self.stalled.get(item.peer)
        return since is not None and now - since > self.limits.max_age_s

    def over(self, item: Pending) -> bool:
        return self.bytes > self.limits.total_bytes or \
            self.peer_bytes.get(item.peer, 0) > self.limits.peer_bytes

    def trim(self, now: float) -> int:
        """Drop, oldest first, what is past the age or the byte bounds and may go; the count."""
        if self.limits is None or not self.items:
            return 0
        old = now - self.limits.max_age_s
        kept, n = collections.deque(), 0
        for item in self.items:
            if self.may_drop(item, now) and ((item.peer in self.away and item.since < old)
                                             or self.over(item)):
                self._count(item, -1)
                self.dropped["messages"] += 1
                self.dropped["bytes"] += item.nbytes
                self.dropped["outcomes"] += item.outcome
                n += 1
            else:
                kept.append(item)
        self.items = kept
        self.away &= self.peer_bytes.keys()      # forget peers with nothing waiting
        for peer in set(self.stalled) - self.peer_bytes.keys():
            del self.stalled[peer]
        return n

    def status(self) -> dict:
        return {"messages": len(self.items), "bytes": self.bytes, "peers": len(self.peer_bytes),
                "away": len(self.away), "dropped": dict(self.dropped)}


def send_tracked(sock: zmq.Socket, parts: list) -> zmq.MessageTracker:
    """Send a multipart message without copying it; the tracker is done once libzmq has let go
    of every part's buffer. Raises zmq.Again (nothing sent) when the socket cannot take it."""
    trackers = []
    for i, part in enumerate(parts):
        more = zmq.SNDMORE if i < len(parts) - 1 else 0
        trackers.append(sock.send(part, zmq.NOBLOCK | more, copy=False, track=True))
    return zmq.MessageTracker(*trackers)


def unencodable_reply(msg: Message, exc: MessageError) -> Message:
    """What answers `msg` when `msg` itself cannot be encoded: an ACK refusing with `internal`,
    or for a frame's outcome an ERROR `internal` (still its one outcome)."""
    text = clip(f"internal: the daemon's {msg.type} reply could not be encoded ({exc})", 512)
    if msg.type == "ack":
        key = "accepted" if "accepted" in msg.body else "ok"
        return Message("ack", {key: False, "code": INTERNAL, "error": text}, ref=msg.ref,
                       source=msg.source)
    frame_id = msg.body.get("frame_id") if isinstance(msg.body, dict) else None
    if not isinstance(frame_id, str) or len(frame_id) > MAX_ID_CHARS:
        frame_id = None
    return Message("error", {"code": INTERNAL, "message": text, "frame_id": frame_id},
                   ref=msg.ref, source=msg.source)


class Bus:
    """The daemon's sockets and outboxes; every method but `wake` runs in the poller's thread."""

    def __init__(self, config: DaemonConfig):
        self.config = config
        self.endpoints: dict[str, str] = {}
        self.sockets: dict[str, zmq.Socket] = {}
        bounds = OutboxLimits(config.outbox_peer_bytes, config.outbox_bytes, config.outbox_max_age_s)
        self.outboxes = {"frames": Outbox("frames", bounds), "commands": Outbox("commands", bounds),
                         "products": Outbox("products")}
        self.unencodable = 0           # replies answered `internal` because they could not be encoded
        # spilled products waiting to go, oldest first: (path, spilled by an earlier process)
        self.spilled: collections.deque[tuple[Path, bool]] = collections.deque()
        self.resent = 0                # an earlier process's spilled products sent since start-up
        self.in_flight: zmq.MessageTracker | None = None   # the product libzmq still holds
        self.samples = {"queued": 0, "sent": 0, "tiles_sent": 0, "bytes_sent": 0, "dropped": 0,
                        "waiting": 0, "waiting_bytes": 0}
        # The pipe exists before the sockets: a signal may ask for a wake-up during start-up.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._ctx: zmq.Context | None = None
        self._poller: zmq.Poller | None = None
        self.security = Security(config)     # reads the keys now: a bad one stops the start

    # ------------------------------------------------------------------ sockets
    def bind(self) -> dict[str, str]:
        """Create and bind every socket named in the config; return the bound endpoints."""
        cfg = self.config
        self._ctx = zmq.Context()
        self.security.start(self._ctx)
        frames = self._ctx.socket(zmq.ROUTER)
        frames.setsockopt(zmq.ROUTER_MANDATORY, 1)   # an absent peer is an error, not a drop
        frames.setsockopt(zmq.ROUTER_HANDOVER, 1)    # a reconnecting payload takes its id back
        frames.setsockopt(zmq.MAXMSGSIZE, int(cfg.max_message_bytes * cfg.socket_limit_factor)
                          + (1 << 20))
        commands = self._ctx.socket(zmq.ROUTER)
        commands.setsockopt(zmq.ROUTER_MANDATORY, 1)
        commands.setsockopt(zmq.MAXMSGSIZE, int(cfg.max_chunk_bytes * cfg.socket_limit_factor)
                            + (1 << 20))
        products = self._ctx.socket(zmq.PUSH)
        products.setsockopt(zmq.SNDHWM, 8)           # the backlog lives in our outbox, visible
        telemetry = self._ctx.socket(zmq.PUB)
        telemetry.setsockopt(zmq.SNDHWM, 100)        # telemetry may drop for a slow listener
        self.sockets = {"frames": frames, "products": products, "commands": commands,
                        "telemetry": telemetry}
        for name, sock in self.sockets.items():
            self.security.secure(sock, name)
            self.endpoints[name] = self._bind_one(name, sock, cfg.endpoints[name])
        self._poller = zmq.Poller()
        for watched in self.security.pollables():      # ZAP requests, handshake failures
            self._poller.register(watched, zmq.POLLIN)
        self._poller.register(frames, zmq.POLLIN)
        self._poller.register(commands, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        return dict(self.endpoints)

    @staticmethod
    def _bind_one(name: str, sock: zmq.Socket, endpoint: str) -> str:
        if endpoint.startswith("ipc://"):
            Path(endpoint[len("ipc://"):]).parent.mkdir(parents=True, exist_ok=True)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            raise OSError(f"endpoints.{name}: cannot bind {endpoint}: {exc}") from None
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def wake(self) -> None:
        """Any thread (or a signal handler): make the poller look at its queues now."""
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass   # the pipe is full: the poller is already due to wake

    # ------------------------------------------------------------------ in
    def poll(self, until: float) -> set[str]:
        """Wait for input, a wake-up, or the monotonic time `until` (sooner while an outbox
        waits); the names of what is ready: "frames", "commands", WAKE."""
        if self.backlog():
            timeout = BACKLOG_POLL_MS
        else:
            timeout = max(0, min(POLL_MS, int((until - time.monotonic()) * 1000) + 1))
        events = dict(self._poller.poll(timeout))
        self.security.serve(events)
        ready = {name for name in ("frames", "commands") if self.sockets[name] in events}
        if self._wake_r in events:
            self._drain_wake_pipe()
            ready.add(WAKE)
        return ready

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def receive(self, name: str, handle: Callable[[list, list], None]) -> None:
        """Hand up to MAX_BURST waiting messages of socket `name` to `handle(route, parts)`."""
        sock = self.sockets[name]
        for _ in range(MAX_BURST):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            # ROUTER prefixes the peer's routing id; a REQ peer adds an empty delimiter.
            split = 2 if len(parts) > 2 and len(parts[1]) == 0 else 1
            route = [p.bytes for p in parts[:split]]
            self._retry_replies()
            refused = self.security.admit_command(parts[split:]) if name == "commands" else None
            if refused is not None:
                self.send(name, route, Message("ack", refused, ref=peek_parts(parts[split:])[0],
                                               source=self.config.name))
                continue
            try:
                handle(route, parts[split:])
            except Exception:          # our bug must cost one message, not the daemon
                log.exception("unexpected failure handling a message from %r", route[0])

    def _retry_replies(self) -> None:
        """A peer spoke: replies waiting for it may now be routable."""
        for name in ("frames", "commands"):
            self.outboxes[name].next_try = 0.0

    # ------------------------------------------------------------------ out
    def send(self, name: str, route: list, msg: Message) -> None:
        """Send `msg` to `route` on socket `name` now, or keep it in that outbox until it can go
        (within the outbox's bounds)."""
        outbox = self.outboxes[name]
        parts = self._encode_reply(msg)
        outcome = name == "frames" and msg.type in ("decision", "error")
        outbox.append(Pending(route, parts, sum(len(p) for p in parts), time.monotonic(), outcome))
        self.flush(name)
        if outbox.items and outbox.over(outbox.items[-1]):
            outbox.trim(time.monotonic())

    def _encode_reply(self, msg: Message) -> list:
        try:
            return encode(msg)
        except MessageError as exc:        # our bug or a value past validation: answer, don't exit
            self.unencodable += 1
            log.error("a %s reply could not be encoded, answered %s instead: %s", msg.type,
                      INTERNAL, clip(str(exc), 200))
            return encode(unencodable_reply(msg, exc))

    def outbox_status(self) -> dict:
        """Each outbox's messages, bytes, peers and what its bounds dropped (status, telemetry)."""
        out = {name: box.status() for name, box in self.outboxes.items()}
        out["products"].update(spilled_waiting=len(self.spilled),
                               spilled_to_resend=sum(again for _, again in self.spilled),
                               spilled_resent=self.resent)
        out["unencodable_replies"] = self.unencodable
        return out

    def push_product(self, msg: Message) -> None:
        """Queue a PRODUCT for the downlink (it leaves at the next flush, in order)."""
        try:
            parts = encode(msg, PRODUCT_PART_BYTES)
        except MessageError as exc:   # a product we cannot encode is our bug: say so, keep serving
            log.error("product of frame %s not sent: %s", msg.body.get("frame_id"), exc)
            return
        self.outboxes["products"].append(Pending([], parts, sum(len(p) for p in parts),
                                                 time.monotonic()))

    def push_sample(self, msg: Message) -> bool:
        """Queue a SAMPLE for the downlink behind what waits there; best effort: dropped (and
        counted) when it cannot be encoded or would pass the samples' bounds. True if queued."""
        counts = self.samples
        try:
            parts = encode(msg, PRODUCT_PART_BYTES)
        except MessageError as exc:
            log.error("samples of frame %s not sent: %s", msg.body.get("frame_id"), exc)
            counts["dropped"] += 1
            return False
        nbytes = sum(len(p) for p in parts)
        if counts["waiting"] and (counts["waiting"] >= MAX_SAMPLES_WAITING
                                  or counts["waiting_bytes"] + nbytes > MAX_SAMPLE_BYTES_WAITING):
            counts["dropped"] += 1
            return False
        self.outboxes["products"].append(Pending([], parts, nbytes, time.monotonic(),
                                                 sample_tiles=len(msg.body["samples"])))
        counts["queued"] += 1
        counts["waiting"] += 1
        counts["waiting_bytes"] += nbytes
        return True

    def sample_status(self) -> dict:
        """SAMPLE messages queued, sent (handed to libzmq: tiles, bytes), dropped, waiting."""
        return dict(self.samples)

    def push_spilled(self, path: Path) -> None:
        """Queue a kept frame's PRODUCT that is on the on-board store (spill_product): read
        back when its turn comes."""
        self.spilled.append((Path(path), False))

    def resend_spilled(self, paths: list[Path]) -> None:
        """Products an earlier process spilled and the ground has not acknowledged: they go
        again, oldest first, after whatever is queued now (the ground ignores a duplicate)."""
        self.spilled.extend((Path(p), True) for p in paths)

    def _read_back_spilled(self) -> bool:
        """Put the next spilled product into the (empty) products outbox; False when none is
        left. A file gone meanwhile was acknowledged; an unreadable one is logged and left on
        disk."""
        outbox = self.outboxes["products"]
        while self.spilled and not outbox.items:
            path, again = self.spilled.popleft()
            try:
                parts = read_spilled(path)
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                log.error("spilled product %s not sent: %s", path, clip(str(exc), 200))
                continue
            outbox.append(Pending([], parts, sum(len(p) for p in parts), time.monotonic()))
            self.resent += again
        return bool(outbox.items)

    def publish(self, msg: Message) -> None:
        """TELEMETRY: sent if the socket takes it now, else dropped (PUB's own rule)."""
        msg.body.setdefault("security", self.security.status())   # what ZAP refused, counted
        msg.body.setdefault("outboxes", self.outbox_status())
        try:
            parts = encode(msg)
        except MessageError as exc:        # a heartbeat we cannot encode must not stop the daemon
            self.unencodable += 1
            log.error("telemetry not sent: %s", clip(str(exc), 200))
            return
        try:
            self.sockets["telemetry"].send_multipart(parts, zmq.NOBLOCK)
        except zmq.Again:
            pass

    def pending(self, name: str) -> int:
        """Messages waiting on socket `name`; for products, the PRODUCTs (waiting or spilled),
        not the SAMPLEs beside them."""
        if name == "products":
            return len(self.outboxes[name]) - self.samples["waiting"] + len(self.spilled)
        return len(self.outboxes[name])

    def product_bytes(self) -> int:
        """Bytes of PRODUCTs waiting in memory (admission's bound; SAMPLEs have their own)."""
        return self.outboxes["products"].bytes - self.samples["waiting_bytes"]

    def backlog(self) -> bool:
        return bool(self.spilled) or any(len(box) for box in self.outboxes.values())

    def flush_all(self) -> None:
        for name in self.outboxes:
            self.flush(name)

    def flush(self, name: str) -> None:
        """Send what an outbox holds, keeping (in order) what cannot go yet; then drop what is
        past the outbox's bounds and may go. Products: `_flush_products`."""
        if name == "products":
            return self._flush_products()
        outbox = self.outboxes[name]
        if not outbox.items or time.monotonic() < outbox.next_try:
            return
        sock = self.sockets[name]
        for item in outbox.take_all():
            try:
                sock.send_multipart([*item.route, *item.parts], zmq.NOBLOCK, copy=False)
                outbox.away.discard(item.peer)
                outbox.stalled.pop(item.peer, None)
            except zmq.Again:
                outbox.append(item)
                outbox.away.discard(item.peer)   # connected, its pipe full: may still read
                outbox.stalled.setdefault(item.peer, time.monotonic())
            except zmq.ZMQError as exc:
                if exc.errno == errno.EHOSTUNREACH:
                    outbox.append(item)   # the payload is away: retry when it is back
                    outbox.away.add(item.peer)
                    outbox.stalled.pop(item.peer, None)
                else:
                    log.error("%s: message to %r not sent: %s", name, item.peer, exc)
        outbox.trim(time.monotonic())
        if not outbox.items:
            outbox.away.clear()
            outbox.stalled.clear()
        outbox.next_try = time.monotonic() + OUTBOX_RETRY_S if outbox.items else 0.0

    def _flush_products(self) -> None:
        """Hand products to libzmq in order, each once libzmq has let go of the one before
        (`in_flight`); a spilled one is read back from disk only then."""
        outbox, sock = self.outboxes["products"], self.sockets["products"]
        while self.in_flight is None or self.in_flight.done:
            self.in_flight = None
            if not outbox.items and not self._read_back_spilled():
                return
            if time.monotonic() < outbox.next_try:
                return
            item = outbox.items[0]
            try:
                self.in_flight = send_tracked(sock, item.parts)
            except zmq.Again:                 # nobody pulling, or its pipe is full: later
                outbox.next_try = time.monotonic() + OUTBOX_RETRY_S
                return
            except zmq.ZMQError as exc:
                log.error("products: message not sent: %s", exc)
            else:
                if item.sample_tiles:
                    self.samples["sent"] += 1
                    self.samples["tiles_sent"] += item.sample_tiles
                    self.samples["bytes_sent"] += item.nbytes
            outbox.pop_first()
            if item.sample_tiles:
                self.samples["waiting"] -= 1
                self.samples["waiting_bytes"] -= item.nbytes
            outbox.next_try = 0.0

    # ------------------------------------------------------------------ close
    def flush_until(self, deadline: float) -> None:
        """At exit: keep flushing until the outboxes are empty or `deadline`; log what is left."""
        while self.backlog() and time.monotonic() < deadline:
            self.flush_all()
            time.sleep(0.02)
        for name, box in self.outboxes.items():
            if len(box):
                log.warning("%d %s messages could not be delivered before exit", len(box), name)

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=CLOSE_LINGER_MS)
        self.security.close()
        if self._ctx is not None:
            self._ctx.term()
        os.close(self._wake_r)
        os.close(self._wake_w)
