"""The two threads beside the poller loop, and the queue their results come back through.

    frame worker    takes accepted frames from admission's queue, one at a time, and runs the
                    serving model on each (OpenVINO spreads one frame's tiles over the cores
                    itself), so a 2-second frame never stalls the sockets
    admin worker    runs the background commands (install, rollback: load + self-test take
                    seconds), one at a time; another one meanwhile is refused `busy`

Each puts what it finished on `results` and wakes the poller, which sends the replies: only the
poller's thread touches a socket.

Stalls: the frame worker records the frame it is on and that frame's deadline
(`frame_deadline`: seconds from config, scaled by the frame's size); the poller asks `stalled`
each turn. OpenVINO cannot cancel an inference from Python, so a stuck frame is not taken back
from the worker: the poller answers it with ERROR `timeout` and stops the watchdog pings, and
the supervisor restarts the process (onboard.supervision).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from onboard.admission import FrameJob
from onboard.errors import INTERNAL, FrameError
from onboard.outcomes import FrameOutcome
from onboard.serving import Serving
from onboard.telecommands import Command
from shared.messages import Message

log = logging.getLogger("onboard.daemon")


@dataclass
class CommandDone:
    """A background command's ACK body, for the route it came from."""

    route: list
    msg: Message
    body: dict


def frame_deadline(job: FrameJob, base_s: float, per_mpix_s: float) -> float:
    """Seconds a frame may take in the worker: a base plus a share per megapixel."""
    shape = job.msg.arrays["data"].shape
    return base_s + per_mpix_s * (int(shape[-1]) * int(shape[-2]) / 1e6)


def blocking_hook(prefix: str, block_s: float) -> Callable[[FrameJob], None]:
    """TEST HOOK (config `supervision.test_block_prefix`, empty = off): a frame whose id starts
    with `prefix` holds the frame worker `block_s` seconds, as a hung inference would."""
    def hook(job: FrameJob) -> None:
        if prefix and job.frame_id.startswith(prefix):
            log.warning("test hook: frame %s blocks the frame worker for %.1f s", job.frame_id, block_s)
            time.sleep(block_s)
    return hook


def decide(serving: Serving, job: FrameJob) -> FrameOutcome:
    """One accepted frame through the serving model; never raises (the frame fails, not us)."""
    job.started_at = time.monotonic()
    model = serving.current()
    try:
        slot, pipeline = model
        body = job.msg.body
        result = pipeline.process(job.msg.arrays["data"], body["bands"], body["scale"],
                                  frame_id=job.frame_id)      # seeds a random learning selection
        return FrameOutcome(job, slot, result)
    except FrameError as exc:              # the pipeline's verdict on the frame's values
        return FrameOutcome(job, code=exc.code, message=str(exc))
    except Exception as exc:
        log.exception("frame %s failed in the pipeline", job.frame_id)
        return FrameOutcome(job, code=INTERNAL, message=f"{type(exc).__name__}: {exc}")


class Workers:
    """The frame worker and the admin worker. `decide(job)` and `run(msg, cmd)` are their work;
    `wake()` tells the poller a result is waiting."""

    def __init__(self, jobs: queue.Queue, decide: Callable[[FrameJob], FrameOutcome],
                 run: Callable[[Message, Command], dict], wake: Callable[[], None],
                 deadline: Callable[[FrameJob], float] = lambda job: float("inf")):
        self._jobs = jobs                      # admission's bounded queue; None stops the worker
        self._deadline = deadline
        # The frame the worker is on and when it must be done (monotonic); written by the frame
        # worker as one tuple (atomic to read), read by the poller's `stalled`.
        self.current: tuple[FrameJob, float] | None = None
        self._admin: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._decide, self._run, self._wake = decide, run, wake
        self.admin_busy = False                # read and written by the poller's thread only
        self._threads = [threading.Thread(target=self._frame_worker, name="frame-worker", daemon=True),
                         threading.Thread(target=self._admin_worker, name="admin-worker", daemon=True)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, route: list, msg: Message, cmd: Command) -> bool:
        """Hand a background command to the admin worker; False while another one runs."""
        if self.admin_busy:
            return False
        self.admin_busy = True
        self._admin.put((route, msg, cmd))
        return True

    def results(self) -> Iterator[FrameOutcome | CommandDone]:
        """What the workers finished since the last call (poller's thread)."""
        while True:
            try:
                item = self._results.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, CommandDone):
                self.admin_busy = False
            yield item

    def stop(self) -> None:
        """Ask both workers to finish (a frame inside OpenVINO still runs to its end)."""
        self._jobs.put(None)
        self._admin.put(None)

    def stalled(self, now: float) -> FrameJob | None:
        """The frame the worker has held past its deadline, or None (idle or on time)."""
        current = self.current
        if current is not None and now > current[1]:
            return current[0]
        return None

    def join(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for each; True when both have finished."""
        for thread in self._threads:
            thread.join(timeout=timeout_s)
        return not any(thread.is_alive() for thread in self._threads)

    # ------------------------------------------------------------------ the threads
    def _frame_worker(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.done:           # cancelled at shutdown while it waited
                continue
            self.current = (job, time.monotonic() + self._deadline(job))
            outcome = self._decide(job)
            self.current = None
            self._results.put(outcome)
            # Let go of the frame now: held here, its pixels and products would stay alive
            # while this thread waits for the next frame, and during that frame's receive the
            # daemon would hold two (measured: +70 MB on the full-tile flight).
            del job, outcome
            self._wake()

    def _admin_worker(self) -> None:
        while True:
            item = self._admin.get()
            if item is None:
                return
            route, msg, cmd = item
            self._results.put(CommandDone(route, msg, self._run(msg, cmd)))
            self._wake()
