"""Resumable chunked uploads: how a bundle reaches the daemon over the commands socket.

`upload_begin` / `upload_chunk` / `upload_status` / `upload_end` (onboard.telecommands) assemble
a file in `[store].uploads`, checking each chunk's sha256 as it lands and the whole file's at the
end. The upload id is derived from (sha256, size, chunk_size), and each received chunk is
recorded on disk, so after a lost link or a daemon restart `upload_begin` with the same file
answers with the same id and the chunks already held: only the missing ones need sending again.
Every refusal is a CommandFailed whose code and message say what was wrong. A full disk is
one too (`disk_full`, naming the file): `upload_begin` reserves the whole file's room at once
(posix_fallocate), so a bundle that cannot fit is refused before any chunk travels; what was
recorded before stays whole (every record is written atomically).

Bounds: at most `store.max_uploads` incomplete uploads at once, announcing at most
`store.max_upload_total_bytes` together, each at most MAX_UPLOAD_CHUNKS chunks (one more is
refused with `too_many_uploads` or `bad_args`; a resume always answers); an upload untouched for
`store.upload_max_age_s` is removed with its bytes (counted: `expired`, `expired_bytes` in
status and telemetry `uploads`). `install {path}` reads only inside the uploads folder and
`store.install_dirs` (`bundle_path`): any other path gets the same `not_found`, whether a
file is there or not, and is never opened or measured.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from onboard.errors import (BAD_ARGS, BAD_CHUNK, CHECKSUM_MISMATCH, DISK_FULL, NOT_FOUND,
                            TOO_MANY_UPLOADS, UNKNOWN_UPLOAD, UPLOAD_COMPLETE, UPLOAD_INCOMPLETE,
                            CommandFailed, is_disk_full)
from onboard.store import write_json_atomic
from shared.hashing import sha256_file
from shared.limits import quote

MAX_UPLOAD_CHUNKS = 16384        # chunks of one upload: its record and status stay small
SWEEP_EVERY_S = 10.0             # how often `expire` looks for abandoned uploads


@contextmanager
def room_for(what: str, path: Path):
    """A full disk while writing `path` becomes a `disk_full` refusal naming it."""
    try:
        yield
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise CommandFailed(f"disk full: {what} {path}: {exc.strerror}; free space in "
                            f"{path.parent} (store.uploads) and send it again", code=DISK_FULL) from None


def reserve(path: Path, size: int) -> None:
    """Create `path` with `size` bytes of room taken on disk now (sparse where the filesystem
    cannot reserve)."""
    with open(path, "wb") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, size)
        except OSError as exc:
            if is_disk_full(exc):
                raise
            fh.truncate(size)          # no fallocate here (some filesystems): sparse as before


class Uploads:
    """Resumable chunked uploads on disk, each checked per chunk and as a whole."""

    def __init__(self, root: str | os.PathLike, max_bytes: int, max_chunk_bytes: int, *,
                 max_uploads: int = 4, max_total_bytes: int = 512 << 20,
                 max_age_s: float = 86400.0, install_dirs: tuple = ()):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self.max_uploads, self.max_total_bytes, self.max_age_s = max_uploads, max_total_bytes, max_age_s
        self.root.mkdir(parents=True, exist_ok=True)
        self.readable = tuple(os.path.realpath(d) for d in (self.root, *install_dirs))
        self._lock = threading.Lock()   # upload_end/install may read what the poller writes
        self.expired = self.expired_bytes = self.refused = 0
        self._next_sweep = 0.0

    @staticmethod
    def make_id(sha256: str, size: int, chunk_size: int) -> str:
        return hashlib.sha256(f"{sha256}:{size}:{chunk_size}".encode()).hexdigest()[:16]

    def _dir(self, upload_id: Any) -> Path:
        if not isinstance(upload_id, str) or not re.fullmatch(r"[0-9a-f]{16}", upload_id):
            raise CommandFailed(f"args.upload_id: not an upload id: {str(upload_id)[:40]!r}",
                                code=BAD_ARGS)
        path = self.root / upload_id
        if not (path / "meta.json").is_file():
            raise CommandFailed(f"args.upload_id: unknown upload {upload_id!r} (upload_begin first)",
                                code=UNKNOWN_UPLOAD)
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
            raise CommandFailed(f"args.name: {name[:80]!r} is not a plain file name", code=BAD_ARGS)
        if not 1 <= size <= self.max_bytes:
            raise CommandFailed(f"args.size: {size} bytes, must be 1..{self.max_bytes} "
                                "(store.max_upload_bytes)", code=BAD_ARGS)
        if not 1 <= chunk_size <= self.max_chunk_bytes:
            raise CommandFailed(f"args.chunk_size: {chunk_size}, must be 1..{self.max_chunk_bytes} "
                                "(store.max_chunk_bytes)", code=BAD_ARGS)
        if -(-size // chunk_size) > MAX_UPLOAD_CHUNKS:
            raise CommandFailed(f"args.chunk_size: {size} bytes in chunks of {chunk_size} is "
                                f"{-(-size // chunk_size)} chunks, over {MAX_UPLOAD_CHUNKS}; use "
                                f"chunks of at least {-(-size // MAX_UPLOAD_CHUNKS)} bytes", code=BAD_ARGS)
        upload_id = self.make_id(sha256, size, chunk_size)
        path = self.root / upload_id
        self.expire(force=True)
        with self._lock:
            if (path / "meta.json").is_file():          # a resume: keep what arrived
                return self._summary(json.loads((path / "meta.json").read_text()))
            self._check_room(size)
            meta = {"upload_id": upload_id, "name": name, "size": size, "sha256": sha256,
                    "chunk_size": chunk_size, "chunks": -(-size // chunk_size), "received": [],
                    "complete": False, "started": time.time()}
            try:
                with room_for(f"upload of {size} bytes:", path / "data.part"):
                    path.mkdir(parents=True, exist_ok=True)
                    reserve(path / "data.part", size)
                    write_json_atomic(path / "meta.json", meta)
            except CommandFailed:
                shutil.rmtree(path, ignore_errors=True)    # nothing half-begun stays behind
                raise
        return self._summary(meta)

    def chunk(self, upload_id: str, index: int, sha256: str, data: memoryview) -> dict:
        path = self._dir(upload_id)
        with self._lock:
            meta = self._meta(upload_id)
            self._check_chunk(upload_id, meta, index, sha256, data)
            with room_for(f"chunk {index} of upload {upload_id}:", path / "data.part"):
                fd = os.open(path / "data.part", os.O_WRONLY)
                try:
                    os.pwrite(fd, data, index * meta["chunk_size"])
                    os.fsync(fd)                       # the record below must not claim lost bytes
                finally:
                    os.close(fd)
            if index not in meta["received"]:
                meta["received"].append(index)
                with room_for(f"record of chunk {index}:", path / "meta.json"):
                    write_json_atomic(path / "meta.json", meta)
        return {"upload_id": upload_id, "index": index, "received_count": len(meta["received"]),
                "chunks": meta["chunks"]}

    @staticmethod
    def _check_chunk(upload_id: str, meta: dict, index: int, sha256: str, data: memoryview) -> None:
        if meta["complete"]:
            raise CommandFailed(f"upload {upload_id} is already complete", code=UPLOAD_COMPLETE)
        if not 0 <= index < meta["chunks"]:
            raise CommandFailed(f"args.index: {index} out of range 0..{meta['chunks'] - 1}",
                                code=BAD_ARGS)
        expected = min(meta["chunk_size"], meta["size"] - index * meta["chunk_size"])
        if data.nbytes != expected:
            raise CommandFailed(f"chunk {index}: {data.nbytes} bytes, expected {expected}",
                                code=BAD_CHUNK)
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise CommandFailed(f"chunk {index}: sha256 mismatch (got {actual[:16]}..., "
                                f"args.sha256 says {sha256[:16]}...); send it again",
                                code=CHECKSUM_MISMATCH)

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
                                    f"{missing[:10]}", code=UPLOAD_INCOMPLETE)
            actual = sha256_file(path / "data.part")
            if actual != meta["sha256"]:
                # Every chunk matched its own hash, so the announced hash or the chunking was wrong:
                # start over rather than keep bytes nobody vouches for.
                meta["received"] = []
                write_json_atomic(path / "meta.json", meta)
                raise CommandFailed(f"upload {upload_id}: whole-file sha256 is {actual}, "
                                    f"upload_begin announced {meta['sha256']}; upload reset",
                                    code=CHECKSUM_MISMATCH)
            final = path / meta["name"]
            complete = {**meta, "complete": True, "path": str(final)}
            os.replace(path / "data.part", final)
            try:
                with room_for(f"record of upload {upload_id}:", path / "meta.json"):
                    write_json_atomic(path / "meta.json", complete)
            except CommandFailed:             # a rename needs no room: undo, still resumable
                os.replace(final, path / "data.part")
                raise
            meta = complete
        return {**self._summary(meta), "path": str(final), "sha256": actual}

    def path_of(self, upload_id: str) -> Path:
        meta = self._meta(upload_id)
        if not meta["complete"]:
            raise CommandFailed(f"upload {upload_id} is not complete (upload_end first)",
                                code=UPLOAD_INCOMPLETE)
        return Path(meta["path"])

    # ------------------------------------------------------------------ bounds
    def _incomplete(self) -> list[tuple[Path, dict]]:
        out = []
        for meta_path in self.root.glob("*/meta.json"):
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict) and not meta.get("complete"):
                out.append((meta_path.parent, meta))
        return out

    def _check_room(self, size: int) -> None:
        """Refuse a new upload past store.max_uploads or store.max_upload_total_bytes."""
        held = self._incomplete()
        announced = sum(int(meta.get("size", 0)) for _, meta in held)
        if len(held) >= self.max_uploads or announced + size > self.max_total_bytes:
            self.refused += 1
            raise CommandFailed(f"{len(held)} uploads in progress announcing {announced} bytes; "
                                f"another of {size} bytes would pass store.max_uploads "
                                f"({self.max_uploads}) or store.max_upload_total_bytes "
                                f"({self.max_total_bytes}): finish one or let it expire "
                                f"(store.upload_max_age_s {self.max_age_s:g} s)", code=TOO_MANY_UPLOADS)

    def expire(self, force: bool = False) -> int:
        """Remove uploads untouched for store.upload_max_age_s (their last chunk or record), with
        their bytes; how many. Looks at most every SWEEP_EVERY_S unless `force`."""
        now = time.time()
        if not force and time.monotonic() < self._next_sweep:
            return 0
        self._next_sweep = time.monotonic() + SWEEP_EVERY_S
        removed = 0
        with self._lock:
            for folder in [p for p in self.root.iterdir() if p.is_dir()]:
                try:
                    files = [f for f in folder.iterdir() if f.is_file()]
                    touched = max([f.stat().st_mtime for f in files] or [folder.stat().st_mtime])
                    if now - touched <= self.max_age_s:
                        continue
                    size = sum(f.stat().st_size for f in files)
                except OSError:
                    continue
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
                self.expired += 1
                self.expired_bytes += size
        return removed

    def counters(self) -> dict:
        """Uploads in progress and what the bounds did (status and telemetry `uploads`)."""
        self.expire()
        held = self._incomplete()
        return {"in_progress": len(held), "announced_bytes": sum(int(m.get("size", 0)) for _, m in held),
                "max_uploads": self.max_uploads, "max_total_bytes": self.max_total_bytes,
                "refused": self.refused, "expired": self.expired, "expired_bytes": self.expired_bytes}

    def bundle_path(self, text: str) -> Path:
        """The file `install {path}` may read: `text` (relative to the uploads folder) resolved,
        symlinks included, inside the uploads folder or a store.install_dirs folder. Any other
        path is refused `not_found` with one message whether something is there or not, before
        anything opens or measures it."""
        try:      # a control character (a newline) could forge a line where the path is logged
            real = os.path.realpath(self.root / text) if text.isprintable() else None
        except (ValueError, OSError):
            real = None
        if real is None or not any(real == d or real.startswith(d.rstrip(os.sep) + os.sep)
                                   for d in self.readable):
            raise CommandFailed(f"not_found: args.path {quote(text)}: no bundle file there that "
                                "install may read (the uploads folder, store.install_dirs)",
                                code=NOT_FOUND)
        return Path(real)

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
