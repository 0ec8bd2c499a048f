"""Supervision: systemd's notify protocol on a fake notify socket (a real AF_UNIX datagram
socket, as systemd passes one), the frame deadline, the watchdog that stops on a stalled frame
worker and comes back after a restart, and the systemd unit.

The stalled worker is the daemon's config-gated test hook (`supervision.test_block_prefix`): a
frame whose id starts with it holds the frame worker, as a hung OpenVINO inference would."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from onboard.supervision import Notifier, Supervision, notify_address, watchdog_interval
from test_daemon import DaemonProcess, Payload, command, offline_install
from test_store import BundleFactory, frame

pytestmark = pytest.mark.timeout(180)

WATCHDOG_S = 1.0                 # WATCHDOG_USEC given to the daemon: pings every 0.5 s


class FakeSystemd:
    """The supervisor's end: a datagram socket the daemon's NOTIFY_SOCKET names."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.seen: list[tuple[float, dict]] = []

    def env(self, watchdog_s: float | None = WATCHDOG_S) -> dict:
        env = {"NOTIFY_SOCKET": str(self.path)}
        if watchdog_s:
            env["WATCHDOG_USEC"] = str(int(watchdog_s * 1e6))
        return env

    def pump(self, seconds: float) -> list[tuple[float, dict]]:
        """Datagrams received over the next `seconds`, as (time, {KEY: VALUE})."""
        got = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            got.append((time.monotonic(), fields))
        self.seen += got
        return got

    def wait_for(self, key: str, timeout: float = 60) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for _, fields in self.pump(0.1):
                if key in fields:
                    return fields
        raise AssertionError(f"no {key} from the daemon within {timeout} s; seen {self.seen[-5:]}")

    def close(self) -> None:
        self.sock.close()


def pings(messages) -> int:
    return sum(1 for _, f in messages if f.get("WATCHDOG") == "1")


# ------------------------------------------------------------------------------------ units
def test_notify_address_and_watchdog_env():
    assert notify_address("@sd/notify") == "\0sd/notify"
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("") is None
    assert watchdog_interval({"WATCHDOG_USEC": "3000000"}, 42) == 3.0
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "41"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "42"}, 42) == 3.0
    assert watchdog_interval({"WATCHDOG_USEC": "nope"}, 42) is None


def test_notifier_speaks_the_datagram_protocol_including_abstract_sockets(tmp_path):
    for address in (str(tmp_path / "notify"), f"@eoedge-test-{os.getpid()}"):
        sd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sd.bind(notify_address(address))
        sd.settimeout(2)
        notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"})
        assert notifier.enabled and notifier.watchdog_s == 2.0
        assert notifier.send("READY=1", "STATUS=serving")
        assert sd.recv(4096) == b"READY=1\nSTATUS=serving"
        notifier.close()
        sd.close()
    assert not Notifier({}).send("READY=1")                 # no supervisor: a no-op
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert gone.send("WATCHDOG=1") is False                  # a vanished supervisor: no raise


def test_watchdog_pings_only_while_healthy(tmp_path):
    sd = FakeSystemd(tmp_path / "notify")
    sup = Supervision(Notifier(sd.env(watchdog_s=1.0)), stall_exit_s=5)
    sup.tick(0.0, "serving")
    sup.tick(0.2, "serving")                         # not due yet (every 0.5 s)
    sup.tick(0.6, "serving; queue 1")
    sup.stall(0.7)
    sup.tick(1.2, "stalled")                         # stalled: STATUS only
    assert not sup.should_exit(100.0)                # a watchdog watches: it decides
    sup.recovered()
    sup.tick(1.3, "serving")
    got = [f for _, f in sd.pump(0.3)]
    assert [f.get("WATCHDOG") for f in got] == ["1", "1", None, "1"]
    assert got[2]["STATUS"] == "stalled" and sup.stalls == 1
    unwatched = Supervision(Notifier({}), stall_exit_s=5)
    unwatched.stall(10.0)
    assert not unwatched.should_exit(14.0) and unwatched.should_exit(15.0)
    sd.close()


# ------------------------------------------------------------------------------------ the daemon
@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> BundleFactory:
    return BundleFactory(tmp_path_factory.mktemp("bundles"))


@pytest.fixture
def supervised(tmp_path, bundles, monkeypatch):
    """A daemon with a fake systemd's NOTIFY_SOCKET and WATCHDOG_USEC in its environment, a
    1 s frame deadline and the blocking test hook on frames named stall-*."""
    offline_install(tmp_path / "store", bundles.public, bundles.build(1))
    sd = FakeSystemd(tmp_path / "notify")
    for key, value in sd.env().items():
        monkeypatch.setenv(key, value)
    daemon = DaemonProcess(tmp_path, bundles.public, supervision={
        "frame_deadline_s": 1.0, "frame_deadline_s_per_mpix": 0.0, "stall_exit_s": 0,
        "test_block_prefix": "stall-", "test_block_s": 30.0})
    yield daemon, sd
    daemon.cleanup()
    sd.close()


def test_ready_after_the_model_serves_then_pings_stop_on_a_stall_and_resume_after_restart(supervised):
    daemon, sd = supervised
    daemon.start()
    ready = sd.wait_for("READY")
    # READY's own STATUS already names the loaded, self-tested model; nothing came before it
    assert ready["READY"] == "1" and "model cloud-test v1" in ready["STATUS"], ready
    assert int(ready["MAINPID"]) == daemon.proc.pid
    assert pings(sd.seen[:-1]) == 0
    assert pings(sd.pump(2.0)) >= 3                            # idle: pings every 0.5 s

    payload = Payload(daemon.endpoints["frames"])
    try:
        data, bands = frame("clear", 64)
        assert payload.outcome(payload.send("ok-1", data, bands)).type == "decision"
        t_stall = time.monotonic()
        err = payload.outcome(payload.send("stall-1", data, bands), timeout=15)
        assert err.type == "error" and err.body["code"] == "timeout", err.body
        assert time.monotonic() - t_stall < 10
        sd.pump(3.0)                                           # 6 intervals of pings
        stalled_at = next(i for i, (_, f) in enumerate(sd.seen) if "stalls 1" in f.get("STATUS", ""))
        after = sd.seen[stalled_at:]                           # datagrams come in send order
        assert pings(after) == 0 and time.monotonic() - after[0][0] > 2.5, after
        status = command(daemon.endpoints["commands"], "status")["result"]
        assert status["supervision"]["stalls"] == 1 and status["supervision"]["stalled"] is True
    finally:
        payload.close()

    daemon.stop()                                              # what the supervisor does: kill
    daemon.start()                                             # ... and start it again
    again = sd.wait_for("READY")
    assert "model cloud-test v1" in again["STATUS"]
    assert pings(sd.pump(2.0)) >= 3


def test_unwatched_stall_exits_for_a_restart(tmp_path, bundles, monkeypatch):
    offline_install(tmp_path / "store", bundles.public, bundles.build(1))
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    daemon = DaemonProcess(tmp_path, bundles.public, supervision={
        "frame_deadline_s": 1.0, "frame_deadline_s_per_mpix": 0.0, "stall_exit_s": 1.0,
        "test_block_prefix": "stall-", "test_block_s": 60.0})
    payload = None
    try:
        daemon.start()
        payload = Payload(daemon.endpoints["frames"])
        data, bands = frame("clear", 64)
        err = payload.outcome(payload.send("stall-1", data, bands), timeout=15)
        assert err.body["code"] == "timeout"
        assert daemon.wait(timeout=20) == 70                   # EXIT_STALLED: Restart=on-failure
        assert "exiting (code 70)" in daemon.log()
    finally:
        if payload is not None:
            payload.close()
        daemon.cleanup()


# ------------------------------------------------------------------------------------ the unit
def test_service_install_writes_a_hardened_notify_unit(tmp_path):
    from test_daemon import cli
    config = tmp_path / "daemon.toml"
    config.write_text(f'[store]\nroot = "{tmp_path}/store"\nuploads = "{tmp_path}/uploads"\n'
                      f'public_key = "{tmp_path}/uplink.pub"\n'
                      f'[supervision]\nspill_dir = "{tmp_path}/spill"\n'
                      '[security]\ninsecure = true\n')
    result = cli("service", "install", "--config", str(config), "--root", str(tmp_path / "root"),
                 "--watchdog-s", "20", "--json")
    assert result.returncode == 0, result.stderr
    import json
    out = json.loads(result.stdout)
    unit_file = tmp_path / "root/etc/systemd/system/eoedge-onboard.service"
    assert out["path"] == str(unit_file)
    unit = unit_file.read_text()
    for line in ("Type=notify", "WatchdogSec=20", "Restart=on-failure", "MemoryMax=2G",
                 "User=eoedge", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                 f"ReadWritePaths={tmp_path}/store {tmp_path}/uploads {tmp_path}/spill",
                 f"--config {config}"):
        assert line in unit, line
    assert any("systemctl enable --now eoedge-onboard.service" in c for c in out["commands"])
    if shutil.which("systemd-analyze"):          # the unit's syntax, as systemd reads it
        check = subprocess.run(["systemd-analyze", "verify", str(unit_file)], capture_output=True,
                               text=True, timeout=60)
        assert "Unknown key" not in check.stderr and "Invalid" not in check.stderr, check.stderr
    bad = cli("service", "install", "--config", str(tmp_path / "missing.toml"), "--root", str(tmp_path))
    assert bad.returncode != 0 and "missing.toml" in bad.stderr
