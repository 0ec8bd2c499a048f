"""Chain bundles (shared.chain, shared.manifest's `chain`): built from real signed step bundles,
verified step by step with the same key; every refusal names the field or the step."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/onboard_models.py

from ground.commands.chain import parse_steps  # noqa: E402  (torch-free: the CLI's own module)
from onboard_models import BANDS_6, CLASSES_3, make_test_manifest, make_test_model_files  # noqa: E402
from shared.bundle import build_bundle, verify_bundle  # noqa: E402
from shared.chain import (build_chain_bundle, chain_manifest, check_chain,  # noqa: E402
                          verify_chain_bundle)
from shared.errors import ChainStepRefused, CommandError, ManifestError  # noqa: E402
from shared.keys import generate_keypair  # noqa: E402
from shared.manifest import validate_manifest  # noqa: E402

SHIP_CLASSES = ("sea", "ship")
GATE_IF = {"class": "cloud", "fraction_below": 0.5}
REPO = Path(__file__).resolve().parents[2]
POLICY = {"rules": [{"if": {"class": "cloud", "fraction_above": 0.6}, "then": "discard"},
                    {"if": {"class": "ship", "largest_component_at_least": 4}, "then": "keep",
                     "priority": 1}],
          "default": {"then": "discard"}}


def _step_bundle(root: Path, name: str, classes, key, version: int = 1) -> Path:
    files = make_test_model_files(root / name, bands=BANDS_6, classes=classes, tile=32, n_reference=1)
    manifest = make_test_manifest(files, model_id=name, version=version, classes=classes, tile=32,
                                  threshold={}, policy={"rules": []})
    return build_bundle(root / f"{name}.tar", files, manifest, key)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    sk, pk = generate_keypair(root / "keys")
    other_sk, _ = generate_keypair(root / "other")
    return {"root": root, "sk": sk, "pk": pk,
            "cloud": _step_bundle(root, "cloud", CLASSES_3, sk),
            "ship": _step_bundle(root, "ship", SHIP_CLASSES, sk),
            "cloud2": _step_bundle(root, "cloud2", CLASSES_3, sk),
            "ship_other_key": _step_bundle(root, "ship-other", SHIP_CLASSES, other_sk)}


def test_chain_bundle_builds_verifies_and_describes_itself(bundles, tmp_path):
    out = build_chain_bundle(tmp_path / "chain.tar", [("cloud", bundles["cloud"], None),
                                                      ("ship", bundles["ship"], GATE_IF)],
                             POLICY, bundles["sk"], "harbour-chain", 3, parent=2)
    verified = verify_bundle(out, bundles["pk"])          # an ordinary bundle to shared.bundle
    m = verified.manifest
    assert m["chain"]["steps"] == [{"name": "cloud", "dir": "steps/cloud"},
                                   {"name": "ship", "dir": "steps/ship", "run_if": GATE_IF}]
    assert m["parent"] == {"model_id": "harbour-chain", "version": 2}
    assert "input" not in m and "output" not in m
    for step in ("cloud", "ship"):
        for name in ("manifest.json", "manifest.sig", "model.xml", "model.bin", "reference.npz"):
            assert f"steps/{step}/{name}" in m["files"]
    assert m["encoding"]["steps/cloud/model.xml"] == "xz"          # members stored compressed
    described = verify_chain_bundle(out, bundles["pk"])
    assert [s["name"] for s in described["steps"]] == ["cloud", "ship"]
    assert described["classes"] == ["clear", "cloud", "shadow", "sea", "ship"]
    assert described["steps"][1]["run_if"] == GATE_IF and described["steps"][0]["run_if"] is None
    assert described["bands"] == list(BANDS_6)


def test_duplicate_class_names_are_refused_naming_both_steps(bundles, tmp_path):
    with pytest.raises(ManifestError) as exc:
        build_chain_bundle(tmp_path / "c.tar", [("cloud", bundles["cloud"], None),
                                                ("again", bundles["cloud2"], GATE_IF)],
                           {"rules": []}, bundles["sk"], "c", 1)
    assert exc.value.field == "chain.steps[1]"
    assert "'clear'" in str(exc.value) and "'again'" in str(exc.value) and "'cloud'" in str(exc.value)
    assert not (tmp_path / "c.tar").exists()


def test_run_if_naming_its_own_or_a_later_steps_class_is_refused(bundles, tmp_path):
    with pytest.raises(ManifestError, match=r"^chain\.steps\[1\]\.run_if\.class: 'ship' is a class of step 'ship'"):
        build_chain_bundle(tmp_path / "c.tar", [("cloud", bundles["cloud"], None),
                                                ("ship", bundles["ship"], {"class": "ship", "fraction_below": 0.5})],
                           {"rules": []}, bundles["sk"], "c", 1)
    # three steps, the middle one reading the last one's class (checked on the manifests alone)
    steps = [("gate", None, None), ("mid", None, {"class": "boat", "fraction_above": 0.1}),
             ("last", None, {"class": "cloud", "fraction_below": 0.5})]
    m = chain_manifest(steps, {"rules": []}, "c", 1)
    step_manifests = [_fake_manifest(CLASSES_3), _fake_manifest(("water", "land")),
                      _fake_manifest(("sea", "boat"))]
    with pytest.raises(ManifestError) as exc:
        check_chain(m, step_manifests)
    assert exc.value.field == "chain.steps[1].run_if.class"
    assert "step 'last'" in str(exc.value) and "earlier steps' classes (clear, cloud, shadow)" in str(exc.value)


def test_a_later_step_with_255_classes_is_refused():
    m = chain_manifest([("gate", None, None), ("many", None, GATE_IF)], {"rules": []}, "c", 1)
    with pytest.raises(ManifestError, match=r"^chain\.steps\[1\]: step 'many' has 255 classes"):
        check_chain(m, [_fake_manifest(CLASSES_3), _fake_manifest([f"c{i}" for i in range(255)])])


def _fake_manifest(classes) -> dict:
    return {"output": {"classes": list(classes)}, "input": {"bands": list(BANDS_6)}}


def test_chain_policy_with_an_unknown_class_is_refused_naming_the_rule(bundles, tmp_path):
    policy = {"rules": [{"if": {"class": "shipp", "fraction_above": 0.1}, "then": "keep"}]}
    with pytest.raises(ManifestError, match=r"^policy\.rules\[0\]\.if\.class: unknown class 'shipp'"):
        build_chain_bundle(tmp_path / "c.tar", [("cloud", bundles["cloud"], None),
                                                ("ship", bundles["ship"], GATE_IF)],
                           policy, bundles["sk"], "c", 1)


def test_a_step_signed_by_another_key_is_refused_naming_the_step(bundles, tmp_path):
    with pytest.raises(ChainStepRefused) as exc:
        build_chain_bundle(tmp_path / "c.tar", [("cloud", bundles["cloud"], None),
                                                ("ship", bundles["ship_other_key"], GATE_IF)],
                           {"rules": []}, bundles["sk"], "c", 1)
    assert exc.value.step == "ship" and exc.value.code == "wrong_key"
    assert str(exc.value).startswith("chain step 'ship': ")


@pytest.mark.parametrize("change, field", [
    (lambda m: m["chain"]["steps"][0].update(run_if=GATE_IF), "chain.steps[0].run_if"),
    (lambda m: m["chain"]["steps"][1].pop("run_if"), "chain.steps[1].run_if"),
    (lambda m: m["chain"]["steps"][1].update(name="Ship!", dir="steps/Ship!"), "chain.steps[1].name"),
    (lambda m: m["chain"]["steps"][1].update(name="cloud", dir="steps/cloud"), "chain.steps[1].name"),
    (lambda m: m["chain"]["steps"][1].update(name="s" * 33, dir="steps/" + "s" * 33), "chain.steps[1].name"),
    (lambda m: m["chain"]["steps"][1].update(dir="../ship"), "chain.steps[1].dir"),
    (lambda m: m["chain"]["steps"].pop(), "chain.steps"),
    (lambda m: m["chain"]["steps"].extend([m["chain"]["steps"][1]] * 3), "chain.steps"),
    (lambda m: m["chain"]["steps"][1]["run_if"].update(fraction_below=2), "chain.steps[1].run_if.fraction_below"),
    (lambda m: m["files"].update({"model.xml": "0" * 64}), "files['model.xml']"),
    (lambda m: m["files"].pop("steps/ship/manifest.sig"), "files"),
    (lambda m: m.update(input={}), "input"),
])
def test_chain_manifest_fields_are_checked_by_name(change, field):
    m = chain_manifest([("cloud", None, None), ("ship", None, GATE_IF)], POLICY, "harbour-chain", 1)
    m["files"] = {f"steps/{s}/{n}": "a" * 64 for s in ("cloud", "ship")
                  for n in ("manifest.json", "manifest.sig", "model.xml")}
    validate_manifest(m)
    change(m)
    with pytest.raises(ManifestError) as exc:
        validate_manifest(m)
    assert exc.value.field == field, str(exc.value)


# ------------------------------------------------------------------------ eoedge ground chain
def _ground_chain(*args: str) -> tuple[int, dict]:
    """`eoedge ground chain ... --json` as a user runs it (its own process: the ground CLI
    loads torch, this module compiles no model)."""
    proc = subprocess.run([sys.executable, "-m", "eoedge", "ground", "chain", *args, "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_ground_chain_command_writes_a_verified_chain(bundles, tmp_path):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    out = tmp_path / "chain.tar"
    rc, result = _ground_chain("--step", f"cloud={bundles['cloud']}", "--step", f"ship={bundles['ship']}",
                               "--run-if", f"ship={json.dumps(GATE_IF)}", "--policy", str(policy),
                               "--key", str(bundles["sk"]), "--model-id", "harbour-chain",
                               "--version", "1", "--out", str(out))
    assert rc == 0, result
    assert result["model_id"] == "harbour-chain" and result["version"] == 1
    assert [(s["name"], s["run_if"]) for s in result["steps"]] == [("cloud", None), ("ship", GATE_IF)]
    assert verify_bundle(out, bundles["pk"]).manifest["policy"] == POLICY


def test_ground_chain_command_names_bad_input_without_a_traceback(bundles, tmp_path):
    rc, result = _ground_chain("--step", f"cloud={bundles['cloud']}", "--step", f"ship={bundles['ship']}",
                               "--run-if", 'ship={"class": "cloud", "fraction_belo": 0.5}',
                               "--policy", '{"rules": []}', "--key", str(bundles["sk"]),
                               "--model-id", "c", "--version", "1", "--out", str(tmp_path / "c.tar"))
    assert rc == 1 and result["error"]["code"] == "invalid_manifest"
    assert result["error"]["message"].startswith("chain.steps[1].run_if.fraction_belo: unknown condition")
    assert not (tmp_path / "c.tar").exists()


@pytest.mark.parametrize("steps, run_if, says", [
    (["cloud"], ["ship={not json"], "--run-if ship: not valid JSON"),
    (["cloud", "ship"], ["boat={}"], "--run-if boat: no --step named 'boat'"),
    (["cloud", "ship"], ["ship=[1]"], "--run-if ship: must be a JSON object"),
    (["cloud", "cloud"], [], "--step cloud: given twice"),
    (["cloud:x"], [], "--step 'cloud:x': expected NAME=BUNDLE.tar"),
])
def test_ground_chain_arguments_are_named_when_wrong(bundles, steps, run_if, says):
    step_args = [s if ":" in s else f"{s}={bundles[s]}" for s in steps]
    if run_if and run_if[0].startswith("ship={not"):
        step_args.append(f"ship={bundles['ship']}")
    with pytest.raises(CommandError) as exc:
        parse_steps(step_args, run_if)
    assert str(exc.value).startswith(says)


# ------------------------------------------------------------------------ on the wire
def test_decision_and_product_chain_fields_are_validated_by_name():
    from shared.messages import MessageError, validate_body
    step = {"name": "ship", "model_id": "ship", "version": 1, "cells_run": 12, "cells_total": 16, "ms": 3.5}
    decision = {"frame_id": "f", "keep": True, "priority": 1, "reason": "r", "chain": {"steps": [step]}}
    validate_body("decision", decision)
    validate_body("product", {"frame_id": "f", "priority": 1, "chain": {
        "steps": [{**step, "classes": ["sea", "ship"], "mask": "mask_ship"}], "nodata": 255}})
    for broken, field in ((dict(step, cells_run=-1), "body.chain.steps[0].cells_run"),
                          ({k: v for k, v in step.items() if k != "ms"}, "body.chain.steps[0].ms"),
                          (dict(step, extra=1), "body.chain.steps[0].extra")):
        with pytest.raises(MessageError) as exc:
            validate_body("decision", dict(decision, chain={"steps": [broken]}))
        assert exc.value.field == field
    with pytest.raises(MessageError) as exc:
        validate_body("decision", dict(decision, chain={"steps": [step] * 5}))
    assert exc.value.field == "body.chain.steps"
