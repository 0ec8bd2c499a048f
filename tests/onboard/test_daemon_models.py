"""Models over the bus: chunked resumable uploads, installs refused for each reason while the old
model keeps serving, rollback, and kill -9 then restart with the same active model."""
from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import zmq

from shared.messages import decode, encode
from test_daemon import (Payload, bundles, cli, command, command_message, connect,  # noqa: F401
                         frame, keys, make_daemon)

# A hung OpenVINO call or socket wait fails its test instead of stalling the suite.
pytestmark = pytest.mark.timeout(180)


def _upload(ep: str, path: Path, chunk_size: int) -> dict:
    from shared.client import CommandClient
    with CommandClient(ep, timeout_s=60, keys=keys("operator")) as client:
        return client.upload(path, chunk_size=chunk_size)


def _at_once(ep: str, *names: str, timeout_s: float = 60) -> list[dict]:
    """Send commands back to back on one socket, then wait for every ACK; bodies in send order."""
    sock = connect(zmq.DEALER, ep, "operator")
    try:
        ids = []
        for name in names:
            msg = command_message(name)
            sock.send_multipart(encode(msg))
            ids.append(msg.id)
        replies = {}
        while len(replies) < len(ids):
            assert sock.poll(int(timeout_s * 1000)), f"no ACK within {timeout_s} s"
            reply = decode(sock.recv_multipart())
            replies[reply.ref] = reply.body
        return [replies[i] for i in ids]
    finally:
        sock.close()


def test_no_model_then_chunked_resumable_upload_and_install(make_daemon, bundles):
    daemon = make_daemon([]).start()
    assert daemon.ready["model"] is None
    payload = Payload(daemon.endpoints["frames"])
    ep = daemon.endpoints["commands"]
    try:
        error = payload.outcome(payload.send("early", frame("clear", 64)[0]))
        assert error.type == "error" and error.body["code"] == "no_model"

        bundle = bundles.build(1)
        data = bundle.read_bytes()
        chunk = 4096
        n = -(-len(data) // chunk)
        begin = {"name": bundle.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                 "chunk_size": chunk}
        first = command(ep, "upload_begin", begin)["result"]
        assert first["chunks"] == n and first["received"] == []
        upload_id = first["upload_id"]

        def send_chunk(i: int, payload_bytes: bytes | None = None, digest: str | None = None) -> dict:
            piece = data[i * chunk:(i + 1) * chunk]
            from shared.client import CommandClient
            with CommandClient(ep, timeout_s=30, keys=keys("operator")) as client:
                return client.request("upload_chunk", {
                    "upload_id": upload_id, "index": i,
                    "sha256": digest or hashlib.sha256(piece).hexdigest()},
                    {"data": np.frombuffer(payload_bytes or piece, np.uint8)})

        # A chunk damaged in transit is refused by its own hash and not recorded.
        damaged = bytes([data[0] ^ 1]) + data[1:chunk]
        refused = send_chunk(0, damaged, hashlib.sha256(data[:chunk]).hexdigest())
        assert refused["ok"] is False and "sha256 mismatch" in refused["error"]
        for i in range(0, n, 2):                          # half the chunks, then the link drops
            assert send_chunk(i)["ok"]
        early_end = command(ep, "upload_end", {"upload_id": upload_id})
        assert early_end["ok"] is False and "missing" in early_end["error"]
        # Resuming: upload_begin again answers with the same id and what is already held.
        resumed = command(ep, "upload_begin", begin)["result"]
        assert resumed["upload_id"] == upload_id and resumed["received"] == list(range(0, n, 2))
        status = command(ep, "upload_status", {"upload_id": upload_id})["result"]
        assert status["missing"] == list(range(1, n, 2))
        for i in status["missing"]:
            assert send_chunk(i)["ok"]
        done = command(ep, "upload_end", {"upload_id": upload_id})
        assert done["ok"] and done["result"]["sha256"] == begin["sha256"]

        installed = command(ep, "install", {"upload_id": upload_id})
        assert installed["ok"], installed
        assert installed["result"]["version"] == 1 and installed["result"]["self_test"]["ok"]
        decision = payload.outcome(payload.send("after-install", frame("cloudy", 64)[0]))
        assert decision.type == "decision" and decision.body["model"]["version"] == 1
    finally:
        payload.close()


def test_install_refusals_keep_old_model_serving_then_rollback(make_daemon, bundles):
    daemon = make_daemon([1]).start()
    payload = Payload(daemon.endpoints["frames"])
    ep = daemon.endpoints["commands"]
    try:
        done = _upload(ep, bundles.build(2), chunk_size=8192)
        installed = command(ep, "install", {"upload_id": done["upload_id"]})
        assert installed["ok"] and installed["result"]["version"] == 2
        assert installed["result"]["previous"]["version"] == 1
        assert payload.outcome(payload.send("v2", frame("clear", 64)[0])).body["model"]["version"] == 2

        for bad, code in ((bundles.tampered(3), "checksum_mismatch"),
                          (bundles.unsigned(3), "missing_signature"),
                          (bundles.build(1), "version_too_old"),
                          (bundles.self_test_failing(3), "self_test_failed")):
            up = _upload(ep, bad, chunk_size=8192)
            refused = command(ep, "install", {"upload_id": up["upload_id"]})
            assert refused["ok"] is False and refused["error"].startswith(code), refused
            assert refused["code"] == code
            # The old model keeps serving, frames in between included.
            decision = payload.outcome(payload.send(f"during-{code}", frame("cloudy", 64)[0]))
            assert decision.type == "decision" and decision.body["model"]["version"] == 2
        status = command(ep, "status")["result"]
        assert status["model"]["version"] == 2 and status["store"]["staged"] is None

        back, busy = _at_once(ep, "rollback", "rollback")       # one install or rollback at a time
        assert busy["ok"] is False and busy["code"] == "busy" and busy["error"].startswith("busy")
        assert back["ok"] and back["code"] == "ok" and back["result"]["version"] == 1
        decision = payload.outcome(payload.send("after-rollback", frame("clear", 64)[0]))
        assert decision.body["model"]["version"] == 1
        rollback_cli = cli("rollback", "--config", str(daemon.config_path), "--json")
        assert rollback_cli.returncode == 0 and json.loads(rollback_cli.stdout)["version"] == 2
    finally:
        payload.close()


def test_kill_9_then_restart_comes_back_with_the_same_model(make_daemon, bundles):
    daemon = make_daemon([1]).start()
    ep = daemon.endpoints["commands"]
    up = _upload(ep, bundles.build(2), chunk_size=16384)
    assert command(ep, "install", {"upload_id": up["upload_id"]})["ok"]
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.wait(10)
    daemon.stop()
    daemon.start()
    assert daemon.ready["model"]["version"] == 2
    status = command(ep, "status")["result"]
    assert status["model"]["version"] == 2 and status["store"]["previous"]["version"] == 1
    payload = Payload(daemon.endpoints["frames"])
    try:
        assert payload.outcome(payload.send("reborn", frame("cloudy", 64)[0])).body["keep"] is False
    finally:
        payload.close()
