"""A frame's one outcome, as the messages that carry it.

    decision    DECISION {frame_id, keep, priority, reason, stats, tile_decisions, timings_ms, model,
                georef (the FRAME's, when it had one), chain (a model chain's steps: name,
                model_id, version, cells_run, cells_total, ms)}
                to the payload (ref = the FRAME's id)
    product     a kept frame's PRODUCT {frame_id, priority, reason, stats, classes, tiles, model,
                scene, index, acquired, georef, bands, scale, chain} + its arrays (mask, quicklook,
                tiles; a chain's later steps' masks `mask_<step>`) to the downlink
    sample      a frame's learning samples (a policy with a `learning` block), SAMPLE {frame_id,
                priority, model {model_id, version}, selection, bands (the model's), scale,
                samples [{row, col, size, entropy, ambiguous}], scene, index, acquired, georef}
                + `tiles` (N, C, size, size) in the frame's dtype, to the downlink after the
                frame's DECISION and PRODUCT, whatever the decision (shared.samples)
    error       ERROR {code, message, frame_id} to the payload, when the pipeline refused the
                frame's values, failed, or the drain ran out of time (message at most 1024
                characters: shared.limits.clip)

`timings_ms` holds the pipeline's stages, its own total renamed `process`, and the daemon's
`queue` (accepted -> started) and `total` (accepted -> outcome), in milliseconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from onboard.admission import FrameJob
from onboard.chain import NOT_RUN, ChainResult
from onboard.store import SlotInfo
from shared.jsonable import jsonable
from shared.limits import clip
from shared.messages import Message

# copied from the FRAME when present (georef: where it lies; the ground derives each tile's from it)
PRODUCT_KEYS_FROM_FRAME = ("scene", "index", "acquired", "georef", "bands", "scale")
SAMPLE_KEYS_FROM_FRAME = ("scene", "index", "acquired", "georef")


@dataclass
class FrameOutcome:
    """What the frame worker hands back: a decision (slot + result) or an error (code + message)."""

    job: FrameJob
    slot: SlotInfo | None = None
    result: Any = None                 # onboard.pipeline.FrameResult, for a decision
    code: str | None = None            # for an error
    message: str = ""

    @property
    def is_error(self) -> bool:
        return self.code is not None


def model_ref(slot: SlotInfo) -> dict:
    return {"id": slot.model_id, "version": slot.version}


def timings_ms(job: FrameJob, result: Any, now: float) -> dict:
    timings = jsonable(result.timings_ms)
    timings["process"] = timings.pop("total", None)
    waited_ms = ((job.started_at or now) - job.accepted_at) * 1000
    timings.update(queue=waited_ms, total=(now - job.accepted_at) * 1000)
    return timings


def decision(outcome: FrameOutcome, timings: dict, source: str) -> Message:
    job, result = outcome.job, outcome.result
    body = {"frame_id": job.frame_id, "keep": bool(result.keep), "priority": int(result.priority),
            "reason": str(result.reason), "stats": jsonable(result.stats),
            "tile_decisions": jsonable(result.tile_decisions), "timings_ms": timings,
            "model": model_ref(outcome.slot)}
    if "georef" in job.msg.body:
        body["georef"] = job.msg.body["georef"]
    if isinstance(result, ChainResult):
        body["chain"] = {"steps": jsonable(result.chain)}
    if getattr(result, "learning", None) is not None:
        body["uncertainty"] = jsonable(result.learning.summary)
    return job.msg.reply("decision", body, source=source)


def sample(outcome: FrameOutcome, source: str) -> Message | None:
    """The frame's SAMPLE (its learning samples), or None when it has none (no `learning`
    block, or no tile reached `min_score`). `bands` are the model's, in manifest order: the
    tiles' channels."""
    job, learning = outcome.job, getattr(outcome.result, "learning", None)
    if learning is None or not learning.samples:
        return None
    body = {"frame_id": job.frame_id, "priority": int(learning.priority),
            "model": {"model_id": outcome.slot.model_id, "version": int(outcome.slot.version)},
            "selection": learning.selection, "bands": list(outcome.slot.manifest["input"]["bands"]),
            "scale": float(job.msg.body["scale"]), "samples": jsonable(learning.samples)}
    for key in SAMPLE_KEYS_FROM_FRAME:
        if key in job.msg.body:
            body[key] = job.msg.body[key]
    return Message("sample", body, {"tiles": learning.tiles}, ref=job.msg.id, source=source)


def chain_product(result: ChainResult) -> dict:
    """A chain PRODUCT's `chain`: per step its accounting, its classes and its mask's part (the
    gate's is `mask_png`, a later step's `mask_<step>`: PNG, NOT_RUN = 255 where it did not run)."""
    steps = [{**step, "classes": list(result.step_classes[step["name"]]),
              "mask": "mask_png" if i == 0 else f"mask_{step['name']}"}
             for i, step in enumerate(jsonable(result.chain))]
    return {"steps": steps, "nodata": NOT_RUN}


def product(outcome: FrameOutcome, source: str) -> Message:
    """`classes` are what `mask_png` holds: the model's, or a chain's gate's (`chain` says each
    step's)."""
    job, result = outcome.job, outcome.result
    body = {"frame_id": job.frame_id, "priority": int(result.priority), "reason": str(result.reason),
            "stats": jsonable(result.stats),
            "classes": (list(result.class_mask_classes) if isinstance(result, ChainResult)
                        else list(outcome.slot.manifest["output"]["classes"])),
            "tiles": [t for t in jsonable(result.tile_decisions) if t.get("keep", True)],
            "model": model_ref(outcome.slot)}
    for key in PRODUCT_KEYS_FROM_FRAME:
        if key in job.msg.body:
            body[key] = job.msg.body[key]
    if isinstance(result, ChainResult):
        body["chain"] = chain_product(result)
    return Message("product", body, dict(result.products or {}), ref=job.msg.id, source=source)


def error(outcome: FrameOutcome, source: str) -> Message:
    job = outcome.job
    return job.msg.reply("error", {"code": outcome.code, "message": clip(outcome.message),
                                   "frame_id": job.frame_id}, source=source)
