"""What CURVE costs on the daemon's bus: frame round trips over ipc with and without it.

A DEALER sends a FRAME-sized message (a 13-band uint16 frame of SIZE x SIZE as one part, as the
payload does) to a ROUTER that answers with a small reply, N times, first plain (NULL mechanism)
then as a CURVE client of a CURVE server (the daemon's setup: shared.curve keys, every byte
encrypted and authenticated with libsodium). Also the connection handshake, which ZAP answers
once per connection. Prints one JSON line per mode; figures only, no assertions.

    nice python benchmarks/bench_curve.py [--size 512] [--frames 40]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import zmq

from shared.curve import client_keys, generate_key_set, load_pair


def _pair(ctx: zmq.Context, endpoint: str, keys_dir: str | None) -> tuple[zmq.Socket, zmq.Socket]:
    server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for s in (server, client):
        s.setsockopt(zmq.LINGER, 0)
    if keys_dir:
        public, secret = load_pair(os.path.join(keys_dir, "daemon.key_secret"))
        server.curve_server, server.curve_publickey, server.curve_secretkey = True, public, secret
        client_keys(keys_dir, "payload").apply(client)
    server.bind(endpoint)
    client.connect(endpoint)
    return server, client


def _round(server: zmq.Socket, client: zmq.Socket, payload: np.ndarray) -> float:
    t0 = time.perf_counter()
    client.send(payload, copy=False)
    route, _ = server.recv_multipart(copy=False)
    server.send_multipart([route, b"ack"])
    client.recv()
    return time.perf_counter() - t0


def measure(mode: str, size: int, frames: int, workdir: str) -> dict:
    ctx = zmq.Context()
    keys_dir = str(generate_key_set(os.path.join(workdir, "keys"))) if mode == "curve" else None
    payload = np.random.default_rng(0).integers(0, 10000, (13, size, size), dtype=np.uint16)
    t0 = time.perf_counter()
    server, client = _pair(ctx, f"ipc://{workdir}/{mode}.sock", keys_dir)
    first = _round(server, client, payload[:, :1, :1].copy())     # connect + handshake + 1 tiny
    handshake_ms = (time.perf_counter() - t0) * 1000
    times = [_round(server, client, payload) for _ in range(frames)]
    server.close()
    client.close()
    ctx.term()
    mb = payload.nbytes / 1e6
    median = statistics.median(times)
    return {"mode": mode, "frame_mb": round(mb, 2), "frames": frames,
            "median_ms": round(median * 1000, 2), "mb_per_s": round(mb / median, 1),
            "first_round_ms": round(handshake_ms, 2), "tiny_round_ms": round(first * 1000, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--frames", type=int, default=40)
    args = p.parse_args()
    machine = {"cpu": platform.processor() or platform.machine(), "load": os.getloadavg(),
               "zmq": zmq.zmq_version(), "pyzmq": zmq.__version__}
    with tempfile.TemporaryDirectory(prefix="curve-", dir="/tmp") as work:
        for mode in ("plain", "curve"):
            print(json.dumps({**measure(mode, args.size, args.frames, work), **machine}), flush=True)


if __name__ == "__main__":
    main()
