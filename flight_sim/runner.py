"""Fly a scenario: start the daemon, uplink the bundle, replay the scenes, break things, record.

Read top to bottom in `run_scenario`:

    prepare     scene sources, camera, the bundle checked with the public key, endpoints, the
                daemon's config in the run folder
    start       `python -m onboard run` as a separate process (flight_sim.daemon_proc)
    uplink      the bundle in chunks (faults: a chunk corrupted in transit, the link lost midway
                and resumed), install; then the bad bundles a scenario asks for (unsigned,
                corrupted), each refused while the installed model keeps serving
    fly         one loop, one thread (ZeroMQ sockets are not thread-safe): the camera releases
                frames (real time from the orbit, or as fast as the daemon takes them), the
                payload sends them and keeps each until its outcome, products are pulled into
                on-board storage, telemetry is recorded, passes are played as the mission clock
                passes them; faults on the way: kill -9 of the daemon and its restart, malformed
                frames, a burst of frames faster than processing
    land        wait for the last outcomes and products, play the remaining passes, ask the
                daemon's status, shut it down (it drains and exits 0)

Everything observed goes into a `RunRecord`; flight_sim.report turns it into figures and files.
"""
from __future__ import annotations

import copy
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from flight_sim.bus import CommandLink, plan_endpoints
from flight_sim.camera import CameraConfig, CapturedFrame, PushbroomCamera
from flight_sim.daemon_proc import DaemonProcess, write_daemon_config
from flight_sim.downlink import Downlink, GroundStation, passes_from_spec
from flight_sim.payload import Payload
from flight_sim.scenario import Scenario
from flight_sim.scenes import open_source
from flight_sim.uplink import Uplink, corrupt_copy, newer_version_copy, unsigned_copy
from shared.messages import MessageError, decode

log = logging.getLogger("flight_sim")

POLL_MS = 20


class ScenarioFailed(RuntimeError):
    """The scenario could not go on (no model could be installed, the daemon would not start)."""


@dataclass
class RunRecord:
    """What a run observed; times are time.monotonic() unless named *_s (mission seconds)."""

    scenario: Scenario
    out_dir: Path
    manifest: dict = field(default_factory=dict)
    camera: dict = field(default_factory=dict)
    scenes: list[dict] = field(default_factory=list)
    endpoints: dict = field(default_factory=dict)
    payload: Payload | None = None
    downlink: Downlink | None = None
    uplink: dict = field(default_factory=dict)
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
    from shared.bundle import BundleError, verify_bundle

    out_dir = Path(out_dir).resolve()
    if out_dir.exists():
        shutil.rmtree(out_dir / "daemon", ignore_errors=True)
        shutil.rmtree(out_dir / "ground", ignore_errors=True)
        shutil.rmtree(out_dir / "bus", ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    rec = RunRecord(scenario, out_dir, t0=time.monotonic())
    S = scenario.sections

    # ---------------------------------------------------------------- prepare
    sources = [open_source(spec, scenario.base_dir, f"scenes[{i}]") for i, spec in enumerate(scenario.scenes)]
    cam_cfg = CameraConfig(frame_lines=S["camera"]["frame_lines"], gsd_m=float(S["camera"]["gsd_m"]),
                           ground_speed_m_s=float(S["camera"]["ground_speed_m_s"]),
                           dtype=S["camera"]["dtype"],
                           bands=tuple(S["camera"]["bands"]) if S["camera"].get("bands") else None,
                           gap_s=float(S["camera"]["gap_s"]))
    camera = PushbroomCamera(sources, cam_cfg)
    schedule = camera.schedule()
    rec.scenes = [s.describe() for s in sources]
    rec.camera = {**{k: v for k, v in cam_cfg.__dict__.items()}, "mode": S["camera"]["mode"],
                  "speedup": S["camera"]["speedup"], "line_period_s": cam_cfg.line_period_s,
                  "frame_period_s": cam_cfg.frame_period_s, "frames": len(schedule),
                  "duration_s": camera.duration_s}
    bundle = scenario.path("bundle", "path")
    public_key = scenario.path("bundle", "public_key")
    try:
        verified = verify_bundle(bundle, public_key)
    except (BundleError, FileNotFoundError, ValueError) as exc:
        raise ScenarioFailed(f"bundle.path: {bundle} does not verify with bundle.public_key "
                             f"{public_key}: {exc}") from None
    rec.manifest = verified.manifest
    endpoints = plan_endpoints(out_dir, S["daemon"]["transport"])
    rec.endpoints = endpoints.as_dict()
    daemon_dir = out_dir / "daemon"
    biggest = max(camera.bytes_per_frame(s) for s in sources)
    config_path = write_daemon_config(
        daemon_dir / "daemon.toml", endpoints, daemon_dir / "store", daemon_dir / "uploads",
        public_key, max_frames=S["daemon"]["max_frames"],
        max_pending_products=S["daemon"]["max_pending_products"],
        telemetry_interval_s=float(S["daemon"]["telemetry_interval_s"]), device=S["daemon"]["device"],
        num_requests=S["daemon"]["num_requests"], log_level=S["daemon"]["log_level"],
        max_message_bytes=max(256 << 20, 2 * biggest))
    daemon = DaemonProcess(config_path, daemon_dir / "daemon.log")
    passes = passes_from_spec(S["downlink"], camera.duration_s)
    downlink = Downlink(passes, GroundStation(out_dir / "ground"))
    rec.downlink = downlink

    ctx = zmq.Context()
    sockets = []
    try:
        # ------------------------------------------------------------ start
        ready = daemon.start(S["daemon"]["start_timeout_s"])
        rec.event("daemon_started", pid=ready.get("pid"), model=ready.get("model"))
        link = CommandLink(ctx, endpoints.commands, timeout_s=15.0)
        sockets.append(link)
        telemetry = ctx.socket(zmq.SUB)
        telemetry.setsockopt(zmq.SUBSCRIBE, b"")
        telemetry.setsockopt(zmq.LINGER, 0)
        telemetry.connect(endpoints.telemetry)
        products = ctx.socket(zmq.PULL)
        products.setsockopt(zmq.LINGER, 0)
        products.connect(endpoints.products)
        sockets += [telemetry, products]

        # ------------------------------------------------------------ uplink
        rec.uplink = _uplink(scenario, link, bundle, out_dir, rec)

        # ------------------------------------------------------------ fly
        payload = Payload(ctx, endpoints.frames, window=S["payload"]["window"],
                          retry_s=float(S["payload"]["retry_s"]),
                          ack_timeout_s=float(S["payload"]["ack_timeout_s"]),
                          outcome_timeout_s=float(S["payload"]["outcome_timeout_s"]),
                          on_event=lambda kind, st, info: rec.event(
                              kind, frame_id=st.frame.frame_id, **info))
        rec.payload = payload
        sockets.append(payload)
        _fly(scenario, rec, camera, schedule, daemon, link, payload, products, telemetry, downlink,
             progress)

        # ------------------------------------------------------------ land
        downlink.finish()
        rec.event("passes_done")
        try:
            rec.final_status = link.call("status")
            link.call("shutdown")
            rec.exit_code = daemon.wait_exit(30.0)
        except Exception as exc:          # report what we can even if the daemon is unwell
            rec.final_status = rec.final_status or {"error": str(exc)}
            rec.exit_code = daemon.stop()
    finally:
        if daemon.alive():
            daemon.stop()
        for s in sockets:
            s.close() if not isinstance(s, zmq.Socket) else s.close(linger=0)
        ctx.term()
        rec.daemon_events = [{"t": e.t, "kind": e.kind, **e.detail} for e in daemon.events]
        rec.t_end = time.monotonic()
    return rec


def _uplink(scenario: Scenario, link: CommandLink, bundle: Path, out_dir: Path, rec: RunRecord) -> dict:
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


def _fly(scenario: Scenario, rec: RunRecord, camera: PushbroomCamera, schedule: list,
         daemon: DaemonProcess, link: CommandLink, payload: Payload, products: zmq.Socket,
         telemetry: zmq.Socket, downlink: Downlink, progress: bool) -> None:
    S = scenario.sections
    F = S["faults"]
    realtime = S["camera"]["mode"] == "realtime"
    speedup = float(S["camera"]["speedup"])
    base_window = payload.window
    kills = sorted(F["kill_daemon_after_frames"])
    malformed = list(F["malformed"])
    burst = F.get("burst")
    burst_range = range(burst["after_frames"], burst["after_frames"] + burst["frames"]) if burst else range(0)
    deadline = rec.t0 + float(S["run"]["timeout_s"])
    poller = zmq.Poller()
    for sock in (payload.sock, products, telemetry):
        poller.register(sock, zmq.POLLIN)
    bar = _progress(len(schedule) + len(malformed), progress)
    resolved_shown = 0
    next_i = 0
    mission_now = 0.0
    rec.t_fly = time.monotonic()
    product_wait_until = None

    def take_products() -> None:           # what reached us before the daemon died
        _drain(products, lambda parts: _on_product(rec, payload, downlink, parts, realtime, speedup))

    def sent_frames() -> int:
        return sum(1 for s in payload.states.values() if s.attempts > 0)

    while True:
        now = time.monotonic()
        if now > deadline:
            rec.timed_out = True
            rec.event("timeout")
            break
        # ---- the camera releases frames
        while next_i < len(schedule):
            acquired = schedule[next_i][4]
            in_burst = next_i in burst_range
            if in_burst:
                payload.window = base_window + len(burst_range)    # the burst overruns the window
            elif realtime and now < rec.t_fly + acquired / speedup:
                break
            elif not realtime and len(payload.buffer) >= base_window:
                break                                   # asap: capture lazily, memory stays flat
            frame = camera.capture(*schedule[next_i])
            payload.add(frame)
            rec.release[frame.frame_id] = time.monotonic()
            rec.acquired_bytes += frame.nbytes
            rec.normal_frames += 1
            mission_now = max(mission_now, frame.acquired)
            next_i += 1
            # one malformed frame after every `malformed_every` good ones; any left at the last frame
            due = 1 if rec.normal_frames % F["malformed_every"] == 0 else 0
            for kind in [malformed.pop(0) for _ in range(len(malformed) if next_i == len(schedule)
                                                         else min(due, len(malformed)))]:
                bad = _malformed_copy(frame, kind)
                payload.add(bad, malformed=kind)
                rec.release[bad.frame_id] = time.monotonic()
                rec.malformed_frames += 1
            if in_burst and next_i == burst_range.stop:
                rec.event("burst", frames=len(burst_range))
        if burst and payload.window != base_window and next_i >= burst_range.stop and \
                payload.in_flight <= base_window:
            payload.window = base_window             # the burst has drained into the daemon
        # ---- a daemon that died on its own is restarted, as a watchdog would
        if not daemon.alive():
            _restart_after_crash(rec, daemon, payload, S["daemon"]["start_timeout_s"], take_products)
        # ---- kill -9 and restart
        if kills and sent_frames() >= kills[0]:
            kills.pop(0)
            _kill_and_restart(rec, daemon, link, payload, float(F["restart_after_s"]),
                              S["daemon"]["start_timeout_s"], take_products)
        # ---- send, receive
        payload.pump()
        events = dict(poller.poll(POLL_MS))
        if payload.sock in events:
            _drain(payload.sock, payload.handle)
        if products in events:
            _drain(products, lambda parts: _on_product(rec, payload, downlink, parts, realtime, speedup))
        if telemetry in events:
            _drain(telemetry, lambda parts: _on_telemetry(rec, parts))
        # the mission clock: the latest acquisition or product so far (and the wall clock in
        # real time); passes that have ended by then are played
        # (as fast as possible, mission time is notional: every pass is played at the end, from
        # the products' ready times, so late arrivals cannot miss a pass they were ready for)
        rec.mission_s = max(rec.mission_s, mission_now)
        if realtime:
            rec.mission_s = max(rec.mission_s, (time.monotonic() - rec.t_fly) * speedup)
            downlink.advance(rec.mission_s)
        rec.samples.append((time.monotonic(), len(payload.buffer), payload.in_flight))
        resolved = len(payload.states) - payload.unresolved
        if bar is not None and resolved > resolved_shown:
            bar.update(resolved - resolved_shown)
            resolved_shown = resolved
        # ---- done?
        if next_i == len(schedule) and not malformed and payload.unresolved == 0:
            kept = [f for f, s in payload.states.items()
                    if s.outcome == "decision" and s.body.get("keep")]
            missing = [f for f in kept if f not in downlink.products]
            if not missing:
                break
            product_wait_until = product_wait_until or time.monotonic() + 10.0
            if time.monotonic() > product_wait_until:
                rec.products_missing = missing
                break
    if bar is not None:
        bar.close()
    rec.event("flight_done")


def _drain(sock: zmq.Socket, handle) -> None:
    for _ in range(256):
        try:
            parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        handle(parts)


def _on_product(rec: RunRecord, payload: Payload, downlink: Downlink, parts: list,
                realtime: bool, speedup: float) -> None:
    now = time.monotonic()
    try:
        head = decode(parts, downlink.limits)
        frame_id = head.body.get("frame_id")
    except MessageError:
        frame_id = None
    state = payload.states.get(frame_id) if frame_id else None
    if state is None:
        downlink.receive(parts, ready_s=0.0)
        return
    # mission time at which the product was ready: acquisition + the processing latency
    latency = now - rec.release.get(frame_id, now)
    ready = state.frame.acquired + latency * (speedup if realtime else 1.0)
    if downlink.receive(parts, ready_s=ready):
        payload.product_arrived(frame_id)
        rec.product_arrival[frame_id] = now
        rec.mission_s = max(rec.mission_s, ready)


def _on_telemetry(rec: RunRecord, parts: list) -> None:
    try:
        msg = decode(parts)
    except MessageError:
        return
    if msg.type == "telemetry":
        rec.telemetry.append({"t": time.monotonic(), **msg.body})


def _restart_after_crash(rec: RunRecord, daemon: DaemonProcess, payload: Payload,
                         start_timeout_s: float, take_products) -> None:
    code = daemon.proc.returncode if daemon.proc else None
    rec.event("daemon_crashed", exit_code=code)
    log.warning("the daemon exited on its own (code %s); restarting it", code)
    take_products()
    ready = daemon.start(start_timeout_s)
    resent = payload.peer_restarted()
    reprocessed = payload.reprocess_lost_products()
    rec.crashes.append({"exit_code": code, "new_pid": ready.get("pid"), "model_after": ready.get("model"),
                        "frames_resent": resent, "products_lost_reprocessed": reprocessed})


def _kill_and_restart(rec: RunRecord, daemon: DaemonProcess, link: CommandLink, payload: Payload,
                      restart_after_s: float, start_timeout_s: float, take_products) -> None:
    try:
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
    ready = daemon.start(start_timeout_s)
    resent = payload.peer_restarted()
    reprocessed = payload.reprocess_lost_products()
    after = ready.get("model")
    rec.event("daemon_restarted", pid=ready.get("pid"), model=after, resent=resent + reprocessed)
    rec.restarts.append({"killed_pid": pid, "new_pid": ready.get("pid"), "model_before": before,
                         "model_after": after, "same_model": _model_key(before) == _model_key(after),
                         "frames_in_flight": in_flight, "frames_resent": resent,
                         "products_lost_reprocessed": reprocessed,
                         "downtime_s": round(time.monotonic() - t_kill, 3)})
