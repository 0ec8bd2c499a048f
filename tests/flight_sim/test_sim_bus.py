"""The simulator's bus plumbing: endpoints, the daemon config it writes (read back by the
daemon's own loader), the chunked uplink's faults over the shared command client (whose
retries tests/shared/test_client.py checks)."""
import hashlib

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")

from fake_daemon import FakeDaemon  # noqa: E402
from flight_sim.bus import plan_endpoints  # noqa: E402
from flight_sim.daemon_proc import write_daemon_config  # noqa: E402
from flight_sim.uplink import Uplink  # noqa: E402
from shared.client import CommandClient  # noqa: E402


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


def test_uplink_resends_corrupt_chunks_and_resumes(ctx, tmp_path):
    """A daemon-side model of the upload commands (chunk checksums, held chunks) drives the
    client's fault handling: a flipped chunk is refused and resent, a lost link resumes."""
    blob = np.random.default_rng(1).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    path = tmp_path / "b.tar"
    path.write_bytes(blob)
    store = {}

    def script(n, msg):
        name, args, arrays = msg.body["name"], msg.body["args"], msg.arrays
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

    d = FakeDaemon(ctx, script, "inproc://cmd-2")
    try:
        up = Uplink(CommandClient("inproc://cmd-2", timeout_s=2, ctx=ctx), chunk_size=4096)
        rep = up.upload(path, interrupt_after=1, corrupt_chunks=(1,))
    finally:
        d.close()
    assert rep.chunks == 3 and rep.interrupted_after == 1 and rep.resumed_missing == [1, 2]
    assert rep.corrupted_in_transit == 1 and rep.chunks_sent == 4       # 0, 1 (bad), 1, 2
    assert rep.path_on_board == "/up/b.tar" and rep.already_held == 1
    assert d.names().count("upload_begin") == 2 and "upload_status" in d.names()
    with pytest.raises(ValueError, match="uplink.chunk_size"):
        Uplink(up.link, chunk_size=0)
    with pytest.raises(FileNotFoundError, match="nothere"):
        up.upload(tmp_path / "nothere.tar")
