"""The simulator's bus plumbing: endpoints, the daemon config it writes (read back by the
daemon's own loader), the shared command client's Lazy-Pirate retry as the simulator uses it,
the chunked uplink's faults."""
import hashlib
import threading

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")

from flight_sim.bus import plan_endpoints  # noqa: E402
from flight_sim.daemon_proc import write_daemon_config  # noqa: E402
from flight_sim.uplink import Uplink  # noqa: E402
from shared.client import CommandClient  # noqa: E402
from shared.errors import CommandRejected, PeerUnreachable  # noqa: E402
from shared.messages import decode, encode  # noqa: E402


def test_endpoints_ipc_in_the_run_folder_or_tcp(tmp_path):
    ep = plan_endpoints(tmp_path)
    assert ep.frames == f"ipc://{tmp_path.resolve()}/bus/frames.sock"
    assert len(set(ep.as_dict().values())) == 4
    deep = tmp_path / ("x" * 120)
    tcp = plan_endpoints(deep)                       # too long for a Unix socket path
    assert all(v.startswith("tcp://127.0.0.1:") for v in tcp.as_dict().values())
    with pytest.raises(ValueError, match="bus.transport"):
        plan_endpoints(tmp_path, "udp")


def test_daemon_config_is_what_the_daemon_reads(tmp_path):
    from onboard.config import load_config
    ep = plan_endpoints(tmp_path)
    (tmp_path / "k.pub").write_text("x")
    path = write_daemon_config(tmp_path / "d" / "daemon.toml", ep, tmp_path / "store", tmp_path / "up",
                               tmp_path / "k.pub", max_frames=3, telemetry_interval_s=0.25,
                               max_message_bytes=300 << 20)
    cfg = load_config(path)
    assert cfg.endpoints == ep.as_dict()
    assert cfg.max_frames == 3 and cfg.telemetry_interval_s == 0.25
    assert cfg.store_root == (tmp_path / "store").resolve() and cfg.max_message_bytes == 300 << 20


class ScriptedDaemon:
    """A commands ROUTER in a thread: `script(name, args, arrays) -> body`, or None to stay silent."""

    def __init__(self, ctx, endpoint, script):
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.script, self.seen, self.stop = script, [], threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while not self.stop.is_set():
            if not self.sock.poll(20):
                continue
            route, *parts = self.sock.recv_multipart()
            msg = decode(parts)
            self.seen.append(msg.body["name"])
            body = self.script(msg.body["name"], msg.body.get("args", {}), msg.arrays)
            if body is not None:
                self.sock.send_multipart([route, *encode(msg.reply("ack", body))])

    def close(self):
        self.stop.set()
        self.thread.join(2)
        self.sock.close(linger=0)


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def test_command_client_retries_with_a_fresh_socket(ctx):
    calls = {"n": 0}

    def script(name, args, arrays):
        calls["n"] += 1
        return None if calls["n"] == 1 else {"ok": True, "result": {"state": "serving"}}

    d = ScriptedDaemon(ctx, "inproc://cmd-1", script)
    try:
        _link_checks(ctx, d)
    finally:
        d.close()


def _link_checks(ctx, d):
    link = CommandClient("inproc://cmd-1", timeout_s=0.2, retries=2, source="ground", ctx=ctx)
    assert link.call("status") == {"state": "serving"}
    assert link.retried == 1 and d.seen == ["status", "status"]
    with pytest.raises(CommandRejected, match="nope") as refused:
        d.script = lambda *a: {"ok": False, "error": "nope", "code": "busy"}
        link.call("install")
    assert refused.value.code == "busy"
    d.script = lambda *a: None
    with pytest.raises(PeerUnreachable, match="after 2 tries") as lost:
        link.call("status", timeout_s=0.05, retries=1)
    assert isinstance(lost.value, TimeoutError) and "inproc://cmd-1" in str(lost.value)
    link.close()


def test_uplink_resends_corrupt_chunks_and_resumes(ctx, tmp_path):
    """A daemon-side model of the upload commands (chunk checksums, held chunks) drives the
    client's fault handling: a flipped chunk is refused and resent, a lost link resumes."""
    blob = np.random.default_rng(1).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    path = tmp_path / "b.tar"
    path.write_bytes(blob)
    store = {}

    def script(name, args, arrays):
        if name == "upload_begin":
            n = -(-args["size"] // args["chunk_size"])
            store.setdefault("chunks", {})
            return {"ok": True, "result": {"upload_id": "0123456789abcdef", "chunks": n,
                                           "received": sorted(store["chunks"])}}
        if name == "upload_chunk":
            data = bytes(arrays["data"])
            if hashlib.sha256(data).hexdigest() != args["sha256"]:
                return {"ok": False, "error": f"chunk {args['index']}: sha256 mismatch; send it again"}
            store["chunks"][args["index"]] = data
            return {"ok": True, "result": {"index": args["index"]}}
        if name == "upload_status":
            n = -(-len(blob) // 4096)
            return {"ok": True, "result": {"missing": [i for i in range(n) if i not in store["chunks"]]}}
        if name == "upload_end":
            whole = b"".join(store["chunks"][i] for i in sorted(store["chunks"]))
            ok = hashlib.sha256(whole).hexdigest() == hashlib.sha256(blob).hexdigest()
            return {"ok": ok, "result": {"path": "/up/b.tar"}} if ok else {"ok": False, "error": "whole"}
        return {"ok": False, "error": f"unknown command {name!r}"}

    d = ScriptedDaemon(ctx, "inproc://cmd-2", script)
    try:
        up = Uplink(CommandClient("inproc://cmd-2", timeout_s=2, ctx=ctx), chunk_size=4096)
        rep = up.upload(path, interrupt_after=1, corrupt_chunks=(1,))
    finally:
        d.close()
    assert rep.chunks == 3 and rep.interrupted_after == 1 and rep.resumed_missing == [1, 2]
    assert rep.corrupted_in_transit == 1 and rep.chunks_sent == 4       # 0, 1 (bad), 1, 2
    assert rep.path_on_board == "/up/b.tar" and rep.already_held == 1
    assert d.seen.count("upload_begin") == 2 and "upload_status" in d.seen
    with pytest.raises(ValueError, match="uplink.chunk_size"):
        Uplink(up.link, chunk_size=0)
    with pytest.raises(FileNotFoundError, match="nothere"):
        up.upload(tmp_path / "nothere.tar")
