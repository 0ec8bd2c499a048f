"""Fly a scenario: start the daemon, uplink the bundle, replay the scenes, break things, record.

Read top to bottom in `run_scenario`:

    prepare     scene sources, camera, the bundle checked with the public key, endpoints, the
                daemon's config and a throwaway CURVE key set (daemon + one pair per peer role)
                in the run folder; every socket below connects with its role's keys
    start       `python -m onboard run` as a separate process (flight_sim.daemon_proc)
    uplink      the bundle in chunks (faults: a chunk corrupted in transit, the link lost midway
                and resumed), install; then the bad bundles a scenario asks for (unsigned,
                corrupted), each refused while the installed model keeps serving. Scheduled
                uplinks ([[uplinks]] after_pass = N) come during the flight: the camera holds
                the first frame acquired after pass N's end until every earlier frame has its
                outcome and the pass is played, the newer bundle goes up the same way and is
                installed, then the frames go on (on it)
    fly         one loop, one thread (ZeroMQ sockets are not thread-safe): the camera releases
                frames (paced on the wall clock, or as fast as the daemon takes them), the
                payload sends them and keeps each until its outcome, products are pulled into
                on-board storage (files in the run folder) and acknowledged to the daemon (it
                then drops its spilled copy), telemetry is recorded, passes are played as the
                mission clock passes them; faults on the way: kill -9 of the daemon and its
                restart, malformed frames, a burst of frames faster than processing; SAMPLE
                messages (learning samples) go into on-board storage beside the products
    soak        (flight_sim.soak, when the scenario asks) the supervisor role on a real
                NOTIFY_SOCKET, restarts on a missed watchdog, periodic kill -9, SIGSTOP, a
                filled disk, a corrupted state.json; the daemon's RSS and fds sampled
    land        wait for the last outcomes and products (and the learning samples the daemon
                says it sent), play the remaining passes, ask the daemon's status, shut it down
                (it drains and exits 0)

The mission clock (`[run] clock`): "simulated" (flight_sim.clock: the orbit's cadence and the
daemon's own measured processing time per frame; passes are played when that clock passes them,
so the report does not depend on the host's speed or load) or "wall" (the wall clock scaled by
`camera.speedup`, for soaks that pace a real daemon for minutes).

Everything observed goes into a `RunRecord`; flight_sim.report turns it into figures and files.
"""
from __future__ import annotations

import copy
import logging
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from flight_sim.bus import Endpoints, plan_endpoints
from flight_sim.camera import CameraConfig, CapturedFrame, PushbroomCamera, safe_name
from flight_sim.clock import SimulatedClock
from flight_sim.daemon_proc import DaemonProcess, write_daemon_config
from flight_sim.downlink import Downlink, GroundStation, passes_from_spec
from flight_sim.errors import ScenarioError, ScenarioFailed
from flight_sim.payload import Payload
from flight_sim.scenario import Scenario
from flight_sim.scenes import open_source
from flight_sim.soak import Soak
from flight_sim.uplink import Uplink, corrupt_copy, newer_version_copy, unsigned_copy
from shared.bundle import BundleError, verify_bundle
from shared.chain import verify_chain_bundle
from shared.manifest import is_chain
from shared.client import CommandClient
from shared.curve import client_keys, generate_key_set
from shared.messages import MessageError, decode

__all__ = ["RunRecord", "ScenarioFailed", "run_scenario"]

log = logging.getLogger("flight_sim")

POLL_MS = 20
PRODUCT_WAIT_S = 10.0       # how long the flight waits for a kept frame's late product
ACK_EVERY_S = 1.0           # products received are acknowledged to the daemon this often
ACK_TIMEOUT_S = 1.0         # ... each try waiting this long (a stopped daemon must not stall us)
ACK_BACKOFF_S = 5.0         # ... and after a try that got no answer, this long before the next
MAX_ACK_IDS = 512           # frame ids per acknowledgement
PARK_TRUTH_BYTES = 1 << 20  # a frame's truth this big waits for the report on disk, not in memory


@dataclass
class RunRecord:
    """What a run observed; times are time.monotonic() unless named *_s (mission seconds)."""

    scenario: Scenario
    out_dir: Path
    manifest: dict = field(default_factory=dict)
    chain: dict | None = None                    # a chain bundle: shared.chain.verify_chain_bundle's description
    camera: dict = field(default_factory=dict)
    scenes: list[dict] = field(default_factory=list)
    endpoints: dict = field(default_factory=dict)
    payload: Payload | None = None
    downlink: Downlink | None = None
    uplink: dict = field(default_factory=dict)
    uplinks: list[dict] = field(default_factory=list)   # the scheduled ones ([[uplinks]]), as flown
    restarts: list[dict] = field(default_factory=list)
    telemetry: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    samples: list[tuple[float, int, int]] = field(default_factory=list)   # (t, buffer, in flight)
    release: dict[str, float] = field(default_factory=dict)               # frame_id -> t released
    product_arrival: dict[str, float] = field(default_factory=dict)
    daemon_events: list[dict] = field(default_factory=list)
    final_status: dict = field(default_factory=dict)
    exit_code: int | None = None
    t0: float = 0.0
    t_fly: float = 0.0
    t_end: float = 0.0
    timed_out: bool = False
    acquired_bytes: int = 0
    normal_frames: int = 0
    malformed_frames: int = 0
    products_missing: list[str] = field(default_factory=list)
    mission_s: float = 0.0
    crashes: list[dict] = field(default_factory=list)
    soak: Soak | None = None
    clock: SimulatedClock | None = None          # the simulated mission clock, when flown on it
    acks: dict = field(default_factory=lambda: {"sent": 0, "removed": 0, "failed": 0, "pending": 0})
    peak_rss_mb: float | None = None             # the simulator's own, over the whole run

    def event(self, kind: str, **info) -> None:
        self.events.append({"t": time.monotonic(), "kind": kind, **info})


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:           # the bar is a nicety; the run does not need it
        return None
    return tqdm(total=total, desc="frames", unit="frame", file=sys.stderr, disable=not enabled,
                leave=False)


def _model_key(model: dict | None) -> tuple | None:
    return None if not model else (model.get("id") or model.get("model_id"), model.get("version"))


def run_scenario(scenario: Scenario, out_dir: str | Path, progress: bool = True) -> RunRecord:
    """Fly `scenario` (prepare, start, uplink, fly, land: the module docstring); what was seen
    goes into the RunRecord, whatever happens the daemon is stopped and the sockets closed."""
    out_dir = _fresh_run_folder(out_dir)
    _reset_peak_rss()
    rec = RunRecord(scenario, out_dir, t0=time.monotonic())
    S = scenario.sections

    # ---------------------------------------------------------------- prepare
    camera = _camera(scenario, rec)
    bundle = _verified_bundle(scenario, rec)
    endpoints = plan_endpoints(out_dir, S["daemon"]["transport"])
    rec.endpoints = endpoints.as_dict()
    keys = generate_key_set(out_dir / "daemon" / "keys")     # throwaway CURVE keys for this run
    rec.soak = soak = Soak(S["faults"], S["daemon"], S["report"], out_dir / "daemon")
    writable = soak.prepare()            # the small disk, mounted (unmounted in _tear_down)
    daemon = DaemonProcess(_daemon_config(scenario, camera, endpoints, out_dir / "daemon", keys,
                                          writable),
                           out_dir / "daemon" / "daemon.log")
    daemon.env = {**soak.env(), **_test_env(S["daemon"])}
    rec.downlink = Downlink(passes_from_spec(S["downlink"], camera.duration_s),
                            GroundStation(out_dir / "ground"), queue_dir=out_dir / "downlink_queue")
    scheduled = _scheduled_uplinks(scenario, rec.downlink.passes)

    ctx = zmq.Context()
    sockets: list = []
    try:
        # ------------------------------------------------------------ start
        ready = _start_supervised(rec, daemon, S["daemon"]["start_timeout_s"])
        rec.event("daemon_started", pid=ready.get("pid"), model=ready.get("model"))
        link = CommandClient(endpoints.commands, timeout_s=15.0, retries=3, source="ground", ctx=ctx,
                             keys=client_keys(keys, "operator"))
        sockets.append(link)
        telemetry, products = _listen(ctx, endpoints, keys)
        sockets += [telemetry, products]

        # ------------------------------------------------------------ uplink
        rec.uplink = _uplink(scenario, link, bundle, out_dir, rec)

        # ------------------------------------------------------------ fly
        payload = _payload(ctx, scenario, endpoints.frames, rec, keys)
        rec.payload = payload
        sockets.append(payload)
        flight = _Flight(scenario, rec, camera, daemon, link, payload, products, telemetry, scheduled)
        flight.fly(progress)

        # ------------------------------------------------------------ land
        _land(rec, daemon, link, flight)
    finally:
        _tear_down(rec, daemon, sockets, ctx)
    return rec


def _test_env(daemon: dict) -> dict[str, str]:
    """The daemon's test hooks a scenario asks for (never in flight): a slowed daemon."""
    delay = float(daemon.get("test_frame_delay_s", 0.0))
    return {"EOEDGE_TEST_FRAME_DELAY_S": repr(delay)} if delay > 0 else {}


def _reset_peak_rss() -> None:
    """Start the process's peak-RSS count (VmHWM) afresh, so the run's own peak is what the
    report gives (Linux: writing 5 to /proc/self/clear_refs; elsewhere the process's peak)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    """The simulator's peak resident memory since `_reset_peak_rss`, in MB (1e6 bytes)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) * 1024 / 1e6, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6, 1)


def _fresh_run_folder(out_dir: str | Path) -> Path:
    """The run folder, rid of what an earlier run in it left (daemon, ground station, bus)."""
    out_dir = Path(out_dir).resolve()
    for leftover in ("daemon", "ground", "bus", "downlink_queue", "truth"):
        shutil.rmtree(out_dir / leftover, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _camera(scenario: Scenario, rec: RunRecord) -> PushbroomCamera:
    """The push-broom camera over the scenario's scenes; the scenes and the camera go on record."""
    cam = scenario.sections["camera"]
    sources = [open_source(spec, scenario.base_dir, f"scenes[{i}]")
               for i, spec in enumerate(scenario.scenes)]
    config = CameraConfig(frame_lines=cam["frame_lines"], gsd_m=float(cam["gsd_m"]),
                          ground_speed_m_s=float(cam["ground_speed_m_s"]), dtype=cam["dtype"],
                          bands=tuple(cam["bands"]) if cam.get("bands") else None,
                          gap_s=float(cam["gap_s"]))
    camera = PushbroomCamera(sources, config)
    rec.scenes = [s.describe() for s in sources]
    rec.camera = {**config.__dict__, "mode": cam["mode"], "speedup": cam["speedup"],
                  "line_period_s": config.line_period_s, "frame_period_s": config.frame_period_s,
                  "frames": len(camera.schedule()), "duration_s": camera.duration_s}
    return camera


def _verified_bundle(scenario: Scenario, rec: RunRecord) -> Path:
    """The scenario's bundle, checked with its public key before any daemon starts."""
    bundle = scenario.path("bundle", "path")
    public_key = scenario.path("bundle", "public_key")
    try:
        rec.manifest = verify_bundle(bundle, public_key).manifest
        if is_chain(rec.manifest):               # and each step with the same key, as the daemon does
            rec.chain = verify_chain_bundle(bundle, public_key)
    except (BundleError, FileNotFoundError, ValueError) as exc:
        raise ScenarioFailed(f"bundle.path: {bundle} does not verify with bundle.public_key "
                             f"{public_key}: {exc}") from None
    return bundle


def _scheduled_uplinks(scenario: Scenario, passes: list) -> list[dict]:
    """The scenario's [[uplinks]], each bundle checked with its key (default the [bundle] one)
    before any daemon starts, its pass on the timeline: {path, public_key, after_pass, at_s
    (the pass's end), model_id, version}."""
    out = []
    for i, up in enumerate(scenario.sections.get("uplinks") or []):
        where = f"uplinks[{i}]"
        if up["after_pass"] >= len(passes):
            raise ScenarioError(f"{where}.after_pass: {up['after_pass']}, but the timeline has "
                                f"{len(passes)} passes (0..{len(passes) - 1})")
        path = (scenario.base_dir / up["path"]).expanduser().resolve()
        key = ((scenario.base_dir / up["public_key"]).expanduser().resolve() if up.get("public_key")
               else scenario.path("bundle", "public_key"))
        try:
            manifest = verify_bundle(path, key).manifest
        except (BundleError, FileNotFoundError, ValueError) as exc:
            raise ScenarioFailed(f"{where}.path: {path} does not verify with {key}: {exc}") from None
        out.append({"index": i, "path": path, "public_key": key, "after_pass": up["after_pass"],
                    "at_s": passes[up["after_pass"]].end_s, "model_id": manifest.get("model_id"),
                    "version": manifest.get("version")})
    return out


def _daemon_config(scenario: Scenario, camera: PushbroomCamera, endpoints: Endpoints,
                   daemon_dir: Path, keys: Path, writable: Path | None = None) -> Path:
    """The daemon's TOML in the run folder, from the scenario's [daemon] section; its store,
    uploads and spill go under `writable` when given (the soak's small disk)."""
    D = scenario.sections["daemon"]
    biggest = max(camera.bytes_per_frame(s) for s in camera.sources)
    data_dir = writable or daemon_dir
    supervision = {"frame_deadline_s": float(D["frame_deadline_s"])} if "frame_deadline_s" in D else {}
    if D.get("spill"):
        supervision["spill_dir"] = str(data_dir / "spill")
    return write_daemon_config(
        daemon_dir / "daemon.toml", endpoints, data_dir / "store", data_dir / "uploads",
        scenario.path("bundle", "public_key"), max_frames=D["max_frames"],
        max_pending_products=D["max_pending_products"],
        telemetry_interval_s=float(D["telemetry_interval_s"]), device=D["device"],
        num_requests=D["num_requests"], log_level=D["log_level"],
        max_message_bytes=max(256 << 20, 2 * biggest),     # room for the largest frame, twice
        keys=keys, extra={"supervision": supervision} if supervision else None)


def _listen(ctx: zmq.Context, endpoints: Endpoints, keys: Path) -> tuple[zmq.Socket, zmq.Socket]:
    """The daemon's telemetry (SUB, everything) and products (PULL) sockets, connected with the
    telemetry and downlink roles' keys."""
    telemetry = client_keys(keys, "telemetry").apply(ctx.socket(zmq.SUB))
    telemetry.setsockopt(zmq.SUBSCRIBE, b"")
    telemetry.setsockopt(zmq.LINGER, 0)
    telemetry.connect(endpoints.telemetry)
    products = client_keys(keys, "downlink").apply(ctx.socket(zmq.PULL))
    products.setsockopt(zmq.LINGER, 0)
    products.connect(endpoints.products)
    return telemetry, products


def _payload(ctx: zmq.Context, scenario: Scenario, endpoint: str, rec: RunRecord, keys: Path) -> Payload:
    """The payload's link from the scenario's [payload] section; its events go on record."""
    P = scenario.sections["payload"]
    return Payload(ctx, endpoint, window=P["window"], retry_s=float(P["retry_s"]),
                   ack_timeout_s=float(P["ack_timeout_s"]),
                   outcome_timeout_s=float(P["outcome_timeout_s"]),
                   on_event=lambda kind, st, info: rec.event(kind, frame_id=st.frame.frame_id, **info),
                   keys=client_keys(keys, "payload"))


def _land(rec: RunRecord, daemon: DaemonProcess, link: CommandClient, flight: "_Flight") -> None:
    """The learning samples still on their way, the remaining passes played, the daemon's
    status, its shutdown (it drains, exits 0)."""
    flight.collect_samples()
    rec.downlink.finish()
    rec.event("passes_done")
    try:
        rec.final_status = link.call("status")
        link.call("shutdown")
        rec.exit_code = daemon.wait_exit(30.0)
    except Exception as exc:          # report what we can even if the daemon is unwell
        rec.final_status = rec.final_status or {"error": str(exc)}
        rec.exit_code = daemon.stop()


def _tear_down(rec: RunRecord, daemon: DaemonProcess, sockets: list, ctx: zmq.Context) -> None:
    """However the run ended: no daemon left running, every socket closed, its events recorded."""
    if daemon.alive():
        daemon.stop()
    for s in sockets:
        s.close() if not isinstance(s, zmq.Socket) else s.close(linger=0)
    ctx.term()
    rec.daemon_events = [{"t": e.t, "kind": e.kind, **e.detail} for e in daemon.events]
    if rec.soak is not None:
        rec.soak.close()              # the small disk unmounted, the notify socket closed
    rec.peak_rss_mb = _peak_rss_mb()
    rec.t_end = time.monotonic()


def _uplink(scenario: Scenario, link: CommandClient, bundle: Path, out_dir: Path, rec: RunRecord) -> dict:
    S = scenario.sections
    F = S["faults"]
    up = Uplink(link, S["bundle"]["chunk_size"])
    result: dict = {"bundle": str(bundle), "attempts": []}
    t = time.monotonic()
    report = up.upload(bundle, interrupt_after=F.get("interrupt_uplink_after_chunks"),
                       corrupt_chunks=tuple(F["corrupt_chunks"]))
    rec.event("uplinked", bundle=bundle.name, chunks=report.chunks)
    ack = up.install(report.upload_id)
    result["attempts"].append({"kind": "good", "upload": report.as_dict(), "ok": ack.get("ok"),
                               "error": ack.get("error"), "result": ack.get("result"),
                               "seconds": round(time.monotonic() - t, 3)})
    if not ack.get("ok"):
        raise ScenarioFailed(f"the daemon refused the scenario's bundle {bundle}: {ack.get('error')}")
    rec.event("installed", model=ack["result"].get("model_id"), version=ack["result"].get("version"))
    active = link.call("status")["model"]
    result["active"] = active
    bad_dir = out_dir / "uplink"
    private_key = scenario.path("bundle", "private_key")

    def corrupted(src: Path, out: Path) -> Path:
        # with the signing key, corrupt a newer version: refused for its checksum, not its age
        if private_key is not None:
            src = newer_version_copy(src, out.with_name("newer-" + out.name), private_key)
        return corrupt_copy(src, out)

    for kind, enabled, make in (("unsigned", F["unsigned_bundle"], unsigned_copy),
                                ("corrupt", F["corrupt_bundle"], corrupted)):
        if not enabled:
            continue
        bad_dir.mkdir(exist_ok=True)
        bad = make(bundle, bad_dir / f"{kind}-{bundle.name}")
        rep = up.upload(bad)
        ack = up.install(rep.upload_id)
        after = link.call("status")["model"]
        result["attempts"].append({"kind": kind, "upload": rep.as_dict(), "ok": ack.get("ok"),
                                   "error": ack.get("error"), "model_after": after,
                                   "still_serving": _model_key(after) == _model_key(active)})
        rec.event("bad_bundle_refused" if not ack.get("ok") else "bad_bundle_accepted", bundle=kind,
                  error=ack.get("error"))
    return result


def _malformed_copy(frame: CapturedFrame, kind: str) -> CapturedFrame:
    bad = copy.copy(frame)
    bad.frame_id = f"{frame.frame_id}-bad-{kind}"
    bad.truth = bad.objects = None
    return bad


class _Flight:
    """The fly step: one loop in one thread (ZeroMQ sockets are not thread-safe), each turn the
    steps of `fly`. It ends when every frame has its outcome and every kept frame's product is
    in (or missing after PRODUCT_WAIT_S), or at the scenario's run.timeout_s."""

    def __init__(self, scenario: Scenario, rec: RunRecord, camera: PushbroomCamera,
                 daemon: DaemonProcess, link: CommandClient, payload: Payload, products: zmq.Socket,
                 telemetry: zmq.Socket, scheduled: list[dict] | None = None):
        S = scenario.sections
        self.chunk_size = S["bundle"]["chunk_size"]
        self.scheduled = list(scheduled or [])    # uplinks still to come, by pass
        self.hold_since: float | None = None      # the camera waits for a scheduled uplink
        self.faults, self.start_timeout_s = S["faults"], S["daemon"]["start_timeout_s"]
        self.rec, self.camera, self.daemon, self.link = rec, camera, daemon, link
        self.daemon_dir = Path(daemon.config_path).parent if rec.soak is None or \
            rec.soak.disk is None else rec.soak.disk.path
        self.payload, self.products, self.telemetry = payload, products, telemetry
        self.downlink = rec.downlink
        self.realtime = S["camera"]["mode"] == "realtime"
        self.previews = S["report"]["previews"]
        self.speedup = float(S["camera"]["speedup"])
        self.deadline = rec.t0 + float(S["run"]["timeout_s"])
        self.schedule = camera.schedule()
        self.next_i = 0                      # the next frame of the schedule to release
        self.mission_now = 0.0               # acquisition time of the latest frame released
        self.base_window = payload.window
        self.kills = sorted(self.faults["kill_daemon_after_frames"])
        self.malformed = list(self.faults["malformed"])
        burst = self.faults.get("burst")
        self.burst = (range(burst["after_frames"], burst["after_frames"] + burst["frames"])
                      if burst else range(0))
        self.product_wait_until: float | None = None
        self.link_down_after = self.faults.get("products_link_down_after_frames")
        self.link_down = False            # the products socket disconnected (a fault)
        self.durable = bool(S["daemon"].get("spill"))  # the daemon keeps products until acknowledged
        self.unacked: list[str] = []                   # products received, not yet acknowledged
        self.next_ack = 0.0
        if S["run"]["clock"] == "simulated":
            # a kill -9 costs the daemon restart_after_s before the frame it came after
            rec.clock = SimulatedClock({n: float(self.faults["restart_after_s"]) for n in self.kills})
        self.clock = rec.clock
        self.bar = None
        self.shown = 0                       # outcomes the progress bar shows
        self.poller = zmq.Poller()
        for sock in (payload.sock, products, telemetry):
            self.poller.register(sock, zmq.POLLIN)

    def fly(self, progress: bool) -> None:
        self.bar = _progress(len(self.schedule) + len(self.malformed), progress)
        self.rec.t_fly = time.monotonic()
        while True:
            now = time.monotonic()
            if now > self.deadline:
                self.rec.timed_out = True
                self.rec.event("timeout")
                break
            self._release_frames(now)
            self._end_burst()
            self._watch_daemon()
            self._exchange()
            self._acknowledge()
            self._advance_clock()
            self._record_buffers()
            if self._done():
                break
        self._advance_clock()             # products named missing settle their frames too
        while self.scheduled and not self.rec.timed_out:   # after the last frame: up all the same
            self._uplink_now(self.scheduled.pop(0), None)
        self._acknowledge(final=True)
        if self.bar is not None:
            self.bar.close()
        self.rec.event("flight_done")

    # ------------------------------------------------------------------ the camera
    def _release_frames(self, now: float) -> None:
        """The camera releases what is due: in real time, each frame once its last line is
        recorded (on the wall clock scaled by speedup); as fast as possible, while the payload
        buffer has room. On the simulated clock a frame's times are the schedule's, so in real
        time too a frame is rendered only once the buffer has room (a host slower than the
        orbit at rendering scenes would otherwise hold every overdue frame's pixels: the whole
        tile). A burst goes at once and overruns the window."""
        while self.next_i < len(self.schedule):
            in_burst = self.next_i in self.burst
            if self.scheduled and self.schedule[self.next_i][4] >= self.scheduled[0]["at_s"] \
                    and not self._scheduled_uplink():
                break                                   # held for the uplink after a pass
            if in_burst:
                self.payload.window = self.base_window + len(self.burst)
            elif self.realtime and now < self.rec.t_fly + self.schedule[self.next_i][4] / self.speedup:
                break
            elif (self.clock is not None or not self.realtime) \
                    and len(self.payload.buffer) >= self.base_window:
                break                                   # capture lazily, memory stays flat
            frame = self._capture()
            self._add_malformed(frame)
            if in_burst and self.next_i == self.burst.stop:
                self.rec.event("burst", frames=len(self.burst))

    def _scheduled_uplink(self) -> bool:
        """The next [[uplinks]] bundle, once every frame acquired before its pass's end has its
        outcome (and, on the simulated clock, is settled, so the pass is played: a product that
        never comes is waited for PRODUCT_WAIT_S); True once it is up (the camera goes on),
        False while it waits."""
        now = time.monotonic()
        if self.payload.unresolved or (self.realtime and self.clock is None and
                                       (now - self.rec.t_fly) * self.speedup < self.scheduled[0]["at_s"]):
            return False                 # (on the wall clock in real time: the pass must be over too)
        self.hold_since = self.hold_since or now
        self._advance_clock()
        if self.clock is not None and self.clock.settled < len(self.clock.frames) \
                and now - self.hold_since < PRODUCT_WAIT_S:
            return False
        self.hold_since = None
        self._uplink_now(self.scheduled.pop(0), self.next_i)
        return True

    def _uplink_now(self, up: dict, next_frame: int | None) -> None:
        """Upload and install a scheduled bundle (flight_sim.uplink, as the first one); what
        happened goes on record (the report finds the first frame decided with it)."""
        rec, t = self.rec, time.monotonic()
        before = after = report = None
        try:
            before = _model_key(self.link.call("status")["model"])
            uplink = Uplink(self.link, self.chunk_size)
            report = uplink.upload(up["path"]).as_dict()
            ack = uplink.install(report["upload_id"])
            after = _model_key(self.link.call("status")["model"])
        except Exception as exc:          # a lost link or a refusal: on record, the flight goes on
            ack = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        played = self.downlink.passes_played > up["after_pass"]
        entry = {"index": up["index"], "bundle": str(up["path"]), "after_pass": up["after_pass"],
                 "mission_s": round(up["at_s"], 3), "pass_played": played,
                 "model_id": up["model_id"], "version": up["version"], "ok": bool(ack.get("ok")),
                 "error": ack.get("error"),
                 "model_before": {"id": before[0], "version": before[1]} if before else None,
                 "model_after": {"id": after[0], "version": after[1]} if after else None,
                 "upload": report or {}, "seconds": round(time.monotonic() - t, 3),
                 "next_frame": (None if next_frame is None else
                                {"schedule_index": next_frame,
                                 "acquired_s": round(self.schedule[next_frame][4], 6)})}
        rec.uplinks.append(entry)
        rec.event("scheduled_uplink", bundle=up["path"].name, ok=entry["ok"], version=up["version"])
        log.info("scheduled uplink %s after pass %d: %s", up["path"].name, up["after_pass"],
                 "installed" if entry["ok"] else f"refused ({entry['error']})")

    def collect_samples(self) -> None:
        """Learning samples follow their frame's DECISION on the products socket: after the
        last outcome, wait (PRODUCT_WAIT_S at most) until the daemon's outbox holds none and
        as many SAMPLE messages came as it says it sent (its status `learning.samples`)."""
        until = time.monotonic() + PRODUCT_WAIT_S
        while self.daemon.alive() and time.monotonic() < until:
            self._take_products()
            try:
                status = self.link.request("status", {}, timeout_s=ACK_TIMEOUT_S, retries=0)
            except Exception:
                return
            counts = ((status.get("result") or {}).get("learning") or {}).get("samples") or {}
            if not counts or (not counts.get("waiting") and
                              self.downlink.sample_messages_seen >= counts.get("sent", 0)):
                self._take_products()
                return
            time.sleep(POLL_MS / 1000)

    def _capture(self) -> CapturedFrame:
        frame = self.camera.capture(*self.schedule[self.next_i])
        if not self.previews:
            frame.extra["preview"] = None     # a long soak keeps no pixels per frame
        self._park_truth(frame)
        self.payload.add(frame)
        self.rec.release[frame.frame_id] = time.monotonic()
        self.rec.acquired_bytes += frame.nbytes
        self.rec.normal_frames += 1
        if self.clock is not None:
            self.clock.add(frame.frame_id, frame.acquired)
        self.mission_now = max(self.mission_now, frame.acquired)
        self.next_i += 1
        return frame

    def _park_truth(self, frame: CapturedFrame) -> None:
        """A large frame's truth (labels, object ids) goes to the run folder and is read back
        as a read-only memory map: the report scores it at the end, a full tile's would
        otherwise sit in memory all flight long (17 MB a 512-line frame)."""
        folder = self.rec.out_dir / "truth"
        for name in ("truth", "objects"):
            values = getattr(frame, name)
            if values is not None and values.nbytes >= PARK_TRUTH_BYTES:
                folder.mkdir(exist_ok=True)
                path = folder / f"{safe_name(frame.frame_id)}.{name}.npy"
                np.save(path, values)
                setattr(frame, name, np.load(path, mmap_mode="r"))

    def _add_malformed(self, frame: CapturedFrame) -> None:
        """One malformed copy after every `malformed_every` good frames; any left after the last."""
        if self.next_i == len(self.schedule):
            due = len(self.malformed)
        else:
            due = min(len(self.malformed),
                      1 if self.rec.normal_frames % self.faults["malformed_every"] == 0 else 0)
        for _ in range(due):
            kind = self.malformed.pop(0)
            bad = _malformed_copy(frame, kind)
            self.payload.add(bad, malformed=kind)
            self.rec.release[bad.frame_id] = time.monotonic()
            self.rec.malformed_frames += 1

    def _end_burst(self) -> None:
        """The window goes back to normal once the burst has drained into the daemon."""
        if self.burst and self.payload.window != self.base_window and \
                self.next_i >= self.burst.stop and self.payload.in_flight <= self.base_window:
            self.payload.window = self.base_window

    # ------------------------------------------------------------------ the daemon
    def _watch_daemon(self) -> None:
        """A daemon that died on its own is restarted, as a watchdog would; the scenario's
        kill -9 comes once that many frames have been sent."""
        soak = self.rec.soak
        if not self.daemon.alive():
            _restart_after_crash(self.rec, self.daemon, self.payload, self.start_timeout_s,
                                 self._take_products, self.durable)
        if self.link_down_after is not None and self._sent_frames() >= self.link_down_after:
            self.link_down_after = None
            self._products_link(up=False)
        if self.kills and self._sent_frames() >= self.kills[0]:
            self.kills.pop(0)
            self._restart("kill -9")
        if soak is not None and soak.active:
            soak.step(time.monotonic() - self.rec.t_fly, self.daemon.pid, self._restart,
                      lambda name, args: self.link.request(name, args, timeout_s=15.0),
                      self.daemon_dir / "store")

    def _restart(self, cause: str) -> None:
        """kill -9, start again, resend (a scenario's kill, the soak's faults, a missed watchdog)."""
        _kill_and_restart(self.rec, self.daemon, self.link, self.payload,
                          float(self.faults["restart_after_s"]), self.start_timeout_s,
                          self._take_products, cause, self.durable)
        self._products_link(up=True)

    def _products_link(self, up: bool) -> None:
        """The fault products_link_down_after_frames: the simulator's products socket leaves the
        daemon (what reached it is taken first), so kept products wait in the daemon; it comes
        back after the next restart or once every frame has its outcome."""
        if up == (not self.link_down):
            return
        endpoint = self.rec.endpoints["products"]
        if up:
            self.products.connect(endpoint)
        else:
            self._take_products()
            self.products.disconnect(endpoint)
        self.link_down = not up
        self.rec.event("products_link_up" if up else "products_link_down")

    def _sent_frames(self) -> int:
        return sum(1 for s in self.payload.states.values() if s.attempts > 0)

    # ------------------------------------------------------------------ the sockets
    def _exchange(self) -> None:
        """Send what the window allows, then take what came: acks and outcomes, products,
        telemetry."""
        self.payload.pump()
        events = dict(self.poller.poll(POLL_MS))
        if self.payload.sock in events:
            _drain(self.payload.sock, self.payload.handle)
        if self.products in events:
            self._take_products()
        if self.telemetry in events:
            _drain(self.telemetry, lambda parts: _on_telemetry(self.rec, parts))

    def _take_products(self) -> None:
        """Products waiting on the socket (also called before a restart: what reached us before
        the daemon died)."""
        _drain(self.products, self._on_product)

    def _on_product(self, parts: list) -> None:
        """A PRODUCT into on-board storage (a second copy, sent again after a restart, is
        dropped there), with its ready time when known; acknowledged to the daemon either way.
        A SAMPLE goes there too (its frame's ready time), never acknowledged (not spilled)."""
        now = time.monotonic()
        try:
            msg = decode(parts, self.downlink.limits)
            frame_id, kind = msg.body.get("frame_id"), msg.type
        except MessageError:
            frame_id, kind = None, None
        if kind == "sample":
            state = self.payload.states.get(frame_id)
            self.downlink.receive(parts, ready_s=self._ready_s(frame_id, state, now) if state else 0.0)
            return
        if frame_id and self.durable:
            self.unacked.append(frame_id)
        state = self.payload.states.get(frame_id) if frame_id else None
        if state is None:                   # not one of ours, or not a product: counted there
            self.downlink.receive(parts, ready_s=0.0)
            return
        ready = self._ready_s(frame_id, state, now)
        if self.downlink.receive(parts, ready_s=ready):
            self.payload.product_arrived(frame_id)
            self.rec.product_arrival[frame_id] = now
            if ready is not None:
                self.rec.mission_s = max(self.rec.mission_s, ready)

    def _ready_s(self, frame_id: str, state, now: float) -> float | None:
        """The mission time a product was ready. On the simulated clock: its frame's end of
        processing once the clock has settled it (None until then: `_advance_clock` sets it).
        On the wall clock: acquisition + the wall time from release to arrival."""
        if self.clock is not None:
            timing = self.clock.timings.get(frame_id)
            return timing.ready_s if timing else None
        latency = now - self.rec.release.get(frame_id, now)
        return state.frame.acquired + latency * (self.speedup if self.realtime else 1.0)

    def _acknowledge(self, final: bool = False) -> None:
        """Tell the daemon which products the ground holds (it removes its spilled copies), at
        most every ACK_EVERY_S; what it does not answer is told again later."""
        now = time.monotonic()
        if not self.unacked or not self.daemon.alive() or (now < self.next_ack and not final):
            return
        batch = list(dict.fromkeys(self.unacked[:MAX_ACK_IDS]))
        acks = self.rec.acks
        try:
            reply = self.link.request("products_received", {"frame_ids": batch},
                                      timeout_s=ACK_TIMEOUT_S * (5 if final else 1), retries=0)
        except Exception:                   # stopped, restarting: later
            reply = {}
        if reply.get("ok"):
            del self.unacked[:MAX_ACK_IDS]
            acks["sent"] += len(batch)
            acks["removed"] += reply["result"].get("removed", 0)
            self.next_ack = now + ACK_EVERY_S
        else:
            acks["failed"] += 1
            self.next_ack = now + ACK_BACKOFF_S
        acks["pending"] = len(self.unacked)

    # ------------------------------------------------------------------ clock and record
    def _service_s(self, frame_id: str) -> float | None:
        """A frame's processing time as the daemon measured it (DECISION timings_ms total -
        queue), once it is settled: decided and, if kept, its product in (or named missing);
        0 for an ERROR; None while open."""
        state = self.payload.states.get(frame_id)
        if state is None or state.outcome is None:
            return None
        if state.outcome != "decision":
            return 0.0
        if state.body.get("keep") and frame_id not in self.downlink.products \
                and frame_id not in self.rec.products_missing:
            return None
        t = state.body.get("timings_ms") or {}
        return max(0.0, float(t.get("total", 0.0)) - float(t.get("queue", 0.0))) / 1000

    def _advance_clock(self) -> None:
        """The mission clock. Simulated: frames settled in acquisition order give their
        products' ready times, and passes that end before anything still open could be ready
        are played. Wall: the latest acquisition or product so far (and the wall clock in real
        time); as fast as possible, every pass is played at the end from the products' ready
        times, so late arrivals cannot miss a pass they were ready for."""
        rec = self.rec
        rec.mission_s = max(rec.mission_s, self.mission_now)
        if self.clock is not None:
            for timing in self.clock.settle(self._service_s):
                self.downlink.set_ready(timing.frame_id, timing.ready_s)
                rec.mission_s = max(rec.mission_s, timing.ready_s)
            upcoming = self.schedule[self.next_i][4] if self.next_i < len(self.schedule) else None
            self.downlink.advance(self.clock.now_s(upcoming))
        elif self.realtime:
            rec.mission_s = max(rec.mission_s, (time.monotonic() - rec.t_fly) * self.speedup)
            self.downlink.advance(rec.mission_s)

    def _record_buffers(self) -> None:
        """A sample of the payload's buffer and window for the timeline; the progress bar."""
        self.rec.samples.append((time.monotonic(), len(self.payload.buffer), self.payload.in_flight))
        resolved = len(self.payload.states) - self.payload.unresolved
        if self.bar is not None and resolved > self.shown:
            self.bar.update(resolved - self.shown)
            self.shown = resolved

    def _done(self) -> bool:
        """Every frame released and resolved, and every kept frame's product in; late products
        are waited for PRODUCT_WAIT_S, then named missing."""
        if self.next_i < len(self.schedule) or self.malformed or self.payload.unresolved:
            return False
        self._products_link(up=True)
        kept = [f for f, s in self.payload.states.items()
                if s.outcome == "decision" and s.body.get("keep")]
        missing = [f for f in kept if f not in self.downlink.products]
        if not missing:
            return True
        self.product_wait_until = self.product_wait_until or time.monotonic() + PRODUCT_WAIT_S
        if time.monotonic() > self.product_wait_until:
            self.rec.products_missing = missing
            return True
        return False


def _drain(sock: zmq.Socket, handle) -> None:
    for _ in range(256):
        try:
            parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        handle(parts)


def _on_telemetry(rec: RunRecord, parts: list) -> None:
    try:
        msg = decode(parts)
    except MessageError:
        return
    if msg.type == "telemetry":
        rec.telemetry.append({"t": time.monotonic(), **msg.body})


def _start_supervised(rec: RunRecord, daemon: DaemonProcess, start_timeout_s: float) -> dict:
    """Start the daemon (again); with the soak's supervisor, wait for READY=1 as systemd does."""
    if rec.soak is not None:
        rec.soak.arm()
    ready = daemon.start(start_timeout_s)
    if rec.soak is not None:
        rec.soak.started(start_timeout_s)
    return ready


def _restart_after_crash(rec: RunRecord, daemon: DaemonProcess, payload: Payload,
                         start_timeout_s: float, take_products, durable: bool) -> None:
    code = daemon.proc.returncode if daemon.proc else None
    rec.event("daemon_crashed", exit_code=code)
    log.warning("the daemon exited on its own (code %s); restarting it", code)
    take_products()
    ready = _start_supervised(rec, daemon, start_timeout_s)
    resent = payload.peer_restarted()
    reprocessed = _recover_products(payload, durable)
    rec.crashes.append({"exit_code": code, "new_pid": ready.get("pid"), "model_after": ready.get("model"),
                        "frames_resent": resent, "products_lost_reprocessed": reprocessed})


def _kill_and_restart(rec: RunRecord, daemon: DaemonProcess, link: CommandClient, payload: Payload,
                      restart_after_s: float, start_timeout_s: float, take_products,
                      cause: str = "kill -9", durable: bool = False) -> None:
    try:
        if cause == "watchdog":             # a stopped or stuck daemon answers nothing
            raise TimeoutError
        before = link.call("status", timeout_s=5.0, retries=0)["model"]
    except Exception:                       # busy or slow: the last heartbeat says it as well
        before = rec.telemetry[-1].get("model") if rec.telemetry else None
    in_flight = payload.in_flight
    pid = daemon.pid
    daemon.kill()
    t_kill = time.monotonic()
    rec.event("daemon_killed", pid=pid, in_flight=in_flight)
    log.info("killed the daemon (pid %s) with %d frames in flight", pid, in_flight)
    time.sleep(restart_after_s)
    take_products()                   # products that left before the kill; the rest died with it
    awaited = sum(1 for s in payload.states.values() if s.awaiting_product)
    ready = _start_supervised(rec, daemon, start_timeout_s)
    resent = payload.peer_restarted()
    reprocessed = _recover_products(payload, durable)
    after = ready.get("model")
    rec.event("daemon_restarted", pid=ready.get("pid"), model=after, resent=resent + reprocessed)
    if rec.soak is not None and rec.soak.active:
        try:
            rec.soak.note_status(link.call("status", timeout_s=10.0, retries=1))
        except Exception:
            pass
    rec.restarts.append({"cause": cause, "killed_pid": pid, "new_pid": ready.get("pid"),
                         "model_before": before,
                         "model_after": after, "same_model": _model_key(before) == _model_key(after),
                         "frames_in_flight": in_flight, "frames_resent": resent,
                         "products_lost_reprocessed": reprocessed,
                         "products_awaited_from_spill": awaited if durable else 0,
                         "downtime_s": round(time.monotonic() - t_kill, 3)})


def _recover_products(payload: Payload, durable: bool) -> int:
    """After the daemon died: kept frames whose product had not come. A daemon that spills
    sends them again itself (they were on disk before their DECISION); without a spill folder
    the frames are processed again. The count processed again."""
    return 0 if durable else payload.reprocess_lost_products()
