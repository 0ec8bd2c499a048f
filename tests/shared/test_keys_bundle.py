"""Key pairs and signed bundles: a real bundle (a real FP16 OpenVINO IR, reference tiles from the
real Sentinel-2 chip) is built once, then each test mutates a copy of it and checks that exactly
the expected rejection comes back."""
from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from shared import bundle as B
from shared.keys import (KeyFileError, generate_keypair, key_id, load_private_key,
                         load_public_key)
from shared.manifest import ManifestError, make_manifest, manifest_bytes

REPO = Path(__file__).resolve().parents[2]
BANDS = ["B02", "B03", "B04", "B08", "B11", "B12"]
CLASSES = ["clear", "cloud", "shadow"]
TILE = 64
MEAN = [0.12, 0.11, 0.10, 0.22, 0.18, 0.13]
STD = [0.09, 0.09, 0.10, 0.11, 0.10, 0.09]


# ---------------------------------------------------------------------------------------------
# Real inputs: a tiny OpenVINO IR and reference tiles (also used by tests/test_shared_cli.py)
# ---------------------------------------------------------------------------------------------

def make_ir(out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """A per-pixel 1x1 conv + softmax "brightness -> cloud" model over 6 bands, saved as FP16 IR."""
    import openvino as ov
    import openvino.opset13 as ops
    rng = np.random.default_rng(seed)
    w = np.zeros((3, 6, 1, 1), np.float32)
    w[1, :4, 0, 0] = 1.5                 # bright in the visible + NIR -> cloud
    w[2, 3:, 0, 0] = -1.0                # dark in NIR/SWIR -> shadow
    w += rng.normal(0, 0.05, w.shape).astype(np.float32)
    x = ops.parameter([-1, 6, -1, -1], ov.Type.f32, name="input")
    y = ops.convolution(x, ops.constant(w), [1, 1], [0, 0], [0, 0], [1, 1])
    y = ops.softmax(ops.add(y, ops.constant(np.array([0.5, -1, -1], np.float32).reshape(1, 3, 1, 1))), 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / "model.xml"
    ov.save_model(ov.Model([y], [x], "brightness_cloud"), xml, compress_to_fp16=True)
    return xml, out_dir / "model.bin"


def reference_tiles(n: int = 2) -> np.ndarray:
    """(n, 6, TILE, TILE) reflectance tiles from the real chip's training rows (0..255); a
    deterministic synthetic stand-in only when the data folder is absent (fresh clone)."""
    root = Path(os.environ.get("EOEDGE_DATA", REPO.parent / "shared" / "data"))
    chip = root / "ukis_csmask_s2" / "sentinel2.npz"
    if chip.exists():
        img = np.load(chip)["img"]                       # (512, 512, 6) reflectance
        tiles = [img[r:r + TILE, c:c + TILE].transpose(2, 0, 1)
                 for r, c in [(0, 0), (64, 192), (128, 320)][:n]]
        return np.ascontiguousarray(np.stack(tiles), dtype=np.float32)
    return np.random.default_rng(1).uniform(0, 1, (n, 6, TILE, TILE)).astype(np.float32)


def run_ir(xml: Path, tiles: np.ndarray) -> np.ndarray:
    import openvino as ov
    x = (tiles - np.array(MEAN, np.float32)[:, None, None]) / np.array(STD, np.float32)[:, None, None]
    return ov.Core().compile_model(str(xml), "CPU")(x)[0]


def make_bundle_inputs(work: Path, version: int = 3, seed: int = 0) -> tuple[dict, dict]:
    """({arcname: path}, manifest) for a real bundle written in `work`."""
    xml, binf = make_ir(work, seed)
    tiles = reference_tiles()
    ref = B.save_reference(work / "reference.npz", tiles, run_ir(xml, tiles))
    files = {"model.xml": xml, "model.bin": binf, "reference.npz": ref}
    manifest = make_manifest(
        model_id="cloudmask-6b", version=version, bands=BANDS, mean=MEAN, std=STD,
        classes=CLASSES, tile_size=TILE, overlap=8, threshold={"cloud": 0.5},
        policy={"rules": [{"if": {"class": "cloud", "fraction_above": 0.7}, "then": "discard"}],
                "default": {"then": "keep", "priority": 5}},
        metrics={"miou": 0.61}, lineage={"test": "test_keys_bundle"},
        created="2026-01-02T03:04:05+00:00", files=files)
    return files, manifest


# ---------------------------------------------------------------------------------------------
# Fixtures and archive surgery
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    priv, pub = generate_keypair(d, "uplink")
    other_priv, other_pub = generate_keypair(d, "other")
    return {"priv": priv, "pub": pub, "other_priv": other_priv, "other_pub": other_pub}


@pytest.fixture(scope="module")
def built(tmp_path_factory, keys):
    work = tmp_path_factory.mktemp("bundle")
    files, manifest = make_bundle_inputs(work / "in")
    path = B.build_bundle(work / "good.tar", files, manifest, keys["priv"])
    return {"path": path, "files": files, "manifest": manifest, "work": work}


def read_members(path: Path) -> list[list]:
    """[[TarInfo, bytes], ...] of an archive, in order (no checks: this is the attacker's view)."""
    out = []
    with tarfile.open(path) as tf:
        for info in tf.getmembers():
            f = tf.extractfile(info) if info.isreg() else None
            out.append([info, f.read() if f else b""])
    return out


def write_members(path: Path, members: list[list]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            if info.isreg():
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return path


def mutated(built, tmp_path, fn) -> Path:
    members = read_members(built["path"])
    fn(members)
    return write_members(tmp_path / "bad.tar", members)


def member(members, name):
    return next(m for m in members if m[0].name == name)


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def reject(path, keys, error, min_version=None, **kw):
    with pytest.raises(error) as exc:
        B.verify_bundle(path, keys["pub"], min_version=min_version, **kw)
    assert type(exc.value) is error, f"expected {error.__name__}, got {type(exc.value).__name__}"
    assert exc.value.reason == error.reason
    return str(exc.value)


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------

def test_keypair_files_permissions_and_key_id(tmp_path):
    priv, pub = generate_keypair(tmp_path, "ground")
    assert (priv.name, pub.name) == ("ground.key", "ground.pub")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in priv.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    sk, pk = load_private_key(priv), load_public_key(pub)
    raw = pk.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(pk) == key_id(sk) == hashlib.sha256(raw).hexdigest()[:16]
    with pytest.raises(FileExistsError, match="ground.key"):
        generate_keypair(tmp_path, "ground")
    assert generate_keypair(tmp_path, "ground", overwrite=True)[0] == priv
    assert key_id(load_public_key(pub)) != key_id(pk)          # really a new key


def test_key_loading_errors_name_the_file_and_problem(tmp_path, keys):
    with pytest.raises(FileNotFoundError, match="nope.pub"):
        load_public_key(tmp_path / "nope.pub")
    with pytest.raises(KeyFileError, match="is a public key"):
        load_private_key(keys["pub"])
    with pytest.raises(KeyFileError, match="is a private key"):
        load_public_key(keys["priv"])
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(KeyFileError, match="junk.pem: not a PEM"):
        load_public_key(junk)
    rsa_file = tmp_path / "rsa.key"
    rsa_file.write_bytes(rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(KeyFileError, match="rsa.key: not an Ed25519 key"):
        load_private_key(rsa_file)


# ---------------------------------------------------------------------------------------------
# A good bundle
# ---------------------------------------------------------------------------------------------

def test_good_bundle_verifies(built, keys):
    v = B.verify_bundle(built["path"], keys["pub"], min_version=2)
    assert v.key_id == key_id(load_public_key(keys["pub"]))
    assert (v.model_id, v.version) == ("cloudmask-6b", 3)
    assert v.manifest == built["manifest"]
    assert v.files == {n: Path(p).stat().st_size for n, p in built["files"].items()}
    names = [m[0].name for m in read_members(built["path"])]
    assert names == ["manifest.json", "manifest.sig", "model.bin", "model.xml", "reference.npz"]
    assert member(read_members(built["path"]), "manifest.json")[1] == manifest_bytes(built["manifest"])


def test_build_is_deterministic(built, keys, tmp_path):
    again = B.build_bundle(tmp_path / "again.tar", built["files"], built["manifest"], keys["priv"])
    assert again.read_bytes() == built["path"].read_bytes()


def test_extract_gives_a_working_model(built, keys, tmp_path):
    v = B.extract_bundle(built["path"], tmp_path / "slot", keys["pub"])
    assert v.root == tmp_path / "slot"
    assert sorted(p.name for p in v.root.iterdir()) == [
        "manifest.json", "manifest.sig", "model.bin", "model.xml", "reference.npz"]
    tiles, probs = B.load_reference(v.root / "reference.npz", v.manifest)
    out = run_ir(v.root / "model.xml", tiles)
    assert np.abs(out - probs).max() <= v.manifest["reference"]["max_abs_diff"]
    with pytest.raises(FileExistsError, match="not an empty folder"):
        B.extract_bundle(built["path"], tmp_path / "slot", keys["pub"])


def test_extract_refuses_before_writing(built, keys, tmp_path):
    def corrupt(ms):
        m = member(ms, "model.bin")
        m[1] = flip(m[1], len(m[1]) // 2)
    bad = mutated(built, tmp_path, corrupt)
    dest = tmp_path / "out" / "slot"
    with pytest.raises(B.ChecksumMismatch):
        B.extract_bundle(bad, dest, keys["pub"])
    assert not (tmp_path / "out").exists()


def test_extract_rechecks_while_writing(built, keys, tmp_path, monkeypatch):
    # The archive may change between the verification pass and the extraction pass: the
    # extraction hashes what it writes and leaves nothing behind on a mismatch.
    def corrupt(ms):
        m = member(ms, "model.bin")
        m[1] = flip(m[1], 3)
    bad = mutated(built, tmp_path, corrupt)
    monkeypatch.setattr(B, "verify_bundle", lambda *a, **k: None)   # pretend pass 1 saw a good file
    (tmp_path / "out").mkdir()
    with pytest.raises(B.ChecksumMismatch, match="'model.bin'"):
        B.extract_bundle(bad, tmp_path / "out" / "slot", keys["pub"])
    assert list((tmp_path / "out").iterdir()) == []


def test_inspect_needs_no_key_and_says_unverified(built, keys, tmp_path):
    info = B.inspect_bundle(built["path"])
    assert info["verified"] is False and "UNVERIFIED" in info["note"]
    assert info["manifest"]["version"] == 3 and info["manifest_error"] is None
    assert info["claimed_key_id"] == key_id(load_public_key(keys["pub"]))
    assert info["members"]["model.bin"] == Path(built["files"]["model.bin"]).stat().st_size
    assert info["archive_bytes"] == built["path"].stat().st_size


def test_reference_shapes_checked_against_manifest(built, tmp_path):
    bad = B.save_reference(tmp_path / "r.npz", np.zeros((1, 5, TILE, TILE)), np.zeros((1, 3, TILE, TILE)))
    with pytest.raises(ValueError, match=r"r.npz: tiles shape \(1, 5, 64, 64\)"):
        B.load_reference(bad, built["manifest"])
    np.savez(tmp_path / "x.npz", tiles=np.zeros((1, 6, 4, 4), np.float32))
    with pytest.raises(ValueError, match="missing array.*probabilities"):
        B.load_reference(tmp_path / "x.npz")


# ---------------------------------------------------------------------------------------------
# One test per rejection reason
# ---------------------------------------------------------------------------------------------

def test_not_a_bundle(built, keys, tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(4096))
    assert "not a tar archive" in reject(junk, keys, B.NotABundle)
    assert "no such file" in reject(tmp_path / "missing.tar", keys, B.NotABundle)
    truncated = tmp_path / "truncated.tar"
    data = built["path"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    reject(truncated, keys, B.NotABundle)
    no_manifest = mutated(built, tmp_path, lambda ms: ms.remove(member(ms, "manifest.json")))
    assert "no manifest.json" in reject(no_manifest, keys, B.NotABundle)


def test_not_a_bundle_damaged_header(built, keys, tmp_path):
    # tarfile alone would stop quietly at a damaged header and report fewer members
    data = bytearray(built["path"].read_bytes())
    # the 4th member's header: a 512-byte block that starts with its name
    at = next(i for i in range(0, len(data), 512) if data[i:i + 9] == b"model.xml")
    data[at] ^= 0x20
    bad = tmp_path / "hdr.tar"
    bad.write_bytes(bytes(data))
    assert "corrupt archive" in reject(bad, keys, B.NotABundle)


def test_missing_signature(built, keys, tmp_path):
    bad = mutated(built, tmp_path, lambda ms: ms.remove(member(ms, "manifest.sig")))
    assert "unsigned" in reject(bad, keys, B.MissingSignature)


def test_bad_signature_flipped_manifest_byte(built, keys, tmp_path):
    def tamper(ms):
        m = member(ms, "manifest.json")
        assert b'"version": 3' in m[1]
        m[1] = m[1].replace(b'"version": 3', b'"version": 7')     # one byte, a real attack
    bad = mutated(built, tmp_path, tamper)
    assert "does not match manifest.json" in reject(bad, keys, B.BadSignature)


def test_bad_signature_garbled_signature_file(built, keys, tmp_path):
    def tamper(ms):
        member(ms, "manifest.sig")[1] = b"not json"
    assert "unreadable" in reject(mutated(built, tmp_path, tamper), keys, B.BadSignature)


def test_wrong_key(built, keys, tmp_path):
    other = B.build_bundle(tmp_path / "other.tar", built["files"], built["manifest"], keys["other_priv"])
    message = reject(other, keys, B.WrongKey)
    assert key_id(load_public_key(keys["other_pub"])) in message
    assert key_id(load_public_key(keys["pub"])) in message
    B.verify_bundle(other, keys["other_pub"])            # it is a valid bundle, for that key


def test_checksum_mismatch_flipped_model_byte(built, keys, tmp_path):
    def tamper(ms):
        m = member(ms, "model.bin")
        m[1] = flip(m[1], 7)
    assert "'model.bin' sha256" in reject(mutated(built, tmp_path, tamper), keys, B.ChecksumMismatch)


def test_checksum_mismatch_swapped_file(built, keys, tmp_path):
    other_xml, other_bin = make_ir(tmp_path / "other_model", seed=5)   # another real model
    def swap(ms):
        member(ms, "model.bin")[1] = other_bin.read_bytes()
    assert "'model.bin'" in reject(mutated(built, tmp_path, swap), keys, B.ChecksumMismatch)


def test_missing_file(built, keys, tmp_path):
    bad = mutated(built, tmp_path, lambda ms: ms.remove(member(ms, "reference.npz")))
    assert "'reference.npz' is listed in the manifest but not in the archive" in reject(
        bad, keys, B.MissingFile)


def test_unexpected_file(built, keys, tmp_path):
    def add(ms):
        ms.append([tarfile.TarInfo("payload.sh"), b"#!/bin/sh\nrm -rf /\n"])
    assert "'payload.sh' is not listed" in reject(mutated(built, tmp_path, add), keys, B.UnexpectedFile)


def _entry(name, kind, **attrs):
    info = tarfile.TarInfo(name)
    info.type = kind
    for k, v in attrs.items():
        setattr(info, k, v)
    return [info, b"x" if kind == tarfile.REGTYPE else b""]


@pytest.mark.parametrize("entry, words", [
    (lambda: _entry("/tmp/evil.txt", tarfile.REGTYPE), "not a plain relative path"),
    (lambda: _entry("../evil.txt", tarfile.REGTYPE), "not a plain relative path"),
    (lambda: _entry("sub/../../evil.txt", tarfile.REGTYPE), "not a plain relative path"),
    (lambda: _entry("passwd", tarfile.SYMTYPE, linkname="/etc/passwd"), "is a link"),
    (lambda: _entry("hard", tarfile.LNKTYPE, linkname="model.bin"), "is a link"),
    (lambda: _entry("null", tarfile.CHRTYPE, devmajor=1, devminor=3), "is a device"),
    (lambda: _entry("fifo", tarfile.FIFOTYPE), "not a regular file"),
    (lambda: _entry("adir", tarfile.DIRTYPE), "is a directory"),
    (lambda: _entry("model.bin", tarfile.REGTYPE), "duplicate member 'model.bin'"),
], ids=["absolute", "dotdot", "nested-dotdot", "symlink", "hardlink", "device", "fifo", "dir",
        "duplicate"])
def test_unsafe_path(built, keys, tmp_path, entry, words):
    bad = mutated(built, tmp_path, lambda ms: ms.append(entry()))
    assert words in reject(bad, keys, B.UnsafePath)


def test_too_large_limits(built, keys, tmp_path):
    sizes = {n: Path(p).stat().st_size for n, p in built["files"].items()}
    assert "more than 4 members" in reject(built["path"], keys, B.TooLarge,
                                          limits=B.ReadLimits(max_members=4))
    small = B.ReadLimits(max_member_bytes=sizes["reference.npz"] - 1)
    assert "'reference.npz' is" in reject(built["path"], keys, B.TooLarge, limits=small)
    total = B.ReadLimits(max_total_bytes=sum(sizes.values()))   # + manifest + sig: over
    assert "members total more than" in reject(built["path"], keys, B.TooLarge, limits=total)


def test_too_large_from_a_lying_header(built, keys, tmp_path):
    # A header claiming 1 TB: refused from the header, nothing is read or allocated.
    info = tarfile.TarInfo("model.bin")
    info.size = 10 ** 12
    blob = (b"".join(m[0].tobuf(tarfile.PAX_FORMAT) + m[1] + b"\0" * (-len(m[1]) % 512)
                     for m in read_members(built["path"])[:2])
            + info.tobuf(tarfile.PAX_FORMAT) + b"\0" * 4096)
    bad = tmp_path / "liar.tar"
    bad.write_bytes(blob)
    assert "1000000000000 bytes" in reject(bad, keys, B.TooLarge)


def test_build_refuses_over_max_bytes(built, keys, tmp_path):
    out = tmp_path / "big.tar"
    with pytest.raises(B.TooLarge) as exc:
        B.build_bundle(out, built["files"], built["manifest"], keys["priv"], max_bytes=10_000)
    message = str(exc.value)
    assert f"{built['path'].stat().st_size} bytes" in message and "max_bytes 10000" in message
    assert "reference.npz" in message and "model.bin" in message
    assert not out.exists() and list(tmp_path.iterdir()) == []
    ok = B.build_bundle(out, built["files"], built["manifest"], keys["priv"],
                        max_bytes=built["path"].stat().st_size)
    assert ok.exists()


def test_version_too_old(built, keys):
    for floor in (3, 4):
        message = reject(built["path"], keys, B.VersionTooOld, min_version=floor)
        assert f"bundle version 3 of 'cloudmask-6b' is not newer than version {floor}" in message


def test_manifest_error_in_a_signed_bundle(built, keys, tmp_path):
    # The ground signed a manifest that is not valid: signature fine, manifest refused.
    sk = load_private_key(keys["priv"])
    def resign(ms):
        bad = dict(built["manifest"], input=dict(built["manifest"]["input"]))
        bad["input"]["scaling"] = {"mean": MEAN, "std": STD[:3] + [0.0] + STD[4:]}
        raw = manifest_bytes(bad)
        member(ms, "manifest.json")[1] = raw
        member(ms, "manifest.sig")[1] = B.signature_document(sk, raw)
    bad = mutated(built, tmp_path, resign)
    with pytest.raises(B.BundleManifestError) as exc:
        B.verify_bundle(bad, keys["pub"])
    assert isinstance(exc.value, ManifestError) and isinstance(exc.value, B.BundleError)
    assert exc.value.field == "input.scaling.std[3]"
    assert "input.scaling.std[3]: must be > 0" in str(exc.value)
    assert B.inspect_bundle(bad)["manifest_error"].startswith("input.scaling.std[3]")


def test_build_checks_its_inputs(built, keys, tmp_path):
    with pytest.raises(B.UnsafePath, match="reserved"):
        B.build_bundle(tmp_path / "x.tar", {**built["files"], "manifest.sig": built["files"]["model.xml"]},
                       built["manifest"], keys["priv"])
    with pytest.raises(FileNotFoundError, match="'model.bin'.*gone.bin"):
        B.build_bundle(tmp_path / "x.tar", {**built["files"], "model.bin": tmp_path / "gone.bin"},
                       built["manifest"], keys["priv"])
    with pytest.raises(ManifestError, match="files: must list model.bin"):
        B.build_bundle(tmp_path / "x.tar", {k: v for k, v in built["files"].items() if k != "model.bin"},
                       built["manifest"], keys["priv"])
    assert not (tmp_path / "x.tar").exists()


def test_verify_extracted_slot_catches_changes_on_disk(built, keys, tmp_path):
    slot = B.extract_bundle(built["path"], tmp_path / "slot", keys["pub"]).root
    (slot / "notes.txt").write_text("the daemon's own file: ignored")
    v = B.verify_extracted(slot, keys["pub"])
    assert v.manifest == built["manifest"] and set(v.files) == set(built["files"])
    binf = slot / "model.bin"
    good = binf.read_bytes()
    binf.write_bytes(flip(good, 11))
    with pytest.raises(B.ChecksumMismatch, match="'model.bin'"):
        B.verify_extracted(slot, keys["pub"])
    binf.write_bytes(good)
    (slot / "reference.npz").unlink()
    with pytest.raises(B.MissingFile, match="'reference.npz'"):
        B.verify_extracted(slot, keys["pub"])
    (slot / "manifest.json").write_bytes((slot / "manifest.json").read_bytes().replace(b'"version": 3', b'"version": 9'))
    with pytest.raises(B.BadSignature):
        B.verify_extracted(slot, keys["pub"])
    with pytest.raises(B.WrongKey):
        B.verify_extracted(slot, keys["other_pub"])


# Any single flipped byte, or a truncation anywhere: either a BundleError, or (a byte in the tar
# padding, which carries nothing) the very content that was signed. Never another exception.
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_damage_is_rejected_or_harmless(built, keys, tmp_path, data):
    raw = built["path"].read_bytes()
    if data.draw(st.booleans(), label="truncate"):
        damaged = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    else:
        at = data.draw(st.integers(0, len(raw) - 1), label="offset")
        damaged = raw[:at] + bytes([raw[at] ^ data.draw(st.integers(1, 255), label="xor")]) + raw[at + 1:]
    path = tmp_path / "damaged.tar"
    path.write_bytes(damaged)
    try:
        v = B.verify_bundle(path, keys["pub"])
    except B.BundleError:
        return
    assert v.manifest == built["manifest"]
    assert v.files == {n: Path(p).stat().st_size for n, p in built["files"].items()}


# ---------------------------------------------------------------------------------------------
# Compressed members and compact references
# ---------------------------------------------------------------------------------------------

def test_compressed_members_verify_extract_the_signed_bytes_and_are_smaller(built, keys, tmp_path):
    files, manifest = built["files"], built["manifest"]
    packed = B.build_bundle(tmp_path / "xz.tar", files, {**manifest, "encoding": {"model.bin": "xz"}},
                            keys["priv"], compress=True)
    plain = B.build_bundle(tmp_path / "plain.tar", files, {**manifest, "encoding": {"model.bin": "xz"}},
                           keys["priv"])
    assert packed.stat().st_size < plain.stat().st_size
    v = B.verify_bundle(packed, keys["pub"])
    # the encoding is the builder's: the XML is smaller xz-encoded, the LZMA .npz is not
    assert v.manifest["encoding"].get("model.xml") == "xz" and "reference.npz" not in v.manifest["encoding"]
    assert v.files["model.xml"] == Path(files["model.xml"]).stat().st_size > v.stored["model.xml"]
    assert "encoding" not in B.verify_bundle(plain, keys["pub"]).manifest      # a plain build says plain
    root = B.extract_bundle(packed, tmp_path / "slot", keys["pub"]).root
    for name, src in files.items():
        assert (root / name).read_bytes() == Path(src).read_bytes()
    assert B.verify_extracted(root, keys["pub"]).files == v.files
    # the tar stops at its end-of-archive blocks (no tape-record padding) and tarfile reads it
    members = read_members(packed)
    assert [m[0].name for m in members][:2] == ["manifest.json", "manifest.sig"]


def test_a_corrupt_or_oversized_compressed_member_is_refused(built, keys, tmp_path):
    packed = B.build_bundle(tmp_path / "xz.tar", built["files"], built["manifest"], keys["priv"], compress=True)

    def flip(members):
        info_data = member(members, "model.xml")
        data = bytearray(info_data[1])
        data[len(data) // 2] ^= 0xFF
        info_data[1] = bytes(data)
    members = read_members(packed)
    flip(members)
    with pytest.raises(B.ChecksumMismatch, match="model.xml"):
        B.verify_bundle(write_members(tmp_path / "bad.tar", members), keys["pub"])
    # a member that decodes to more than the limits allow stops there, whatever the archive's size
    big = tmp_path / "big.xml"
    big.write_bytes(b"\0" * (8 << 20))                  # 8 MiB that xz stores in about a kilobyte
    bomb = B.build_bundle(tmp_path / "bomb.tar", {**built["files"], "model.xml": big}, built["manifest"],
                          keys["priv"], compress=True)
    limit = max(B.inspect_bundle(bomb)["members"].values())           # every stored member fits
    assert limit < 8 << 20
    with pytest.raises(B.TooLarge, match="model.xml.*decodes to more than"):
        B.verify_bundle(bomb, keys["pub"], limits=B.ReadLimits(max_member_bytes=limit))


def test_references_on_their_grids_are_stored_as_uint16_and_read_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    tiles = B.on_grid(rng.uniform(0, 0.6, (1, 6, 64, 64)), B.REFLECTANCE_STEP)
    probs = rng.dirichlet(np.ones(3), (1, 64, 64)).transpose(0, 3, 1, 2)
    probs = B.on_grid(probs, B.PROBABILITY_STEP)
    small = B.save_reference(tmp_path / "grid.npz", tiles, probs)
    with np.load(small) as z:
        assert z["tiles"].dtype == np.uint16 and z["probabilities"].dtype == np.uint16
    got_tiles, got_probs = B.load_reference(small)
    assert np.array_equal(got_tiles, tiles) and np.array_equal(got_probs, probs)
    assert got_tiles.dtype == got_probs.dtype == np.float32
    # off the grid: stored as float32, as before, and still exact
    off = tiles + np.float32(1e-6)
    big = B.save_reference(tmp_path / "off.npz", off, probs)
    assert np.array_equal(B.load_reference(big)[0], off) and small.stat().st_size < big.stat().st_size
