"""The simulator's side of the bus: where the daemon's sockets live and a command link to it.

The simulator never imports `onboard`; it speaks the bus contract (shared.messages) only.

- `plan_endpoints(run_dir)`: one ipc:// endpoint per daemon socket inside the run folder (they
  survive a daemon restart unchanged, so peers reconnect by themselves), or tcp://127.0.0.1 with
  free ports when the path would be too long for a Unix socket.
- `CommandLink`: a DEALER that sends COMMAND messages and waits for the ACK whose `ref` is that
  command's id. On a timeout it closes the socket, opens a fresh one and sends again (the
  ZeroMQ guide's Lazy Pirate), so a daemon killed mid-command does not leave it stuck.
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from flight_sim.errors import ScenarioError
from shared.messages import Message, MessageError, decode, encode

SOCKETS = ("frames", "products", "commands", "telemetry")
MAX_IPC_PATH = 100          # sun_path is 108 bytes on Linux; keep a margin


@dataclass(frozen=True)
class Endpoints:
    frames: str
    products: str
    commands: str
    telemetry: str

    def as_dict(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in SOCKETS}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plan_endpoints(run_dir: Path, transport: str = "ipc") -> Endpoints:
    """Endpoints that both the daemon (bind) and the simulator (connect) use as written."""
    if transport == "ipc":
        bus = Path(run_dir).resolve() / "bus"
        if len(str(bus / "telemetry.sock")) <= MAX_IPC_PATH:
            bus.mkdir(parents=True, exist_ok=True)
            return Endpoints(**{name: f"ipc://{bus / name}.sock" for name in SOCKETS})
    elif transport != "tcp":
        raise ScenarioError(f"bus.transport: 'ipc' or 'tcp' expected, got {transport!r}")
    return Endpoints(**{name: f"tcp://127.0.0.1:{_free_port()}" for name in SOCKETS})


class CommandRejected(RuntimeError):
    """The daemon answered ACK {ok: false, error}; the message is its error."""


class CommandLink:
    """Commands to the daemon with bounded waits and Lazy-Pirate retries."""

    def __init__(self, ctx: zmq.Context, endpoint: str, timeout_s: float = 10.0, retries: int = 3,
                 source: str = "ground"):
        self.ctx, self.endpoint = ctx, endpoint
        self.timeout_s, self.retries, self.source = timeout_s, retries, source
        self.sent = 0
        self.retried = 0
        self._sock = None
        self._open()

    def _open(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = self.ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.endpoint)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def request(self, name: str, args: dict | None = None, arrays: dict | None = None,
                timeout_s: float | None = None, retries: int | None = None) -> dict:
        """The ACK body {ok, result | error}; TimeoutError after every try timed out."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            msg = Message("command", {"name": name, "args": args or {}}, dict(arrays or {}),
                          source=self.source)
            self._sock.send_multipart(encode(msg), copy=False)
            self.sent += 1
            deadline = time.monotonic() + timeout_s
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._sock.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                    break
                frames = self._sock.recv_multipart()
                try:
                    reply = decode(frames)
                except MessageError:
                    continue
                if reply.ref == msg.id:         # late answers to earlier tries are skipped
                    return reply.body
            self.retried += attempt < retries
            self._open()                        # Lazy Pirate: a fresh socket, then try again
        raise TimeoutError(f"no answer to command {name!r} from {self.endpoint} after "
                           f"{retries + 1} tries of {timeout_s:g} s")

    def call(self, name: str, args: dict | None = None, arrays: dict | None = None,
             timeout_s: float | None = None, retries: int | None = None) -> dict:
        """The result of a command; CommandRejected carries the daemon's error."""
        body = self.request(name, args, arrays, timeout_s, retries)
        if not body.get("ok"):
            raise CommandRejected(body.get("error", "command failed"))
        return body.get("result", {})

    def wait_ready(self, timeout_s: float = 30.0) -> dict:
        """Poll `status` until the daemon answers."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.call("status", timeout_s=1.0, retries=0)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the daemon at {self.endpoint} did not answer status "
                                       f"within {timeout_s:g} s") from None
