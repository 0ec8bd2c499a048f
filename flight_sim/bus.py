"""The simulator's side of the bus: where the daemon's sockets live.

The simulator never imports `onboard`; it speaks the bus contract (shared.messages) only, and
sends commands through shared.client.CommandClient (Lazy-Pirate retries, as the CLI does).

- `plan_endpoints(run_dir)`: one ipc:// endpoint per daemon socket inside the run folder (they
  survive a daemon restart unchanged, so peers reconnect by themselves), or tcp://127.0.0.1 with
  free ports when the path would be too long for a Unix socket.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from flight_sim.errors import ScenarioError

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
