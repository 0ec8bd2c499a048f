"""The daemon's bus: the four sockets named in config, the wake-up pipe, and the outboxes.

    frames      ROUTER  FRAME in; ACK, DECISION, ERROR out (to the payload's routing id)
    commands    ROUTER  COMMAND in; ACK out
    products    PUSH    PRODUCT out to the downlink
    telemetry   PUB     TELEMETRY out (a slow listener may miss some: by design)

Every socket is a CURVE server whose ZAP domain is its name (onboard.security): only the keys
`[security]` allows for that socket's role connect, and a COMMAND must carry a fresh anti-replay
counter before the daemon sees it. The ZAP handler's socket sits in the same poller.

Only the poller loop's thread touches a socket (they are not thread-safe); other threads wake
it through a pipe the same `zmq.Poller` watches. Nothing sent is dropped silently: a reply to a
payload that is away (ROUTER_MANDATORY says so) and a product the downlink does not pull yet
wait in an outbox, retried every OUTBOX_RETRY_S and at once when a peer speaks again.
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
from onboard.security import Security
from shared.messages import Message, MessageError, encode

log = logging.getLogger("onboard.daemon")

POLL_MS = 100                 # longest the loop sleeps: bounds how late a timer or a signal is seen
BACKLOG_POLL_MS = 20          # ... and while an outbox holds messages
MAX_BURST = 64                # messages read from one socket per loop turn (others stay served)
OUTBOX_RETRY_S = 0.25         # unroutable replies are retried this often
MAX_OUTBOX = 4096             # replies kept for absent payloads; beyond, the oldest are dropped (logged)
CLOSE_LINGER_MS = 2000        # at exit, queued outgoing messages get this long to leave
PEEK_MAX_BYTES = 1 << 20      # a broken header longer than this is not even peeked at
WAKE = "wake"                 # the name `poll` gives the wake-up pipe's event


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
        return (msg_id[:64] if msg_id else None), (frame_id[:256] if frame_id else None)
    except Exception:
        return None, None


def peek_parts(parts: list) -> tuple[str | None, str | None]:
    """`peek_header` of a multipart message's first part (None, None for no parts)."""
    return peek_header(parts[0]) if parts else (None, None)


@dataclass
class Outbox:
    """Messages waiting to leave one socket, oldest first: (route, encoded parts)."""

    name: str
    items: collections.deque = field(default_factory=collections.deque)
    next_try: float = 0.0

    def __len__(self) -> int:
        return len(self.items)


class Bus:
    """The daemon's sockets and outboxes; every method but `wake` runs in the poller's thread."""

    def __init__(self, config: DaemonConfig):
        self.config = config
        self.endpoints: dict[str, str] = {}
        self.sockets: dict[str, zmq.Socket] = {}
        self.outboxes = {name: Outbox(name) for name in ("frames", "commands", "products")}
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
        zap = self.security.start(self._ctx)
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
        if zap is not None:
            self._poller.register(zap, zmq.POLLIN)
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
        if self.security.zap in events:
            self.security.serve_zap()
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
        """Send `msg` to `route` on socket `name` now, or keep it in that outbox until it can go."""
        outbox = self.outboxes[name]
        outbox.items.append((route, encode(msg)))
        if len(outbox) > MAX_OUTBOX:
            route_, _ = outbox.items.popleft()
            log.error("%s outbox over %d messages: dropped the oldest reply (peer %r gone?)",
                      name, MAX_OUTBOX, route_[0] if route_ else None)
        self.flush(name)

    def push_product(self, msg: Message) -> None:
        """Queue a PRODUCT for the downlink (it leaves at the next flush, in order)."""
        try:
            parts = encode(msg)
        except MessageError as exc:   # a product we cannot encode is our bug: say so, keep serving
            log.error("product of frame %s not sent: %s", msg.body.get("frame_id"), exc)
            return
        self.outboxes["products"].items.append(([], parts))

    def publish(self, msg: Message) -> None:
        """TELEMETRY: sent if the socket takes it now, else dropped (PUB's own rule)."""
        msg.body.setdefault("security", self.security.status())   # what ZAP refused, counted
        try:
            self.sockets["telemetry"].send_multipart(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def pending(self, name: str) -> int:
        return len(self.outboxes[name])

    def backlog(self) -> bool:
        return any(len(box) for box in self.outboxes.values())

    def flush_all(self) -> None:
        for name in self.outboxes:
            self.flush(name)

    def flush(self, name: str) -> None:
        """Send what an outbox holds, keeping (in order) what cannot go yet."""
        outbox = self.outboxes[name]
        if not outbox.items or time.monotonic() < outbox.next_try:
            return
        sock = self.sockets[name]
        kept = collections.deque()
        blocked = False
        while outbox.items:
            route, parts = outbox.items.popleft()
            if blocked and name == "products":
                kept.append((route, parts))
                continue
            try:
                sock.send_multipart([*route, *parts], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                kept.append((route, parts))
                blocked = True           # PUSH: nobody pulling or HWM reached; keep the order
            except zmq.ZMQError as exc:
                if exc.errno == errno.EHOSTUNREACH:
                    kept.append((route, parts))   # the payload is away: retry when it is back
                else:
                    log.error("%s: message to %r not sent: %s", name, route[0] if route else None, exc)
        outbox.items = kept
        outbox.next_try = time.monotonic() + OUTBOX_RETRY_S if kept else 0.0

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
