"""Operator commands: the registry the daemon dispatches on, their checks and their ACKs.

Every command is one function `(daemon, args, arrays) -> result dict` registered with
`@command(name, help, background=...)`: that entry is the one place to add a command. A
handler raises `CommandFailed` (with a code from onboard.errors) to answer
ACK {ok: false, code, error}; a `background` handler runs in the daemon's admin worker
(installs self-test a model: seconds), so the sockets stay served, and its ACK goes out when
it finishes. Uploads live in onboard.uploads.

The daemon's side, in order: `read_command` (size, envelope, type) -> `find_command` (name) ->
`execute` (the handler; its result or refusal becomes the ACK body).

Only operator keys reach this socket (ZAP, onboard.security), and the bus refuses a command whose
anti-replay `body.counter` is not above the last one its key sent before any of this runs.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from onboard.errors import (BAD_ARGS, BAD_MESSAGE, INTERNAL, OK, TOO_LARGE, UNKNOWN_COMMAND,
                            CommandFailed)
from shared.jsonable import jsonable
from shared.limits import MAX_ID_CHARS, clip
from shared.messages import Limits, Message, MessageError, decode

log = logging.getLogger("onboard.daemon")

ENVELOPE_BYTES = 1 << 20       # room for a command's header beside its chunk (store.max_chunk_bytes)
MAX_ACK_IDS = 1024             # frame ids one products_received may name


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
# The daemon's side: read, find, execute; ACK bodies.

def read_command(parts: list, limits: Limits) -> Message:
    """A COMMAND message from the commands socket's parts; CommandFailed if it is not one."""
    size = sum(len(p) for p in parts)
    limit = limits.max_array_bytes + ENVELOPE_BYTES
    if size > limit:
        raise CommandFailed(f"too_large: command message is {size} bytes, over {limit} "
                            "(store.max_chunk_bytes + 1 MiB)", code=TOO_LARGE)
    try:
        msg = decode(parts, limits)
    except MessageError as exc:
        raise CommandFailed(f"bad_message: {exc}", code=BAD_MESSAGE) from None
    if msg.type != "command":
        raise CommandFailed(f"bad_message: the commands socket takes command messages, "
                            f"got a {msg.type!r} message", code=BAD_MESSAGE)
    return msg


def find_command(name: str) -> Command:
    cmd = COMMANDS.get(name)
    if cmd is None:
        raise CommandFailed(f"unknown command {name!r} (known: {', '.join(sorted(COMMANDS))})",
                            code=UNKNOWN_COMMAND)
    return cmd


def execute(daemon, cmd: Command, msg: Message) -> dict:
    """Run one command; the body of its ACK (never raises: a bug is answered `internal`)."""
    try:
        result = cmd.func(daemon, msg.body.get("args") or {}, msg.arrays)
        return {"ok": True, "code": OK, "result": jsonable(result)}
    except CommandFailed as exc:
        return refusal(exc)
    except Exception as exc:
        log.exception("command %s failed", cmd.name)
        return refusal(CommandFailed(f"internal: {type(exc).__name__}: {exc}", code=INTERNAL))


def refusal(exc: CommandFailed) -> dict:
    """The ACK body of a refused command (its text at most 1024 characters: shared.limits.clip)."""
    return {"ok": False, "code": exc.code, "error": clip(str(exc))}


# ---------------------------------------------------------------------------------------------
# Argument checks: every failure names `args.<field>`.

_TYPES = {int: "an integer", str: "a string", dict: "a map", bool: "true or false"}


def arg(args: dict, name: str, kind: type, required: bool = True, default: Any = None) -> Any:
    if name not in args:
        if required:
            raise CommandFailed(f"args.{name}: missing", code=BAD_ARGS)
        return default
    value = args[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CommandFailed(f"args.{name}: expected {_TYPES.get(kind, kind.__name__)}, "
                            f"got {type(value).__name__}", code=BAD_ARGS)
    return value


def sha256_arg(args: dict, name: str = "sha256") -> str:
    value = arg(args, name, str).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise CommandFailed(f"args.{name}: expected 64 hex digits (a SHA-256), got {value[:80]!r}",
                            code=BAD_ARGS)
    return value


def chunk_bytes(arrays: dict) -> memoryview:
    """The one array (or bytes frame) of an upload_chunk, as raw bytes (no copy)."""
    if len(arrays) != 1:
        raise CommandFailed(f"upload_chunk carries exactly one data frame, got {len(arrays)}",
                            code=BAD_ARGS)
    data = np.ascontiguousarray(next(iter(arrays.values())))
    return memoryview(data.reshape(-1).view(np.uint8))


# ---------------------------------------------------------------------------------------------
# The commands. `daemon` is onboard.daemon.Daemon; handlers use only its small public surface
# (status, uploads, install, rollback, set_policy, products_received, request_shutdown).

@command("status", "model, queue, frame counters, latency, memory, store slots, uploads")
def _status(daemon, args: dict, arrays: dict) -> dict:
    return {**daemon.status(), "security": daemon.bus.security.status()}


@command("upload_begin", "start or resume an upload {name, size, sha256, chunk_size}")
def _upload_begin(daemon, args: dict, arrays: dict) -> dict:
    return daemon.uploads.begin(arg(args, "name", str), arg(args, "size", int), sha256_arg(args),
                                arg(args, "chunk_size", int))


@command("upload_chunk", "one chunk {upload_id, index, sha256} + its bytes as one frame")
def _upload_chunk(daemon, args: dict, arrays: dict) -> dict:
    return daemon.uploads.chunk(arg(args, "upload_id", str), arg(args, "index", int),
                                sha256_arg(args), chunk_bytes(arrays))


@command("upload_status", "what an upload holds {upload_id}: received and missing chunks")
def _upload_status(daemon, args: dict, arrays: dict) -> dict:
    return daemon.uploads.status(arg(args, "upload_id", str))


@command("upload_end", "finish an upload {upload_id}: checks the whole file's sha256")
def _upload_end(daemon, args: dict, arrays: dict) -> dict:
    return daemon.uploads.end(arg(args, "upload_id", str))


def _install_source(daemon, args: dict) -> Path:
    if ("upload_id" in args) == ("path" in args):
        raise CommandFailed("args: give exactly one of upload_id or path", code=BAD_ARGS)
    if "upload_id" in args:
        return daemon.uploads.path_of(arg(args, "upload_id", str))
    # Only inside the uploads folder or store.install_dirs; elsewhere one answer for all.
    return daemon.uploads.bundle_path(arg(args, "path", str))


def _store_outcome(result: dict) -> dict:
    """An install's or rollback's InstallResult; a refusal passes its code on to the ACK."""
    if not result["ok"]:
        raise CommandFailed(f"{result['code']}: {result['reason']}", code=result["code"])
    return result


@command("install", "verify, self-test and activate a bundle {upload_id | path}", background=True)
def _install(daemon, args: dict, arrays: dict) -> dict:
    return _store_outcome(daemon.install(_install_source(daemon, args)))


@command("rollback", "make the previous model active again", background=True)
def _rollback(daemon, args: dict, arrays: dict) -> dict:
    return _store_outcome(daemon.rollback())


@command("set_policy", "replace the keep/discard policy of the active model {policy}; "
                       "{policy: null} restores the bundle's own")
def _set_policy(daemon, args: dict, arrays: dict) -> dict:
    if "policy" not in args:
        raise CommandFailed("args.policy: missing", code=BAD_ARGS)
    policy = args["policy"]
    if policy is not None and not isinstance(policy, dict):
        raise CommandFailed(f"args.policy: expected a map or null, got {type(policy).__name__}",
                            code=BAD_ARGS)
    return daemon.set_policy(policy)


@command("products_received", "the ground holds these products: their spilled copies go "
                               "{frame_ids: [id, ...]} (at most MAX_ACK_IDS)")
def _products_received(daemon, args: dict, arrays: dict) -> dict:
    frame_ids = arg(args, "frame_ids", list)
    if len(frame_ids) > MAX_ACK_IDS or not all(isinstance(f, str) and 0 < len(f) <= MAX_ID_CHARS
                                                for f in frame_ids):
        raise CommandFailed(f"args.frame_ids: at most {MAX_ACK_IDS} frame ids of 1..{MAX_ID_CHARS} "
                            "characters expected", code=BAD_ARGS)
    return daemon.products_received(frame_ids)


@command("shutdown", "finish the frames in flight, then exit 0")
def _shutdown(daemon, args: dict, arrays: dict) -> dict:
    daemon.request_shutdown("shutdown command")
    return {"shutting_down": True}


@command("help", "the commands this daemon knows")
def _help(daemon, args: dict, arrays: dict) -> dict:
    return {"commands": {c.name: c.help for c in COMMANDS.values()}}
