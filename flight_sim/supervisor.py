"""The supervisor role, as systemd plays it for a Type=notify service with WatchdogSec.

The simulator binds a real AF_UNIX datagram socket (in the abstract namespace: no path length
limit, nothing left on disk) and passes it to the daemon process as $NOTIFY_SOCKET, with
$WATCHDOG_USEC; the daemon sends READY=1, WATCHDOG=1 and STATUS= datagrams to it
(onboard.supervision, sd_notify(3)). `poll` reads them; `expired` says when no WATCHDOG=1 came
for a whole watchdog interval after READY, which is when systemd would kill the process and
start it again (the runner then does: kill -9, start, resend).
"""
from __future__ import annotations

import os
import socket
import time
import uuid

from flight_sim.errors import DaemonStartError


class NotifySupervisor:
    """systemd's side of the notify protocol for one (restartable) daemon."""

    def __init__(self, watchdog_s: float):
        self.watchdog_s = float(watchdog_s)
        self.name = f"@eoedge-sim-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind("\0" + self.name[1:])
        self.sock.setblocking(False)
        self.ready_at: float | None = None
        self.last_ping: float | None = None
        self.status = ""
        self.pings = 0
        self.readies = 0
        self.expiries = 0

    def env(self) -> dict[str, str]:
        """What the daemon's environment gets (as systemd sets it for the service)."""
        return {"NOTIFY_SOCKET": self.name, "WATCHDOG_USEC": str(int(self.watchdog_s * 1e6))}

    def arm(self) -> None:
        """A new process is starting: nothing heard from it yet."""
        self.poll()                   # what the old one said last is not the new one's
        self.ready_at = self.last_ping = None

    def poll(self, now: float | None = None) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return
            now = time.monotonic() if now is None else now
            for line in data.decode("utf-8", "replace").splitlines():
                key, _, value = line.partition("=")
                if key == "READY" and value == "1":
                    self.ready_at, self.readies = now, self.readies + 1
                elif key == "WATCHDOG" and value == "1":
                    self.last_ping, self.pings = now, self.pings + 1
                elif key == "STATUS":
                    self.status = value

    def wait_ready(self, timeout_s: float) -> float:
        """Block until READY=1 (systemd's start job); seconds it took."""
        t0 = time.monotonic()
        while self.ready_at is None:
            if time.monotonic() - t0 > timeout_s:
                raise DaemonStartError(f"the daemon sent no READY=1 within {timeout_s:g} s "
                                       f"(last STATUS: {self.status!r})")
            time.sleep(0.02)
            self.poll()
        return time.monotonic() - t0

    def expired(self, now: float) -> bool:
        """True when a ready daemon let a whole watchdog interval pass without WATCHDOG=1."""
        self.poll(now)
        if self.ready_at is None:
            return False
        last = max(self.ready_at, self.last_ping or 0.0)
        if now - last > self.watchdog_s:
            self.expiries += 1
            return True
        return False

    def summary(self) -> dict:
        return {"watchdog_s": self.watchdog_s, "readies": self.readies, "pings": self.pings,
                "expiries": self.expiries, "last_status": self.status}

    def close(self) -> None:
        self.sock.close()
