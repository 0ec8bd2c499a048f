"""Telemetry: per-stage latency statistics, memory, refusal counts, and the heartbeat body the
daemon publishes."""
from __future__ import annotations

import logging
import os
import resource
import sys
import threading
import time
from collections import deque

import numpy as np

from shared.limits import quote


def rss_mb() -> float:
    """Resident memory of this process now (Linux /proc), else its peak (getrusage)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024   # bytes on macOS, KiB on Linux


class LatencyTracker:
    """Last, median and 95th percentile of each stage's latency over a sliding window.

    Written by the inference worker, read by the poller loop: a lock keeps the deques whole.
    """

    def __init__(self, window: int = 200):
        self.window = window
        self._samples: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def add(self, timings_ms: dict[str, float]) -> None:
        with self._lock:
            for stage, ms in timings_ms.items():
                if isinstance(ms, (int, float)):
                    self._samples.setdefault(stage, deque(maxlen=self.window)).append(float(ms))

    def summary(self) -> dict[str, dict[str, float]]:
        with self._lock:
            snapshot = {stage: list(values) for stage, values in self._samples.items()}
        out = {}
        for stage, values in snapshot.items():
            p50, p95 = np.percentile(values, [50, 95])
            out[stage] = {"last": round(values[-1], 3), "p50": round(float(p50), 3),
                          "p95": round(float(p95), 3), "n": len(values)}
        return out


class UncertaintyTracker:
    """The learning tile scores of the last `window` scored frames (telemetry `learning`): a
    histogram of tile entropy in HISTOGRAM_BINS equal bins over 0..1, its mean and p90, and the
    ambiguous share's mean and p90. Written and read by the poller loop."""

    HISTOGRAM_BINS = 10

    def __init__(self, window: int = 200):
        self._frames: deque[np.ndarray] = deque(maxlen=window)
        self.frames = 0                 # frames scored since start
        self.tiles = 0

    def add(self, tile_scores: np.ndarray) -> None:
        """One frame's (tiles, 2) [entropy, ambiguous] scores."""
        self._frames.append(np.asarray(tile_scores, np.float32))
        self.frames += 1
        self.tiles += len(tile_scores)

    def summary(self) -> dict:
        out = {"frames_scored": self.frames, "tiles_scored": self.tiles, "window_frames": len(self._frames)}
        scores = np.concatenate(list(self._frames)) if self._frames else np.zeros((0, 2), np.float32)
        if not len(scores):
            return out
        entropy, ambiguous = scores[:, 0].astype(np.float64), scores[:, 1].astype(np.float64)
        counts, _ = np.histogram(np.clip(entropy, 0.0, 1.0), bins=self.HISTOGRAM_BINS, range=(0.0, 1.0))
        out["entropy"] = {"histogram": counts.tolist(), "mean": round(float(entropy.mean()), 6),
                          "p90": round(float(np.percentile(entropy, 90)), 6)}
        out["ambiguous"] = {"mean": round(float(ambiguous.mean()), 6),
                            "p90": round(float(np.percentile(ambiguous, 90)), 6)}
        return out


class StepCounters:
    """Per step of a model chain, since it was loaded: frames decided, and cells run of the cells
    seen (telemetry and status `model.chain`; each step's latency is `latency_ms.step_<name>`).
    Written by the frame worker, read by the poller: a lock keeps each step's counts together."""

    def __init__(self, names: list[str]):
        self._counts = {name: {"frames": 0, "cells_run": 0, "cells_total": 0} for name in names}
        self._lock = threading.Lock()

    def add(self, steps: list[dict]) -> None:
        """One frame's accounting: [{name, cells_run, cells_total, ...}]."""
        with self._lock:
            for step in steps:
                counts = self._counts[step["name"]]
                counts["frames"] += 1
                counts["cells_run"] += int(step["cells_run"])
                counts["cells_total"] += int(step["cells_total"])

    def as_dict(self) -> list[dict]:
        with self._lock:
            return [{"name": name, **counts} for name, counts in self._counts.items()]


class FrameCounters:
    """How many frames were accepted, decided, errored (after acceptance) and rejected at the door."""

    def __init__(self) -> None:
        self.accepted = 0
        self.decided = 0
        self.errored = 0
        self.rejected = 0
        self.kept = 0

    def as_dict(self) -> dict[str, int]:
        return {"accepted": self.accepted, "decided": self.decided, "errored": self.errored,
                "rejected": self.rejected, "kept": self.kept}


class Refusals:
    """Refused messages counted by code, and logged at most `burst` per `window_s`: a flood of
    bad input costs a counter, not a log line each (status and telemetry `refusals`). What is
    logged repeats the input only as a short escaped prefix (shared.limits.quote): a newline in a
    `frame_id` cannot forge a log line."""

    def __init__(self, log: logging.Logger, burst: int = 10, window_s: float = 60.0):
        self.log, self.burst, self.window_s = log, burst, window_s
        self.by_code: dict[str, int] = {}
        self.not_logged = 0
        self._window_end = 0.0
        self._logged = self._skipped = 0

    def record(self, what: str, subject: object, code: str, message: str) -> None:
        """One refusal of `what` (a frame, a command) named `subject` (its id, or None)."""
        self.by_code[code] = self.by_code.get(code, 0) + 1
        now = time.monotonic()
        if now >= self._window_end:
            if self._skipped:
                self.log.warning("%d refusals not logged in the last %.0f s (counted in telemetry "
                                 "`refusals`)", self._skipped, self.window_s)
            self._window_end, self._logged, self._skipped = now + self.window_s, 0, 0
        if self._logged < self.burst:
            self._logged += 1
            self.log.info("refused %s %s: %s: %s", what, quote(subject), code, quote(message, 200))
        else:
            self._skipped += 1
            self.not_logged += 1

    def as_dict(self) -> dict:
        return {"total": sum(self.by_code.values()), "by_code": dict(self.by_code),
                "not_logged": self.not_logged}


class Heartbeat:
    """Builds the TELEMETRY body: sequence number, uptime, model, queue, frames, latency, memory."""

    def __init__(self) -> None:
        self.seq = 0
        self.started = time.monotonic()

    def uptime(self) -> float:
        return time.monotonic() - self.started

    def body(self, model: dict | None, queue_depth: int, frames: FrameCounters,
             latency: LatencyTracker, **extra) -> dict:
        body = {"seq": self.seq, "uptime": round(self.uptime(), 3), "model": model,
                "queue_depth": queue_depth, "frames": frames.as_dict(),
                "latency_ms": latency.summary(), "rss_mb": round(rss_mb(), 2), **extra}
        self.seq += 1
        return body
