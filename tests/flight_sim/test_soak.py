"""The short soak (scenarios/soak_short.toml) in CI: the real daemon under the simulator's
supervisor (a real NOTIFY_SOCKET, restart on a missed watchdog), killed with -9, stopped with
SIGSTOP past its watchdog, its disk (a tmpfs mounted for the run) filled, its state.json
corrupted; about a minute and a half. Nothing may be lost, memory and descriptors stay flat.

Run as a script it builds the soak's bundle (the small brightness test model, 6 bands, 64 px
tiles, signed with a key made there) for scenarios/soak*.toml:

    python tests/flight_sim/test_soak.py runs/soak
"""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from sim_flight import fly, make_flight_bundle  # noqa: E402


def make_soak_bundle(out: Path) -> Path:
    """out/bundle.tar signed with out/keys/uplink.key (one 64 x 64 tile per frame)."""
    return make_flight_bundle(out, overlap=0)


def can_mount() -> bool:
    import os
    import tempfile
    if os.geteuid() != 0:
        return False
    with tempfile.TemporaryDirectory() as d:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", d],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", d], capture_output=True)
    return ok


@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    pytest.importorskip("openvino")
    pytest.importorskip("zmq")
    if not can_mount():
        pytest.skip("the soak's full-disk fault mounts a size-limited tmpfs: needs root and mount")
    root = tmp_path_factory.mktemp("soak")
    make_soak_bundle(root)
    text = (REPO / "scenarios" / "soak_short.toml").read_text()
    text = text.replace("../runs/soak/", "")          # the bundle and key made here
    (root / "soak_short.toml").write_text(text)
    out = root / "run"
    proc, report = fly(root / "soak_short.toml", out, timeout=600)
    return proc, report, out


def test_every_check_passes(soak):
    proc, report, _ = soak
    failed = [c for c in report["checks"] if not c["ok"]]
    assert not failed and proc.returncode == 0, (failed, proc.stderr[-2000:])


def test_nothing_lost_and_each_fault_happened(soak):
    s = soak[1]["soak"]
    f = s["frames"]
    assert f["sent"] >= 600 and f["lost"] == 0 and f["sent"] == f["decided"] + f["errored"]
    assert s["restarts"].get("watchdog", 0) >= 1            # the SIGSTOP: pings stopped
    assert s["restarts"].get("kill -9", 0) >= 1
    assert s["restarts"].get("corrupt state.json", 0) == 1
    kinds = [e["kind"] for e in s["events"]]
    for kind in ("sigstop", "watchdog_expired", "disk_filled", "disk_freed", "state_corrupted"):
        assert kind in kinds, kinds
    assert s["supervisor"]["readies"] == 1 + s["restarts_total"]   # READY=1 after every start


def test_full_disk_gave_error_events_naming_it_and_refusals(soak):
    s = soak[1]["soak"]
    assert s["frames"]["error_codes"].get("disk_full", 0) >= 1, s["frames"]
    codes = {c["command"]: c["code"] for c in s["disk_full_commands"]}
    # refused, each naming the disk: by the command-counter store or by the write itself
    assert codes["set_policy"] in ("disk_full", "policy_not_stored") and codes["upload_begin"] == "disk_full"
    assert all("No space left" in c["error"] for c in s["disk_full_commands"])


def test_corrupt_state_fell_back_to_the_last_good_state(soak):
    s = soak[1]["soak"]
    assert any("last good state" in r for r in s["state_recoveries"]), s["state_recoveries"]
    assert all(r["same_model"] for r in soak[1]["restarts"])


def test_memory_and_descriptors_sampled_and_flat(soak):
    p = soak[1]["soak"]["process"]
    assert p["samples"] >= 10
    assert p["fds"]["growth"] <= 4 and p["rss_mb"]["max"] < 1500
    assert "## Soak" in (soak[2] / "report.md").read_text()


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/soak")
    print(make_soak_bundle(target))
