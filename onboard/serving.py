"""Serving: which model decides the next frame, swapped whole at a safe moment.

The store (onboard.store) does the slow, careful part of an install or a rollback (verify,
stage, self-test, atomic activation) in the admin worker; this module only swaps the model
that serves, as one (slot, pipeline) pair under a lock, so a frame is never decided by half
of one model and half of another. A policy override set by command is kept on disk per slot
and applied whenever that slot serves.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from onboard.chain import ChainPipeline
from onboard.errors import BAD_ARGS, NO_MODEL, POLICY_NOT_STORED, CommandFailed, StoreError
from onboard.store import ModelStore, SlotInfo
from shared.policy import PolicyError, validate_policy

log = logging.getLogger("onboard.daemon")


class Serving:
    """The active model (SlotInfo + pipeline), or why there is none."""

    def __init__(self, store: ModelStore, device: str):
        self.store = store
        self.device = device
        self._lock = threading.Lock()
        self._model: tuple[SlotInfo, Any] | None = None
        self.error: str | None = None       # why no model serves (status and no_model refusals say it)

    def current(self) -> tuple[SlotInfo, Any] | None:
        """(slot, pipeline) to decide one frame with, or None. Any thread."""
        with self._lock:
            return self._model

    def info(self) -> dict | None:
        """The serving model for status and telemetry: id, version, slot, and the precision it
        runs at (the manifest's, the running one, overridden or not: onboard.precision)."""
        model = self.current()
        if model is None:
            return None
        info, pipeline = model
        out = {"id": info.model_id, "version": info.version, "slot": info.slot,
               "precision": pipeline.precision.as_dict()}
        if isinstance(pipeline, ChainPipeline):       # each step's cells run of cells seen
            out["chain"] = pipeline.counters.as_dict()
        return out

    def load(self) -> None:
        """Bring back the active model at start-up; if its slot fails its checks, fall back to
        the previous one (a satellite should serve something without waiting for a ground pass)."""
        try:
            info, pipeline = self.store.load_active()
        except StoreError as exc:
            self.error = f"active model failed its start-up check: {exc}"
            log.error(self.error)
            self._fall_back()
            return
        if info is None:
            self.error = "no model installed yet (install a bundle)"
            log.warning(self.error)
            return
        self._swap(info, pipeline)
        log.info("serving %s v%d from slot %s on %s", info.model_id, info.version, info.slot,
                 self.device)

    def _fall_back(self) -> None:
        if self.store.previous() is None:
            return
        result = self.store.rollback()
        if result.ok:
            log.warning("fell back to the previous model %s v%s", result.model_id, result.version)
            self._swap(self.store.active(), result.pipeline)
        else:
            log.error("fallback to the previous model failed too: %s", result.reason)

    def install(self, path: Path) -> dict:
        """Admin worker: the store's install; on success the new model serves the next frame."""
        result = self.store.install(path)
        if result.ok:
            self._swap(self.store.active(), result.pipeline)
        return result.as_dict()

    def rollback(self) -> dict:
        """Admin worker: the store's rollback; on success the previous model serves again."""
        result = self.store.rollback()
        if result.ok:
            self._swap(self.store.active(), result.pipeline)
        return result.as_dict()

    def set_policy(self, policy: dict | None) -> dict:
        """Replace the active model's policy (None: the bundle's own), on disk first."""
        model = self.current()
        if model is None:
            raise CommandFailed("no_model: no active model to set a policy for", code=NO_MODEL)
        info, pipeline = model
        effective = info.manifest.get("policy") if policy is None else policy
        try:
            validate_policy(effective, pipeline.classes)     # a chain's: every step's
        except PolicyError as exc:
            raise CommandFailed(f"args.{exc}", code=BAD_ARGS) from None
        try:                            # on disk first: what serves must survive a restart
            self.store.set_policy_override(policy)
        except (StoreError, OSError) as exc:
            raise CommandFailed(f"policy not stored: {exc}", code=POLICY_NOT_STORED) from None
        pipeline.set_policy(effective)
        return {"policy": effective, "source": "bundle" if policy is None else "command",
                "model": self.info()}

    def _swap(self, info: SlotInfo, pipeline: Any) -> None:
        override = self.store.policy_override()
        if override is not None:
            try:
                pipeline.set_policy(override)
            except ValueError as exc:       # a stored override the model cannot take: its own policy
                log.error("stored policy override not applied (%s); using the bundle's policy", exc)
        with self._lock:
            self._model = (info, pipeline)
            self.error = None
