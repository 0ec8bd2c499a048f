"""Supervision: the daemon tells its supervisor (systemd, or the simulator playing it) that it
is up and still making progress, in systemd's notify protocol.

    READY=1      once, from `Daemon.run`: the active model is loaded and self-tested (or the
                 store says why there is none) and every socket is bound
    WATCHDOG=1   every WATCHDOG_USEC / 2, from the poller loop, only while the frame worker is
                 idle or its current frame is within its deadline: a stalled frame (or a stuck
                 loop) stops the pings, and the supervisor restarts the process
    STATUS=...   one line: state, model, queue depth, stalls (`systemctl status` shows it)
    STOPPING=1   when the drain begins

The protocol is one datagram of newline-separated KEY=VALUE lines sent to the AF_UNIX socket
named by $NOTIFY_SOCKET (a leading "@" is the abstract namespace); $WATCHDOG_USEC is the
supervisor's timeout and $WATCHDOG_PID, when set, the process it is meant for
(sd_notify(3), sd_watchdog_enabled(3)). It is a few lines with the standard socket module, so
the Pi install needs no libsystemd binding. Without $NOTIFY_SOCKET every call is a no-op.

Stalls (onboard.workers.Workers.stalled): a frame's deadline is
`frame_deadline_s + frame_deadline_s_per_mpix * megapixels`. Past it the frame gets an ERROR
`timeout` outcome at once, the stall is counted (status, telemetry `stalls`), and the pings
stop. OpenVINO cannot cancel an inference from Python, so the process is not trusted to
recover by itself: the supervisor restarts it (the payload resends what had no outcome). Should
the frame still come back before the supervisor acts, the pings resume. Where no watchdog
watches (no $WATCHDOG_USEC), the daemon exits itself with EXIT_STALLED once the frame has been
stuck `stall_exit_s` longer, so that Restart=on-failure (or any supervisor) restarts it.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Mapping

log = logging.getLogger("onboard.supervision")

EXIT_STALLED = 70             # EX_SOFTWARE: a stalled frame worker; the supervisor restarts us


def notify_address(value: str | None) -> str | None:
    """The socket address of $NOTIFY_SOCKET ("@name" is Linux's abstract namespace)."""
    if not value:
        return None
    return "\0" + value[1:] if value.startswith("@") else value


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds of the supervisor's watchdog timeout, or None when no watchdog is meant for us."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    wanted = env.get("WATCHDOG_PID")
    if usec <= 0 or (wanted and wanted.strip() != str(pid)):
        return None
    return usec / 1e6


class Notifier:
    """Datagrams to the supervisor's notify socket; never raises (a supervisor that went away
    must not take the daemon with it)."""

    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        self.address = notify_address(env.get("NOTIFY_SOCKET"))
        self.watchdog_s = watchdog_interval(env, os.getpid()) if self.address else None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) \
            if self.address else None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> bool:
        if self._sock is None:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode("utf-8", "replace"), self.address)
            self._failed = False
            return True
        except OSError as exc:
            if not self._failed:          # say it once, not at every ping
                log.error("cannot notify the supervisor at %r: %s", self.address, exc)
            self._failed = True
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Supervision:
    """What the poller loop tells the supervisor, and when: READY once, WATCHDOG while healthy,
    STATUS when it changes. `stalls` counts frames that passed their deadline."""

    def __init__(self, notifier: Notifier, stall_exit_s: float = 30.0):
        self.notifier = notifier
        self.stall_exit_s = stall_exit_s
        self.stalls = 0
        self.stalled_since: float | None = None
        self._next_ping = 0.0
        self._last_status = ""

    @property
    def ping_every_s(self) -> float | None:
        w = self.notifier.watchdog_s
        return None if w is None else w / 2

    def ready(self, status: str) -> None:
        self.notifier.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")
        self._last_status = status
        log.info("ready%s", f" (notified {self.notifier.address!r})" if self.notifier.enabled else "")

    def stopping(self, status: str) -> None:
        self.notifier.send("STOPPING=1", f"STATUS={status}")

    def stall(self, now: float) -> None:
        """A frame passed its deadline: counted once per stuck frame; the pings stop."""
        if self.stalled_since is None:
            self.stalls += 1
            self.stalled_since = now

    def recovered(self) -> None:
        if self.stalled_since is not None:
            log.warning("the frame worker is making progress again")
        self.stalled_since = None

    def should_exit(self, now: float) -> bool:
        """True when no watchdog watches us and the stall has lasted stall_exit_s more."""
        return (self.stalled_since is not None and self.notifier.watchdog_s is None
                and self.stall_exit_s > 0 and now - self.stalled_since >= self.stall_exit_s)

    def tick(self, now: float, status: str) -> None:
        """Each loop turn: WATCHDOG=1 when due and healthy, STATUS= when it changed."""
        lines = []
        every = self.ping_every_s
        if every is not None and self.stalled_since is None and now >= self._next_ping:
            lines.append("WATCHDOG=1")
            self._next_ping = now + every
        if status != self._last_status:
            lines.append(f"STATUS={status}")
            self._last_status = status
        if lines:
            self.notifier.send(*lines)
