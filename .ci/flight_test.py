"""The daemon as it flies, on the runtime and CPU this runs on (CI only: .ci/aarch64.sh runs it in
an emulated arm64 Debian, .ci/myriad.sh on OpenVINO 2022.3 / Python 3.10). It reuses the suite's
own harness (tests/onboard/test_daemon.py: a real daemon process, CURVE keys per peer role, the
payload socket) on the bundles the ground built on the host (.ci/bundles.sh):

    EOEDGE_BUNDLES=DIR EOEDGE_PROFILE=rpi4 python -m pytest -q -s .ci/flight_test.py

DIR holds PROFILE-v1.tar, PROFILE-v2.tar and keys/uplink.pub (rpi5-v2.tar too, for the refusal
on a CPU without FP16). Lines starting with RESULT go to the CI log.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests"), str(HERE.parent / "tests" / "onboard")]

import onboard                                                            # noqa: E402
from onboard import ov                                                   # noqa: E402
from onboard.runtime import device_capabilities                          # noqa: E402
from shared.profiles import get_profile                                  # noqa: E402
from shared.client import CommandClient                                  # noqa: E402
from test_daemon import DaemonProcess, Payload, command, keys                 # noqa: E402
from test_store import frame                                             # noqa: E402
import test_daemon                                                        # noqa: E402

test_daemon.START_TIMEOUT_S = 600        # Python and OpenVINO start in tens of seconds under QEMU

BUNDLES = Path(os.environ.get("EOEDGE_BUNDLES", "/nonexistent"))
PROFILE = get_profile(os.environ.get("EOEDGE_PROFILE", "cpu-x86"))
WHERE = os.environ.get("QEMU_CPU") or "x86-64"
pytestmark = [pytest.mark.timeout(900),
              pytest.mark.skipif(not (BUNDLES / f"{PROFILE.name}-v1.tar").is_file(),
                                 reason=f"no {PROFILE.name} bundles in {BUNDLES} (run .ci/bundles.sh)")]


def result(text: str) -> None:
    print(f"RESULT {WHERE} {PROFILE.name}: {text}", flush=True)


def test_torch_is_not_installed():
    assert importlib.util.find_spec("torch") is None
    out = subprocess.run([sys.executable, "-c", "import sys, onboard.daemon; print('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=600, cwd="/")
    assert out.stdout.strip() == "False", out.stderr
    result("torch not installed, not imported by onboard.daemon")


def test_the_runtime_is_one_the_profile_accepts():
    caps = device_capabilities("CPU")
    assert PROFILE.runtime_accepts(ov.VERSION), ov.VERSION
    if PROFILE.computes == "f16" and WHERE != "x86-64":
        assert "FP16" in caps, caps          # a Cortex-A76 computes f16
    assert zmq.has("curve")                  # the pyzmq wheel bundles libzmq with libsodium
    result(f"Python {sys.version.split()[0]}, OpenVINO {ov.VERSION}, CPU capabilities {', '.join(caps)}; "
           f"pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()}, CURVE {zmq.has('curve')})")


def slow_cpu_sections() -> dict:
    """Config sections for a CPU emulated ~50x slower: deadlines of the supervision (where this
    daemon has them) that a frame under QEMU does not pass by being slow."""
    defaults = (Path(onboard.__file__).with_name("default.toml")).read_text()
    if "frame_deadline_s" not in defaults:
        return {}
    return {"supervision": {"frame_deadline_s": 600.0, "frame_deadline_s_per_mpix": 600.0, "stall_exit_s": 0.0}}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = DaemonProcess(tmp_path_factory.mktemp("flight"), BUNDLES / "keys" / "uplink.pub",
                      runtime={"precision": "fp32" if PROFILE.name == "myriadx" else "auto"},
                      **slow_cpu_sections())
    d.start()
    yield d
    d.cleanup()


def install(d: DaemonProcess, name: str) -> dict:
    """Uplink the bundle in checked chunks and install it (the ACK's InstallResult, or the refusal)."""
    with CommandClient(d.endpoints["commands"], timeout_s=600, keys=keys("operator")) as client:
        upload_id = client.upload(BUNDLES / name)["upload_id"]
        ack = client.request("install", {"upload_id": upload_id})
    return ack.get("result") or ack


def test_install_self_test_frames_rollback(daemon):
    ack = install(daemon, f"{PROFILE.name}-v1.tar")
    assert ack["ok"], ack
    st = ack["self_test"]
    result(f"install v1 ({ack['duration_s']:.1f} s): self-test at {st.get('precision')}: "
           f"{st.get('message') or st}")

    payload = Payload(daemon.endpoints["frames"])
    try:
        data, bands = frame("cloudy")
        decision = payload.outcome(payload.send("f-1", data, bands), timeout=600)
        assert decision.type == "decision", decision.body
        result(f"frame through the bus: keep={decision.body['keep']} "
               f"fractions={decision.body['stats'].get('fractions')}")
    finally:
        payload.close()

    ack2 = install(daemon, f"{PROFILE.name}-v2.tar")
    assert ack2["ok"] and ack2["version"] == 2, ack2
    back = command(daemon.endpoints["commands"], "rollback", timeout=600)
    back = back.get("result") or back
    assert back["ok"] and back["version"] == 1, back
    status = command(daemon.endpoints["commands"], "status")["result"]
    assert status["model"]["version"] == 1
    result(f"install v2, rollback to v{status['model']['version']}: running {status['model']['precision']}")


def test_fp16_bundle_refused_without_fp16(daemon):
    if "FP16" in device_capabilities("CPU") or not (BUNDLES / "rpi5-v2.tar").is_file():
        pytest.skip("this CPU computes f16 (or no fp16 bundle here)")
    ack = install(daemon, "rpi5-v2.tar")         # newer than the active v1: refused for its precision
    assert not ack["ok"] and ack["code"] == "precision_unsupported", ack
    result(f"an fp16 bundle refused: {ack['code']}")
