"""Operator commands: the registry the daemon dispatches on, chunked uploads, and a client.

Every command is one function `(daemon, args, arrays) -> result dict` registered with
`@command(name, help, background=...)`: that entry is the one place to add a command. A
handler raises `CommandFailed` to answer ACK {ok: false, error}; a `background` handler runs in
the daemon's admin thread (installs self-test a model: seconds), so the sockets stay served,
and its ACK goes out when it finishes.

Uploads (`upload_begin` / `upload_chunk` / `upload_status` / `upload_end`) assemble a bundle
in `[store].uploads`, checking each chunk's sha256 as it lands and the whole file's at the end.
The upload id is derived from (sha256, size, chunk_size), and each received chunk is recorded
on disk, so after a lost link or a daemon restart `upload_begin` with the same file answers
with the same id and the chunks already held: only the missing ones need sending again.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from onboard.store import write_json_atomic
from shared.manifest import sha256_file


class CommandFailed(Exception):
    """A command that cannot be done; the message goes back as ACK {ok: false, error}."""


@dataclass(frozen=True)
class Command:
    name: str
    func: Callable[[Any, dict, dict], dict]
    help: str
    background: bool = False


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, background: bool = False):
    def register(func):
        COMMANDS[name] = Command(name, func, help, background)
        return func
    return register


# ---------------------------------------------------------------------------------------------
# Argument checks: every failure names `args.<field>`.

_TYPES = {int: "an integer", str: "a string", dict: "a map", bool: "true or false"}


def arg(args: dict, name: str, kind: type, required: bool = True, default: Any = None) -> Any:
    if name not in args:
        if required:
            raise CommandFailed(f"args.{name}: missing")
        return default
    value = args[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CommandFailed(f"args.{name}: expected {_TYPES.get(kind, kind.__name__)}, "
                            f"got {type(value).__name__}")
    return value


def _sha256_arg(args: dict, name: str = "sha256") -> str:
    value = arg(args, name, str).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise CommandFailed(f"args.{name}: expected 64 hex digits (a SHA-256), got {value[:80]!r}")
    return value


def chunk_bytes(arrays: dict) -> memoryview:
    """The one array (or bytes frame) of an upload_chunk, as raw bytes (no copy)."""
    if len(arrays) != 1:
        raise CommandFailed(f"upload_chunk carries exactly one data frame, got {len(arrays)}")
    data = np.ascontiguousarray(next(iter(arrays.values())))
    return memoryview(data.reshape(-1).view(np.uint8))


# ---------------------------------------------------------------------------------------------
# Uploads

class Uploads:
    """Resumable chunked uploads on disk, each checked per chunk and as a whole."""

    def __init__(self, root: str | os.PathLike, max_bytes: int, max_chunk_bytes: int):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()   # upload_end/install may read what the poller writes

    @staticmethod
    def make_id(sha256: str, size: int, chunk_size: int) -> str:
        return hashlib.sha256(f"{sha256}:{size}:{chunk_size}".encode()).hexdigest()[:16]

    def _dir(self, upload_id: Any) -> Path:
        if not isinstance(upload_id, str) or not re.fullmatch(r"[0-9a-f]{16}", upload_id):
            raise CommandFailed(f"args.upload_id: not an upload id: {str(upload_id)[:40]!r}")
        path = self.root / upload_id
        if not (path / "meta.json").is_file():
            raise CommandFailed(f"args.upload_id: unknown upload {upload_id!r} (upload_begin first)")
        return path

    def _meta(self, upload_id: str) -> dict:
        return json.loads((self._dir(upload_id) / "meta.json").read_text())

    @staticmethod
    def _summary(meta: dict) -> dict:
        return {"upload_id": meta["upload_id"], "name": meta["name"], "size": meta["size"],
                "chunk_size": meta["chunk_size"], "chunks": meta["chunks"],
                "received": sorted(meta["received"]), "complete": meta["complete"]}

    def begin(self, name: str, size: int, sha256: str, chunk_size: int) -> dict:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", name) or name.startswith("."):
            raise CommandFailed(f"args.name: {name[:80]!r} is not a plain file name")
        if not 1 <= size <= self.max_bytes:
            raise CommandFailed(f"args.size: {size} bytes, must be 1..{self.max_bytes} "
                                "(store.max_upload_bytes)")
        if not 1 <= chunk_size <= self.max_chunk_bytes:
            raise CommandFailed(f"args.chunk_size: {chunk_size}, must be 1..{self.max_chunk_bytes} "
                                "(store.max_chunk_bytes)")
        upload_id = self.make_id(sha256, size, chunk_size)
        path = self.root / upload_id
        with self._lock:
            if (path / "meta.json").is_file():          # a resume: keep what arrived
                return self._summary(json.loads((path / "meta.json").read_text()))
            path.mkdir(parents=True, exist_ok=True)
            with open(path / "data.part", "wb") as fh:
                fh.truncate(size)
            meta = {"upload_id": upload_id, "name": name, "size": size, "sha256": sha256,
                    "chunk_size": chunk_size, "chunks": -(-size // chunk_size), "received": [],
                    "complete": False, "started": time.time()}
            write_json_atomic(path / "meta.json", meta)
        return self._summary(meta)

    def chunk(self, upload_id: str, index: int, sha256: str, data: memoryview) -> dict:
        path = self._dir(upload_id)
        with self._lock:
            meta = self._meta(upload_id)
            if meta["complete"]:
                raise CommandFailed(f"upload {upload_id} is already complete")
            if not 0 <= index < meta["chunks"]:
                raise CommandFailed(f"args.index: {index} out of range 0..{meta['chunks'] - 1}")
            expected = min(meta["chunk_size"], meta["size"] - index * meta["chunk_size"])
            if data.nbytes != expected:
                raise CommandFailed(f"chunk {index}: {data.nbytes} bytes, expected {expected}")
            actual = hashlib.sha256(data).hexdigest()
            if actual != sha256:
                raise CommandFailed(f"chunk {index}: sha256 mismatch (got {actual[:16]}..., "
                                    f"args.sha256 says {sha256[:16]}...); send it again")
            fd = os.open(path / "data.part", os.O_WRONLY)
            try:
                os.pwrite(fd, data, index * meta["chunk_size"])
                os.fsync(fd)                       # the record below must not claim lost bytes
            finally:
                os.close(fd)
            if index not in meta["received"]:
                meta["received"].append(index)
                write_json_atomic(path / "meta.json", meta)
        return {"upload_id": upload_id, "index": index, "received_count": len(meta["received"]),
                "chunks": meta["chunks"]}

    def status(self, upload_id: str) -> dict:
        with self._lock:
            meta = self._meta(upload_id)
        summary = self._summary(meta)
        summary["missing"] = sorted(set(range(meta["chunks"])) - set(meta["received"]))
        return summary

    def end(self, upload_id: str) -> dict:
        path = self._dir(upload_id)
        with self._lock:
            meta = self._meta(upload_id)
            missing = sorted(set(range(meta["chunks"])) - set(meta["received"]))
            if missing:
                raise CommandFailed(f"upload {upload_id}: {len(missing)} chunks missing, first "
                                    f"{missing[:10]}")
            actual = sha256_file(path / "data.part")
            if actual != meta["sha256"]:
                # Every chunk matched its own hash, so the announced hash or the chunking was wrong:
                # start over rather than keep bytes nobody vouches for.
                meta["received"] = []
                write_json_atomic(path / "meta.json", meta)
                raise CommandFailed(f"upload {upload_id}: whole-file sha256 is {actual}, "
                                    f"upload_begin announced {meta['sha256']}; upload reset")
            final = path / meta["name"]
            os.replace(path / "data.part", final)
            meta["complete"] = True
            meta["path"] = str(final)
            write_json_atomic(path / "meta.json", meta)
        return {**self._summary(meta), "path": str(final), "sha256": actual}

    def path_of(self, upload_id: str) -> Path:
        meta = self._meta(upload_id)
        if not meta["complete"]:
            raise CommandFailed(f"upload {upload_id} is not complete (upload_end first)")
        return Path(meta["path"])

    def list(self) -> list[dict]:
        out = []
        for meta_path in sorted(self.root.glob("*/meta.json")):
            try:
                out.append(self._summary(json.loads(meta_path.read_text())))
            except (OSError, ValueError, KeyError):
                continue
        for item in out:
            item["received"] = len(item["received"])   # counts only: status stays small
        return out


# ---------------------------------------------------------------------------------------------
# The commands. `daemon` is onboard.daemon.Daemon; handlers use only its small public surface.

@command("status", "model, queue, frame counters, latency, memory, store slots, uploads")
def _status(daemon, args: dict, arrays: dict) -> dict:
    return daemon.status()


@command("upload_begin", "start or resume an upload {name, size, sha256, chunk_size}")
def _upload_begin(daemon, args: dict, arrays: dict) -> dict:
    return daemon.uploads.begin(arg(args, "name", str), arg(args, "size", int), _sha256_arg(args),
                                arg(args, "chunk_size", int))


@command("upload_chunk", "one chunk {upload_id, index, sha256} + its bytes as one frame")
def _upload_chunk(daemon, args: dict, arrays: dict) -> dict:
    return daemon.uploads.chunk(arg(args, "upload_id", str), arg(args, "index", int),
                                _sha256_arg(args), chunk_bytes(arrays))


@command("upload_status", "what an upload holds {upload_id}: received and missing chunks")
def _upload_status(daemon, args: dict, arrays: dict) -> dict:
    return daemon.uploads.status(arg(args, "upload_id", str))


@command("upload_end", "finish an upload {upload_id}: checks the whole file's sha256")
def _upload_end(daemon, args: dict, arrays: dict) -> dict:
    return daemon.uploads.end(arg(args, "upload_id", str))


def _install_source(daemon, args: dict) -> Path:
    if ("upload_id" in args) == ("path" in args):
        raise CommandFailed("args: give exactly one of upload_id or path")
    if "upload_id" in args:
        return daemon.uploads.path_of(arg(args, "upload_id", str))
    return Path(arg(args, "path", str))


@command("install", "verify, self-test and activate a bundle {upload_id | path}", background=True)
def _install(daemon, args: dict, arrays: dict) -> dict:
    result = daemon.install(_install_source(daemon, args))
    if not result["ok"]:
        raise CommandFailed(f"{result['code']}: {result['reason']}")
    return result


@command("rollback", "make the previous model active again", background=True)
def _rollback(daemon, args: dict, arrays: dict) -> dict:
    result = daemon.rollback()
    if not result["ok"]:
        raise CommandFailed(f"{result['code']}: {result['reason']}")
    return result


@command("set_policy", "replace the keep/discard policy of the active model {policy}; "
                       "{policy: null} restores the bundle's own")
def _set_policy(daemon, args: dict, arrays: dict) -> dict:
    if "policy" not in args:
        raise CommandFailed("args.policy: missing")
    policy = args["policy"]
    if policy is not None and not isinstance(policy, dict):
        raise CommandFailed(f"args.policy: expected a map or null, got {type(policy).__name__}")
    return daemon.set_policy(policy)


@command("shutdown", "finish the frames in flight, then exit 0")
def _shutdown(daemon, args: dict, arrays: dict) -> dict:
    daemon.request_shutdown("shutdown command")
    return {"shutting_down": True}


@command("help", "the commands this daemon knows")
def _help(daemon, args: dict, arrays: dict) -> dict:
    return {"commands": {c.name: c.help for c in COMMANDS.values()}}


# ---------------------------------------------------------------------------------------------
# Client (CLI, tests, the flight simulator's operator side)

class CommandClient:
    """A DEALER that sends COMMAND messages and waits (bounded) for the matching ACK."""

    def __init__(self, endpoint: str, timeout_s: float = 30.0, source: str = "operator"):
        import zmq
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.source = source
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> "CommandClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, name: str, args: dict | None = None, arrays: dict | None = None,
                timeout_s: float | None = None) -> dict:
        """Send one command; return the ACK body {ok, result | error}. TimeoutError if none."""
        import zmq
        from shared.messages import Message, MessageError, decode, encode
        msg = Message("command", {"name": name, "args": args or {}}, dict(arrays or {}),
                      source=self.source)
        self._sock.send_multipart(encode(msg), copy=False)
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._sock.poll(int(remaining * 1000), zmq.POLLIN):
                raise TimeoutError(f"no answer to {name!r} from {self.endpoint} within "
                                   f"{self.timeout_s if timeout_s is None else timeout_s:g} s "
                                   "(is the daemon running?)")
            frames = self._sock.recv_multipart()
            if frames and frames[0] == b"":
                frames = frames[1:]
            try:
                reply = decode(frames)
            except MessageError:
                continue
            if reply.ref == msg.id:       # a late answer to an earlier, timed-out request: skip
                return reply.body

    def call(self, name: str, args: dict | None = None, arrays: dict | None = None,
             timeout_s: float | None = None) -> dict:
        """Like `request` but returns the result, raising CommandFailed with the daemon's error."""
        body = self.request(name, args, arrays, timeout_s)
        if not body.get("ok"):
            raise CommandFailed(body.get("error", "command failed"))
        return body.get("result", {})

    def upload(self, path: str | os.PathLike, chunk_size: int = 1 << 20,
               progress: Callable[[int], None] | None = None) -> dict:
        """Upload a file in chunks (resuming: chunks the daemon holds are skipped); returns
        upload_end's result (with upload_id and the daemon-side path)."""
        path = Path(path)
        size = path.stat().st_size
        begun = self.call("upload_begin", {"name": path.name, "size": size,
                                           "sha256": sha256_file(path), "chunk_size": chunk_size})
        upload_id, held = begun["upload_id"], set(begun["received"])
        with open(path, "rb") as fh:
            for index in range(begun["chunks"]):
                if index in held:
                    continue
                fh.seek(index * chunk_size)
                data = fh.read(chunk_size)
                self.call("upload_chunk", {"upload_id": upload_id, "index": index,
                                           "sha256": hashlib.sha256(data).hexdigest()},
                          {"data": np.frombuffer(data, dtype=np.uint8)})
                if progress:
                    progress(len(data))
        return self.call("upload_end", {"upload_id": upload_id})
