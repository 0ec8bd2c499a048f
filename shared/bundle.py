"""Signed uplink bundles: build on the ground, verify and extract on board.

A bundle is one plain tar archive, members in this order::

    manifest.json   the manifest (shared.manifest), canonical JSON
    manifest.sig    {"algorithm": "ed25519", "key_id": 16 hex, "signature": base64} over the
                    exact bytes of manifest.json
    model.bin, model.xml, reference.npz, ...   every file listed in manifest["files"] with its sha256

A file the manifest's `encoding` marks "xz" is stored xz-compressed (`build_bundle(compress=True)`
does it where it saves bytes: an OpenVINO .xml shrinks about 20x, FP16 weights about 10%); its
sha256 is the decoded file's, so a slot on board holds the same bytes as without compression and
`verify_extracted` needs no encoding. The tar itself stays plain: header sizes are the sizes read.

Reading treats the archive as hostile: every header is checked (safe relative name, regular file,
no duplicates, member count and sizes within `ReadLimits`) before any content is read; then the
signature, then the manifest, then each file's sha256 against the signed manifest. Every reason
to refuse is its own `BundleError` subclass (in shared.errors, importable from here) with a
`code` (alias `.reason`) for the daemon's error events and the CLI's JSON.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import lzma
import os
import shutil
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

import numpy as np

# The errors live in shared.errors (one registry); they stay importable from here.
from shared.errors import (BadSignature, BundleError, BundleManifestError,  # noqa: F401
                           ChecksumMismatch, ManifestError, MissingFile, MissingSignature,
                           NotABundle, TooLarge, UnexpectedFile, UnsafePath, VersionTooOld,
                           WrongKey)
from shared.hashing import sha256_blocks, sha256_file
from shared.keys import (PrivateKeyLike, PublicKeyLike, key_id, load_private_key,
                         load_public_key, sign, signature_valid)
from shared.manifest import (MANIFEST_NAME, RESERVED_NAMES, SIGNATURE_NAME, hash_files,
                             manifest_bytes, parse_manifest, parse_time, safe_relative_path,
                             validate_manifest)
from shared.units import format_bytes

SIGNATURE_ALGORITHM = "ed25519"
_CHUNK = 1 << 20
MIB = 1 << 20
XZ_PRESET = 9 | lzma.PRESET_EXTREME     # small files: the slowest preset costs well under a second
XZ_MEMLIMIT = 128 * MIB                 # what decoding may allocate, whatever a stream declares


# ---------------------------------------------------------------------------------------------
# Limits and results
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReadLimits:
    """Bounds checked from the tar headers before anything is read (a hostile archive cannot
    make us read or write more than this)."""
    max_members: int = 32
    max_member_bytes: int = 256 * MIB
    max_total_bytes: int = 512 * MIB
    max_manifest_bytes: int = 1 * MIB

    @property
    def max_archive_bytes(self) -> int:
        # members plus their headers, padding and the end-of-archive records
        return self.max_total_bytes + (self.max_members * 3 + 64) * 512 + 1 * MIB


DEFAULT_LIMITS = ReadLimits()


@dataclass(frozen=True)
class VerifiedBundle:
    path: Path
    manifest: dict
    key_id: str
    files: dict[str, int]            # arcname -> size in bytes (manifest and signature excluded)
    root: Path | None = None         # where extract_bundle put the files
    stored: dict[str, int] | None = None   # arcname -> bytes in the archive (smaller when xz-encoded)

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @property
    def version(self) -> int:
        return self.manifest["version"]

    def as_dict(self) -> dict:
        return {"verified": True, "path": str(self.path), "key_id": self.key_id,
                "model_id": self.model_id, "version": self.version, "files": self.files,
                "stored": self.stored, "root": str(self.root) if self.root else None,
                "manifest": self.manifest}


@dataclass
class _Member:
    info: tarfile.TarInfo
    name: str
    size: int


# ---------------------------------------------------------------------------------------------
# Reading (hostile input)
# ---------------------------------------------------------------------------------------------

def _open_tar(path: Path, limits: ReadLimits) -> tarfile.TarFile:
    if not path.exists():
        raise NotABundle(f"{path}: no such file")
    if not path.is_file():
        raise NotABundle(f"{path}: not a file")
    size = path.stat().st_size
    if size > limits.max_archive_bytes:
        raise TooLarge(f"{path}: archive is {size} bytes, over the limit of {limits.max_archive_bytes}")
    try:
        # "r:" = plain tar only: no decompression, so header sizes are the sizes we read
        return tarfile.open(path, mode="r:")
    except tarfile.TarError as exc:
        raise NotABundle(f"{path}: not a tar archive ({exc})") from None


def _check_headers(tf: tarfile.TarFile, path: Path, limits: ReadLimits) -> dict[str, _Member]:
    """Walk the headers one by one, refusing before the next is read."""
    members: dict[str, _Member] = {}
    total = 0
    while True:
        try:
            info = tf.next()
        except tarfile.TarError as exc:
            raise NotABundle(f"{path}: corrupt archive ({exc})") from None
        if info is None:
            break
        if len(members) >= limits.max_members:
            raise TooLarge(f"{path}: more than {limits.max_members} members")
        name = info.name
        if not safe_relative_path(name):
            raise UnsafePath(f"{path}: member {name!r} is not a plain relative path "
                             "(absolute, '..', or '\\')")
        if info.issym() or info.islnk():
            raise UnsafePath(f"{path}: member {name!r} is a link (to {info.linkname!r})")
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            kind = ("a directory" if info.isdir() else "a device" if info.isdev()
                    else f"tar type {info.type!r}")
            raise UnsafePath(f"{path}: member {name!r} is {kind}, not a regular file")
        if name in members:
            raise UnsafePath(f"{path}: duplicate member {name!r}")
        if info.size > limits.max_member_bytes:
            raise TooLarge(f"{path}: member {name!r} is {info.size} bytes, over the limit "
                           f"of {limits.max_member_bytes}")
        total += info.size
        if total > limits.max_total_bytes:
            raise TooLarge(f"{path}: members total more than {limits.max_total_bytes} bytes")
        members[name] = _Member(info, name, info.size)
    # tarfile stops quietly at a damaged header; what follows the last member must be the
    # zero-filled end-of-archive records, or the archive is corrupt.
    with open(path, "rb") as f:
        f.seek(tf.offset)
        while block := f.read(_CHUNK):
            if block.count(0) != len(block):
                raise NotABundle(f"{path}: corrupt archive (unreadable header at byte {tf.offset}, "
                                 f"after {len(members)} members)")
    return members


def _read_member(tf: tarfile.TarFile, m: _Member, path: Path) -> bytes:
    try:
        f = tf.extractfile(m.info)
        data = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise NotABundle(f"{path}: corrupt archive reading {m.name!r} ({exc})") from None
    if len(data) != m.size:
        raise NotABundle(f"{path}: member {m.name!r} truncated ({len(data)} of {m.size} bytes)")
    return data


def _iter_member(tf: tarfile.TarFile, m: _Member, path: Path) -> Iterator[bytes]:
    try:
        f = tf.extractfile(m.info)
        if f is None:
            return
        n = 0
        while block := f.read(_CHUNK):
            n += len(block)
            yield block
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise NotABundle(f"{path}: corrupt archive reading {m.name!r} ({exc})") from None
    if n != m.size:
        raise NotABundle(f"{path}: member {m.name!r} truncated ({n} of {m.size} bytes)")


def _decoded(blocks: Iterator[bytes], encoding: str | None, name: str, path: Path,
             limit: int) -> Iterator[bytes]:
    """The file's bytes from its stored `blocks`: as they are, or xz-decoded in bounded pieces
    (never more than `limit` bytes in all, nor XZ_MEMLIMIT of decoder state). A stream that does
    not decode, ends early or carries trailing bytes does not hold the signed file:
    ChecksumMismatch naming it."""
    if encoding is None:
        yield from blocks
        return
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT)
    total = 0
    try:
        for block in blocks:
            out = dec.decompress(block, max_length=_CHUNK)
            while True:
                total += len(out)
                if total > limit:
                    raise TooLarge(f"{path}: {name!r} decodes to more than {limit} bytes")
                if out:
                    yield out
                if dec.eof or dec.needs_input:
                    break
                out = dec.decompress(b"", max_length=_CHUNK)
        complete = dec.eof and not dec.unused_data
    except (lzma.LZMAError, EOFError) as exc:
        raise ChecksumMismatch(f"{path}: {name!r} does not decode as {encoding} ({exc}): "
                               "it is not the file the manifest signed") from None
    if not complete:
        raise ChecksumMismatch(f"{path}: {name!r}: the {encoding} stream is truncated or has trailing "
                               "bytes: it is not the file the manifest signed")


def _parse_signature(data: bytes, path: Path) -> tuple[str, bytes]:
    try:
        doc = json.loads(data.decode("utf-8"))
        if doc.get("algorithm") != SIGNATURE_ALGORITHM:
            raise BadSignature(f"{path}: {SIGNATURE_NAME}: algorithm {doc.get('algorithm')!r}, "
                               f"expected {SIGNATURE_ALGORITHM!r}")
        kid = doc["key_id"]
        sig = base64.b64decode(doc["signature"], validate=True)
        if not isinstance(kid, str):
            raise TypeError("key_id")
    except BadSignature:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise BadSignature(f"{path}: {SIGNATURE_NAME} is unreadable ({type(exc).__name__}: {exc})") from None
    return kid, sig


def _authenticated_manifest(raw_manifest: bytes, raw_signature: bytes, public_key,
                            where: Path) -> tuple[dict, str]:
    """Key id, then signature over the exact bytes, then (only then) parse and validate."""
    claimed_kid, signature = _parse_signature(raw_signature, where)
    pub = load_public_key(public_key)
    our_kid = key_id(pub)
    if claimed_kid != our_kid:
        raise WrongKey(f"{where}: signed by key {claimed_kid}, but the trusted key is {our_kid}")
    if not signature_valid(pub, signature, raw_manifest):
        raise BadSignature(f"{where}: the signature does not match {MANIFEST_NAME} "
                           f"(key {our_kid}): the manifest or signature was altered")
    try:
        manifest = parse_manifest(raw_manifest, f"{where}: {MANIFEST_NAME}")
    except ManifestError as exc:
        raise BundleManifestError(exc) from None
    return manifest, our_kid


def _manifest_and_members(tf: tarfile.TarFile, path: Path, public_key, limits: ReadLimits,
                          min_version: int | None) -> tuple[dict, str, dict[str, _Member]]:
    """Headers, then signature, then manifest, then version and the member list; no file
    content beyond the manifest and signature is read here."""
    members = _check_headers(tf, path, limits)
    if MANIFEST_NAME not in members:
        raise NotABundle(f"{path}: no {MANIFEST_NAME} (not a bundle)")
    if SIGNATURE_NAME not in members:
        raise MissingSignature(f"{path}: no {SIGNATURE_NAME}: the bundle is unsigned")
    if members[MANIFEST_NAME].size > limits.max_manifest_bytes:
        raise TooLarge(f"{path}: {MANIFEST_NAME} is {members[MANIFEST_NAME].size} bytes, over "
                       f"{limits.max_manifest_bytes}")
    if members[SIGNATURE_NAME].size > 4096:
        raise TooLarge(f"{path}: {SIGNATURE_NAME} is {members[SIGNATURE_NAME].size} bytes, over 4096")
    raw_manifest = _read_member(tf, members[MANIFEST_NAME], path)
    manifest, our_kid = _authenticated_manifest(
        raw_manifest, _read_member(tf, members[SIGNATURE_NAME], path), public_key, path)
    if min_version is not None and manifest["version"] <= min_version:
        raise VersionTooOld(f"{path}: bundle version {manifest['version']} of "
                            f"{manifest['model_id']!r} is not newer than version {min_version}")
    listed = manifest["files"]
    for name in members:
        if name not in RESERVED_NAMES and name not in listed:
            raise UnexpectedFile(f"{path}: member {name!r} is not listed in the manifest")
    for name in listed:
        if name not in members:
            raise MissingFile(f"{path}: {name!r} is listed in the manifest but not in the archive")
    return manifest, our_kid, members


def _checksum_error(path: Path, name: str, expected: str, got: str) -> ChecksumMismatch:
    return ChecksumMismatch(f"{path}: {name!r} sha256 {got[:16]}... does not match the "
                            f"manifest's {expected[:16]}...")


def verify_bundle(path: str | os.PathLike, public_key: PublicKeyLike,
                  min_version: int | None = None,
                  limits: ReadLimits = DEFAULT_LIMITS) -> VerifiedBundle:
    """Check a bundle completely (headers, signature, manifest, version, every sha256) without
    writing anything. Raises the BundleError subclass of the first problem found."""
    path = Path(path)
    sizes: dict[str, int] = {}
    with _open_tar(path, limits) as tf:
        manifest, kid, members = _manifest_and_members(tf, path, public_key, limits, min_version)
        for name, expected in sorted(manifest["files"].items()):
            blocks = _file_blocks(tf, members[name], manifest, path, limits, sizes)
            got = sha256_blocks(blocks)
            if got != expected:
                raise _checksum_error(path, name, expected, got)
    return VerifiedBundle(path, manifest, kid, sizes, stored=_stored(members))


def _stored(members: dict[str, _Member]) -> dict[str, int]:
    return {n: m.size for n, m in members.items() if n not in RESERVED_NAMES}


def _file_blocks(tf: tarfile.TarFile, m: _Member, manifest: dict, path: Path, limits: ReadLimits,
                 sizes: dict[str, int]) -> Iterator[bytes]:
    """A listed file's decoded bytes; records its size in `sizes` and bounds all files together
    by limits.max_total_bytes once decoded."""
    encoding = (manifest.get("encoding") or {}).get(m.name)
    room = limits.max_total_bytes - sum(sizes.values())
    sizes[m.name] = 0
    for block in _decoded(_iter_member(tf, m, path), encoding, m.name, path,
                          min(limits.max_member_bytes, room)):
        sizes[m.name] += len(block)
        yield block


def extract_bundle(path: str | os.PathLike, dest: str | os.PathLike, public_key: PublicKeyLike,
                   min_version: int | None = None,
                   limits: ReadLimits = DEFAULT_LIMITS) -> VerifiedBundle:
    """Verify, then extract into `dest` (which must not exist or be empty).

    Files are written into a temporary folder beside `dest`, hashed again as they are written
    (the archive could change between two reads), and the folder is renamed into place only
    when every file matched: `dest` ends up complete or untouched.
    """
    path, dest = Path(path), Path(dest)
    verify_bundle(path, public_key, min_version, limits)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest}: extraction target exists and is not an empty folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with _open_tar(path, limits) as tf:
            manifest, kid, members = _manifest_and_members(tf, path, public_key, limits, min_version)
            expected = dict(manifest["files"])
            sizes: dict[str, int] = {}
            for name, m in members.items():
                target = tmp.joinpath(*name.split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                # mode and owner are ours, never the archive's
                with open(target, "xb") as out:
                    for block in _file_blocks(tf, m, manifest, path, limits, sizes):
                        h.update(block)
                        out.write(block)
                    out.flush()
                    os.fsync(out.fileno())
                if name in expected and h.hexdigest() != expected[name]:
                    raise _checksum_error(path, name, expected[name], h.hexdigest())
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = {n: size for n, size in sizes.items() if n not in RESERVED_NAMES}
    return VerifiedBundle(path, manifest, kid, files, root=dest, stored=_stored(members))


def verify_extracted(root: str | os.PathLike, public_key: PublicKeyLike) -> VerifiedBundle:
    """Re-check an extracted bundle folder (a model slot) as the archive was checked: the
    signature over manifest.json, the manifest, then every listed file's sha256. A bit flip on
    disk since the install raises the same BundleError subclasses as a bad archive. Files the
    manifest does not list are ignored (the folder's owner may keep its own files there)."""
    root = Path(root)
    try:
        raw_manifest = (root / MANIFEST_NAME).read_bytes()
    except FileNotFoundError:
        raise NotABundle(f"{root}: no {MANIFEST_NAME}") from None
    try:
        raw_signature = (root / SIGNATURE_NAME).read_bytes()
    except FileNotFoundError:
        raise MissingSignature(f"{root}: no {SIGNATURE_NAME}") from None
    manifest, kid = _authenticated_manifest(raw_manifest, raw_signature, public_key, root)
    sizes = {}
    for name, expected in sorted(manifest["files"].items()):
        path = root.joinpath(*name.split("/"))
        if not path.is_file() or path.is_symlink():
            raise MissingFile(f"{root}: {name!r} is listed in the manifest but missing (or not a regular file)")
        got = sha256_file(path)
        if got != expected:
            raise _checksum_error(root, name, expected, got)
        sizes[name] = path.stat().st_size
    return VerifiedBundle(root, manifest, kid, sizes, root=root)


def inspect_bundle(path: str | os.PathLike, limits: ReadLimits = DEFAULT_LIMITS) -> dict:
    """What a bundle says about itself, WITHOUT checking the signature or any hash.

    Headers are still checked (safe to run on anything). The manifest is reported with its
    validation error, if any, instead of raising, so a broken bundle can be looked at.
    """
    path = Path(path)
    with _open_tar(path, limits) as tf:
        members = _check_headers(tf, path, limits)
        if MANIFEST_NAME not in members:
            raise NotABundle(f"{path}: no {MANIFEST_NAME} (not a bundle)")
        if members[MANIFEST_NAME].size > limits.max_manifest_bytes:
            raise TooLarge(f"{path}: {MANIFEST_NAME} is over {limits.max_manifest_bytes} bytes")
        raw = _read_member(tf, members[MANIFEST_NAME], path)
        claimed_kid = None
        if SIGNATURE_NAME in members and members[SIGNATURE_NAME].size <= 4096:
            try:
                claimed_kid, _ = _parse_signature(_read_member(tf, members[SIGNATURE_NAME], path), path)
            except BadSignature:
                claimed_kid = None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotABundle(f"{path}: {MANIFEST_NAME} is not valid JSON ({exc})") from None
    try:
        validate_manifest(manifest)
        manifest_error = None
    except ManifestError as exc:
        manifest_error = str(exc)
    return {
        "verified": False,
        "note": "UNVERIFIED: signature and checksums not checked (use verify with the public key)",
        "path": str(path),
        "archive_bytes": path.stat().st_size,
        "signed": SIGNATURE_NAME in members,
        "claimed_key_id": claimed_kid,
        "members": {n: m.size for n, m in members.items()},
        "total_bytes": sum(m.size for m in members.values()),
        "manifest": manifest,
        "manifest_error": manifest_error,
    }


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------

def signature_document(private_key, data: bytes) -> bytes:
    """The manifest.sig bytes for `data` (the exact manifest.json bytes)."""
    doc = {"algorithm": SIGNATURE_ALGORITHM, "key_id": key_id(private_key),
           "signature": base64.b64encode(sign(private_key, data)).decode("ascii")}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("ascii")


def _add(tf: tarfile.TarFile, name: str, fileobj: IO[bytes], size: int, mtime: int) -> None:
    # Fixed owner, mode and time: the same inputs give the same archive bytes.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, fileobj)


def build_bundle(out_path: str | os.PathLike, files: Mapping[str, str | os.PathLike],
                 manifest: Mapping[str, Any], private_key: PrivateKeyLike,
                 max_bytes: int | None = None, compress: bool = False) -> Path:
    """Hash `files` ({arcname: path}) into the manifest, validate it, sign it, write the tar.

    `manifest["files"]` is replaced by the hashes of `files`. The archive is written to a
    temporary file and renamed into place, so `out_path` is never left half-written; with
    `max_bytes`, a bundle over that size is refused (TooLarge naming the sizes) and not written.
    `compress` stores each file xz-compressed where that is smaller, and says so in the signed
    manifest's `encoding` (which is always this call's: any `encoding` given is replaced).
    """
    out_path = Path(out_path)
    key = load_private_key(private_key)
    for name in files:
        if not safe_relative_path(name):
            raise UnsafePath(f"arcname {name!r}: must be a plain relative path")
        if name in RESERVED_NAMES:
            raise UnsafePath(f"arcname {name!r}: reserved for the bundle's own manifest/signature")
    m = json.loads(json.dumps(dict(manifest)))
    m["files"] = hash_files(files)
    m.pop("encoding", None)
    stored = {name: _encoded(Path(files[name])) if compress else None for name in files}
    if any(v is not None for v in stored.values()):
        m["encoding"] = {name: "xz" for name, v in sorted(stored.items()) if v is not None}
    validate_manifest(m)
    raw = manifest_bytes(m)
    sig = signature_document(key, raw)
    mtime = int(parse_time(m["created"]).timestamp())

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw_out, tarfile.open(fileobj=raw_out, mode="w:",
                                                          format=tarfile.PAX_FORMAT) as tf:
            _add(tf, MANIFEST_NAME, io.BytesIO(raw), len(raw), mtime)
            _add(tf, SIGNATURE_NAME, io.BytesIO(sig), len(sig), mtime)
            for name in sorted(files):
                if stored[name] is not None:
                    _add(tf, name, io.BytesIO(stored[name]), len(stored[name]), mtime)
                    continue
                with open(files[name], "rb") as f:
                    _add(tf, name, f, os.fstat(f.fileno()).st_size, mtime)
            end = tf.offset + 2 * tarfile.BLOCKSIZE
        # the end-of-archive blocks are the end: the padding to a 10 KiB tape record that tarfile
        # adds carries nothing, and a reader (ours, GNU tar, tarfile) stops at those blocks
        os.truncate(tmp, end)
        size = tmp.stat().st_size
        if max_bytes is not None and size > max_bytes:
            sizes = {n: len(v) if v is not None else Path(files[n]).stat().st_size for n, v in stored.items()}
            parts = ", ".join(f"{n} {format_bytes(b)}{' (xz)' if stored[n] is not None else ''}"
                              for n, b in sorted(sizes.items(), key=lambda kv: -kv[1]))
            raise TooLarge(f"{out_path}: bundle would be {size} bytes ({format_bytes(size)}), over "
                           f"max_bytes {max_bytes} ({format_bytes(max_bytes)}); files: {parts}")
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def _encoded(path: Path) -> bytes | None:
    """The file xz-compressed, or None when that saves nothing (already compressed data)."""
    raw = path.read_bytes()
    packed = lzma.compress(raw, format=lzma.FORMAT_XZ, preset=XZ_PRESET)
    return packed if len(packed) < len(raw) else None


# ---------------------------------------------------------------------------------------------
# The reference tiles (reference.npz) for the daemon's self-test
# ---------------------------------------------------------------------------------------------

REFERENCE_KEYS = ("tiles", "probabilities")
# The grids an array is stored on when it lies on one exactly (the ground puts it there with
# `on_grid`): uint16 steps instead of float32, half the bytes before compression, and the
# compressor sees the repeats. Reflectance: Sentinel-2 L1C digital numbers (DN / 10000), so a
# tile of real imagery is stored losslessly; probabilities: 2^-10, exact in float16 and float32.
REFLECTANCE_STEP = 1e-4
PROBABILITY_STEP = 2.0 ** -10
_GRIDS = {"tiles": REFLECTANCE_STEP, "probabilities": PROBABILITY_STEP}


def _from_grid(q: np.ndarray, step: float) -> np.ndarray:
    return q.astype(np.float32) * np.float32(step)


def on_grid(a: np.ndarray, step: float) -> np.ndarray:
    """`a` as float32 rounded to the nearest of `step`'s multiples in 0..65535 steps: the values
    load_reference gives back for it, bit for bit (compute expectations from these)."""
    q = np.clip(np.round(np.asarray(a, np.float64) / step), 0, 65535).astype(np.uint16)
    return _from_grid(q, step)


def _stored_array(key: str, a: np.ndarray) -> dict[str, np.ndarray]:
    """{key: uint16, key_step: scalar} when `a` lies on its grid exactly, else {key: float32 a}."""
    step = _GRIDS[key]
    q = np.clip(np.round(a.astype(np.float64) / step), 0, 65535).astype(np.uint16)
    if np.array_equal(_from_grid(q, step), a):
        return {key: q, f"{key}_step": np.float32(step)}
    return {key: a}


def save_reference(path: str | os.PathLike, tiles: np.ndarray, probabilities: np.ndarray) -> Path:
    """Write reference.npz: `tiles` (N, C, t, t) float32 reflectance 0..1 in the manifest's band
    order, *before* normalisation; `probabilities` (N, K, t, t) float32, the model's output after
    the manifest's activation, as computed on the ground. Lossless: load_reference gives back
    these very arrays; one that lies on its grid (`on_grid`: REFLECTANCE_STEP for tiles,
    PROBABILITY_STEP for probabilities) is stored as uint16 steps, which is what makes a
    reference small."""
    tiles = np.ascontiguousarray(tiles, dtype=np.float32)
    probabilities = np.ascontiguousarray(probabilities, dtype=np.float32)
    if tiles.ndim != 4 or probabilities.ndim != 4:
        raise ValueError(f"tiles {tiles.shape} and probabilities {probabilities.shape} must be 4-D")
    if tiles.shape[0] != probabilities.shape[0] or tiles.shape[2:] != probabilities.shape[2:]:
        raise ValueError(f"tiles {tiles.shape} and probabilities {probabilities.shape} disagree "
                         "on N or the tile size")
    path = Path(path)
    arrays = {**_stored_array("tiles", tiles), **_stored_array("probabilities", probabilities)}
    # LZMA-compressed members with fixed timestamps: small (the uplink budget counts every byte)
    # and the same bytes for the same arrays; numpy.load reads it as any .npz
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_LZMA) as z:
        for key, a in arrays.items():
            buf = io.BytesIO()
            np.save(buf, a, allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_LZMA
            z.writestr(info, buf.getvalue())
    return path


def _read_array(z, key: str, path: Path) -> np.ndarray:
    """A float32 array of reference.npz: stored as it is, or uint16 steps of `key_step`."""
    a = z[key]
    step_key = f"{key}_step"
    if step_key not in z.files:
        return a
    step = z[step_key]
    if a.dtype != np.uint16 or step.shape != () or step.dtype != np.float32 or not np.isfinite(step) or step <= 0:
        raise ValueError(f"{path}: {key} on a grid must be uint16 with a positive float32 {step_key}, "
                         f"got {a.dtype} and {step.dtype} {step.shape}")
    return _from_grid(a, float(step))


def load_reference(path: str | os.PathLike, manifest: Mapping[str, Any] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(tiles, probabilities) from reference.npz (no pickles), float32 whichever way they were
    stored; with `manifest`, shapes are checked against its bands, classes and tile size. Errors
    name the file and the array."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in REFERENCE_KEYS if k not in z.files]
            if missing:
                raise ValueError(f"{path}: missing array(s) {', '.join(missing)} "
                                 f"(has {', '.join(z.files) or 'none'})")
            tiles, probs = (_read_array(z, k, path) for k in REFERENCE_KEYS)
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable .npz ({exc})") from None
    for name, a in (("tiles", tiles), ("probabilities", probs)):
        if a.dtype != np.float32 or a.ndim != 4:
            raise ValueError(f"{path}: {name} must be 4-D float32, got {a.dtype} {a.shape}")
    if manifest is not None:
        t = manifest["input"]["tile_size"]
        want_tiles = (len(manifest["input"]["bands"]), t, t)
        want_probs = (len(manifest["output"]["classes"]), t, t)
        if tiles.shape[1:] != want_tiles:
            raise ValueError(f"{path}: tiles shape {tiles.shape}, manifest wants (N, *{want_tiles})")
        if probs.shape != (tiles.shape[0], *want_probs):
            raise ValueError(f"{path}: probabilities shape {probs.shape}, manifest wants "
                             f"({tiles.shape[0]}, *{want_probs})")
    return tiles, probs
