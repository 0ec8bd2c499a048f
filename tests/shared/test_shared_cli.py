"""`eoedge shared ...` used as a user would: a subprocess, real files, exit codes, stderr, --json."""
from __future__ import annotations

import json
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from test_keys_bundle import make_bundle_inputs   # real IR + reference tiles

REPO = Path(__file__).resolve().parents[2]
EOEDGE = REPO / ".venv" / "bin" / "eoedge"


def eoedge(*args, cwd=None) -> subprocess.CompletedProcess:
    cmd = [str(EOEDGE)] if EOEDGE.exists() else [sys.executable, "-m", "eoedge"]
    return subprocess.run(cmd + ["shared", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("cli")
    r = eoedge("keygen", "--out", work / "keys", "--json")
    assert r.returncode == 0, r.stderr
    keygen = json.loads(r.stdout)
    files, manifest = make_bundle_inputs(work / "in", version=3)
    partial = {k: v for k, v in manifest.items() if k not in ("files", "format_version")}
    (work / "manifest.json").write_text(json.dumps(partial))
    file_args = [a for name, path in files.items() for a in ("--file", f"{name}={path}")]
    return {"work": work, "keygen": keygen, "files": files, "file_args": file_args,
            "priv": Path(keygen["private_key"]), "pub": Path(keygen["public_key"])}


def one_error_line(r: subprocess.CompletedProcess, code: str) -> bool:
    """The error policy: one line `error: <message> [<code>]` on stderr, no traceback."""
    return (r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
            and r.stderr.rstrip().endswith(f"[{code}]"))


def build(setup, out, *extra, manifest=None):
    return eoedge("bundle", "build", "--manifest", manifest or setup["work"] / "manifest.json",
                  *setup["file_args"], "--key", setup["priv"], "--out", out, *extra)


@pytest.mark.parametrize("args", [[], ["keygen"], ["bundle"], ["bundle", "build"],
                                  ["bundle", "verify"], ["bundle", "inspect"]])
def test_help_everywhere(args):
    r = eoedge(*args, "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: eoedge shared"), r.stderr


def test_keygen(setup, tmp_path):
    k = setup["keygen"]
    assert stat.S_IMODE(Path(k["private_key"]).stat().st_mode) == 0o600
    assert len(k["key_id"]) == 16 and Path(k["public_key"]).read_text().startswith("-----BEGIN PUBLIC KEY")
    again = eoedge("keygen", "--out", Path(k["private_key"]).parent)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    human = eoedge("keygen", "--out", tmp_path, "--name", "ops")
    assert human.returncode == 0 and "key id:" in human.stdout and (tmp_path / "ops.pub").exists()


def test_build_verify_inspect(setup):
    out = setup["work"] / "good.tar"
    r = build(setup, out, "--json")
    assert r.returncode == 0, r.stderr
    built = json.loads(r.stdout)
    assert (built["model_id"], built["version"], built["key_id"]) == ("cloudmask-6b", 3, setup["keygen"]["key_id"])
    assert set(built["files"]) == {"model.xml", "model.bin", "reference.npz"}

    v = eoedge("bundle", "verify", out, "--key", setup["pub"], "--min-version", 2, "--json")
    assert v.returncode == 0, v.stderr
    doc = json.loads(v.stdout)
    assert doc["verified"] is True and doc["version"] == 3 and doc["manifest"]["input"]["tile_size"] == 64

    human = eoedge("bundle", "verify", out, "--key", setup["pub"])
    assert human.returncode == 0 and human.stdout.startswith(f"OK {out}: cloudmask-6b version 3")

    i = eoedge("bundle", "inspect", out, "--json")
    assert i.returncode == 0
    info = json.loads(i.stdout)
    assert info["verified"] is False and info["manifest"]["version"] == 3
    assert info["claimed_key_id"] == setup["keygen"]["key_id"]
    assert "UNVERIFIED" in eoedge("bundle", "inspect", out).stdout


def test_verify_rejections_exit_1_with_the_reason(setup, tmp_path):
    out = tmp_path / "b.tar"
    assert build(setup, out).returncode == 0
    with tarfile.open(out) as tf:
        at = tf.getmember("reference.npz").offset_data + 100
    data = bytearray(out.read_bytes())
    data[at] ^= 0xFF                   # one byte of reference.npz
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    r = eoedge("bundle", "verify", bad, "--key", setup["pub"])
    assert r.returncode == 1 and r.stdout == ""
    assert one_error_line(r, "checksum_mismatch") and "'reference.npz'" in r.stderr

    j = eoedge("bundle", "verify", bad, "--key", setup["pub"], "--json")
    doc = json.loads(j.stdout)
    assert j.returncode == 1 and doc["ok"] is False and doc["error"]["code"] == "checksum_mismatch"
    assert "'reference.npz'" in doc["error"]["message"] and j.stderr == ""

    old = eoedge("bundle", "verify", out, "--key", setup["pub"], "--min-version", 5)
    assert old.returncode == 1
    assert one_error_line(old, "version_too_old") and "version 3" in old.stderr and "version 5" in old.stderr

    other = eoedge("keygen", "--out", tmp_path, "--name", "other", "--json")
    wrong = eoedge("bundle", "verify", out, "--key", json.loads(other.stdout)["public_key"])
    assert wrong.returncode == 1 and one_error_line(wrong, "wrong_key")

    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"hello" * 100)
    r = eoedge("bundle", "verify", junk, "--key", setup["pub"])
    assert r.returncode == 1 and one_error_line(r, "not_a_bundle")


def test_build_refusals(setup, tmp_path):
    big = build(setup, tmp_path / "big.tar", "--max-bytes", "10KiB")
    assert big.returncode == 1 and one_error_line(big, "too_large")
    assert "over max_bytes 10240" in big.stderr and "reference.npz" in big.stderr
    assert not (tmp_path / "big.tar").exists()
    si = build(setup, tmp_path / "big.tar", "--max-bytes", "10kB")       # powers of 1000
    assert si.returncode == 1 and "over max_bytes 10000" in si.stderr

    # "10k" means 10,000 to some and 10,240 to others: refused as a usage error, naming both
    vague = build(setup, tmp_path / "big.tar", "--max-bytes", "10k")
    assert vague.returncode == 2 and one_error_line(vague, "usage")
    assert "--max-bytes" in vague.stderr and "10KB" in vague.stderr and "10KiB" in vague.stderr
    assert not (tmp_path / "big.tar").exists()

    manifest = json.loads((setup["work"] / "manifest.json").read_text())
    manifest["input"]["scaling"]["std"][3] = 0
    (tmp_path / "bad.json").write_text(json.dumps(manifest))
    r = build(setup, tmp_path / "x.tar", manifest=tmp_path / "bad.json")
    assert r.returncode == 1 and "input.scaling.std[3]: must be > 0" in r.stderr

    r = eoedge("bundle", "build", "--manifest", setup["work"] / "manifest.json", "--file", "model.xml",
               "--key", setup["priv"], "--out", tmp_path / "x.tar")
    assert r.returncode == 2 and "expected ARCNAME=PATH" in r.stderr

    r = build(setup, tmp_path / "x.tar", "--key", setup["pub"])       # a public key cannot sign
    assert r.returncode == 1 and "this is a public key" in r.stderr
    assert not (tmp_path / "x.tar").exists()
