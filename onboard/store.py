"""The model store: slots for the active, staged and previous model, and the install path.

Like a cFS table load: a new bundle goes into an inactive slot, is checked there by its owner,
and only then becomes active, at one atomic step. Installing is

    verify (signature, checksums, version newer than the active one: shared.bundle)
    -> extract into a new slot (the staged one)
    -> load it (FramePipeline, at the bundle's precision if the device can run it, else
       refused with `precision_unsupported`) and self-test it on the bundle's reference tiles
    -> activate: state.json rewritten via a temporary file + fsync + os.replace, so a crash
       leaves either the old or the new state, never half of one
    -> the model that was active becomes `previous`, kept for `rollback()`.

A chain bundle (shared.chain: a gate model, then models that run only where it allows) is one
slot: after the chain's own archive checks, each step folder is verified with the same key
(shared.chain.verify_chain_steps: a tampered step file or a step signed by another key is
refused naming the step and the file), loaded and self-tested on its own reference tiles, and
the steps serve together as one onboard.chain.ChainPipeline; activation, rollback and restart
are a single model's.

Any failure removes the staged slot and leaves the active model untouched and serving; the
InstallResult says which check refused the bundle and why. A restart (even after kill -9)
reopens state.json and comes back with the same active model after re-checking its files.

Damaged state: every state write is atomic (a full disk leaves the old state.json whole and the
install refused `activation_failed`), and a copy of the last state written is kept in
state.last-good.json. At start-up a corrupt or truncated state.json (a flash card that lost a
block) falls back to that copy; failing that, to the slots on disk (the newest version active,
the one before it previous); a named slot whose folder is gone falls back to the other one.
`recovered` (status, the log) says which fallback was taken and why.

Layout under `root`:
    state.json                   {"active": slot, "previous": slot, "policy": {slot: policy}, ...}
    state.last-good.json         a copy of the last state written (the fallback)
    slots/<model_id>-v<version>-<8 hex>/   manifest.json, manifest.sig, model.xml, model.bin, ...
A slot folder that state.json does not name is debris of an interrupted install: removed at open.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from onboard.errors import (ACTIVATION_FAILED, BAD_STATE, BUSY, EXTRACT_FAILED, INSTALLED,
                            LOAD_FAILED, NO_MODEL, NO_PREVIOUS, NOT_FOUND, PRECISION_UNSUPPORTED,
                            ROLLED_BACK, SELF_TEST_FAILED, SLOT_CORRUPT, SLOT_UNREADABLE,
                            STORE_IN_USE, PrecisionUnsupported, StoreError)
from onboard.chain import LATER_STEP_BATCH, ChainPipeline
from onboard.pipeline import FramePipeline
from onboard.precision import AUTO
from shared.bundle import BundleError, extract_bundle, verify_extracted
from shared.chain import verify_chain_steps
from shared.keys import load_public_key
from shared.manifest import ManifestError, is_chain

log = logging.getLogger("onboard.store")

STATE_FILE = "state.json"
LAST_GOOD_FILE = "state.last-good.json"
LOCK_FILE = "store.lock"
SLOTS_DIR = "slots"
STATE_SCHEMA = 1
HISTORY_LENGTH = 20


@dataclass
class SlotInfo:
    """What a slot holds, as status reports it."""

    slot: str
    model_id: str
    version: int
    path: Path
    manifest: dict = field(repr=False)

    def as_dict(self) -> dict:
        return {"slot": self.slot, "model_id": self.model_id, "version": self.version,
                "path": str(self.path)}


@dataclass
class InstallResult:
    """The outcome of an install or a rollback. `pipeline` is the loaded, self-tested model."""

    ok: bool
    code: str                     # "installed", "rolled_back", or why it was refused
    reason: str
    model_id: str | None = None
    version: int | None = None
    slot: str | None = None
    active: dict | None = None     # what is active after this call (old one when refused)
    previous: dict | None = None
    self_test: dict | None = None
    duration_s: float = 0.0
    pipeline: Any = field(default=None, repr=False)

    def as_dict(self) -> dict:
        """JSON-ready (the pipeline stays out: it holds the compiled model)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "pipeline"}


def write_json_atomic(path: Path, data: dict) -> None:
    """Write-temp, fsync, rename, fsync the folder: after a crash the file is old or new, whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:           # disk full mid-write: no half file left beside the whole old one
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def default_pipeline_factory(device: str = "CPU", num_requests: int | None = None,
                             precision: str = AUTO, capabilities: tuple[str, ...] | None = None
                             ) -> Callable[..., Any]:
    """`factory(manifest, model_dir)` -> FramePipeline; a chain's later steps also pass
    `batch_size` (onboard.chain.LATER_STEP_BATCH)."""
    def factory(manifest: dict, model_dir: Path, batch_size: int = 2) -> Any:
        return FramePipeline(manifest, model_dir, device=device, num_requests=num_requests,
                             precision=precision, capabilities=capabilities, batch_size=batch_size)
    return factory


class ModelStore:
    """Model slots on disk (active, staged, previous) and the verified install path.

    `public_key`: the uplink Ed25519 public key (PEM path or key object).
    `pipeline_factory(manifest, model_dir)` builds the runnable model (default: FramePipeline on
    `device` with `num_requests` infer requests, None = OpenVINO's choice, at the manifest's
    precision or `precision` unless "auto", checked against `capabilities`, None = OpenVINO's
    list); it must offer `.self_test(reference_path)` and `.precision` (onboard.precision's
    Precision) like onboard.pipeline.FramePipeline. For a chain's later steps it is called with
    `batch_size` too.
    `exclusive=True` takes an advisory lock on the store for this object's lifetime (the daemon
    and the offline CLI do), so an offline install cannot race a running daemon's.
    """

    def __init__(self, root: str | os.PathLike, public_key: Any, device: str = "CPU",
                 pipeline_factory: Callable[[dict, Path], Any] | None = None,
                 num_requests: int | None = None, exclusive: bool = False,
                 precision: str = AUTO, capabilities: tuple[str, ...] | None = None):
        self.root = Path(root)
        self.public_key = load_public_key(public_key)
        self.device = device
        self.pipeline_factory = pipeline_factory or default_pipeline_factory(
            device, num_requests, precision, capabilities)
        self._lock_fd: int | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        if exclusive:
            self._lock_store()
        self._state_lock = threading.Lock()     # state reads/writes (status runs beside installs)
        self._install_lock = threading.Lock()   # one install or rollback at a time
        self._write_lock = threading.Lock()     # one read-modify-write of state.json at a time
        self._staged: SlotInfo | None = None
        (self.root / SLOTS_DIR).mkdir(parents=True, exist_ok=True)
        self.recovered: str | None = None       # which fallback the start-up state came from
        self._state = self._read_state()
        if self._lock_fd is not None or self._nobody_holds_the_store():
            self._remove_debris()       # never under a running daemon: that could be its staged slot

    def _lock_store(self) -> None:
        path = self.root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StoreError(STORE_IN_USE, f"{self.root}: the store is in use by process {holder} "
                                             "(a running daemon? send it the install command instead)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd            # released by close() or when the process dies (even kill -9)

    def _nobody_holds_the_store(self) -> bool:
        try:
            fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)                # closing drops our probe lock

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------ state
    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    @property
    def last_good_path(self) -> Path:
        return self.root / LAST_GOOD_FILE

    @staticmethod
    def _empty_state() -> dict:
        return {"schema": STATE_SCHEMA, "active": None, "previous": None, "policy": {},
                "history": []}

    def _load_state_file(self, path: Path) -> dict:
        """One state file, whole and of our schema; StoreError(BAD_STATE) saying what is wrong."""
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreError(BAD_STATE, f"{path}: unreadable store state ({exc})") from None
        if not isinstance(state, dict) or state.get("schema") != STATE_SCHEMA:
            raise StoreError(BAD_STATE, f"{path}: not a schema-{STATE_SCHEMA} store state")
        return {**self._empty_state(), **state}

    def _read_state(self) -> dict:
        """state.json; if damaged, the last good copy; failing that, the slots on disk. A named
        slot whose folder is gone gives way to the other one. Says so in `recovered`."""
        if not self.state_path.exists() and not self.last_good_path.exists():
            return self._empty_state()
        try:
            state = self._load_state_file(self.state_path)
        except StoreError as exc:
            state = self._fallback_state(str(exc))
        state = self._without_missing_slots(state)
        if self.recovered:
            log.error("store state recovered: %s", self.recovered)
            try:                           # make the recovery stick (a full disk: next time again)
                write_json_atomic(self.state_path, state)
            except OSError as exc:
                log.error("could not rewrite %s after recovery: %s", self.state_path, exc)
        return state

    def _fallback_state(self, why: str) -> dict:
        try:
            state = self._load_state_file(self.last_good_path)
            self.recovered = f"{why}; fell back to the last good state {self.last_good_path.name}"
            return state
        except StoreError as exc:
            state = self._state_from_slots()
            self.recovered = (f"{why}; {exc}; fell back to the slots on disk: active "
                              f"{state['active']}, previous {state['previous']}")
            return state

    def _state_from_slots(self) -> dict:
        """Active = the newest version among the slots that read, previous = the one before."""
        found = []
        for path in (self.root / SLOTS_DIR).iterdir():
            try:
                info = self._slot_info(path.name)
            except StoreError:
                continue
            if not path.name.startswith("staging-"):
                found.append((int(info.version or 0), path.name))
        found.sort(reverse=True)
        state = self._empty_state()
        state["active"] = found[0][1] if found else None
        state["previous"] = found[1][1] if len(found) > 1 else None
        return state

    def _without_missing_slots(self, state: dict) -> dict:
        """A slot named but gone from disk: the previous slot steps in for a missing active."""
        def present(slot):
            return slot if slot and (self.root / SLOTS_DIR / slot).is_dir() else None
        active, previous = present(state.get("active")), present(state.get("previous"))
        if (active, previous) == (state.get("active"), state.get("previous")):
            return state
        missing = [s for s in (state.get("active"), state.get("previous")) if s and not present(s)]
        if active is None:
            active, previous = previous, None
        note = f"slot folder(s) {', '.join(missing)} missing; active {active}, previous {previous}"
        self.recovered = f"{self.recovered}; {note}" if self.recovered else note
        return {**state, "active": active, "previous": previous}

    def _update_state(self, change: Callable[[dict], None], event: dict) -> dict:
        """Read-modify-write of state.json as one step: `change` edits a copy, which is written
        atomically and only then becomes the state in memory. Installs (admin thread) and
        set_policy (poller) both write; the lock keeps one from losing the other's change."""
        with self._write_lock:
            with self._state_lock:
                state = json.loads(json.dumps(self._state))
            change(state)
            live = {state.get("active"), state.get("previous")}
            state["policy"] = {k: v for k, v in state.get("policy", {}).items() if k in live}
            state["history"] = (list(state.get("history", [])) + [{"ts": time.time(), **event}])[-HISTORY_LENGTH:]
            write_json_atomic(self.state_path, state)
            with self._state_lock:
                self._state = state
            try:                  # the fallback copy; without it, state.json alone still holds
                write_json_atomic(self.last_good_path, state)
            except OSError as exc:
                log.warning("could not refresh %s: %s", self.last_good_path, exc)
            return state

    def _remove_debris(self) -> None:
        keep = {self._state.get("active"), self._state.get("previous")}
        for path in (self.root / SLOTS_DIR).iterdir():
            if path.name not in keep:
                log.info("removing %s: not an active or previous slot (interrupted install?)", path)
                shutil.rmtree(path, ignore_errors=True)

    def _slot_info(self, slot: str | None) -> SlotInfo | None:
        if not slot:
            return None
        path = self.root / SLOTS_DIR / slot
        try:
            manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreError(SLOT_UNREADABLE, f"{path}: cannot read the slot's manifest ({exc})") from None
        return SlotInfo(slot, manifest.get("model_id", "?"), manifest.get("version", 0), path, manifest)

    def active(self) -> SlotInfo | None:
        """The active model's slot, or None before the first install."""
        with self._state_lock:
            slot = self._state.get("active")
        return self._slot_info(slot)

    def previous(self) -> SlotInfo | None:
        with self._state_lock:
            slot = self._state.get("previous")
        return self._slot_info(slot)

    def staged(self) -> SlotInfo | None:
        """The slot being verified and self-tested right now, if an install is running."""
        return self._staged

    def policy_override(self) -> dict | None:
        """A policy set by command for the active slot (None: the bundle's own policy)."""
        with self._state_lock:
            return self._state.get("policy", {}).get(self._state.get("active") or "")

    def set_policy_override(self, policy: dict | None) -> None:
        """Persist `policy` for the active slot (it stays with that slot across restarts)."""
        with self._state_lock:
            slot = self._state.get("active")
        if not slot:
            raise StoreError(NO_MODEL, "no active model to set a policy for")

        def change(state: dict) -> None:
            if state.get("active") != slot:
                raise StoreError(BUSY, "the active model changed while setting its policy")
            state.setdefault("policy", {}).pop(slot, None)
            if policy is not None:
                state["policy"][slot] = policy
        self._update_state(change, {"event": "set_policy", "slot": slot})

    def status(self) -> dict:
        def describe(get):
            try:
                info = get()
            except StoreError as exc:
                return {"error": str(exc)}
            return info.as_dict() if info else None
        with self._state_lock:
            history = list(self._state.get("history", []))[-5:]
        return {"root": str(self.root), "active": describe(self.active),
                "staged": describe(self.staged), "previous": describe(self.previous),
                "history": history, "recovered": self.recovered}

    # ------------------------------------------------------------------ checks
    def check_slot_files(self, info: SlotInfo) -> None:
        """Re-check a slot as its bundle was checked (signature over the manifest, every file's
        sha256): a bit flip on disk since the install must not fly."""
        try:
            verify_extracted(info.path, self.public_key)
        except BundleError as exc:
            raise StoreError(SLOT_CORRUPT, f"slot {info.slot} failed its check: {exc}") from None

    def _load_and_test(self, info: SlotInfo) -> tuple[Any, dict]:
        """Build the pipeline for a slot and self-test it (a chain: each step); raise
        StoreError saying why not."""
        if is_chain(info.manifest):
            return self._load_chain(info)
        return self._load_model(info.manifest, info.path, f"model {info.model_id} v{info.version}")

    def _load_model(self, manifest: dict, path: Path, label: str, where: str = "",
                    **options) -> tuple[Any, dict]:
        """One model (a slot, or a chain's step folder: `where` prefixes its messages; `options`
        go to the pipeline factory)."""
        try:
            pipeline = self.pipeline_factory(manifest, path, **options)
        except PrecisionUnsupported as exc:
            raise StoreError(PRECISION_UNSUPPORTED, f"{where}{label} refused: {exc}") from None
        except Exception as exc:       # OpenVINO raises plain RuntimeError for a bad IR or device
            raise StoreError(LOAD_FAILED, f"{where}{label} did not load on {self.device}: {exc}") from None
        reference = (manifest.get("reference") or {}).get("file", "reference.npz")
        try:
            result = pipeline.self_test(path / reference)
        except Exception as exc:
            raise StoreError(SELF_TEST_FAILED, f"{where}self-test could not run: {exc}") from None
        report = {"ok": bool(result.ok), "max_abs_diff": float(result.max_abs_diff),
                  "mask_agreement": float(result.mask_agreement), "message": result.message,
                  "precision": pipeline.precision.running}
        if not result.ok:
            error = StoreError(SELF_TEST_FAILED, f"{where}self-test on the reference tiles failed: "
                                                 f"{result.message}")
            error.self_test = report
            raise error
        return pipeline, report

    def _load_chain(self, info: SlotInfo) -> tuple[ChainPipeline, dict]:
        """Each step folder verified with the uplink key, loaded and self-tested; the steps as
        one ChainPipeline. The report holds each step's self-test."""
        label = f"chain {info.model_id} v{info.version}"
        try:
            steps = verify_chain_steps(info.path, info.manifest, self.public_key)
        except (BundleError, ManifestError) as exc:      # ChainStepRefused names the step
            raise StoreError(exc.code, f"{label} refused: {exc}") from None
        loaded, reports = [], {}
        for i, step in enumerate(steps):
            where = f"{label}, step {step.name!r}: "
            pipeline, reports[step.name] = self._load_model(
                step.manifest, step.root, f"model {step.manifest['model_id']} v{step.manifest['version']}",
                where, **({"batch_size": LATER_STEP_BATCH} if i else {}))
            loaded.append((step, pipeline))
        try:
            chain = ChainPipeline(info.manifest, loaded)
        except (ValueError, KeyError) as exc:
            raise StoreError(LOAD_FAILED, f"{label} did not load: {exc}") from None
        report = {"ok": True, "steps": reports, "precision": chain.precision.running,
                  "message": "; ".join(f"{name}: {r['message']}" for name, r in reports.items())}
        return chain, report

    # ------------------------------------------------------------------ install / rollback
    def install(self, bundle_path: str | os.PathLike) -> InstallResult:
        """Verify, stage, self-test and activate a bundle. Never raises for a bad bundle: the
        result says why it was refused, and the active model is untouched."""
        started = time.monotonic()
        if not self._install_lock.acquire(blocking=False):
            return self._refused(BUSY, "another install or rollback is running", started)
        try:
            return self._install(Path(bundle_path), started)
        finally:
            self._staged = None
            self._install_lock.release()

    def _install(self, bundle_path: Path, started: float) -> InstallResult:
        active = self.active()
        min_version = active.version if active else None
        if not bundle_path.is_file():
            return self._refused(NOT_FOUND, f"{bundle_path}: no such bundle file", started)
        slot_path = self.root / SLOTS_DIR / f"staging-{uuid.uuid4().hex[:8]}"
        try:
            try:
                extract_bundle(bundle_path, slot_path, self.public_key, min_version=min_version)
            except BundleError as exc:
                return self._refused(exc.code, str(exc), started)   # version_too_old, bad_signature, ...
            except OSError as exc:      # disk full, permissions: the bundle may be fine
                return self._refused(EXTRACT_FAILED, f"{bundle_path}: could not extract into "
                                                       f"{slot_path}: {exc}", started)
            info = self._slot_info(slot_path.name)
            final = self.root / SLOTS_DIR / f"{info.model_id}-v{info.version}-{uuid.uuid4().hex[:8]}"
            # Rename before loading: the pipeline may keep paths, and the slot's name is final.
            os.rename(slot_path, final)
            slot_path = final
            info = self._slot_info(final.name)
            self._staged = info
            try:
                pipeline, report = self._load_and_test(info)
            except StoreError as exc:
                return self._refused(exc.code, str(exc), started, info, getattr(exc, "self_test", None))
            retired = []

            def activate(state: dict) -> None:
                retired.append(state["previous"])
                state["previous"], state["active"] = state["active"], final.name
            try:
                state = self._update_state(activate, {"event": "install", "slot": final.name,
                                                      "model_id": info.model_id, "version": info.version})
            except OSError as exc:      # state.json untouched (os.replace never ran): old model stays
                return self._refused(ACTIVATION_FAILED, f"could not write {self.state_path}: {exc}",
                                     started, info, report)
            slot_path = None            # activated: keep it
            if retired[0] and retired[0] not in (state["active"], state["previous"]):
                shutil.rmtree(self.root / SLOTS_DIR / retired[0], ignore_errors=True)
            log.info("installed %s v%d in %s", info.model_id, info.version, final.name)
            return InstallResult(True, INSTALLED, f"{info.model_id} v{info.version} active",
                                 info.model_id, info.version, final.name, info.as_dict(),
                                 self._describe(self.previous), report,
                                 time.monotonic() - started, pipeline)
        finally:
            if slot_path is not None:
                shutil.rmtree(slot_path, ignore_errors=True)

    def rollback(self) -> InstallResult:
        """Make the previous model active again (after re-checking and self-testing it); the
        model it replaces becomes `previous`, so a second rollback undoes the first."""
        started = time.monotonic()
        if not self._install_lock.acquire(blocking=False):
            return self._refused(BUSY, "another install or rollback is running", started)
        try:
            previous = self.previous()
            if previous is None:
                return self._refused(NO_PREVIOUS, "no previous model to roll back to", started)
            try:
                self.check_slot_files(previous)
                pipeline, report = self._load_and_test(previous)
            except StoreError as exc:
                return self._refused(exc.code, f"cannot roll back to {previous.model_id} "
                                               f"v{previous.version}: {exc}", started)
            def swap(state: dict) -> None:
                state["active"], state["previous"] = state["previous"], state["active"]
            try:
                self._update_state(swap, {"event": "rollback", "slot": previous.slot,
                                          "model_id": previous.model_id, "version": previous.version})
            except OSError as exc:
                return self._refused(ACTIVATION_FAILED, f"could not write {self.state_path}: {exc}",
                                     started)
            return InstallResult(True, ROLLED_BACK, f"{previous.model_id} v{previous.version} active again",
                                 previous.model_id, previous.version, previous.slot, previous.as_dict(),
                                 self._describe(self.previous), report,
                                 time.monotonic() - started, pipeline)
        finally:
            self._install_lock.release()

    def load_active(self) -> tuple[SlotInfo | None, Any]:
        """At start-up: the active slot and its loaded pipeline, files re-checked first.

        Raises StoreError if the active slot is corrupt or fails to load: the daemon then
        serves no model (and says why) rather than a model that differs from what was signed.
        """
        info = self.active()
        if info is None:
            return None, None
        try:
            self.check_slot_files(info)
        except OSError as exc:            # a file unreadable: as corrupt (serving falls back)
            raise StoreError(SLOT_CORRUPT, f"slot {info.slot} unreadable: {exc}") from None
        pipeline, _ = self._load_and_test(info)
        return info, pipeline

    # ------------------------------------------------------------------ helpers
    def _describe(self, get) -> dict | None:
        try:
            info = get()
        except StoreError:
            return None
        return info.as_dict() if info else None

    def _refused(self, code: str, reason: str, started: float, info: SlotInfo | None = None,
                 self_test: dict | None = None) -> InstallResult:
        log.warning("install refused (%s): %s", code, reason)
        return InstallResult(False, code, reason, info.model_id if info else None,
                             info.version if info else None, None, self._describe(self.active),
                             self._describe(self.previous), self_test, time.monotonic() - started)
