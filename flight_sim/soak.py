"""The soak: a long flight with the faults a daemon meets in months unattended, on a schedule.

Scenario keys ([faults], times in seconds since the flight began):

    kill_every_s        kill -9 the daemon this often (it is started again, frames resent)
    sigstop_at_s        [t, ...]: SIGSTOP the daemon for 2 x the watchdog interval; the supervisor
                        (flight_sim.supervisor, [daemon] watchdog_s) misses its pings and
                        restarts it, as systemd would (no supervisor: SIGCONT after the pause)
    disk_mb             the daemon's store, uploads and product spill on a tmpfs of this size,
                        mounted for the run (root only; else the scenario stops, saying so)
    fill_disk_at_s      fill that filesystem (a filler file until ENOSPC) for fill_disk_for_s;
                        meanwhile a set_policy (a state write) and an upload_begin are tried
    corrupt_state_at_s  [t, ...]: overwrite state.json with garbage, then kill -9: the restart
                        must fall back to the last good state and say so

`Soak.step` runs each turn of the flight loop; `Soak.report` adds to the scenario report the
soak's figures: frames sent / decided / errored / lost, restarts by cause, the daemon's RSS and
open file descriptors over time (sampled from /proc every [report] sample_every_s), and the
longest gap without an outcome.
"""
from __future__ import annotations

import logging
import os
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from flight_sim.errors import ScenarioFailed
from flight_sim.supervisor import NotifySupervisor

log = logging.getLogger("flight_sim")

CORRUPT_STATE = b'{"schema": 1, "active": "slot-that-is-\x00\xff garbage'


def proc_sample(pid: int) -> tuple[float, int] | None:
    """(RSS in MB, open file descriptors) of a live process, from /proc; None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            rss_kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
        return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration, ValueError):
        return None


class SmallDisk:
    """A size-limited tmpfs at `path`, mounted for the run (the filled-disk fault)."""

    def __init__(self, path: Path, size_mb: int):
        self.path, self.size_mb = path, size_mb
        self.filler = path / ".filler"
        self.mounted = False

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m", "tmpfs",
                               str(self.path)], capture_output=True, text=True)
        if done.returncode != 0:
            raise ScenarioFailed(f"faults.disk_mb: cannot mount a {self.size_mb} MB tmpfs at "
                                 f"{self.path} ({done.stderr.strip() or 'needs root'})")
        self.mounted = True

    def fill(self) -> int:
        """Take every free byte; the bytes written."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        written = 0
        try:
            for size in (1 << 20, 65536, 4096, 1):
                try:
                    while True:
                        written += os.write(fd, b"\0" * size)
                except OSError:
                    pass
        finally:
            os.close(fd)
        return written

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
            self.mounted = False


@dataclass
class Samples:
    """The daemon process seen from outside: (seconds since flight, pid, RSS MB, open fds)."""

    rows: list[tuple[float, int, float, int]] = field(default_factory=list)

    def add(self, t: float, pid: int | None) -> None:
        got = proc_sample(pid) if pid else None
        if got is not None:
            self.rows.append((round(t, 1), pid, round(got[0], 1), got[1]))

    def summary(self, settle_s: float = 60.0) -> dict:
        """First/last/max, and flatness: each process's values after `settle_s` of its life
        (model loaded, pools warm), the last quarter of the run against the second."""
        if not self.rows:
            return {"samples": 0}
        starts: dict[int, float] = {}
        for t, pid, _, _ in self.rows:
            starts.setdefault(pid, t)
        settled = [r for r in self.rows if r[0] - starts[r[1]] >= settle_s] or self.rows
        n = len(settled)
        q2, q4 = settled[n // 4: n // 2] or settled, settled[3 * n // 4:] or settled

        def trend(i: int) -> dict:
            early, late = statistics.median(r[i] for r in q2), statistics.median(r[i] for r in q4)
            return {"first": self.rows[0][i], "last": self.rows[-1][i],
                    "max": max(r[i] for r in self.rows), "median_q2": early, "median_q4": late,
                    "growth": round(late - early, 2)}
        return {"samples": len(self.rows), "rss_mb": trend(2), "fds": trend(3),
                "timeline": self.rows[:: max(1, len(self.rows) // 60)]}


class Soak:
    """The soak's faults on their schedule, the supervisor, and the samples, for one flight.
    `restart(cause, before=...)` is the runner's kill -9 + start + resend."""

    def __init__(self, faults: dict, daemon: dict, report: dict, daemon_dir: Path):
        self.faults, self.daemon_cfg = faults, daemon
        self.sample_every_s = float(report.get("sample_every_s", 5.0))
        watchdog_s = float(daemon.get("watchdog_s", 0) or 0)
        self.supervisor = NotifySupervisor(watchdog_s) if watchdog_s > 0 else None
        self.disk = SmallDisk(daemon_dir / "disk", int(faults["disk_mb"])) \
            if faults.get("disk_mb") else None
        self.samples = Samples()
        self.events: list[dict] = []
        self.restarts: dict[str, int] = {}
        self.disk_checks: list[dict] = []
        self.recoveries: list[str] = []
        self._next_kill = float(faults.get("kill_every_s") or 0) or None
        self._stops = sorted(faults.get("sigstop_at_s", []))
        self._corrupt = sorted(faults.get("corrupt_state_at_s", []))
        self._fill_at = faults.get("fill_disk_at_s")
        self._free_at: float | None = None
        self._stopped_until: float | None = None
        self._next_sample = 0.0

    @property
    def active(self) -> bool:
        return bool(self.supervisor or self.disk or self._next_kill or self._stops or self._corrupt)

    # ------------------------------------------------------------------ start
    def prepare(self) -> Path | None:
        """Mount the small disk (when asked); the folder the daemon's writable paths go in."""
        if self.disk is None:
            return None
        self.disk.mount()
        return self.disk.path

    def env(self) -> dict[str, str]:
        return self.supervisor.env() if self.supervisor else {}

    def arm(self) -> None:
        if self.supervisor:
            self.supervisor.arm()

    def started(self, timeout_s: float) -> None:
        """After each start: systemd's start job waits for READY=1."""
        if self.supervisor:
            self.supervisor.wait_ready(timeout_s)

    # ------------------------------------------------------------------ each turn
    def step(self, t: float, pid: int | None, restart: Callable[..., None],
             command: Callable[[str, dict], dict], store: Path | None) -> None:
        """`t`: seconds since the flight began. At most one fault per turn."""
        if t >= self._next_sample:
            self.samples.add(t, pid)
            self._next_sample = t + self.sample_every_s
        if self._stopped_until is not None and self.supervisor is None and t >= self._stopped_until:
            os.kill(pid, signal.SIGCONT)            # nobody watching: the pause just ends
            self._stopped_until = None
        if self.supervisor and self.supervisor.expired(time.monotonic()):
            self._event(t, "watchdog_expired", status=self.supervisor.status)
            self._stopped_until = None
            return self._restart(restart, "watchdog")
        if self._next_kill is not None and t >= self._next_kill:
            self._next_kill += float(self.faults["kill_every_s"])
            return self._restart(restart, "kill -9")
        if self._stops and t >= self._stops[0] and pid:
            self._stops.pop(0)
            pause = 2 * float(self.daemon_cfg.get("watchdog_s") or 5.0)
            os.kill(pid, signal.SIGSTOP)
            self._stopped_until = t + pause
            self._event(t, "sigstop", pid=pid, pause_s=pause)
            return None
        if self._corrupt and t >= self._corrupt[0] and store is not None:
            self._corrupt.pop(0)
            (store / "state.json").write_bytes(CORRUPT_STATE)
            self._event(t, "state_corrupted", path=str(store / "state.json"))
            return self._restart(restart, "corrupt state.json")
        if self.disk and self._fill_at is not None and t >= self._fill_at:
            self._fill_at = None
            self._fill(t, command)
        if self._free_at is not None and t >= self._free_at:
            self._free_at = None
            self.disk.free()
            self._event(t, "disk_freed")
        return None

    def _restart(self, restart: Callable[..., None], cause: str) -> None:
        self.restarts[cause] = self.restarts.get(cause, 0) + 1
        restart(cause)

    def _fill(self, t: float, command: Callable[[str, dict], dict]) -> None:
        written = self.disk.fill()
        self._free_at = t + float(self.faults.get("fill_disk_for_s", 60.0))
        self._event(t, "disk_filled", bytes=written, path=str(self.disk.path))
        for name, args in (("set_policy", {"policy": None}),
                           ("upload_begin", {"name": "soak.tar", "size": 1 << 20,
                                             "sha256": "0" * 64, "chunk_size": 65536})):
            try:
                ack = command(name, args)
            except Exception as exc:              # a timeout is a finding, not the soak's end
                ack = {"ok": False, "code": "no_answer", "error": str(exc)}
            self.disk_checks.append({"command": name, "ok": ack.get("ok"), "code": ack.get("code"),
                                     "error": str(ack.get("error", ""))[:200]})

    def _event(self, t: float, kind: str, **info) -> None:
        self.events.append({"t": round(t, 1), "kind": kind, **info})
        log.info("soak: %s at %.0f s %s", kind, t, info or "")

    def note_status(self, status: dict) -> None:
        """A status after a restart: the store's recovery note, if any."""
        recovered = ((status or {}).get("store") or {}).get("recovered")
        if recovered and recovered not in self.recoveries:
            self.recoveries.append(recovered)

    # ------------------------------------------------------------------ end
    def close(self) -> None:
        if self.disk:
            self.disk.free()
            self.disk.unmount()
        if self.supervisor:
            self.supervisor.close()

    def report(self, states: list, t_fly: float) -> dict:
        sent = [s for s in states if s.attempts > 0]
        decided = sum(1 for s in sent if s.outcome == "decision")
        errored = sum(1 for s in sent if s.outcome == "error")
        codes: dict[str, int] = {}
        for s in sent:
            if s.outcome == "error":
                code = (s.body or {}).get("code", "?")
                codes[code] = codes.get(code, 0) + 1
        times = sorted(s.outcome_at for s in sent if s.outcome_at is not None)
        gap, at = 0.0, None
        for a, b in zip([t_fly] + times, times):
            if b - a > gap:
                gap, at = b - a, a - t_fly
        return {"frames": {"sent": len(sent), "decided": decided, "errored": errored,
                           "lost": len(sent) - decided - errored, "error_codes": codes},
                "restarts": dict(self.restarts), "restarts_total": sum(self.restarts.values()),
                "longest_gap_without_outcome_s": round(gap, 2),
                "longest_gap_at_s": None if at is None else round(at, 1),
                "process": self.samples.summary(), "events": self.events,
                "disk_full_commands": self.disk_checks, "state_recoveries": self.recoveries,
                "supervisor": self.supervisor.summary() if self.supervisor else None}


def soak_checks(s: dict) -> list[tuple[str, bool, str]]:
    """(name, ok, detail) lines for the report's checks."""
    f = s["frames"]
    out = [("soak: no frame lost", f["lost"] == 0,
            f"sent {f['sent']} = decided {f['decided']} + errored {f['errored']} + lost {f['lost']}")]
    proc = s["process"]
    if proc.get("samples"):
        rss = proc["rss_mb"]
        flat = rss["growth"] <= max(10.0, 0.1 * rss["median_q2"])
        out.append(("soak: daemon memory flat", flat,
                    f"RSS median {rss['median_q2']:.0f} MB (2nd quarter) -> {rss['median_q4']:.0f} MB "
                    f"(last quarter), max {rss['max']:.0f} MB"))
        fds = proc["fds"]
        out.append(("soak: open file descriptors flat", fds["growth"] <= 4,
                    f"fds median {fds['median_q2']} -> {fds['median_q4']}, max {fds['max']}"))
    if s["supervisor"] and any(e["kind"] == "sigstop" for e in s["events"]):
        out.append(("soak: a stopped daemon was restarted by the watchdog",
                    s["restarts"].get("watchdog", 0) >= 1, f"{s['restarts']}"))
    for c in s["disk_full_commands"]:
        out.append((f"soak: {c['command']} on a full disk refused, daemon alive",
                    c["ok"] is False and c["code"] != "no_answer", f"{c['code']}: {c['error'][:120]}"))
    if any(e["kind"] == "state_corrupted" for e in s["events"]):
        out.append(("soak: corrupt state.json recovered at restart", bool(s["state_recoveries"]),
                    "; ".join(r[:160] for r in s["state_recoveries"]) or "no recovery reported"))
    return out
