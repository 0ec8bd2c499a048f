"""Frame admission: every FRAME is answered at once, with an ACK (accepted) or an ERROR (refused).

At the door, in this order (the first that fails is the refusal, and that ERROR is the frame's
only outcome):

    size        all parts together within limits.max_message_bytes, before decoding   too_large
    envelope    a frame message whose header, body and array specs validate          bad_message / invalid_frame
    open        the daemon is not draining                                           shutdown
    model       a model is active                                                    no_model
    manifest    array shape vs `bands`, and the bands the model needs                 invalid_frame
    room        fewer than queue.max_frames pending, fewer than                      queue_full
                queue.max_pending_products products waiting for the downlink, and
                fewer than queue.max_pending_product_bytes of them in memory

An accepted frame becomes a FrameJob in the bounded queue the frame worker takes from; it stays
pending until `settle` records its one outcome. The queue is bounded here, by refusing, never by
dropping. Values (NaN, Inf) are the pipeline's to check, in the worker.

Every bound of shared.limits applies at `envelope` (a `frame_id` of at most 64 characters, int64
integers, ...). A refusal's ERROR repeats the input only as a short escaped prefix, and
refusals are counted by code (`refusals` in status and telemetry) and logged at most
10 a minute (onboard.telemetry.Refusals).
"""
from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass
from typing import Sequence

from onboard.bus import peek_parts
from onboard.config import DaemonConfig
from onboard.errors import (BAD_MESSAGE, INVALID_FRAME, NO_MODEL, OK, QUEUE_FULL, SHUTDOWN,
                            TOO_LARGE, FrameRefused)
from onboard.serving import Serving
from onboard.telemetry import FrameCounters, Refusals
from shared.bands import UnknownBandError, canonical_band
from shared.limits import clip
from shared.messages import Limits, Message, MessageError, decode

log = logging.getLogger("onboard.daemon")


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


def check_frame(msg: Message, needed: Sequence[str]) -> None:
    """Cheap checks against the model (shape against bands, the bands it needs: a chain's, of
    every step); the pipeline checks the values themselves (NaN, Inf) in the worker."""
    data, bands = msg.arrays["data"], msg.body["bands"]
    if data.shape[0] != len(bands):
        raise FrameRefused(INVALID_FRAME, f"data has {data.shape[0]} bands (shape {list(data.shape)}) "
                                          f"but body.bands names {len(bands)}", "arrays.data.shape")
    if data.shape[1] == 0 or data.shape[2] == 0:
        raise FrameRefused(INVALID_FRAME, f"empty frame (shape {list(data.shape)})", "arrays.data.shape")
    try:
        have = {canonical_band(b) for b in bands}
    except UnknownBandError as exc:
        raise FrameRefused(INVALID_FRAME, str(exc), "body.bands") from None
    missing = [b for b in needed if b not in have]
    if missing:
        raise FrameRefused(INVALID_FRAME, f"the model needs bands {', '.join(missing)} which the "
                                          f"frame lacks (it has {', '.join(bands)})", "body.bands")


class Admission:
    """The door and the bounded queue behind it. Runs in the poller's thread."""

    def __init__(self, config: DaemonConfig, serving: Serving, counters: FrameCounters):
        self.config = config
        self.serving = serving
        self.counters = counters
        self.limits = Limits(max_array_bytes=config.max_message_bytes)
        self.pending: dict[str, FrameJob] = {}   # FRAME message id -> job, until its outcome
        self.jobs: queue.Queue = queue.Queue()    # bounded by `admit`, not by the Queue
        self.closed: str | None = None            # why the door closed (shutdown), else None
        self.refusals = Refusals(log)

    def close(self, reason: str) -> None:
        """From now on every frame is refused with `shutdown`."""
        self.closed = reason

    def admit(self, route: list, parts: list, pending_products: int,
              pending_product_bytes: int = 0) -> Message:
        """The immediate answer to one FRAME: its ACK (the job is queued) or its refusal ERROR.
        `pending_products`: products waiting for the downlink; `pending_product_bytes`: the
        bytes of those held in memory."""
        msg = None
        try:
            msg = self._read(parts)
            self._check(msg, pending_products, pending_product_bytes)
        except FrameRefused as refused:
            if msg is not None:
                msg_id, frame_id = msg.id, (msg.body["frame_id"] if msg.type == "frame" else None)
            else:
                msg_id, frame_id = peek_parts(parts)
            return self._refuse(refused, msg_id, frame_id)
        job = FrameJob(route, msg, time.monotonic())
        self.pending[msg.id] = job
        self.counters.accepted += 1
        self.jobs.put(job)
        return msg.reply("ack", {"accepted": True, "code": OK, "queue_depth": len(self.pending),
                                 "frame_id": job.frame_id}, source=self.config.name)

    def settle(self, job: FrameJob) -> bool:
        """Record that `job` has its outcome now; False if it already had one."""
        if job.done:
            return False
        job.done = True
        self.pending.pop(job.msg.id, None)
        return True

    # ------------------------------------------------------------------ the checks
    def _read(self, parts: list) -> Message:
        size = sum(len(p) for p in parts)
        limit = self.config.max_message_bytes
        if size > limit:
            raise FrameRefused(TOO_LARGE, f"message is {size} bytes, over the limit of {limit} "
                                          "(limits.max_message_bytes)", "message")
        try:
            return decode(parts, self.limits)
        except MessageError as exc:
            code = INVALID_FRAME if exc.field.startswith("arrays") else BAD_MESSAGE
            raise FrameRefused(code, str(exc), exc.field) from None

    def _check(self, msg: Message, pending_products: int, pending_product_bytes: int = 0) -> None:
        if msg.type != "frame":
            raise FrameRefused(BAD_MESSAGE, "the frames socket takes frame messages, got a "
                                            f"{msg.type!r} message", "type")
        if self.closed:
            raise FrameRefused(SHUTDOWN, f"the daemon is shutting down ({self.closed}); "
                                         "send it again later")
        model = self.serving.current()
        if model is None:
            raise FrameRefused(NO_MODEL, "no active model: "
                                         f"{self.serving.error or 'install a bundle first'}")
        check_frame(msg, model[1].bands)
        depth = len(self.pending)
        if depth >= self.config.max_frames:
            raise FrameRefused(QUEUE_FULL, f"{depth} frames pending, the limit is "
                                           f"{self.config.max_frames} (queue.max_frames); send it "
                                           "again after an outcome", details={"queue_depth": depth})
        if pending_products >= self.config.max_pending_products:
            raise FrameRefused(QUEUE_FULL, f"{pending_products} products wait for the downlink "
                                           "(queue.max_pending_products); send it again later",
                               details={"queue_depth": depth})
        if pending_product_bytes >= self.config.max_pending_product_bytes:
            raise FrameRefused(QUEUE_FULL, f"{pending_product_bytes} bytes of products wait in "
                                           "memory for the downlink (queue.max_pending_product_"
                                           "bytes); send it again later",
                               details={"queue_depth": depth})

    def _refuse(self, refused: FrameRefused, ref: str | None, frame_id: str | None) -> Message:
        self.counters.rejected += 1
        self.refusals.record("frame", frame_id, refused.code, str(refused))
        body = {"code": refused.code, "message": clip(str(refused)), "frame_id": frame_id,
                "field": clip(refused.field, 256) if refused.field else None}
        if refused.details:
            body["details"] = refused.details
        return Message("error", body, ref=ref, source=self.config.name)
