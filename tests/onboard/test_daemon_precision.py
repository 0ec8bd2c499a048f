"""The precision contract over the bus: a real daemon on a device declared to run FP32 and INT8
refuses a bf16 bundle with `precision_unsupported` while its model keeps serving, installs an
int8 one, reports what runs in status and telemetry, and applies a config override."""
from __future__ import annotations

import time

import pytest
import zmq

from shared.messages import decode
from test_daemon import (REPLY_TIMEOUT_S, Payload, bundles, command, connect, frame,  # noqa: F401
                         make_daemon)
from test_daemon_models import _upload

# A hung OpenVINO call or socket wait fails its test instead of stalling the suite.
pytestmark = pytest.mark.timeout(180)

NO_BF16 = {"capabilities": ["FP32", "INT8"]}


def _install(ep: str, bundle) -> dict:
    return command(ep, "install", {"upload_id": _upload(ep, bundle, chunk_size=65536)["upload_id"]})


def _telemetry_model(endpoint: str) -> dict:
    sub = connect(zmq.SUB, endpoint, "telemetry", SUBSCRIBE=b"")
    try:
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while time.monotonic() < deadline:
            if sub.poll(200):
                return decode(sub.recv_multipart()).body["model"]
    finally:
        sub.close()
    raise AssertionError("no telemetry")


def test_unsupported_precision_refused_while_the_model_serves_then_int8_installs(make_daemon, bundles):
    daemon = make_daemon([1], runtime=NO_BF16).start()
    payload = Payload(daemon.endpoints["frames"])
    ep = daemon.endpoints["commands"]
    try:
        status = command(ep, "status")["result"]
        assert status["runtime"] == {"precision": "auto", "capabilities": ["FP32", "INT8"]}
        assert status["model"]["precision"]["running"] == "fp32"

        refused = _install(ep, bundles.build(2, precision="bf16"))
        assert refused["ok"] is False and refused["code"] == "precision_unsupported", refused
        assert "precision bf16 needs BF16" in refused["error"] and "FP32, INT8" in refused["error"]
        decision = payload.outcome(payload.send("during-bf16", frame("cloudy", 64)[0]))
        assert decision.type == "decision" and decision.body["model"]["version"] == 1
        assert command(ep, "status")["result"]["model"]["version"] == 1

        installed = _install(ep, bundles.int8(3))
        assert installed["ok"], installed
        assert installed["result"]["self_test"]["ok"] and installed["result"]["self_test"]["precision"] == "int8"
        expected = {"declared": "int8", "running": "int8", "overridden": False, "hint": "f32",
                    "capabilities": ["FP32", "INT8"]}
        status = command(ep, "status")["result"]
        assert status["model"]["version"] == 3 and status["model"]["precision"] == expected
        assert _telemetry_model(daemon.endpoints["telemetry"])["precision"] == expected
        decision = payload.outcome(payload.send("int8", frame("cloudy", 64)[0]))
        assert decision.body["model"]["version"] == 3 and decision.body["keep"] is False
    finally:
        payload.close()


def test_config_override_runs_a_bf16_bundle_at_fp32_and_reports_it(make_daemon, bundles):
    daemon = make_daemon([], runtime={"precision": "fp32", **NO_BF16}).start()
    ep = daemon.endpoints["commands"]
    installed = _install(ep, bundles.build(1, precision="bf16"))
    assert installed["ok"], installed
    expected = {"declared": "bf16", "running": "fp32", "overridden": True, "hint": "f32",
                "capabilities": ["FP32", "INT8"]}
    status = command(ep, "status")["result"]
    assert status["runtime"]["precision"] == "fp32"
    assert status["model"]["precision"] == expected
    assert _telemetry_model(daemon.endpoints["telemetry"])["precision"] == expected
