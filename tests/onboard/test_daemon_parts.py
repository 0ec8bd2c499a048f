"""The daemon's parts that need no running process: config, uploads, telemetry, CLI basics."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onboard.commands import CommandFailed, Uploads
from onboard.config import ConfigError, config_from_dict, connect_address, load_config
from onboard.telemetry import LatencyTracker, rss_mb

# A hung OpenVINO call or socket wait fails its test instead of stalling the suite.
pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
BENCH = {"security": {"insecure": True}}      # a bench config: no CURVE, said outright


# ------------------------------------------------------------------------------------ config
def test_default_toml_is_the_documented_defaults():
    config = load_config(REPO / "onboard" / "default.toml")
    assert config.device == "CPU" and config.max_frames == 4
    assert config.store_root == (REPO / "onboard" / "store").resolve()     # relative to the file
    assert set(config.endpoints) == {"frames", "products", "commands", "telemetry"}
    assert config.precision == "auto" and config.capabilities is None     # the manifest's; ask OpenVINO


def test_runtime_precision_and_capabilities_are_read():
    config = config_from_dict({"runtime": {"precision": "fp32", "capabilities": ["fp32", " INT8"]},
                               **BENCH})
    assert config.precision == "fp32" and config.capabilities == ("FP32", "INT8")


def test_config_paths_resolve_against_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    cfg = tmp_path / "sub" / "d.toml"
    cfg.write_text('[store]\nroot = "s"\npublic_key = "../k.pub"\n[daemon]\ndevice = "GPU"\n'
                   '[security]\nsecret_key = "keys/d.key_secret"\noperator = ["../ops", "op.key"]\n')
    config = load_config(cfg)
    assert config.store_root == tmp_path / "sub" / "s"
    assert config.public_key == tmp_path / "k.pub"
    assert config.device == "GPU" and config.source_file == cfg
    assert not config.insecure and config.secret_key == tmp_path / "sub" / "keys" / "d.key_secret"
    assert config.allowed_keys["operator"] == (tmp_path / "ops", tmp_path / "sub" / "op.key")
    assert config.allowed_keys["payload"] == (tmp_path / "sub" / "keys" / "payload.key",)   # default


def test_security_is_the_default():
    with pytest.raises(ConfigError, match=r"test.toml: \[security\]: missing.*insecure = true"):
        config_from_dict({}, where="test.toml")
    assert config_from_dict(BENCH).insecure is True          # said outright: allowed


@pytest.mark.parametrize("given, field", [
    ({"queue": {"max_frames": 0}}, "queue.max_frames"),
    ({"queue": {"max_frames": True}}, "queue.max_frames"),
    ({"queue": {"max_frame": 3}}, "queue.max_frame: unknown key"),
    ({"bogus": {}}, "unknown section [bogus]"),
    ({"endpoints": {"frames": "http://x"}}, "endpoints.frames"),
    ({"endpoints": {"frames": "ipc:///tmp/a", "products": "ipc:///tmp/a"}}, "every endpoint must be different"),
    ({"daemon": {"log_level": "LOUD"}}, "daemon.log_level"),
    ({"telemetry": {"interval_s": -1}}, "telemetry.interval_s"),
    ({"store": {"max_chunk_bytes": 10, "max_upload_bytes": 5}}, "store.max_chunk_bytes"),
    ({"runtime": {"precision": "fp64"}}, "runtime.precision: must be \"auto\" or one of fp32"),
    ({"runtime": {"capabilities": []}}, "runtime.capabilities"),
    ({"runtime": {"capabilities": "FP32"}}, "runtime.capabilities"),
    ({"security": {"insecure": "yes"}}, "security.insecure: must be true or false"),
    ({"security": {"operator": 3}}, "security.operator: must be a public key file or folder"),
    ({"security": {"secret_key": ""}}, "security.secret_key"),
    ({"security": {"admin": "k.key"}}, "security.admin: unknown key"),
])
def test_bad_config_names_the_field(given, field):
    with pytest.raises(ConfigError) as err:
        config_from_dict(given, where="test.toml")
    assert field in str(err.value) and "test.toml" in str(err.value)


def test_bad_toml_and_missing_file_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon\nname=")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="nope.toml: config file not found"):
        load_config(tmp_path / "nope.toml")


def test_connect_address_for_wildcard_binds():
    assert connect_address("tcp://*:5552") == "tcp://127.0.0.1:5552"
    assert connect_address("tcp://0.0.0.0:1") == "tcp://127.0.0.1:1"
    assert connect_address("ipc:///tmp/x") == "ipc:///tmp/x"


# ------------------------------------------------------------------------------------ uploads
def _begin(up: Uploads, data: bytes, chunk: int, name: str = "b.tar") -> dict:
    return up.begin(name, len(data), hashlib.sha256(data).hexdigest(), chunk)


def _chunk(up: Uploads, uid: str, data: bytes, chunk: int, i: int) -> dict:
    piece = data[i * chunk:(i + 1) * chunk]
    return up.chunk(uid, i, hashlib.sha256(piece).hexdigest(), memoryview(piece))


def test_upload_assembles_in_any_order_and_survives_a_restart(tmp_path):
    data = np.random.default_rng(1).bytes(10_000)
    up = Uploads(tmp_path, max_bytes=1 << 20, max_chunk_bytes=4096)
    begun = _begin(up, data, 3000)
    uid = begun["upload_id"]
    assert begun["chunks"] == 4 and begun["received"] == []
    for i in (3, 1):
        _chunk(up, uid, data, 3000, i)
    _chunk(up, uid, data, 3000, 1)                                  # a repeat is harmless
    # A new daemon process (same folder) knows what arrived.
    up2 = Uploads(tmp_path, max_bytes=1 << 20, max_chunk_bytes=4096)
    assert _begin(up2, data, 3000)["received"] == [1, 3]
    assert up2.status(uid)["missing"] == [0, 2]
    for i in (0, 2):
        _chunk(up2, uid, data, 3000, i)
    done = up2.end(uid)
    assert Path(done["path"]).read_bytes() == data and done["complete"]
    assert up2.path_of(uid) == Path(done["path"])


def test_upload_refusals_name_the_problem(tmp_path):
    data = b"x" * 5000
    up = Uploads(tmp_path, max_bytes=8000, max_chunk_bytes=2048)
    with pytest.raises(CommandFailed, match="args.size"):
        up.begin("b.tar", 9000, "0" * 64, 1024)
    with pytest.raises(CommandFailed, match="args.chunk_size"):
        up.begin("b.tar", 100, "0" * 64, 4096)
    with pytest.raises(CommandFailed, match="args.name"):
        up.begin("../etc/passwd", 100, "0" * 64, 1024)
    uid = _begin(up, data, 2048)["upload_id"]
    with pytest.raises(CommandFailed, match="args.index"):
        up.chunk(uid, 3, "0" * 64, memoryview(b"x"))
    with pytest.raises(CommandFailed, match="expected 2048"):
        up.chunk(uid, 0, hashlib.sha256(b"x").hexdigest(), memoryview(b"x"))
    with pytest.raises(CommandFailed, match="sha256 mismatch"):
        up.chunk(uid, 0, "0" * 64, memoryview(data[:2048]))
    with pytest.raises(CommandFailed, match="unknown upload"):
        up.status("0123456789abcdef")
    with pytest.raises(CommandFailed, match="not an upload id"):
        up.status("../../x")
    with pytest.raises(CommandFailed, match="not complete"):
        up.path_of(uid)


def test_upload_whole_file_hash_mismatch_resets(tmp_path):
    data = b"abc" * 1000
    up = Uploads(tmp_path, max_bytes=1 << 20, max_chunk_bytes=4096)
    wrong = hashlib.sha256(b"something else").hexdigest()
    uid = up.begin("b.tar", len(data), wrong, 1000)["upload_id"]
    for i in range(3):
        _chunk(up, uid, data, 1000, i)
    with pytest.raises(CommandFailed, match="whole-file sha256"):
        up.end(uid)
    assert up.status(uid)["received"] == []


# ------------------------------------------------------------------------------------ telemetry
def test_latency_tracker_percentiles():
    tracker = LatencyTracker(window=100)
    for ms in range(1, 201):                       # only the last 100 (101..200) count
        tracker.add({"infer": float(ms), "note": "not a number"})
    summary = tracker.summary()["infer"]
    assert summary["last"] == 200 and summary["n"] == 100
    assert summary["p50"] == pytest.approx(150.5) and summary["p95"] == pytest.approx(195.05)
    assert "note" not in tracker.summary()
    assert rss_mb() > 1


# ------------------------------------------------------------------------------------ CLI
def _run(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "onboard", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("sub", ["run", "install", "upload", "status", "rollback", "command"])
def test_every_command_has_help_and_json(sub):
    result = _run(sub, "--help")
    assert result.returncode == 0 and "--json" in result.stdout


def test_run_with_bad_config_says_which_field(tmp_path):
    cfg = tmp_path / "d.toml"
    cfg.write_text("[queue]\nmax_frames = -3\n")
    result = _run("run", "--config", str(cfg))
    assert result.returncode == 1 and "queue.max_frames" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_missing_key_file_names_it(tmp_path):
    cfg = tmp_path / "d.toml"
    cfg.write_text(f'[store]\nroot = "s"\npublic_key = "{tmp_path}/none.pub"\n[security]\ninsecure = true\n')
    result = _run("run", "--config", str(cfg))
    assert result.returncode == 1 and "none.pub" in result.stderr


def test_run_without_security_section_is_refused(tmp_path):
    cfg = tmp_path / "d.toml"
    cfg.write_text('[store]\nroot = "s"\n')
    result = _run("run", "--config", str(cfg))
    assert result.returncode == 1 and "[security]: missing" in result.stderr
    assert "eoedge onboard keys generate" in result.stderr and "Traceback" not in result.stderr


def test_status_without_daemon_times_out_clearly(tmp_path):
    result = _run("status", "--endpoint", f"ipc://{tmp_path}/nobody", "--timeout", "0.5")
    assert result.returncode == 4 and "no answer" in result.stderr and "is the daemon running" in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.rstrip().endswith("[unreachable]")


def test_onboard_never_imports_torch_or_ground():
    modules = sorted(f"onboard.{p.stem}" for p in (REPO / "onboard").glob("*.py") if p.stem != "__init__")
    assert {"onboard.daemon", "onboard.bus", "onboard.store", "onboard.pipeline"} <= set(modules)
    code = (f"import sys, onboard, {', '.join(modules)}; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ground')); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
