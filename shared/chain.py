"""Model chains (issue 16): a gate model, then models that run only where the earlier ones allow.

A chain is ONE signed bundle (shared.bundle's format, the same key, verify and extract path)
whose manifest carries `chain` (shared.manifest) instead of one model's input/output; each step
is an ordinary single-model bundle extracted under `steps/<name>/`, its own manifest.json and
manifest.sig included, so on board each step folder is verified with the same public key as a
slot is (`verify_chain_steps`) and self-tested on its own reference tiles. The chain installs,
activates and rolls back as one unit: a gate and a target validated together on the ground fly
together, never in mixed versions.

    build_chain_bundle(out, steps=[("cloud", "cloud.tar", None),
                                   ("ship", "ship.tar", {"class": "cloud", "fraction_below": 0.5})],
                       policy=..., private_key=..., model_id="harbour-chain", version=1)

What needs the steps' own manifests is checked here (`check_chain`): class names unique across
steps, a step's `run_if` naming a class of an EARLIER step, the chain's policy naming classes of
the steps; the chain manifest alone is checked by shared.manifest.validate_manifest.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from shared.bundle import BundleError, build_bundle, extract_bundle, verify_extracted
from shared.errors import ChainStepRefused, ManifestError, PolicyError
from shared.hashing import sha256_file
from shared.keys import PrivateKeyLike, PublicKeyLike, load_private_key
from shared.manifest import (FORMAT_VERSION, RESERVED_NAMES, STEPS_DIR, chain_steps, check_run_if,
                             is_chain, manifest_precision, utc_now, validate_manifest)
from shared.policy import validate_policy

StepSpec = tuple[str, "str | os.PathLike", "Mapping[str, Any] | None"]
NOT_RUN = 255          # a later step's mask value where it did not run (nodata), on board and down


@dataclass(frozen=True)
class ChainStep:
    """One verified step: its name, its folder (an extracted single-model bundle), its own
    manifest, and where it runs (None: everywhere, the gate)."""

    name: str
    root: Path
    manifest: dict
    run_if: dict | None

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["output"]["classes"])


def union(lists: Sequence[Sequence[str]]) -> list[str]:
    """The names of several lists, in order of first appearance."""
    out: list[str] = []
    for names in lists:
        out += [n for n in names if n not in out]
    return out


def chain_classes(step_manifests: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every step's classes, gate first (unique across steps in a valid chain)."""
    return union([m["output"]["classes"] for m in step_manifests])


def chain_bands(step_manifests: Sequence[Mapping[str, Any]]) -> list[str]:
    """The bands a frame must carry: the union of the steps' bands."""
    return union([m["input"]["bands"] for m in step_manifests])


def check_chain(manifest: Mapping[str, Any], step_manifests: Sequence[Mapping[str, Any]]) -> None:
    """What the chain manifest alone cannot say, checked against the steps' own (validated)
    manifests; ManifestError naming the field (`chain.steps[1].run_if.class`) and the steps."""
    steps = chain_steps(manifest)
    if len(step_manifests) != len(steps):
        raise ManifestError("chain.steps", f"{len(steps)} steps, {len(step_manifests)} step manifests")
    owner: dict[str, str] = {}            # class -> the step that outputs it
    for i, (step, sm) in enumerate(zip(steps, step_manifests)):
        if is_chain(sm):
            raise ManifestError(f"chain.steps[{i}]", f"step {step['name']!r} is itself a chain: "
                                                     "a step is one model")
        if i > 0 and len(sm["output"]["classes"]) >= NOT_RUN:
            raise ManifestError(f"chain.steps[{i}]", f"step {step['name']!r} has "
                                f"{len(sm['output']['classes'])} classes: a later step has at most "
                                f"{NOT_RUN} ({NOT_RUN} marks the pixels where it did not run)")
        for cls in sm["output"]["classes"]:
            if cls in owner:
                raise ManifestError(f"chain.steps[{i}]", f"class {cls!r} of step {step['name']!r} is "
                                    f"also a class of step {owner[cls]!r}: class names must be "
                                    "unique across the steps")
            owner[cls] = step["name"]
    earlier: list[str] = []
    for i, (step, sm) in enumerate(zip(steps, step_manifests)):
        run_if = step.get("run_if")
        if run_if is not None:
            cls = run_if.get("class")
            if cls in owner and cls not in earlier:
                raise ManifestError(f"chain.steps[{i}].run_if.class",
                                    f"{cls!r} is a class of step {owner[cls]!r}, which has not run "
                                    f"when step {step['name']!r} is decided: a run_if reads only "
                                    f"earlier steps' classes ({', '.join(earlier)})")
            check_run_if(run_if, f"chain.steps[{i}].run_if", earlier)
        earlier += sm["output"]["classes"]
    try:
        validate_policy(manifest["policy"], classes=list(owner), field="policy")
    except PolicyError as exc:
        raise ManifestError(exc.field, str(exc).split(": ", 1)[1]) from None


def verify_chain_steps(root: str | os.PathLike, manifest: Mapping[str, Any],
                       public_key: PublicKeyLike) -> list[ChainStep]:
    """Each step folder of an extracted chain re-checked as a slot is (signature with the same
    key, every file's sha256: shared.bundle.verify_extracted), then the chain against the steps'
    manifests. ChainStepRefused names the step (and verify's message the file); ManifestError
    the field."""
    root = Path(root)
    steps = []
    for step in chain_steps(manifest):
        try:
            verified = verify_extracted(root.joinpath(*step["dir"].split("/")), public_key)
        except BundleError as exc:
            raise ChainStepRefused(step["name"], exc) from None
        steps.append(ChainStep(step["name"], verified.root, verified.manifest, step.get("run_if")))
    check_chain(manifest, [s.manifest for s in steps])
    return steps


def _parent(parent: int | Mapping[str, Any] | None, model_id: str) -> dict | None:
    if parent is None or isinstance(parent, Mapping):
        return None if parent is None else dict(parent)
    return {"model_id": model_id, "version": parent}


def chain_manifest(steps: Sequence[StepSpec], policy: Mapping[str, Any], model_id: str,
                   version: int, parent: int | Mapping[str, Any] | None = None,
                   created: str | None = None, lineage: Mapping[str, Any] | None = None) -> dict:
    """The chain manifest for `steps` [(name, bundle, run_if or None)] before its files are
    hashed (shared.bundle.build_bundle fills `files`)."""
    entries = []
    for name, _, run_if in steps:
        entry: dict[str, Any] = {"name": name, "dir": f"{STEPS_DIR}/{name}"}
        if run_if is not None:
            entry["run_if"] = dict(run_if)
        entries.append(entry)
    m = {"format_version": FORMAT_VERSION, "model_id": model_id, "version": version,
         "parent": _parent(parent, model_id), "created": created or utc_now(),
         "chain": {"steps": entries}, "policy": dict(policy), "files": {}}
    if lineage is not None:
        m["lineage"] = dict(lineage)
    return m


def build_chain_bundle(out_path: str | os.PathLike, steps: Sequence[StepSpec],
                       policy: Mapping[str, Any], private_key: PrivateKeyLike, model_id: str,
                       version: int, parent: int | Mapping[str, Any] | None = None,
                       public_key: PublicKeyLike | None = None, max_bytes: int | None = None,
                       compress: bool = True, created: str | None = None) -> Path:
    """Verify each step bundle (with `public_key`; default: the signing key's own, since on
    board every step is verified with the one uplink key), extract it under steps/<name>/,
    check the chain against the steps' manifests, then write and sign the chain bundle
    (shared.bundle.build_bundle: deterministic, xz members where smaller with `compress`).

    `steps`: [(name, step bundle path, run_if or None for the first)]; `parent`: the version of
    this chain it replaces, or {"model_id", "version"}. Errors: ManifestError naming the field
    (`chain.steps[1].run_if.class: ...`), ChainStepRefused naming the step (a step bundle that
    does not verify), shared.bundle's errors for the output."""
    key = load_private_key(private_key)
    trusted = key.public_key() if public_key is None else public_key
    manifest = chain_manifest(steps, policy, model_id, version, parent, created,
                              lineage={"steps": [{"name": name, "bundle": Path(path).name,
                                                  "sha256": sha256_file(path)}
                                                 for name, path, _ in steps]})
    validate_manifest(manifest | {"files": _placeholder_files(steps)})
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.", dir=out_path.parent) as tmp:
        files: dict[str, Path] = {}
        step_manifests = []
        for name, path, _ in steps:
            dest = Path(tmp, STEPS_DIR, name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                verified = extract_bundle(path, dest, trusted)
            except BundleError as exc:
                raise ChainStepRefused(name, exc) from None
            step_manifests.append(verified.manifest)
            for arcname in (*RESERVED_NAMES, *verified.files):
                files[f"{STEPS_DIR}/{name}/{arcname}"] = dest.joinpath(*arcname.split("/"))
        check_chain(manifest, step_manifests)
        return build_bundle(out_path, files, manifest, key, max_bytes=max_bytes, compress=compress)


def _placeholder_files(steps: Sequence[StepSpec]) -> dict[str, str]:
    """The signed files every step folder must hold, with dummy digests: the chain manifest's own
    fields are checked before any step bundle is opened."""
    return {f"{STEPS_DIR}/{name}/{n}": "0" * 64 for name, _, _ in steps for n in RESERVED_NAMES}


def verify_chain_bundle(path: str | os.PathLike, public_key: PublicKeyLike) -> dict:
    """Check a chain bundle as the daemon does before its self-tests (the archive, then each
    step folder with the same key, then the chain against the steps) and describe it:
    {bundle, bytes, model_id, version, parent, key_id, steps: [{name, model_id, version,
    classes, bands, tile_size, precision, run_if}], classes, bands, policy}."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix=".chain-verify-") as tmp:
        verified = extract_bundle(path, Path(tmp, "chain"), public_key)
        if not is_chain(verified.manifest):
            raise ManifestError("chain", f"{path}: missing: a single-model bundle, not a chain")
        steps = verify_chain_steps(verified.root, verified.manifest, public_key)
    m = verified.manifest
    return {"bundle": str(path), "bytes": path.stat().st_size, "model_id": m["model_id"],
            "version": m["version"], "parent": m["parent"], "key_id": verified.key_id,
            "steps": [{"name": s.name, "model_id": s.manifest["model_id"],
                       "version": s.manifest["version"], "classes": s.classes,
                       "bands": list(s.manifest["input"]["bands"]),
                       "tile_size": s.manifest["input"]["tile_size"],
                       "precision": manifest_precision(s.manifest), "run_if": s.run_if}
                      for s in steps],
            "classes": chain_classes([s.manifest for s in steps]),
            "bands": chain_bands([s.manifest for s in steps]), "policy": m["policy"]}
