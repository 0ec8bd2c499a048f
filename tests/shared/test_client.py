"""shared.client.CommandClient against a real ROUTER socket on loopback TCP: Lazy-Pirate retries
with a fresh socket, late replies skipped by `ref`, the daemon's refusal and silence as shared
errors, resumable uploads."""
import hashlib
import time

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")

from fake_daemon import FakeDaemon  # noqa: E402
from shared.client import CommandClient  # noqa: E402
from shared.errors import EXIT_ERROR, EXIT_UNREACHABLE, CommandRejected, PeerUnreachable  # noqa: E402


def test_the_first_request_ignored_then_answered_on_a_fresh_socket(ctx):
    router = FakeDaemon(ctx, lambda n, msg: None if n == 1 else {"ok": True, "result": {"n": n}})
    try:
        with CommandClient(router.endpoint, timeout_s=0.3, retries=2, ctx=ctx) as client:
            assert client.call("status") == {"n": 2}
            assert client.retried == 1
    finally:
        router.close()
    first, second = router.seen
    assert {k: first.body[k] for k in ("name", "args")} == {"name": "status", "args": {}}
    assert {k: second.body[k] for k in ("name", "args")} == {"name": "status", "args": {}}
    assert second.body["counter"] > first.body["counter"] > 0   # a fresh anti-replay counter per try
    assert first.id == second.id            # the same command sent again, not a new one
    assert router.routes[0] != router.routes[1]     # ... from a fresh socket (Lazy Pirate)
    assert first.source == "operator"


def test_a_late_reply_to_an_earlier_request_is_skipped(ctx):
    def script(n, msg):
        if n == 1:
            time.sleep(0.5)                 # answers the first request after the client gave up
        return {"ok": True, "result": {"n": n}}

    router = FakeDaemon(ctx, script)
    try:
        with CommandClient(router.endpoint, timeout_s=0.2, ctx=ctx) as client:   # retries=0
            with pytest.raises(PeerUnreachable, match="after 1 try of 0.2 s"):
                client.call("status")
            # the answer to the first request now arrives first on this socket: not ours
            assert client.call("status", timeout_s=3) == {"n": 2}
            assert client.retried == 0
    finally:
        router.close()


def test_the_daemons_refusal_carries_its_error_and_code(ctx):
    bodies = {1: {"ok": False, "error": "busy: an install is running", "code": "busy"},
              2: {"ok": False, "error": "no"}}
    router = FakeDaemon(ctx, lambda n, msg: bodies[n])
    try:
        with CommandClient(router.endpoint, timeout_s=2, ctx=ctx) as client:
            with pytest.raises(CommandRejected, match="busy: an install is running") as exc:
                client.call("install", {"upload_id": "0123456789abcdef"})
            assert exc.value.code == "busy" and exc.value.exit_code == EXIT_ERROR
            with pytest.raises(CommandRejected) as exc:
                client.call("rollback")
            assert exc.value.code == "command_rejected"
            assert isinstance(exc.value, RuntimeError)
    finally:
        router.close()
    assert router.seen[0].body["args"] == {"upload_id": "0123456789abcdef"}


def test_no_answer_names_the_endpoint_and_exits_4(ctx):
    sock = ctx.socket(zmq.ROUTER)        # bound, never read: the daemon hung
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    try:
        with CommandClient(f"tcp://127.0.0.1:{port}", timeout_s=0.05, retries=2, ctx=ctx) as client:
            with pytest.raises(PeerUnreachable) as exc:
                client.call("status")
        assert client.retried == 2
    finally:
        sock.close(linger=0)
    error = exc.value
    assert error.exit_code == EXIT_UNREACHABLE and error.code == "unreachable"
    assert f"tcp://127.0.0.1:{port}" in str(error) and "after 3 tries of 0.05 s" in str(error)
    assert isinstance(error, TimeoutError)


def test_upload_resumes_skipping_chunks_the_daemon_holds(ctx, tmp_path):
    blob = np.random.default_rng(2).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    path = tmp_path / "b.tar"
    path.write_bytes(blob)
    held = {0: blob[:4096]}                        # from an earlier, interrupted upload

    def script(n, msg):
        name, args = msg.body["name"], msg.body["args"]
        if name == "upload_begin":
            assert args["sha256"] == hashlib.sha256(blob).hexdigest() and args["size"] == len(blob)
            return {"ok": True, "result": {"upload_id": "u1", "chunks": 3, "received": sorted(held)}}
        if name == "upload_chunk":
            data = bytes(msg.arrays["data"])
            assert hashlib.sha256(data).hexdigest() == args["sha256"]
            held[args["index"]] = data
            return {"ok": True, "result": {}}
        whole = b"".join(held[i] for i in sorted(held))
        return {"ok": whole == blob, "result": {"upload_id": "u1", "path": "/up/b.tar"},
                   "error": "whole file differs"}

    router = FakeDaemon(ctx, script)
    sent = []
    try:
        with CommandClient(router.endpoint, timeout_s=2, ctx=ctx) as client:
            done = client.upload(path, chunk_size=4096, progress=sent.append)
    finally:
        router.close()
    assert done == {"upload_id": "u1", "path": "/up/b.tar"}
    assert router.names() == ["upload_begin", "upload_chunk", "upload_chunk",
                                                     "upload_end"]
    assert [m.body["args"]["index"] for m in router.seen[1:3]] == [1, 2] and sent == [4096, 1808]
