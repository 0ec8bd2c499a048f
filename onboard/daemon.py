"""The on-board daemon process: the bus around the frame pipeline and the model store.

One turn of the poller loop, read top to bottom in `Daemon.run`:

    poll        sleep until a socket has input, a worker wakes us, or the next timer   bus.Bus.poll
    frames      each FRAME is admitted (ACK, queued for the frame worker) or refused   admission
                (ERROR: that is its outcome)
    commands    each COMMAND runs here and is answered with an ACK, or goes to the     telecommands,
                admin worker (install, rollback)                                        workers
    results     a finished frame's outcome: DECISION (+ PRODUCT to the downlink if     outcomes
                kept, + SAMPLE with a `learning` policy, whatever the decision) or
                ERROR; a finished background command's ACK
    flush       outboxes retried: a payload back after an absence, a downlink pulling  bus.Bus.flush_all
    telemetry   a heartbeat every telemetry.interval_s                                 telemetry
    supervise   a frame past its deadline gets ERROR timeout and stops the watchdog;    supervision
                WATCHDOG=1 / STATUS= to the supervisor while healthy
    drain       once shutting down: leave when every accepted frame has its outcome
                (past shutdown.drain_timeout_s, each still pending gets ERROR shutdown)

Around it: `bind` (the sockets named in config), `load_model` (serving), READY=1 to the
supervisor as `run` begins, `request_shutdown` (SIGTERM, SIGINT, the shutdown command) and
`_close`.

Threads, and why (onboard.workers): the poller loop (the main thread) is the only thread that
touches a ZeroMQ socket; the frame worker runs the pipeline on accepted frames one at a time;
the admin worker runs installs and rollbacks. Workers hand results back through a queue and
wake the poller through a pipe the same `zmq.Poller` watches.

Delivery rules (docs/onboard.md): every FRAME is answered at once with an ACK (accepted) or an
ERROR (refused: that is its outcome); every accepted frame later gets exactly one DECISION or
ERROR, with `ref` = the FRAME's id. The queue is bounded: a full one refuses with `queue_full`,
never drops. Replies to a payload that is gone for a while wait in an outbox and go out when it
reconnects with the same routing id. Products wait in an outbox while the downlink does not
pull, and while that outbox is full new frames are refused. With `supervision.spill_dir` a kept
frame's PRODUCT is on disk (fsync'd) before its DECISION leaves; it stays there until the ground
acknowledges it (`products_received`), and a restarted daemon sends every spilled product again,
so a kill -9 between the DECISION and the downlink loses no kept product. A frame's learning
samples (SAMPLE) follow its DECISION and PRODUCT on the products socket, best effort: never
spilled, and dropped (counted in telemetry `learning.samples`) rather than let them hold up or
refuse frames (onboard.bus.push_sample).
"""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from onboard import outcomes
from onboard.admission import Admission
from onboard.bus import CLOSE_LINGER_MS, PRODUCT_PART_BYTES, Bus, peek_parts
from onboard.config import DaemonConfig
from onboard.errors import (BUSY, DISK_FULL, SHUTDOWN, SPILL_FAILED, TIMEOUT, CommandFailed,
                            is_disk_full)
from onboard.memory import release_memory, tune_allocator
from onboard.outcomes import FrameOutcome
from onboard.products import remove_spilled, spill_product, spilled_products
from onboard.serving import Serving
from onboard.store import ModelStore
from onboard.supervision import EXIT_STALLED, Notifier, Supervision
from onboard.telecommands import Command, execute, find_command, read_command, refusal
from onboard.telemetry import FrameCounters, Heartbeat, LatencyTracker, UncertaintyTracker, rss_mb
from onboard.uploads import Uploads
from onboard.workers import CommandDone, Workers, blocking_hook, decide, frame_deadline
from shared.messages import Limits, Message, encode

log = logging.getLogger("onboard.daemon")

WORKER_JOIN_S = 1.0           # at exit, how long each worker gets to finish
# TEST HOOK: seconds every frame waits before the pipeline (a slowed daemon, as on a loaded
# host); it counts as queue time in timings_ms, not as processing. Never set in flight.
TEST_FRAME_DELAY_ENV = "EOEDGE_TEST_FRAME_DELAY_S"


class Daemon:
    """The parts wired together (the bus, serving, admission, the workers) and the loop over them.

    Commands reach it through a small surface: status, uploads, install, rollback, set_policy,
    request_shutdown (onboard.telecommands)."""

    def __init__(self, config: DaemonConfig, store: ModelStore | None = None):
        tune_allocator()           # before OpenVINO's and libzmq's threads exist (onboard.memory)
        self.config = config
        self.store = store or ModelStore(config.store_root, config.public_key, device=config.device,
                                         num_requests=config.num_requests or None, exclusive=True,
                                         precision=config.precision, capabilities=config.capabilities)
        self.uploads = Uploads(config.uploads, config.max_upload_bytes, config.max_chunk_bytes,
                               max_uploads=config.max_uploads,
                               max_total_bytes=config.max_upload_total_bytes,
                               max_age_s=config.upload_max_age_s, install_dirs=config.install_dirs)
        self.command_limits = Limits(max_array_bytes=config.max_chunk_bytes)
        self.counters = FrameCounters()
        self.latency = LatencyTracker(config.telemetry_window)
        self.uncertainty = UncertaintyTracker(config.telemetry_window)
        self.heartbeat = Heartbeat()
        self.bus = Bus(config)
        self.serving = Serving(self.store, config.device)
        self.admission = Admission(config, self.serving, self.counters)
        self._test_hook = blocking_hook(config.test_block_prefix, config.test_block_s)
        self._test_delay_s = max(0.0, float(os.environ.get(TEST_FRAME_DELAY_ENV) or 0.0))
        self.workers = Workers(self.admission.jobs, self._decide,
                               lambda msg, cmd: execute(self, cmd, msg), self.bus.wake,
                               lambda job: frame_deadline(job, config.frame_deadline_s,
                                                          config.frame_deadline_s_per_mpix))
        self.supervision = Supervision(Notifier(), config.stall_exit_s)
        self._drain_deadline = 0.0
        self._next_telemetry = 0.0
        self.threads_finished = True
        spilled = spilled_products(config.spill_dir)   # an earlier process's, not acknowledged
        if spilled:
            log.info("%d spilled products not acknowledged by the ground: sending them again",
                     len(spilled))
            self.bus.resend_spilled(spilled)

    # ================================================================== start
    def load_model(self) -> None:
        self.serving.load()

    def bind(self) -> dict[str, str]:
        return self.bus.bind()

    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            self.request_shutdown(signal.Signals(signum).name)
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    # ================================================================== the loop
    def run(self) -> int:
        """Serve until SIGTERM or the shutdown command, then drain and return 0 (or, after a
        stall nobody watches for stall_exit_s, EXIT_STALLED)."""
        self.workers.start()
        self.supervision.ready(self.status_line())
        self._publish_telemetry()
        while True:
            ready = self.bus.poll(until=self._next_telemetry)
            if "frames" in ready:
                self.bus.receive("frames", self._on_frame)
            if "commands" in ready:
                self.bus.receive("commands", self._on_command)
            self._collect_results()
            self.bus.flush_all()
            if time.monotonic() >= self._next_telemetry:
                self._publish_telemetry()
            if self._supervise(time.monotonic()):
                return EXIT_STALLED
            if self.admission.closed and self._drained():
                break
        self._close()
        return 0

    def _decide(self, job) -> FrameOutcome:
        """Frame worker: the test hooks (off unless configured), then the pipeline."""
        self._test_hook(job)
        if self._test_delay_s:
            time.sleep(self._test_delay_s)
        return decide(self.serving, job)

    def _supervise(self, now: float) -> bool:
        """A frame past its deadline gets its ERROR `timeout` now and the watchdog pings stop
        (the supervisor restarts us: OpenVINO cannot cancel it); True when unwatched and stuck
        too long, so that we exit for a restart."""
        job = self.workers.stalled(now)
        if job is None:
            self.supervision.recovered()
        elif self.supervision.stalled_since is None:
            self.supervision.stall(now)
            log.error("frame %s passed its deadline: answered `timeout`; watchdog pings stop",
                      job.frame_id)
            self._frame_outcome(FrameOutcome(job, code=TIMEOUT, message=(
                "the frame passed its deadline in the frame worker (supervision.frame_deadline_s); "
                "the daemon restarts: send it again")))
        self.supervision.tick(now, self.status_line())
        if self.supervision.should_exit(now):
            self._exit_stalled()
            return True
        return False

    def _exit_stalled(self) -> None:
        """Unwatched and stuck: tell every pending frame, flush, leave with EXIT_STALLED."""
        log.error("the frame worker has been stuck %.0f s with no watchdog: exiting (code %d) "
                  "for a restart", self.config.stall_exit_s, EXIT_STALLED)
        for job in list(self.admission.pending.values()):
            self._frame_outcome(FrameOutcome(job, code=SHUTDOWN, message=(
                "the daemon restarts after a stall; send it again")))
        self.bus.flush_until(time.monotonic() + CLOSE_LINGER_MS / 1000)
        self.threads_finished = False        # the stuck worker: leave with os._exit

    def status_line(self) -> str:
        """STATUS= for the supervisor: state, model, queue depth, stalls."""
        model = self.model_info()
        name = f"{model['id']} v{model['version']}" if model else "no model"
        return (f"{self.state}; model {name}; queue {len(self.admission.pending)}/"
                f"{self.config.max_frames}; stalls {self.supervision.stalls}")

    def _on_frame(self, route: list, parts: list) -> None:
        reply = self.admission.admit(route, parts, self.bus.pending("products"),
                                     self.bus.product_bytes())
        self.bus.send("frames", route, reply)

    def _on_command(self, route: list, parts: list) -> None:
        try:
            msg = read_command(parts, self.command_limits)
            cmd = find_command(msg.body["name"])
        except CommandFailed as exc:
            return self._ack(route, peek_parts(parts)[0], refusal(exc))
        if not cmd.background:
            return self._ack(route, msg.id, execute(self, cmd, msg))
        if not self.workers.submit(route, msg, cmd):
            self._ack(route, msg.id, refusal(self._busy(cmd)))

    @staticmethod
    def _busy(cmd: Command) -> CommandFailed:
        return CommandFailed(f"busy: an install or rollback is running; {cmd.name} again when it "
                             "has finished", code=BUSY)

    def _ack(self, route: list, ref: str | None, body: dict) -> None:
        self.bus.send("commands", route, Message("ack", body, ref=ref, source=self.config.name))

    def _collect_results(self) -> None:
        frames = 0
        for item in self.workers.results():
            if isinstance(item, CommandDone):
                self._ack(item.route, item.msg.id, item.body)
            else:
                self._frame_outcome(item)
                frames += 1
        if frames:
            release_memory()       # what the frame's small allocations left (onboard.memory)

    def _frame_outcome(self, outcome: FrameOutcome) -> None:
        """Send a frame's one outcome (a late or second one is ignored)."""
        if not self.admission.settle(outcome.job):
            return
        source, route = self.config.name, outcome.job.route
        if outcome.is_error:
            self.counters.errored += 1
            self.bus.send("frames", route, outcomes.error(outcome, source))
            return
        spilled = None
        if outcome.result.keep and self.config.spill_dir is not None:
            spilled = self._spill(outcome)
            if isinstance(spilled, FrameOutcome):
                self.counters.errored += 1
                self.bus.send("frames", route, outcomes.error(spilled, source))
                return
        self.counters.decided += 1
        timings = outcomes.timings_ms(outcome.job, outcome.result, time.monotonic())
        self.latency.add(timings)
        self.bus.send("frames", route, outcomes.decision(outcome, timings, source))
        if outcome.result.keep:
            self.counters.kept += 1
            if spilled is not None and self.bus.pending("products"):
                self.bus.push_spilled(spilled)     # behind others: read back when its turn comes
            else:
                self.bus.push_product(outcomes.product(outcome, source))
        self._learning_samples(outcome, source)

    def _learning_samples(self, outcome: FrameOutcome, source: str) -> None:
        """A decided frame's tile scores into telemetry, its SAMPLE (if any) to the downlink."""
        learning = getattr(outcome.result, "learning", None)
        if learning is None:
            return
        self.uncertainty.add(learning.tile_scores)
        msg = outcomes.sample(outcome, source)
        if msg is not None:
            self.bus.push_sample(msg)

    def _spill(self, outcome: FrameOutcome) -> Path | FrameOutcome:
        """Write a kept frame's product to the spill folder: its path, or an ERROR outcome
        naming the folder when the disk is full (or the write fails)."""
        job = outcome.job
        try:
            return spill_product(self.config.spill_dir, job.frame_id,
                                 encode(outcomes.product(outcome, self.config.name), PRODUCT_PART_BYTES))
        except OSError as exc:
            what = "disk full" if is_disk_full(exc) else "write failed"
            log.error("product of frame %s not spilled to %s: %s", job.frame_id,
                      self.config.spill_dir, exc)
            return FrameOutcome(job, code=DISK_FULL if is_disk_full(exc) else SPILL_FAILED,
                                message=f"{what}: the product could not be written to "
                                        f"{self.config.spill_dir} ({exc.strerror or exc}); "
                                        "send the frame again when there is room")

    def _publish_telemetry(self) -> None:
        body = self.heartbeat.body(self.model_info(), len(self.admission.pending), self.counters,
                                   self.latency, pending_products=self.bus.pending("products"),
                                   state=self.state, stalls=self.supervision.stalls,
                                   refusals=self.admission.refusals.as_dict(),
                                   uploads=self.uploads.counters(), **self._learning_telemetry())
        self.bus.publish(Message("telemetry", body, source=self.config.name))
        self._next_telemetry = time.monotonic() + self.config.telemetry_interval_s

    def _learning_telemetry(self) -> dict:
        """{"learning": ...} once a `learning` policy has scored a frame, else nothing."""
        if not self.uncertainty.frames and not self.bus.samples["queued"]:
            return {}
        return {"learning": {**self.uncertainty.summary(), "samples": self.bus.sample_status()}}

    # ================================================================== shutdown
    def request_shutdown(self, reason: str) -> None:
        """Stop taking frames; finish those accepted (up to the drain timeout); then exit 0."""
        if self.admission.closed:
            return
        self.admission.close(reason)
        self.supervision.stopping(f"draining ({reason})")
        self._drain_deadline = time.monotonic() + self.config.drain_timeout_s
        log.info("shutting down (%s): %d frames pending", reason, len(self.admission.pending))
        self.bus.wake()

    def _drained(self) -> bool:
        if self.admission.pending and time.monotonic() < self._drain_deadline:
            return False
        for job in list(self.admission.pending.values()):   # past the deadline: tell each, don't drop
            self._frame_outcome(FrameOutcome(job, code=SHUTDOWN, message=(
                "the daemon shut down before this frame was processed; send it again")))
        return True

    def _close(self) -> None:
        self.workers.stop()
        self.bus.flush_until(time.monotonic() + CLOSE_LINGER_MS / 1000)
        self._publish_telemetry()
        self.bus.close()
        # A frame cut off by the drain timeout may still be inside OpenVINO: the caller should
        # then leave with os._exit rather than tear the interpreter down under that thread.
        self.threads_finished = self.workers.join(WORKER_JOIN_S)
        log.info("stopped")

    # ================================================================== what commands use
    @property
    def state(self) -> str:
        return "draining" if self.admission.closed else "serving"

    @property
    def endpoints(self) -> dict[str, str]:
        return self.bus.endpoints

    def model_info(self) -> dict | None:
        return self.serving.info()

    def install(self, path: Path) -> dict:
        return self.serving.install(path)

    def rollback(self) -> dict:
        return self.serving.rollback()

    def set_policy(self, policy: dict | None) -> dict:
        return self.serving.set_policy(policy)

    def products_received(self, frame_ids: list[str]) -> dict:
        """The ground holds these frames' products: their spilled copies are removed."""
        if self.config.spill_dir is None:
            return {"removed": 0, "not_held": len(frame_ids), "spill": False}
        removed, not_held = remove_spilled(self.config.spill_dir, frame_ids)
        return {"removed": removed, "not_held": not_held, "spill": True}

    def runtime_settings(self) -> dict:
        """The config's precision setting ("auto" or forced) and declared capabilities."""
        caps = self.config.capabilities
        return {"precision": self.config.precision,
                "capabilities": list(caps) if caps is not None else "auto"}

    def supervision_status(self) -> dict:
        return {"notify_socket": bool(self.supervision.notifier.enabled),
                "watchdog_s": self.supervision.notifier.watchdog_s, "stalls": self.supervision.stalls,
                "stalled": self.supervision.stalled_since is not None}

    def status(self) -> dict:
        return {"model": self.model_info(), "model_error": self.serving.error,
                "device": self.config.device, "runtime": self.runtime_settings(), "state": self.state,
                "uptime": round(self.heartbeat.uptime(), 3), "queue_depth": len(self.admission.pending),
                "max_frames": self.config.max_frames, "frames": self.counters.as_dict(),
                "pending_products": self.bus.pending("products"),
                "latency_ms": self.latency.summary(), **self._learning_telemetry(), "rss_mb": round(rss_mb(), 2),
                "refusals": self.admission.refusals.as_dict(), "outboxes": self.bus.outbox_status(),
                "upload_limits": self.uploads.counters(),
                "supervision": self.supervision_status(),
                "store": self.store.status(), "uploads": self.uploads.list(),
                "endpoints": self.endpoints, "pid": os.getpid()}
