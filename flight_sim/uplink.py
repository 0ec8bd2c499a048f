"""Uplink: a bundle sent to the daemon in checked chunks over the command socket, resumable.

`Uplink.upload(path)`: `upload_begin {name, size, sha256, chunk_size}` answers with the upload
id and the chunks the daemon already holds (after a lost pass or a daemon restart, only the
missing ones are sent again); each `upload_chunk {upload_id, index, sha256}` carries its bytes
as one frame and is checked on arrival; `upload_status` says what is held; `upload_end` checks
the whole file's sha256. Faults a scenario can ask for: a chunk corrupted in transit (the daemon
refuses it by its checksum and it is sent again) and a link lost after N chunks (the upload is
resumed from `upload_status`).

`unsigned_copy` / `corrupt_copy` make the bad bundles a scenario uplinks on purpose.
"""
from __future__ import annotations

import hashlib
import io
import json
import lzma
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from flight_sim.errors import ScenarioError, UplinkInterrupted
from shared.bundle import build_bundle
from shared.client import CommandClient, missing_chunks
from shared.errors import CommandRejected
from shared.hashing import sha256_file
from shared.manifest import MANIFEST_NAME, utc_now

__all__ = ["Uplink", "UplinkInterrupted", "UploadReport", "corrupt_copy", "newer_version_copy",
           "unsigned_copy"]

MAX_CHUNK_TRIES = 5


@dataclass
class UploadReport:
    name: str
    size: int
    sha256: str
    chunk_size: int
    upload_id: str = ""
    chunks: int = 0
    chunks_sent: int = 0
    already_held: int = 0          # chunks the daemon had from an earlier, interrupted try
    corrupted_in_transit: int = 0  # refused by the daemon's per-chunk checksum, then resent
    interrupted_after: int | None = None
    resumed_missing: list[int] = field(default_factory=list)
    path_on_board: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Uplink:
    def __init__(self, link: CommandClient, chunk_size: int = 256 * 1024):
        if chunk_size < 1:
            raise ScenarioError(f"uplink.chunk_size: must be >= 1, got {chunk_size}")
        self.link, self.chunk_size = link, chunk_size

    def upload(self, path: str | Path, *, interrupt_after: int | None = None,
               corrupt_chunks: tuple[int, ...] = (), progress: Callable[[int], None] | None = None
               ) -> UploadReport:
        """Upload `path`; with `interrupt_after`, stop after that many chunks, ask upload_status
        and resume (as after a lost pass). Returns what happened."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"uplink: bundle {path} not found")
        report = UploadReport(path.name, path.stat().st_size, sha256_file(path), self.chunk_size)
        corrupt = set(corrupt_chunks)        # each of these goes up flipped the first time it is sent
        try:
            self._send(path, report, interrupt_after, corrupt, progress)
        except UplinkInterrupted as exc:
            report.interrupted_after = exc.sent
            status = self.link.call("upload_status", {"upload_id": exc.upload_id})
            report.resumed_missing = list(status["missing"])
            self._send(path, report, None, corrupt, progress)
        done = self.link.call("upload_end", {"upload_id": report.upload_id})
        report.path_on_board = done.get("path", "")
        return report

    def _send(self, path: Path, report: UploadReport, interrupt_after: int | None,
              corrupt: set[int], progress) -> None:
        begun = self.link.call("upload_begin", {"name": report.name, "size": report.size,
                                                "sha256": report.sha256,
                                                "chunk_size": self.chunk_size})
        report.upload_id, report.chunks = begun["upload_id"], begun["chunks"]
        report.already_held = max(report.already_held, len(begun["received"]))
        sent_now = 0
        for index, data in missing_chunks(path, self.chunk_size, report.chunks, begun["received"]):
            if interrupt_after is not None and sent_now >= interrupt_after:
                raise UplinkInterrupted(report.upload_id, sent_now)
            self._chunk(report, index, data, corrupt)
            sent_now += 1
            if progress:
                progress(len(data))

    def _chunk(self, report: UploadReport, index: int, data: bytes, corrupt: set[int]) -> None:
        digest = hashlib.sha256(data).hexdigest()
        for attempt in range(MAX_CHUNK_TRIES):
            payload = data
            if index in corrupt:                          # one bit flipped on the way up, once
                corrupt.discard(index)
                flipped = bytearray(data)
                flipped[len(flipped) // 2] ^= 0x01
                payload = bytes(flipped)
            body = self.link.request("upload_chunk",
                                     {"upload_id": report.upload_id, "index": index, "sha256": digest},
                                     {"data": np.frombuffer(payload, np.uint8)})
            report.chunks_sent += 1
            if body.get("ok"):
                return
            if "sha256 mismatch" in body.get("error", ""):
                report.corrupted_in_transit += 1
                continue
            raise CommandRejected(body.get("error", "upload_chunk failed"), code=body.get("code"))
        raise CommandRejected(f"chunk {index} refused {MAX_CHUNK_TRIES} times")

    def install(self, upload_id: str, timeout_s: float = 180.0) -> dict:
        """The install command's ACK body: {ok: true, result} or {ok: false, error}."""
        return self.link.request("install", {"upload_id": upload_id}, timeout_s=timeout_s, retries=0)


# ----------------------------------------------------------------------------- bad bundles

def _rewrite(src: Path, dst: Path, change: Callable[[tarfile.TarInfo, bytes], bytes | None]) -> Path:
    """Copy a bundle member by member; `change` returns new bytes, or None to drop a member."""
    with tarfile.open(src, "r:") as tin, tarfile.open(dst, "w:", format=tarfile.PAX_FORMAT) as tout:
        for member in tin.getmembers():
            data = tin.extractfile(member).read() if member.isfile() else b""
            new = change(member, data)
            if new is None:
                continue
            info = tarfile.TarInfo(member.name)
            info.size, info.mtime, info.mode = len(new), member.mtime, member.mode
            tout.addfile(info, io.BytesIO(new))
    return dst


def unsigned_copy(bundle: str | Path, out: str | Path) -> Path:
    """The bundle without its signature (manifest.sig dropped)."""
    return _rewrite(Path(bundle), Path(out),
                    lambda m, d: None if m.name == "manifest.sig" else d)


def newer_version_copy(bundle: str | Path, out: str | Path, private_key) -> Path:
    """The same model re-signed as the next version (parent = the original): a bundle the
    daemon would install, so a corruption of it is refused for its checksum, not its age."""
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(bundle, "r:") as tf:
        manifest = json.loads(tf.extractfile(MANIFEST_NAME).read())
        encoding = manifest.get("encoding") or {}          # files stored xz-compressed
        files = {}
        for m in tf.getmembers():
            if m.isfile() and m.name not in (MANIFEST_NAME, "manifest.sig"):
                path = Path(tmp) / m.name
                path.parent.mkdir(parents=True, exist_ok=True)
                data = tf.extractfile(m).read()
                path.write_bytes(lzma.decompress(data) if encoding.get(m.name) == "xz" else data)
                files[m.name] = path
        manifest["parent"] = {"model_id": manifest["model_id"], "version": manifest["version"]}
        manifest["version"] += 1
        manifest["created"] = utc_now()
        return build_bundle(out, files, manifest, private_key, compress=bool(encoding))


def corrupt_copy(bundle: str | Path, out: str | Path, member: str | None = None) -> Path:
    """The bundle with bytes of one file flipped after signing (its checksum no longer holds):
    `member`, by default model.bin (a model chain's: its first step's, steps/NAME/model.bin)."""
    if member is None:
        with tarfile.open(bundle, "r:") as tf:
            names = tf.getnames()
        member = next((n for n in names if n == "model.bin"), None) or \
            next((n for n in names if n.endswith("/model.bin")), "model.bin")

    def change(m: tarfile.TarInfo, data: bytes) -> bytes:
        if m.name != member or not data:
            return data
        b = bytearray(data)
        for i in range(0, len(b), max(1, len(b) // 16)):
            b[i] ^= 0xFF
        return bytes(b)
    with tarfile.open(bundle, "r:") as tf:
        if member not in tf.getnames():
            raise ValueError(f"corrupt_copy: {bundle} has no member {member!r}")
    return _rewrite(Path(bundle), Path(out), change)
