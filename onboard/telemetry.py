"""Telemetry: per-stage latency statistics, memory, and the heartbeat body the daemon publishes."""
from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections import deque

import numpy as np


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
