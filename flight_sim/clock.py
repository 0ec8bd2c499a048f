"""The simulated mission clock: time advanced by the orbit and by the daemon's own measured
processing, never by the host's wall clock.

    orbit       frame i is complete at `acquired_i` (its last line; the camera's schedule)
    daemon      one frame worker: frame i starts at max(acquired_i, the end of frame i-1), plus
                the outage of a kill -9 and restart just before it (faults.restart_after_s), and
                takes `service_i`, its measured processing time (the DECISION's timings_ms
                total - queue: the daemon's own time for the frame, not its wait in the queue)
    product     ready at the end of its frame's processing
    passes      played once the clock has passed their end, that is once every frame that could
                have a product ready by then is settled (decided, and its product in if kept)

Frames are settled in acquisition order, whatever order the host's timing gave their outcomes
in, so the same seed flies the same timeline on a fast or a loaded machine, and with a daemon
slowed outside its processing (the test hook EOEDGE_TEST_FRAME_DELAY_S). What still moves it is
the daemon's processing itself: a host so loaded that the pipeline takes longer makes products
ready later, as a slower flight computer would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

INFINITY = float("inf")


@dataclass(frozen=True)
class FrameTiming:
    """One settled frame on the mission clock (seconds)."""

    frame_id: str
    acquired_s: float
    start_s: float
    ready_s: float
    service_s: float


class SimulatedClock:
    """Frames in acquisition order (`add`), settled in that order (`settle`) once their
    service time is known; `now_s` is the mission time up to which nothing more can happen."""

    def __init__(self, outages: dict[int, float] | None = None):
        self.outages = dict(outages or {})      # frame index -> seconds down just before it
        self.frames: list[tuple[str, float]] = []
        self.timings: dict[str, FrameTiming] = {}
        self.busy_until = 0.0

    def add(self, frame_id: str, acquired_s: float) -> None:
        self.frames.append((frame_id, float(acquired_s)))

    @property
    def settled(self) -> int:
        return len(self.timings)

    def _start(self, index: int, acquired_s: float) -> float:
        return max(acquired_s, self.busy_until) + self.outages.get(index, 0.0)

    def settle(self, service_s: Callable[[str], float | None]) -> list[FrameTiming]:
        """Settle the next frames while `service_s(frame_id)` knows their processing time
        (None: not yet); the frames settled now."""
        new = []
        while self.settled < len(self.frames):
            frame_id, acquired = self.frames[self.settled]
            service = service_s(frame_id)
            if service is None:
                break
            start = self._start(self.settled, acquired)
            self.busy_until = start + max(0.0, service)
            timing = FrameTiming(frame_id, acquired, start, self.busy_until, service)
            self.timings[frame_id] = timing
            new.append(timing)
        return new

    def now_s(self, next_acquired_s: float | None) -> float:
        """The earliest mission time a product not settled yet could be ready: the next frame
        to settle (added, or `next_acquired_s` still to come) cannot start before it. INFINITY
        once every frame is settled and none is to come."""
        if self.settled < len(self.frames):
            return self._start(self.settled, self.frames[self.settled][1])
        if next_acquired_s is None:
            return INFINITY
        return self._start(self.settled, next_acquired_s)

    def summary(self) -> dict:
        """The timeline's end and the daemon's busy share of it, for the report."""
        t = list(self.timings.values())
        if not t:
            return {"frames": 0}
        span = max(x.ready_s for x in t) - min(x.acquired_s for x in t)
        busy = sum(x.service_s for x in t)
        return {"frames": len(t), "last_ready_s": round(max(x.ready_s for x in t), 3),
                "service_s": round(busy, 3),
                "max_lag_s": round(max(x.ready_s - x.acquired_s for x in t), 3),
                "busy_fraction": round(busy / span, 4) if span > 0 else None,
                "outages_s": round(sum(self.outages.values()), 3)}
