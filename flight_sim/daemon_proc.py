"""The on-board daemon as a separate process: configure, start, kill -9, restart, stop.

The simulator writes the daemon's TOML config (endpoints from `flight_sim.bus.plan_endpoints`,
its store, upload folder and public key in the run folder, and `[security]` naming the run's
throwaway CURVE key set: shared.curve.generate_key_set), starts
`python -m onboard run --config FILE --json` and reads the one JSON line the daemon prints
once its sockets are bound (pid, endpoints, active model). Its log (stderr) goes to a file in
the run folder. Nothing of `onboard` is imported here.

Memory: while a daemon runs, a thread reads its peak resident set (VmHWM in /proc/PID/status,
the kernel's own high-water mark, so no peak between two reads is missed) every
PEAK_POLL_S; the peak of each process goes into its `killed`, `stopped` or `exited` event as
`peak_rss_mb` (MB of 10^6 bytes), and the report lists those events.
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from flight_sim.bus import Endpoints
from shared.curve import DAEMON, ROLES, SECRET_SUFFIX
from flight_sim.errors import DaemonStartError

__all__ = ["DaemonEvent", "DaemonProcess", "DaemonStartError", "write_daemon_config"]

REPO_ROOT = Path(__file__).resolve().parents[1]
PEAK_POLL_S = 0.2


def vm_hwm_mb(pid: int) -> float | None:
    """The peak resident set of process `pid` so far (VmHWM), in MB; None where /proc has none."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except (OSError, ValueError, IndexError):
        pass
    return None


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the simulator dies, however it dies (Linux
    prctl PR_SET_PDEATHSIG), so a killed simulator never leaves a daemon behind."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))          # a JSON string is a valid TOML basic string


def write_daemon_config(path: Path, endpoints: Endpoints, store: Path, uploads: Path,
                        public_key: Path, *, max_frames: int = 4, max_pending_products: int = 32,
                        telemetry_interval_s: float = 0.5, drain_timeout_s: float = 5.0,
                        device: str = "CPU", num_requests: int = 0, log_level: str = "INFO",
                        max_message_bytes: int | None = None, keys: Path | None = None,
                        extra: dict | None = None) -> Path:
    """The daemon's TOML. `keys`: a key set folder (daemon pair + one per role) the daemon
    authenticates its peers with; None writes `[security] insecure = true` (a bench only)."""
    sections = {
        "daemon": {"name": "onboard", "device": device, "num_requests": num_requests,
                   "log_level": log_level},
        "endpoints": endpoints.as_dict(),
        "store": {"root": str(store), "public_key": str(public_key), "uploads": str(uploads)},
        "queue": {"max_frames": max_frames, "max_pending_products": max_pending_products},
        "telemetry": {"interval_s": telemetry_interval_s},
        "shutdown": {"drain_timeout_s": drain_timeout_s},
        "security": ({"secret_key": str(Path(keys) / f"{DAEMON}{SECRET_SUFFIX}"),
                      **{role: str(Path(keys) / f"{role}.key") for role in ROLES}}
                     if keys is not None else {"insecure": True}),
    }
    if max_message_bytes:
        sections["limits"] = {"max_message_bytes": int(max_message_bytes)}
    for name, values in (extra or {}).items():         # e.g. [supervision] for a soak
        sections.setdefault(name, {}).update(values)
    lines = ["# written by the flight simulator for this run"]
    for name, values in sections.items():
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class DaemonEvent:
    t: float            # time.monotonic()
    kind: str           # started, killed, stopped, exited
    detail: dict = field(default_factory=dict)


class DaemonProcess:
    """One daemon, restartable. `events` records every start, kill and stop."""

    def __init__(self, config_path: Path, log_path: Path, python: str = sys.executable):
        self.config_path, self.log_path, self.python = Path(config_path), Path(log_path), python
        self.proc: subprocess.Popen | None = None
        self.ready: dict | None = None
        self.events: list[DaemonEvent] = []
        self.starts = 0
        self.env: dict[str, str] = {}       # added to its environment (a supervisor's NOTIFY_SOCKET)
        self.peak_rss_mb: float | None = None   # the running process's VmHWM, last read

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 120.0) -> dict:
        """Start the process and wait for its ready line; returns it (pid, endpoints, model)."""
        if self.alive():
            raise RuntimeError("daemon already running")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        for inherited in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(inherited, None)       # our own supervisor's are not the daemon's
        env.update(self.env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        log.write(f"\n--- start {self.starts + 1} at {time.strftime('%H:%M:%S')} ---\n".encode())
        log.flush()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [self.python, "-m", "onboard", "run", "--config", str(self.config_path), "--json"],
            stdout=subprocess.PIPE, stderr=log, cwd=str(REPO_ROOT), env=env,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        log.close()
        line = self._read_line(timeout_s)
        try:
            self.ready = json.loads(line)
        except json.JSONDecodeError:
            self.kill()
            raise DaemonStartError(f"the daemon printed {line[:200]!r} instead of its JSON ready "
                                   f"line; log: {self.log_path}") from None
        self.starts += 1
        # anything more it prints goes to the log, so a full pipe can never block it
        threading.Thread(target=self._drain_stdout, args=(self.proc,), daemon=True).start()
        self.peak_rss_mb = None
        threading.Thread(target=self._watch_peak, args=(self.proc,), daemon=True).start()
        self.events.append(DaemonEvent(time.monotonic(), "started",
                                       {"pid": self.proc.pid, "model": self.ready.get("model"),
                                        "start_s": round(time.monotonic() - t0, 3)}))
        return self.ready

    def _watch_peak(self, proc: subprocess.Popen) -> None:
        while proc.poll() is None:
            peak = vm_hwm_mb(proc.pid)
            if peak is not None and proc is self.proc:
                self.peak_rss_mb = round(peak, 1)
            time.sleep(PEAK_POLL_S)

    def _peak(self) -> dict:
        """{"peak_rss_mb": ...} of the process now ending (read once more while it still runs)."""
        peak = vm_hwm_mb(self.proc.pid) if self.alive() else None
        if peak is not None:
            self.peak_rss_mb = round(peak, 1)
        return {"peak_rss_mb": self.peak_rss_mb}

    def _drain_stdout(self, proc: subprocess.Popen) -> None:
        try:
            with open(self.log_path, "ab") as log:
                for line in iter(proc.stdout.readline, b""):
                    log.write(b"[stdout] " + line)
                    log.flush()
        except (OSError, ValueError):      # the pipe was closed by kill/stop
            pass

    def _read_line(self, timeout_s: float) -> str:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        buf = b""
        try:
            while b"\n" not in buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.kill()
                    raise DaemonStartError(f"the daemon did not report ready within {timeout_s:g} s; "
                                           f"log: {self.log_path}")
                if sel.select(min(remaining, 0.5)):
                    chunk = os.read(self.proc.stdout.fileno(), 65536)
                    if not chunk:
                        code = self.proc.wait()
                        raise DaemonStartError(f"the daemon exited with code {code} before it was "
                                               f"ready: {self._log_tail()}")
                    buf += chunk
        finally:
            sel.close()
        line, _, rest = buf.partition(b"\n")
        if rest:
            with open(self.log_path, "ab") as log:
                log.write(b"[stdout] " + rest)
        return line.decode("utf-8", "replace")

    def _log_tail(self, n: int = 6) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
            return " | ".join(lines[-n:]) + f" (log: {self.log_path})"
        except OSError:
            return f"(no log at {self.log_path})"

    def kill(self) -> int | None:
        """kill -9: no drain, no goodbye (the fault a scenario injects)."""
        if not self.alive():
            return None
        pid = self.proc.pid
        peak = self._peak()
        os.kill(pid, signal.SIGKILL)
        code = self.proc.wait()
        self.events.append(DaemonEvent(time.monotonic(), "killed", {"pid": pid, "signal": "SIGKILL",
                                                                    **peak}))
        return code

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (the daemon drains and exits 0); SIGKILL if it does not within the timeout."""
        if not self.alive():
            return self.proc.returncode if self.proc else None
        pid = self.proc.pid
        peak = self._peak()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
            kind = "stopped"
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            code = self.proc.wait()
            kind = "killed_after_timeout"
        self.events.append(DaemonEvent(time.monotonic(), kind, {"pid": pid, "exit_code": code, **peak}))
        return code

    def wait_exit(self, timeout_s: float = 30.0) -> int | None:
        """After a `shutdown` command: wait for the exit code."""
        if self.proc is None:
            return None
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return self.stop()
        self.events.append(DaemonEvent(time.monotonic(), "exited", {"pid": self.proc.pid,
                                                                    "exit_code": code,
                                                                    "peak_rss_mb": self.peak_rss_mb}))
        return code

