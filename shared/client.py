"""The one client of the daemon's commands socket: the onboard CLI, the flight simulator and the
tests all talk to the daemon through `CommandClient`.

A DEALER sends a COMMAND message and waits, bounded, for the reply whose `ref` is that
command's id; replies to earlier, timed-out commands arriving late are skipped. On a timeout it
closes the socket, opens a fresh one and sends the command again, up to `retries` times (the
ZeroMQ guide's Lazy Pirate): a daemon restarted mid-command does not leave the client stuck on
a dead connection. Resending is only safe for commands that can run twice (status, uploads), so
retries are asked for (`retries=` per client or per call) and never the default; install and
rollback go once.

With `keys` (shared.curve.ClientKeys, the operator's) the socket is a CURVE client of the
daemon; without them the daemon's ZAP handler never lets it in. Every COMMAND, every try of it
included, carries `body.counter`: the nanosecond clock, kept strictly increasing, which the
daemon wants above the last counter it saw from this key (anti-replay, docs/onboard.md).

Failures are shared errors: `CommandRejected` (the daemon's ACK {ok: false}: its `error` is the
message, its `code` the code) and `PeerUnreachable` (no answer after every try; exit code 4,
the endpoint named).

pyzmq is imported at the top: only the `onboard` and `sim` extras, which install pyzmq, import
this module (the rest of `shared` does not need it).
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import zmq

from shared.curve import ClientKeys
from shared.errors import CommandRejected, PeerUnreachable
from shared.hashing import sha256_file
from shared.messages import Message, MessageError, decode, encode


class CommandClient:
    """Commands to one daemon endpoint: `request` (the ACK body), `call` (the result, or
    CommandRejected), `upload` (a file in resumable chunks). `retried` counts the tries again."""

    def __init__(self, endpoint: str, *, timeout_s: float = 10.0, retries: int = 0,
                 source: str = "operator", ctx: zmq.Context | None = None,
                 keys: ClientKeys | None = None):
        self.endpoint, self.timeout_s, self.retries, self.source = endpoint, timeout_s, retries, source
        self.ctx = ctx or zmq.Context.instance()
        self.keys = keys
        self.retried = 0
        self._counter = 0
        self._sock: zmq.Socket | None = None
        self._open()

    def _open(self) -> None:
        self.close()
        self._sock = self.ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if self.keys is not None:
            self.keys.apply(self._sock)
        self._sock.connect(self.endpoint)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> "CommandClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------------------- commands
    def request(self, name: str, args: dict | None = None, arrays: dict | None = None,
                timeout_s: float | None = None, retries: int | None = None) -> dict:
        """Send one command; return the reply's body (an ACK's {ok, result | error, code}).
        PeerUnreachable when no try got an answer within `timeout_s`."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        retries = self.retries if retries is None else retries
        msg = Message("command", {"name": name, "args": args or {}}, dict(arrays or {}),
                      source=self.source)
        for attempt in range(retries + 1):
            if attempt:
                self.retried += 1
                self._open()                # Lazy Pirate: a fresh socket, then the same command
            msg.body["counter"] = self.next_counter()     # a fresh one for every try
            self._sock.send_multipart(encode(msg), copy=False)
            reply = self._reply_to(msg.id, time.monotonic() + timeout_s)
            if reply is not None:
                return reply.body
        tries = f"{retries + 1} {'try' if retries == 0 else 'tries'}"
        raise PeerUnreachable(f"no answer to {name!r} from {self.endpoint} after {tries} of "
                              f"{timeout_s:g} s ({self._unreachable_hint()})")

    def _unreachable_hint(self) -> str:
        """A secured daemon says nothing to a client it does not let in: name that cause too."""
        if self.keys is None:
            return "is the daemon running? a daemon with [security] answers only CURVE clients: --keys"
        return "is the daemon running, and is this operator key allowed in its [security]?"

    def next_counter(self) -> int:
        """The anti-replay counter of the next command: the clock in ns, strictly increasing
        (so a new client process also starts above what an earlier one sent)."""
        self._counter = max(time.time_ns(), self._counter + 1)
        return self._counter

    def _reply_to(self, msg_id: str, deadline: float) -> Message | None:
        """The reply whose ref is `msg_id`, or None at the deadline; anything else is skipped."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._sock.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                return None
            frames = self._sock.recv_multipart()
            if frames and frames[0] == b"":        # a REQ-style empty delimiter, if any
                frames = frames[1:]
            try:
                reply = decode(frames)
            except MessageError:
                continue
            if reply.ref == msg_id:                 # a late answer to an earlier try: skipped
                return reply

    def call(self, name: str, args: dict | None = None, arrays: dict | None = None,
             timeout_s: float | None = None, retries: int | None = None) -> dict:
        """The command's result; CommandRejected carries the daemon's error and code."""
        body = self.request(name, args, arrays, timeout_s, retries)
        if not body.get("ok"):
            message = body.get("error") or body.get("message") or f"{name}: command failed"
            raise CommandRejected(message, code=body.get("code") or None)
        return body.get("result", {})

    # ----------------------------------------------------------------------------------- uploads
    def upload(self, path: str | os.PathLike, chunk_size: int = 1 << 20,
               progress: Callable[[int], None] | None = None) -> dict:
        """Upload a file in checked chunks, resuming: chunks the daemon already holds (from an
        earlier, interrupted upload of the same file) are skipped. Returns upload_end's result
        (upload_id and the daemon-side path)."""
        path = Path(path)
        size = path.stat().st_size
        begun = self.call("upload_begin", {"name": path.name, "size": size,
                                           "sha256": sha256_file(path), "chunk_size": chunk_size})
        upload_id = begun["upload_id"]
        for index, data in missing_chunks(path, chunk_size, begun["chunks"], begun["received"]):
            self.call("upload_chunk", {"upload_id": upload_id, "index": index,
                                       "sha256": hashlib.sha256(data).hexdigest()},
                      {"data": np.frombuffer(data, dtype=np.uint8)})
            if progress:
                progress(len(data))
        return self.call("upload_end", {"upload_id": upload_id})


def missing_chunks(path: str | os.PathLike, chunk_size: int, chunks: int, held) -> Iterator[tuple[int, bytes]]:
    """(index, bytes) of every chunk of `path` the daemon does not hold yet (`held`: the indices
    upload_begin reported received), in order: what a resumed upload still has to send."""
    held = set(held)
    with open(path, "rb") as fh:
        for index in range(chunks):
            if index not in held:
                fh.seek(index * chunk_size)
                yield index, fh.read(chunk_size)
