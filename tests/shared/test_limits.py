"""shared.limits: every integer and string of a manifest, policy, command and frame is bounded,
and `eoedge shared bundle build` and `verify` refuse what the daemon could not serve (a version
or a priority of 2^70: msgpack packs integers only in [-2^63, 2^64))."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from hostile_bundles import resigned, set_default_priority, set_version
from shared import limits
from shared.bundle import build_bundle, verify_bundle
from shared.errors import BundleManifestError, ManifestError, MessageError, PolicyError
from shared.keys import generate_keypair
from shared.manifest import validate_manifest
from shared.messages import Message, decode, encode
from shared.policy import validate_policy
from test_keys_bundle import make_bundle_inputs

REPO = Path(__file__).resolve().parents[2]
HUGE = 2 ** 70


# ------------------------------------------------------------------------------------ quote
def test_quote_escapes_and_cuts():
    assert limits.quote("a\nCRITICAL x") == "'a\\nCRITICAL x'"
    long = limits.quote("y" * 1_000_000)
    assert len(long) < 100 and long.endswith("(1000000 chars)") and "\n" not in long
    assert limits.quote(2 ** 700) == "an integer of 701 bits"
    assert limits.quote(b"\x00" * 10_000).endswith("(10000 chars)")
    assert limits.quote(list(range(10 ** 6))) == "a list of 1000000 items"


def test_tree_problem_names_the_path():
    assert limits.tree_problem({"a": [1, {"b": HUGE}]})[0] == ".a[1].b"
    assert limits.tree_problem({"a": "x" * 5000})[1].startswith("longer than 4096")
    nested: list = []
    for _ in range(100):
        nested = [nested]
    assert "deeper" in limits.tree_problem(nested)[1]
    assert limits.tree_problem({"ok": [1, 2.5, "s", None, True, -(2 ** 63)]}) is None


# ------------------------------------------------------------------------------------ manifest
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    work = tmp_path_factory.mktemp("limits")
    files, manifest = make_bundle_inputs(work)
    priv, pub = generate_keypair(work / "keys")
    bundle = build_bundle(work / "ok.tar", files, manifest, priv)
    return work, files, manifest, priv, pub, bundle


@pytest.mark.parametrize("change, field", [
    (lambda m: m.update(version=HUGE), "version"),
    (lambda m: m.update(version=limits.MAX_VERSION + 1), "version"),
    (lambda m: m.update(parent={"model_id": "x", "version": HUGE}), "parent.version"),
    (lambda m: m["policy"].update(default={"then": "keep", "priority": HUGE}), "policy.default.priority"),
    (lambda m: m["metrics"].update(big=HUGE), "metrics.big"),
    (lambda m: m["lineage"].update(note="x" * 5000), "lineage.note"),
    (lambda m: m.update(model_id="m" * 65), "model_id"),
    (lambda m: m["input"].update(tile_size=10 ** 6), "input.tile_size"),
    (lambda m: m["postprocess"].update(opening_radius=10 ** 6), "postprocess.opening_radius"),
    (lambda m: m["output"].update(classes=["c" * 65, "b", "x"]), "output.classes[0]"),
])
def test_manifest_bounds_name_the_field_and_the_limit(inputs, change, field):
    manifest = json.loads(json.dumps(inputs[2]))
    change(manifest)
    with pytest.raises(ManifestError) as info:
        validate_manifest(manifest)
    assert info.value.field == field, str(info.value)
    assert str(info.value).startswith(f"{field}: ")


def test_policy_priority_and_rule_count_bounded():
    with pytest.raises(PolicyError, match=r"policy.default.priority: must be <= 2147483647"):
        validate_policy({"default": {"then": "keep", "priority": HUGE}})
    with pytest.raises(PolicyError, match=r"more than 256 rules"):
        validate_policy({"rules": [{"if": {"class": "c", "fraction_above": 0.5}, "then": "discard"}] * 257})


def test_build_refuses_a_2_70_version(inputs):
    work, files, manifest, priv, _, _ = inputs
    with pytest.raises(ManifestError, match=r"^version: must be <= 9007199254740991"):
        build_bundle(work / "huge.tar", files, {**manifest, "version": HUGE}, priv)
    assert not (work / "huge.tar").exists()


@pytest.mark.parametrize("change, field", [(set_version(HUGE), "version"),
                                           (set_default_priority(HUGE), "policy.default.priority")])
def test_verify_refuses_a_signed_2_70_value(inputs, change, field):
    work, _, _, priv, pub, bundle = inputs
    hostile = resigned(bundle, work / f"hostile-{field}.tar", priv, change)
    with pytest.raises(BundleManifestError) as info:
        verify_bundle(hostile, pub)
    assert info.value.code == "invalid_manifest" and f"{field}: must be <=" in str(info.value)


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eoedge", "shared", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_build_and_verify_refuse_a_2_70_version(inputs):
    work, files, manifest, priv, pub, bundle = inputs
    partial = work / "huge.json"
    partial.write_text(json.dumps({**manifest, "version": HUGE}))
    built = _cli("bundle", "build", "--manifest", str(partial), "--key", str(priv),
                 "--out", str(work / "cli-huge.tar"),
                 *[a for name, path in files.items() for a in ("--file", f"{name}={path}")])
    assert built.returncode == 1 and "version: must be <= 9007199254740991" in built.stderr
    assert "Traceback" not in built.stderr and not (work / "cli-huge.tar").exists()
    hostile = resigned(bundle, work / "cli-hostile.tar", priv, set_version(HUGE))
    verified = _cli("bundle", "verify", str(hostile), "--key", str(pub), "--json")
    assert verified.returncode == 1 and "Traceback" not in verified.stderr
    assert json.loads(verified.stdout or verified.stderr)["error"]["code"] == "invalid_manifest"


# ------------------------------------------------------------------------------------ messages
def _frame(**body) -> dict:
    return {"frame_id": "f", "bands": ["B02"], "scale": 1.0, **body}


@pytest.mark.parametrize("body, field", [
    (_frame(frame_id="f" * 65), "body.frame_id"),
    (_frame(frame_id="x" * 500_000), "body.frame_id"),
    (_frame(bands=["B02"] * 65), "body.bands"),
    (_frame(bands=["b" * 65]), "body.bands[0]"),
    (_frame(scene="s" * 257), "body.scene"),
    (_frame(index=2 ** 63), "body.index"),
])
def test_frame_fields_bounded(body, field):
    import numpy as np
    header = {"type": "frame", "schema": 1, "id": "m1", "ref": None, "ts": 1.0, "source": "",
              "body": body, "arrays": [{"name": "data", "dtype": "uint16", "shape": [1, 1, 1]}]}
    with pytest.raises(MessageError) as info:
        decode([msgpack.packb(header), np.zeros(1, np.uint16).tobytes()])
    assert info.value.field == field
    assert len(str(info.value)) < 200          # never the input at full size


def test_errors_never_echo_more_than_a_prefix():
    header = {"type": "x" * 100_000, "schema": 1, "id": "m1", "ts": 1.0, "source": "", "body": {},
              "arrays": []}
    with pytest.raises(MessageError) as info:
        decode([msgpack.packb(header)])
    assert len(str(info.value)) < 300 and "100000 chars" in str(info.value)


def test_command_args_and_replies_bounded():
    with pytest.raises(MessageError, match=r"body.args.n: must be"):
        encode(Message("command", {"name": "status", "args": {"n": 2 ** 64 - 1}}))
    with pytest.raises(MessageError, match=r"body.name: longer than 64"):
        encode(Message("command", {"name": "n" * 65}))
    with pytest.raises(MessageError, match=r"^body"):            # cannot be packed: refused at the sender
        encode(Message("ack", {"ok": True, "code": "ok", "result": {"model": {"version": HUGE}}}))
