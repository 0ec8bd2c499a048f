"""A scripted stand-in for the daemon's commands socket: a real ROUTER in a thread.

`script(n, msg) -> body | None` answers the n-th request (1-based) with an ACK of that body, or
stays silent (None); a script may sleep to answer late. `seen` holds every request, `routes`
the ZeroMQ identity each came from (a fresh DEALER has a new one)."""
from __future__ import annotations

import threading

import zmq

from shared.messages import decode, encode


class FakeDaemon:
    def __init__(self, ctx: zmq.Context, script, endpoint: str | None = None):
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if endpoint is None:
            endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        else:
            self.sock.bind(endpoint)
        self.endpoint, self.script = endpoint, script
        self.seen, self.routes, self.stop = [], [], threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def names(self) -> list[str]:
        return [m.body["name"] for m in self.seen]

    def _loop(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(20):
                continue
            route, *frames = self.sock.recv_multipart()
            msg = decode(frames)
            self.seen.append(msg)
            self.routes.append(route)
            body = self.script(len(self.seen), msg)
            if body is not None:
                self.sock.send_multipart([route, *encode(msg.reply("ack", body))])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close(linger=0)
