"""The on-board daemon process: the bus endpoints around the frame pipeline and the model store.

Read top to bottom: sockets (named in config) -> the poller loop -> frames in (admission,
ack, queue) -> the frame worker -> outcomes back (decision or error, product to the downlink)
-> commands -> telemetry -> shutdown.

Threads, and why:
- the poller loop (the main thread) is the only thread that touches a ZeroMQ socket (they are
  not thread-safe);
- the frame worker runs `FramePipeline.process` on accepted frames one at a time (OpenVINO
  spreads one frame's tiles over the cores itself), so a 2-second frame never stalls the sockets;
- the admin worker runs installs and rollbacks (load + self-test take seconds).
Workers hand results back through a `queue.Queue` and wake the poller by writing one byte to
a pipe that the same `zmq.Poller` watches (a wake-up that needs no socket in their thread).

Delivery rules (docs/onboard.md): every FRAME is answered at once with an ACK (accepted) or an
ERROR (refused: that is its outcome); every accepted frame later gets exactly one DECISION or
ERROR, with `ref` = the FRAME's id. The queue is bounded: a full one refuses with `queue_full`,
never drops. Replies to a payload that is gone for a while wait in an outbox (ROUTER_MANDATORY
tells us) and go out when it reconnects with the same routing id. Products wait in an outbox
while the downlink does not pull, and while that outbox is full new frames are refused.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import msgpack
import numpy as np
import zmq

from onboard.commands import COMMANDS, CommandFailed, Uploads
from onboard.config import DaemonConfig
from onboard.store import InstallResult, ModelStore, StoreError
from onboard.telemetry import FrameCounters, Heartbeat, LatencyTracker, rss_mb
from shared.messages import Limits, Message, MessageError, decode, encode

log = logging.getLogger("onboard.daemon")

POLL_MS = 100                 # longest the loop sleeps: bounds how late a timer or a signal is seen
MAX_BURST = 64                # messages read from one socket per loop turn (others stay served)
OUTBOX_RETRY_S = 0.25         # unroutable replies are retried this often
MAX_OUTBOX = 4096             # replies kept for absent payloads; beyond, the oldest are dropped (logged)
CLOSE_LINGER_MS = 2000        # at exit, queued outgoing messages get this long to leave


def plain(value: Any) -> Any:
    """JSON/msgpack-ready copy of stats and decisions (numpy scalars and arrays become lists)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "as_dict"):
        return plain(value.as_dict())
    return value


def peek_header(frame: Any) -> tuple[str | None, str | None]:
    """(message id, frame_id) from a header that failed to decode, so even the error about a
    broken message can name which one it was. Never raises."""
    try:
        if len(frame) > (1 << 20):
            return None, None
        header = msgpack.unpackb(bytes(frame), raw=False)
        msg_id = header.get("id") if isinstance(header.get("id"), str) else None
        body = header.get("body") if isinstance(header.get("body"), dict) else {}
        frame_id = body.get("frame_id") if isinstance(body.get("frame_id"), str) else None
        return (msg_id[:64] if msg_id else None), (frame_id[:256] if frame_id else None)
    except Exception:
        return None, None


@dataclass
class FrameJob:
    """An accepted frame, from admission to its one outcome."""

    route: list            # [routing id] (+ b"" when the peer is a REQ socket)
    msg: Message           # the decoded FRAME; its array is a view of the received bytes
    accepted_at: float
    started_at: float | None = None
    done: bool = False     # outcome sent (or cancelled at shutdown): a late result is ignored

    @property
    def frame_id(self) -> str:
        return self.msg.body["frame_id"]


@dataclass
class Outbox:
    """Messages waiting to leave one socket, oldest first."""

    name: str
    items: collections.deque = field(default_factory=collections.deque)
    next_try: float = 0.0

    def __len__(self) -> int:
        return len(self.items)


class Daemon:
    def __init__(self, config: DaemonConfig, store: ModelStore | None = None):
        self.config = config
        self.store = store or ModelStore(config.store_root, config.public_key, device=config.device,
                                         num_requests=config.num_requests or None, exclusive=True)
        self.uploads = Uploads(config.uploads, config.max_upload_bytes, config.max_chunk_bytes)
        self.frame_limits = Limits(max_array_bytes=config.max_message_bytes)
        self.command_limits = Limits(max_array_bytes=config.max_chunk_bytes)
        self.counters = FrameCounters()
        self.latency = LatencyTracker(config.telemetry_window)
        self.heartbeat = Heartbeat()
        self.endpoints: dict[str, str] = {}
        self._model_lock = threading.Lock()
        self._model: tuple[Any, Any] | None = None        # (SlotInfo, pipeline)
        self._model_error: str | None = None
        self._pending: dict[str, FrameJob] = {}          # FRAME message id -> job
        self._jobs: queue.Queue = queue.Queue()          # bounded by admission, not by the Queue
        self._admin: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._admin_busy = False
        self._stopping: str | None = None
        self._drain_deadline = 0.0
        self._next_telemetry = 0.0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._ctx: zmq.Context | None = None
        self.threads_finished = True

    # ================================================================== model
    def load_model(self) -> None:
        """Bring back the active model at start-up; if its slot fails its checks, fall back to
        the previous one (a satellite should serve something without waiting for a ground pass)."""
        try:
            info, pipeline = self.store.load_active()
        except StoreError as exc:
            self._model_error = f"active model failed its start-up check: {exc}"
            log.error(self._model_error)
            if self.store.previous() is not None:
                result = self.store.rollback()
                if result.ok:
                    log.warning("fell back to the previous model %s v%s", result.model_id, result.version)
                    self._set_model(self.store.active(), result.pipeline)
                    return
                log.error("fallback to the previous model failed too: %s", result.reason)
            return
        if info is None:
            self._model_error = "no model installed yet (install a bundle)"
            log.warning(self._model_error)
            return
        self._set_model(info, pipeline)
        log.info("serving %s v%d from slot %s on %s", info.model_id, info.version, info.slot,
                 self.config.device)

    def _set_model(self, info, pipeline) -> None:
        override = self.store.policy_override()
        if override is not None:
            try:
                self._apply_policy(pipeline, override)
            except ValueError as exc:       # a stored override the model cannot take: its own policy
                log.error("stored policy override not applied (%s); using the bundle's policy", exc)
        with self._model_lock:
            self._model = (info, pipeline)
            self._model_error = None

    def model_info(self) -> dict | None:
        with self._model_lock:
            model = self._model
        if model is None:
            return None
        return {"id": model[0].model_id, "version": model[0].version, "slot": model[0].slot}

    def install(self, path: Path) -> dict:
        """Admin thread: the store's install; on success the new model serves the next frame."""
        result = self.store.install(path)
        if result.ok:
            self._set_model(self.store.active(), result.pipeline)
        return result.as_dict()

    def rollback(self) -> dict:
        result = self.store.rollback()
        if result.ok:
            self._set_model(self.store.active(), result.pipeline)
        return result.as_dict()

    @staticmethod
    def _apply_policy(pipeline, policy: dict) -> None:
        pipeline.set_policy(policy)

    def set_policy(self, policy: dict | None) -> dict:
        from shared.policy import PolicyError, validate_policy
        with self._model_lock:
            model = self._model
        if model is None:
            raise CommandFailed("no_model: no active model to set a policy for")
        info, pipeline = model
        effective = info.manifest.get("policy") if policy is None else policy
        try:
            validate_policy(effective, info.manifest["output"]["classes"])
        except PolicyError as exc:
            raise CommandFailed(f"args.{exc}") from None
        try:                            # on disk first: what serves must survive a restart
            self.store.set_policy_override(policy)
        except (StoreError, OSError) as exc:
            raise CommandFailed(f"policy not stored: {exc}") from None
        self._apply_policy(pipeline, effective)
        return {"policy": effective, "source": "bundle" if policy is None else "command",
                "model": self.model_info()}

    # ================================================================== sockets
    def bind(self) -> dict[str, str]:
        """Create and bind every socket named in the config; return the bound endpoints."""
        cfg = self.config
        self._ctx = zmq.Context()
        socket_limit = int(cfg.max_message_bytes * cfg.socket_limit_factor) + (1 << 20)
        self.frames = self._ctx.socket(zmq.ROUTER)
        self.frames.setsockopt(zmq.ROUTER_MANDATORY, 1)   # an absent peer is an error, not a drop
        self.frames.setsockopt(zmq.ROUTER_HANDOVER, 1)    # a reconnecting payload takes its id back
        self.frames.setsockopt(zmq.MAXMSGSIZE, socket_limit)
        self.commands = self._ctx.socket(zmq.ROUTER)
        self.commands.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.commands.setsockopt(zmq.MAXMSGSIZE, int(cfg.max_chunk_bytes * cfg.socket_limit_factor)
                                 + (1 << 20))
        self.products = self._ctx.socket(zmq.PUSH)
        self.products.setsockopt(zmq.SNDHWM, 8)           # the backlog lives in our outbox, visible
        self.telemetry = self._ctx.socket(zmq.PUB)
        self.telemetry.setsockopt(zmq.SNDHWM, 100)        # telemetry may drop for a slow listener
        for name, sock in (("frames", self.frames), ("products", self.products),
                           ("commands", self.commands), ("telemetry", self.telemetry)):
            endpoint = cfg.endpoints[name]
            if endpoint.startswith("ipc://"):
                Path(endpoint[len("ipc://"):]).parent.mkdir(parents=True, exist_ok=True)
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as exc:
                raise OSError(f"endpoints.{name}: cannot bind {endpoint}: {exc}") from None
            self.endpoints[name] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.outboxes = {"frames": Outbox("frames"), "commands": Outbox("commands"),
                         "products": Outbox("products")}
        self.poller = zmq.Poller()
        self.poller.register(self.frames, zmq.POLLIN)
        self.poller.register(self.commands, zmq.POLLIN)
        self.poller.register(self._wake_r, zmq.POLLIN)
        return dict(self.endpoints)

    def wake(self) -> None:
        """Any thread (or a signal handler): make the poller look at its queues now."""
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass   # the pipe is full: the poller is already due to wake

    # ================================================================== the loop
    def run(self) -> int:
        """Serve until SIGTERM or the shutdown command, then drain and return 0."""
        workers = [threading.Thread(target=self._frame_worker, name="frame-worker", daemon=True),
                   threading.Thread(target=self._admin_worker, name="admin-worker", daemon=True)]
        for worker in workers:
            worker.start()
        self._publish_telemetry()
        while True:
            events = dict(self.poller.poll(self._poll_timeout_ms()))
            if self._wake_r in events:
                self._drain_wake_pipe()
            if self.frames in events:
                self._receive(self.frames, self._on_frame)
            if self.commands in events:
                self._receive(self.commands, self._on_command)
            self._collect_results()
            self._flush_all()
            if time.monotonic() >= self._next_telemetry:
                self._publish_telemetry()
            if self._stopping and self._drained():
                break
        self._close(workers)
        return 0

    def _poll_timeout_ms(self) -> int:
        if any(len(box) for box in self.outboxes.values()):
            return 20
        return max(0, min(POLL_MS, int((self._next_telemetry - time.monotonic()) * 1000) + 1))

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _receive(self, sock: zmq.Socket, handle: Callable[[list, list], None]) -> None:
        for _ in range(MAX_BURST):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            # ROUTER prefixes the peer's routing id; a REQ peer adds an empty delimiter.
            split = 2 if len(parts) > 2 and len(parts[1]) == 0 else 1
            route = [p.bytes for p in parts[:split]]
            self._retry_route(route[0])
            try:
                handle(route, parts[split:])
            except Exception:          # our bug must cost one message, not the daemon
                log.exception("unexpected failure handling a message from %r", route[0])

    # ================================================================== frames in
    def _on_frame(self, route: list, parts: list) -> None:
        size = sum(len(p) for p in parts)
        if size > self.config.max_message_bytes:
            msg_id, frame_id = peek_header(parts[0]) if parts else (None, None)
            return self._refuse(route, msg_id, frame_id, "too_large",
                                f"message is {size} bytes, over the limit of "
                                f"{self.config.max_message_bytes} (limits.max_message_bytes)", "message")
        try:
            msg = decode(parts, self.frame_limits)
        except MessageError as exc:
            msg_id, frame_id = peek_header(parts[0]) if parts else (None, None)
            code = "invalid_frame" if exc.field.startswith("arrays") else "bad_message"
            return self._refuse(route, msg_id, frame_id, code, str(exc), exc.field)
        if msg.type != "frame":
            return self._refuse(route, msg.id, None, "bad_message",
                                f"the frames socket takes frame messages, got a {msg.type!r} message",
                                "type")
        frame_id = msg.body["frame_id"]
        if self._stopping:
            return self._refuse(route, msg.id, frame_id, "shutdown",
                                f"the daemon is shutting down ({self._stopping}); send it again later")
        with self._model_lock:
            model = self._model
        if model is None:
            return self._refuse(route, msg.id, frame_id, "no_model",
                                f"no active model: {self._model_error or 'install a bundle first'}")
        problem = self._frame_problem(msg, model[0].manifest)
        if problem:
            return self._refuse(route, msg.id, frame_id, "invalid_frame", problem[1], problem[0])
        if len(self._pending) >= self.config.max_frames:
            return self._refuse(route, msg.id, frame_id, "queue_full",
                                f"{len(self._pending)} frames pending, the limit is "
                                f"{self.config.max_frames} (queue.max_frames); send it again after an outcome",
                                details={"queue_depth": len(self._pending)})
        if len(self.outboxes["products"]) >= self.config.max_pending_products:
            return self._refuse(route, msg.id, frame_id, "queue_full",
                                f"{len(self.outboxes['products'])} products wait for the downlink "
                                f"(queue.max_pending_products); send it again later",
                                details={"queue_depth": len(self._pending)})
        job = FrameJob(route, msg, time.monotonic())
        self._pending[msg.id] = job
        self.counters.accepted += 1
        self._jobs.put(job)
        self._send_route("frames", route, msg.reply(
            "ack", {"accepted": True, "queue_depth": len(self._pending), "frame_id": frame_id}, source=self.config.name))

    @staticmethod
    def _frame_problem(msg: Message, manifest: dict) -> tuple[str, str] | None:
        """Cheap checks at the door (shape against bands, bands the model needs); the pipeline
        checks the values themselves (NaN, Inf) in the worker."""
        from shared.bands import UnknownBandError, canonical_band
        data, bands = msg.arrays["data"], msg.body["bands"]
        if data.shape[0] != len(bands):
            return "arrays.data.shape", (f"data has {data.shape[0]} bands (shape {list(data.shape)}) "
                                         f"but body.bands names {len(bands)}")
        if data.shape[1] == 0 or data.shape[2] == 0:
            return "arrays.data.shape", f"empty frame (shape {list(data.shape)})"
        try:
            have = {canonical_band(b) for b in bands}
        except UnknownBandError as exc:
            return "body.bands", str(exc)
        missing = [b for b in manifest["input"]["bands"] if b not in have]
        if missing:
            return "body.bands", (f"the model needs bands {', '.join(missing)} which the frame "
                                  f"lacks (it has {', '.join(bands)})")
        return None

    def _refuse(self, route: list, ref: str | None, frame_id: str | None, code: str, message: str,
                field_: str | None = None, details: dict | None = None) -> None:
        """A frame the daemon cannot take: its ERROR, sent at once, is its outcome."""
        self.counters.rejected += 1
        log.info("refused frame %s: %s: %s", frame_id, code, message)
        body = {"code": code, "message": message, "frame_id": frame_id, "field": field_}
        if details:
            body["details"] = details
        reply = Message("error", body, ref=ref, source=self.config.name)
        self._send_route("frames", route, reply)

    # ================================================================== the frame worker
    def _frame_worker(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.done:           # cancelled at shutdown while it waited
                continue
            job.started_at = time.monotonic()
            with self._model_lock:
                model = self._model
            try:
                info, pipeline = model
                body = job.msg.body
                result = pipeline.process(job.msg.arrays["data"], body["bands"], body["scale"])
                outcome = ("decision", info, result)
            except Exception as exc:      # the frame fails, the daemon goes on
                if type(exc).__name__ == "FrameError":   # the pipeline's verdict on a bad frame
                    outcome = ("error", getattr(exc, "code", "invalid_frame"), str(exc))
                else:
                    log.exception("frame %s failed in the pipeline", job.frame_id)
                    outcome = ("error", "internal", f"{type(exc).__name__}: {exc}")
            self._results.put(("frame", job, outcome))
            self.wake()

    # ================================================================== the admin worker
    def _admin_worker(self) -> None:
        while True:
            item = self._admin.get()
            if item is None:
                return
            route, msg, cmd = item
            body = self._run_command(cmd, msg)
            self._results.put(("command", route, msg, body))
            self.wake()

    # ================================================================== outcomes
    def _collect_results(self) -> None:
        while True:
            try:
                item = self._results.get_nowait()
            except queue.Empty:
                return
            if item[0] == "frame":
                self._frame_outcome(item[1], item[2])
            else:
                _, route, msg, body = item
                self._admin_busy = False
                self._send_route("commands", route, msg.reply("ack", body, source=self.config.name))

    def _frame_outcome(self, job: FrameJob, outcome: tuple) -> None:
        if job.done:
            return
        job.done = True
        self._pending.pop(job.msg.id, None)
        now = time.monotonic()
        waited_ms = ((job.started_at or now) - job.accepted_at) * 1000
        if outcome[0] == "error":
            self.counters.errored += 1
            _, code, message = outcome
            self._send_route("frames", job.route, job.msg.reply(
                "error", {"code": code, "message": message, "frame_id": job.frame_id},
                source=self.config.name))
            return
        _, info, result = outcome
        self.counters.decided += 1
        timings = plain(result.timings_ms)
        # The pipeline's own total becomes "process"; "total" is the daemon's: accepted -> outcome.
        timings["process"] = timings.pop("total", None)
        timings.update(queue=waited_ms, total=(now - job.accepted_at) * 1000)
        self.latency.add(timings)
        model = {"id": info.model_id, "version": info.version}
        decision = {"frame_id": job.frame_id, "keep": bool(result.keep),
                    "priority": int(result.priority), "reason": str(result.reason),
                    "stats": plain(result.stats), "tile_decisions": plain(result.tile_decisions),
                    "timings_ms": timings, "model": model}
        self._send_route("frames", job.route, job.msg.reply("decision", decision,
                                                            source=self.config.name))
        if result.keep:
            self.counters.kept += 1
            self._queue_product(job, info, result, model)

    def _queue_product(self, job: FrameJob, info, result, model: dict) -> None:
        body = job.msg.body
        product = {"frame_id": job.frame_id, "priority": int(result.priority),
                   "reason": str(result.reason), "stats": plain(result.stats),
                   "classes": list(info.manifest["output"]["classes"]),
                   "tiles": [t for t in plain(result.tile_decisions) if t.get("keep", True)],
                   "model": model}
        for key in ("scene", "index", "acquired"):
            if key in body:
                product[key] = body[key]
        msg = Message("product", product, dict(result.products or {}), ref=job.msg.id,
                      source=self.config.name)
        try:
            parts = encode(msg)
        except MessageError as exc:   # a product we cannot encode is our bug: say so, keep serving
            log.error("product of frame %s not sent: %s", job.frame_id, exc)
            return
        self.outboxes["products"].items.append(([], parts))

    # ================================================================== sending
    def _send_route(self, box: str, route: list, msg: Message) -> None:
        outbox = self.outboxes[box]
        outbox.items.append((route, encode(msg)))
        if len(outbox) > MAX_OUTBOX:
            route_, _ = outbox.items.popleft()
            log.error("%s outbox over %d messages: dropped the oldest reply (peer %r gone?)",
                      box, MAX_OUTBOX, route_[0] if route_ else None)
        self._flush(box)

    def _retry_route(self, routing_id: bytes) -> None:
        """A peer spoke: replies waiting for it may now be routable."""
        for box in ("frames", "commands"):
            self.outboxes[box].next_try = 0.0

    def _flush_all(self) -> None:
        for box in self.outboxes:
            self._flush(box)

    def _flush(self, box: str) -> None:
        outbox = self.outboxes[box]
        if not outbox.items or time.monotonic() < outbox.next_try:
            return
        sock = {"frames": self.frames, "commands": self.commands, "products": self.products}[box]
        kept = collections.deque()
        blocked = False
        while outbox.items:
            route, parts = outbox.items.popleft()
            if blocked and box == "products":
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
                    log.error("%s: message to %r not sent: %s", box, route[0] if route else None, exc)
        outbox.items = kept
        outbox.next_try = time.monotonic() + OUTBOX_RETRY_S if kept else 0.0

    # ================================================================== commands
    def _on_command(self, route: list, parts: list) -> None:
        size = sum(len(p) for p in parts)
        limit = self.config.max_chunk_bytes + (1 << 20)
        if size > limit:
            msg_id, _ = peek_header(parts[0]) if parts else (None, None)
            return self._command_reply(route, msg_id, {
                "ok": False, "error": f"too_large: command message is {size} bytes, over {limit} "
                                      "(store.max_chunk_bytes + 1 MiB)"})
        try:
            msg = decode(parts, self.command_limits)
        except MessageError as exc:
            msg_id, _ = peek_header(parts[0]) if parts else (None, None)
            return self._command_reply(route, msg_id, {"ok": False, "error": f"bad_message: {exc}"})
        if msg.type != "command":
            return self._command_reply(route, msg.id, {
                "ok": False, "error": f"bad_message: the commands socket takes command messages, "
                                      f"got a {msg.type!r} message"})
        cmd = COMMANDS.get(msg.body["name"])
        if cmd is None:
            return self._command_reply(route, msg.id, {
                "ok": False, "error": f"unknown command {msg.body['name']!r} "
                                      f"(known: {', '.join(sorted(COMMANDS))})"})
        if cmd.background:
            if self._admin_busy:
                return self._command_reply(route, msg.id, {
                    "ok": False, "error": f"busy: an install or rollback is running; "
                                          f"{cmd.name} again when it has finished"})
            self._admin_busy = True
            self._admin.put((route, msg, cmd))
            return
        self._command_reply(route, msg.id, self._run_command(cmd, msg))

    def _run_command(self, cmd, msg: Message) -> dict:
        try:
            result = cmd.func(self, msg.body.get("args") or {}, msg.arrays)
            return {"ok": True, "result": plain(result)}
        except CommandFailed as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("command %s failed", cmd.name)
            return {"ok": False, "error": f"internal: {type(exc).__name__}: {exc}"}

    def _command_reply(self, route: list, ref: str | None, body: dict) -> None:
        self._send_route("commands", route, Message("ack", body, ref=ref, source=self.config.name))

    def status(self) -> dict:
        return {"model": self.model_info(), "model_error": self._model_error,
                "device": self.config.device, "state": "draining" if self._stopping else "serving",
                "uptime": round(self.heartbeat.uptime(), 3), "queue_depth": len(self._pending),
                "max_frames": self.config.max_frames, "frames": self.counters.as_dict(),
                "pending_products": len(self.outboxes["products"]),
                "latency_ms": self.latency.summary(), "rss_mb": round(rss_mb(), 2),
                "store": self.store.status(), "uploads": self.uploads.list(),
                "endpoints": self.endpoints, "pid": os.getpid()}

    # ================================================================== telemetry
    def _publish_telemetry(self) -> None:
        body = self.heartbeat.body(self.model_info(), len(self._pending), self.counters, self.latency,
                                   pending_products=len(self.outboxes["products"]),
                                   state="draining" if self._stopping else "serving")
        try:
            self.telemetry.send_multipart(encode(Message("telemetry", body, source=self.config.name)),
                                          zmq.NOBLOCK)
        except zmq.Again:
            pass                      # PUB drops for slow subscribers by design
        self._next_telemetry = time.monotonic() + self.config.telemetry_interval_s

    # ================================================================== shutdown
    def request_shutdown(self, reason: str) -> None:
        """Stop taking frames; finish those accepted (up to the drain timeout); then exit 0."""
        if self._stopping:
            return
        self._stopping = reason
        self._drain_deadline = time.monotonic() + self.config.drain_timeout_s
        log.info("shutting down (%s): %d frames pending", reason, len(self._pending))
        self.wake()

    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            self.request_shutdown(signal.Signals(signum).name)
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _drained(self) -> bool:
        if self._pending and time.monotonic() < self._drain_deadline:
            return False
        for job in list(self._pending.values()):    # past the deadline: tell each, don't drop
            self._frame_outcome(job, ("error", "shutdown",
                                      "the daemon shut down before this frame was processed; "
                                      "send it again"))
        return True

    def _close(self, workers: list[threading.Thread]) -> None:
        self._jobs.put(None)
        self._admin.put(None)
        deadline = time.monotonic() + CLOSE_LINGER_MS / 1000
        while any(len(box) for box in self.outboxes.values()) and time.monotonic() < deadline:
            self._flush_all()
            time.sleep(0.02)
        for name, box in self.outboxes.items():
            if len(box):
                log.warning("%d %s messages could not be delivered before exit", len(box), name)
        self._publish_telemetry()
        for sock in (self.frames, self.commands, self.products, self.telemetry):
            sock.close(linger=CLOSE_LINGER_MS)
        self._ctx.term()
        os.close(self._wake_r)
        os.close(self._wake_w)
        for worker in workers:
            worker.join(timeout=1.0)
        # A frame cut off by the drain timeout may still be inside OpenVINO: the caller should
        # then leave with os._exit rather than tear the interpreter down under that thread.
        self.threads_finished = not any(worker.is_alive() for worker in workers)
        log.info("stopped")
