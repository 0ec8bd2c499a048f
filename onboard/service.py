"""The daemon as a systemd service on a Raspberry Pi class board: the unit file, and where to put it.

`unit_text(config)` writes a unit that

    Type=notify + WatchdogSec   systemd waits for READY=1 (model loaded and self-tested, sockets
                                bound) and restarts the daemon when WATCHDOG=1 stops (a stalled
                                frame, a stuck loop: onboard.supervision)
    Restart=on-failure          a crash, a watchdog timeout or exit 70 (a stall nobody watched)
                                brings it back; StartLimitIntervalSec=0: never give up in orbit
    MemoryMax                   the kernel stops a leak before the board swaps itself to death
    User=, Group=               a dedicated system user, no login
    ProtectSystem=strict +      the whole filesystem read-only but the store, the uploads folder,
    ReadWritePaths              the spill folder and the folders of ipc:// endpoints
    NoNewPrivileges, ...        the usual hardening (no capabilities, no devices but on a
                                VPU board, private /tmp, kernel tunables and modules protected)

`install_unit` writes it to /etc/systemd/system/<name>.service (or under `root`, or to `output`,
for a look before installing) and returns the commands that create the user and folders and
start it, which `eoedge onboard service install` prints.
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from onboard.config import DaemonConfig

UNIT_DIR = Path("etc/systemd/system")
REPO_ROOT = Path(__file__).resolve().parents[1]     # where `onboard` is importable from


@dataclass(frozen=True)
class ServiceOptions:
    name: str = "eoedge-onboard"
    user: str = "eoedge"
    watchdog_s: int = 30          # WatchdogSec: pings come every half of it
    memory_max: str = "2G"
    start_timeout_s: int = 300    # model load + self-test on a slow board
    restart_s: int = 2
    python: str = sys.executable


def writable_paths(config: DaemonConfig) -> list[Path]:
    """The only folders the service may write: store, uploads, spill, ipc endpoints' folders."""
    paths = [config.store_root, config.uploads]
    if config.spill_dir is not None:
        paths.append(config.spill_dir)
    for endpoint in config.endpoints.values():
        if endpoint.startswith("ipc://"):
            paths.append(Path(endpoint[len("ipc://"):]).parent)
    out: list[Path] = []
    for p in paths:
        if p not in out:
            out.append(p)
    return out


def unit_text(config: DaemonConfig, opts: ServiceOptions = ServiceOptions()) -> str:
    if config.source_file is None:
        raise ValueError("the unit needs the config's file (load_config), not an in-memory config")
    on_cpu = config.device.upper().startswith("CPU")
    rw = " ".join(shlex.quote(str(p)) for p in writable_paths(config))
    exec_start = " ".join(shlex.quote(str(a)) for a in
                          (opts.python, "-m", "onboard", "run", "--config", config.source_file))
    lines = [
        "# Written by `eoedge onboard service install`; see docs/onboard.md, \"Supervision\".",
        "[Unit]",
        f"Description=eoedge on-board daemon ({config.source_file})",
        "After=network-online.target",
        "StartLimitIntervalSec=0",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={exec_start}",
        f"Environment=PYTHONPATH={shlex.quote(str(REPO_ROOT))}",
        "Environment=PYTHONUNBUFFERED=1",
        f"WorkingDirectory={shlex.quote(str(config.source_file.parent))}",
        f"User={opts.user}",
        f"Group={opts.user}",
        f"WatchdogSec={opts.watchdog_s}",
        f"TimeoutStartSec={opts.start_timeout_s}",
        f"TimeoutStopSec={int(config.drain_timeout_s) + 15}",
        "Restart=on-failure",
        f"RestartSec={opts.restart_s}",
        f"MemoryMax={opts.memory_max}",
        "MemorySwapMax=0",
        "LimitNOFILE=4096",
        "UMask=0027",
        "ProtectSystem=strict",
        f"ReadWritePaths={rw}",
        "ProtectHome=read-only",
        "PrivateTmp=yes",
        f"PrivateDevices={'yes' if on_cpu else 'no'}",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictSUIDSGID=yes",
        "RestrictRealtime=yes",
        "RestrictNamespaces=yes",
        "LockPersonality=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "SystemCallArchitectures=native",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def unit_path(opts: ServiceOptions, root: Path | None = None, output: Path | None = None) -> Path:
    if output is not None:
        return Path(output)
    return Path(root or "/") / UNIT_DIR / f"{opts.name}.service"


def setup_commands(config: DaemonConfig, opts: ServiceOptions, path: Path) -> list[str]:
    """What an operator runs next: the user, its folders, systemd told, the service started."""
    folders = " ".join(shlex.quote(str(p)) for p in writable_paths(config))
    unit = f"{opts.name}.service"
    commands = [
        f"sudo useradd --system --no-create-home --shell /usr/sbin/nologin {opts.user}",
        f"sudo install -d -o {opts.user} -g {opts.user} -m 0750 {folders}",
        f"sudo chown -R {opts.user}:{opts.user} {folders}",
    ]
    if path != Path("/") / UNIT_DIR / unit:
        commands.append(f"sudo install -m 0644 {shlex.quote(str(path))} /{UNIT_DIR}/{unit}")
    return commands + [
        "sudo systemctl daemon-reload",
        f"sudo systemctl enable --now {unit}",
        f"systemctl status {unit}     # STATUS= line: model, queue, stalls",
        f"journalctl -u {unit} -f",
    ]


def install_unit(config: DaemonConfig, opts: ServiceOptions = ServiceOptions(),
                 root: Path | None = None, output: Path | None = None) -> dict:
    """Write the unit; {path, unit, commands}. Raises OSError when the folder is not writable."""
    path = unit_path(opts, root, output)
    text = unit_text(config, opts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return {"path": str(path), "name": f"{opts.name}.service", "writable": [str(p) for p in writable_paths(config)],
            "commands": setup_commands(config, opts, path), "unit": text}
