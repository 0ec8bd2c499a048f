"""The bundle manifest: what a model expects, what it outputs, how it decides, what it came from.

A manifest is a JSON object (format_version 1)::

    format_version  1
    model_id        "cloudmask-6b" ([a-z0-9._-])
    version         int >= 1, grows with every bundle of a model (the daemon refuses older ones)
    parent          {"model_id", "version"} of the bundle this one replaces, or null
    created         ISO 8601 time
    input           {bands: [canonical S2 names], dtype: "float32",
                     scaling: {mean: [..], std: [.. > 0]}  -> (reflectance 0..1 - mean) / std,
                     tile_size: int, overlap: int < tile_size,
                     gsd_m: optional processing ground sampling distance in metres, a whole
                     multiple of FRAME_GSD_M (10 m): the daemon averages the frame's pixels
                     in blocks of gsd_m / 10 to it and brings the mask back to 10 m.
                     Absent: the frame's own 10 m}
    output          {classes: [names], activation: "softmax" | "sigmoid" | "none"}
    postprocess     {threshold: {class: 0..1} for thresholded classes, opening_radius: int >= 0}
    policy          the keep/discard policy (shared.policy)
    metrics         free object of numbers measured on the ground (may nest)
    precision       "fp32" | "fp16" | "bf16" | "int8": the precision the bundle was validated at
                    on the ground; its `reference` outputs and tolerances were computed at it,
                    and the daemon compiles and self-tests the model at it. Optional: a
                    manifest without it (older bundles) means "fp32".
    profile         "cpu-x86" | "rpi4" | "rpi5" | "myriadx": the device profile (shared.profiles)
                    the IR was checked against on the ground; `precision` must be one it runs.
                    Optional: a manifest without it (older bundles) means "cpu-x86".
    reference       {file: "reference.npz", max_abs_diff: >= 0, min_mask_agreement: 0..1}
    lineage         free object (config, input hashes, run folder ...)
    files           {relative path: sha256 hex} of every file but manifest.json and manifest.sig
                    (the file's own bytes, as it is extracted on board)
    encoding        optional {relative path: "xz"}: files stored xz-compressed in the archive
                    (decoded on reading, their sha256 checked on the decoded bytes); absent or
                    unlisted: stored as they are. shared.bundle.build_bundle writes it.

Every integer and string is bounded (shared.limits): `version` and `parent.version` 1..2^53-1,
`model_id` and class names at most 64 characters, at most 64 bands and 256 classes, `tile_size`
1..8192, `opening_radius` 0..64, policy priorities 0..2^31-1, and anywhere else (metrics,
lineage) integers in int64, finite floats, strings of at most 4096 characters, 32 levels: a
signed manifest the daemon could not put in a reply is refused by build, verify and install alike.

A **chain** manifest (issue 16: a gate model, then models that run only where the earlier ones
allow) carries `chain` in place of `input`, `output`, `postprocess`, `reference`, `precision`
and `profile`; each step is an ordinary single-model bundle, extracted under `steps/<name>/`
with its own signed manifest.json and manifest.sig, all listed in `files`::

    chain           {"steps": [{"name": "cloud", "dir": "steps/cloud"},
                               {"name": "ship", "dir": "steps/ship",
                                "run_if": {"class": "cloud", "fraction_below": 0.5}}]}
                    2..4 steps (MIN/MAX_CHAIN_STEPS), names [a-z0-9_-]{1,32} and unique, `dir`
                    exactly "steps/<name>"; the first step (the gate) has no `run_if`, every later
                    one has one shared.policy `if` block (same condition kinds)
    policy          the keep/discard policy over the classes of every step
    files           every file of every step folder (steps/<name>/manifest.json, .sig, model.xml,
                    ...); nothing outside them
    metrics, lineage, encoding   optional, as above

What needs the steps' own manifests (class names unique across steps, a `run_if` naming a
class of an earlier step, the policy's classes) is checked by `shared.chain.check_chain`.

`validate_manifest` raises `ManifestError` whose message starts with the path of the offending
field (`input.scaling.std[3]: must be > 0`). `make_manifest` fills defaults and file hashes.
"""
from __future__ import annotations

import json
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping

from shared.bands import S2_BANDS, canonical_band
from shared.errors import ManifestError, PolicyError, UnknownBandError
from shared.hashing import sha256_file
from shared.limits import (MAX_BANDS, MAX_CHAIN_STEPS, MAX_CLASSES, MAX_NAME_CHARS,
                           MAX_OPENING_RADIUS, MAX_SOURCE_CHARS, MAX_STEP_NAME_CHARS,
                           MAX_TILE_SIZE, MAX_VERSION, MIN_CHAIN_STEPS, quote, str_problem,
                           tree_problem)
from shared.policy import DEFAULT_POLICY, validate_policy
from shared.profiles import DEFAULT_PROFILE, PROFILES

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
MODEL_XML = "model.xml"
MODEL_BIN = "model.bin"
REFERENCE_NAME = "reference.npz"
RESERVED_NAMES = (MANIFEST_NAME, SIGNATURE_NAME)

ACTIVATIONS = ("softmax", "sigmoid", "none")
DTYPES = ("float32",)
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
DEFAULT_PRECISION = "fp32"     # what a manifest without `precision` was validated at
# How each precision runs in OpenVINO, for the ground and the daemon alike: the inference
# precision hint (int8: the IR's FakeQuantize nodes run as int8 kernels, the rest at f32) and
# the device capability (OPTIMIZATION_CAPABILITIES) it needs.
INFERENCE_HINTS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "f32"}
REQUIRED_CAPABILITY = {"fp32": "FP32", "fp16": "FP16", "bf16": "BF16", "int8": "INT8"}
FRAME_GSD_M = 10.0        # the pixel size frames arrive at (Sentinel-2's 10 m bands)
MAX_GSD_FACTOR = 8
DEFAULT_REFERENCE = {"file": REFERENCE_NAME, "max_abs_diff": 1e-2, "min_mask_agreement": 0.99}

_MODEL_ID = re.compile(r"^[a-z0-9._-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

_TOP_FIELDS = {
    "format_version", "model_id", "version", "parent", "created", "input", "output",
    "postprocess", "policy", "metrics", "reference", "lineage", "files", "precision", "profile",
    "encoding",
}
_OPTIONAL_FIELDS = {"precision", "profile", "encoding"}
_CHAIN_FIELDS = {
    "format_version", "model_id", "version", "parent", "created", "chain", "policy", "files",
    "encoding", "metrics", "lineage",
}
_CHAIN_OPTIONAL_FIELDS = {"encoding", "metrics", "lineage"}
STEPS_DIR = "steps"                 # a chain bundle's step folders: steps/<name>/
_STEP_NAME = re.compile(r"^[a-z0-9_-]+$")
ENCODINGS = ("xz",)            # how a file may be stored in the archive (shared.bundle)


# ---------------------------------------------------------------------------------------------
# Small checkers: each raises ManifestError(field, ...) and returns the value
# ---------------------------------------------------------------------------------------------

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _obj(m: Any, field: str, allowed: set[str] | None = None,
         required: Iterable[str] = ()) -> dict:
    if not isinstance(m, dict):
        raise ManifestError(field or "manifest", f"must be an object, got {type(m).__name__}")
    prefix = f"{field}." if field else ""
    for key in required:
        if key not in m:
            raise ManifestError(f"{prefix}{key}", "missing")
    if allowed is not None:
        for key in m:
            if key not in allowed:
                raise ManifestError(f"{prefix}{key}",
                                    f"unknown field (expected {', '.join(sorted(allowed))})")
    return m


MAX_MANIFEST_VALUES = 100_000      # numbers and strings of one manifest (metrics, lineage...)


def _int(v: Any, field: str, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ManifestError(field, f"must be an integer, got {quote(v)}")
    if minimum is not None and v < minimum:
        raise ManifestError(field, f"must be >= {minimum}, got {quote(v)}")
    if maximum is not None and v > maximum:
        raise ManifestError(field, f"must be <= {maximum}, got {quote(v)}")
    return v


def _num(v: Any, field: str, lo: float | None = None, hi: float | None = None) -> float:
    if not _is_number(v):
        raise ManifestError(field, f"must be a finite number, got {quote(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"{lo:g}..{hi:g}" if lo is not None and hi is not None else (
            f">= {lo:g}" if lo is not None else f"<= {hi:g}")
        raise ManifestError(field, f"must be {rng}, got {v!r}")
    return float(v)


def _str(v: Any, field: str, limit: int = MAX_SOURCE_CHARS) -> str:
    if not isinstance(v, str) or not v:
        raise ManifestError(field, f"must be a non-empty string, got {quote(v)}")
    problem = str_problem(v, limit)
    if problem:
        raise ManifestError(field, problem)
    return v


def _unique_strings(v: Any, field: str, max_items: int) -> list[str]:
    if not isinstance(v, list) or not v:
        raise ManifestError(field, "must be a non-empty list")
    if len(v) > max_items:
        raise ManifestError(field, f"more than {max_items} items ({len(v)})")
    seen: set[str] = set()
    for i, item in enumerate(v):
        _str(item, f"{field}[{i}]", MAX_NAME_CHARS)
        if item in seen:
            raise ManifestError(f"{field}[{i}]", f"duplicate {item!r}")
        seen.add(item)
    return v


def safe_relative_path(name: Any) -> bool:
    """A plain relative POSIX path inside the bundle: no absolute path, no `..`, no `\\`."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        return False
    p = PurePosixPath(name)
    return not p.is_absolute() and all(part not in ("", ".", "..") for part in name.split("/"))


def parse_time(value: Any, field: str = "created") -> datetime:
    if not isinstance(value, str) or len(value) > 64:
        raise ManifestError(field, f"must be an ISO 8601 time string, got {quote(value)}")
    try:
        # Python 3.10 does not read a trailing "Z"
        return datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
    except ValueError:
        raise ManifestError(field, f"not an ISO 8601 time: {quote(value)}") from None


def _numbers_tree(v: Any, field: str) -> None:
    if isinstance(v, dict):
        for k, item in v.items():
            _numbers_tree(item, f"{field}.{k}")
    elif not _is_number(v):
        raise ManifestError(field, f"must be a number (or an object of numbers), got {quote(v)}")


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

def _check_input(inp: Any) -> None:
    _obj(inp, "input", {"bands", "dtype", "scaling", "tile_size", "overlap", "gsd_m"},
         ("bands", "dtype", "scaling", "tile_size", "overlap"))
    if "gsd_m" in inp:
        gsd_factor(inp)
    bands = _unique_strings(inp["bands"], "input.bands", MAX_BANDS)
    for i, name in enumerate(bands):
        if name not in S2_BANDS:
            try:
                hint = f"; write {canonical_band(name)!r}"
            except UnknownBandError:
                hint = f" (expected one of {' '.join(S2_BANDS)})"
            raise ManifestError(f"input.bands[{i}]", f"{name!r} is not a canonical Sentinel-2 band name{hint}")
    if inp["dtype"] not in DTYPES:
        raise ManifestError("input.dtype", f"must be one of {', '.join(DTYPES)}, got {quote(inp['dtype'])}")
    scaling = _obj(inp["scaling"], "input.scaling", {"mean", "std"}, ("mean", "std"))
    for key in ("mean", "std"):
        values = scaling[key]
        field = f"input.scaling.{key}"
        if not isinstance(values, list):
            raise ManifestError(field, "must be a list of numbers, one per band")
        if len(values) != len(bands):
            raise ManifestError(field, f"has {len(values)} values for {len(bands)} bands")
        for i, v in enumerate(values):
            _num(v, f"{field}[{i}]")
            if key == "std" and v <= 0:
                raise ManifestError(f"{field}[{i}]", f"must be > 0, got {v!r}")
    tile = _int(inp["tile_size"], "input.tile_size", minimum=1, maximum=MAX_TILE_SIZE)
    overlap = _int(inp["overlap"], "input.overlap", minimum=0)
    if overlap >= tile:
        raise ManifestError("input.overlap", f"must be < tile_size ({tile}), got {overlap}")


def _check_output(out: Any) -> list[str]:
    _obj(out, "output", {"classes", "activation"}, ("classes", "activation"))
    classes = _unique_strings(out["classes"], "output.classes", MAX_CLASSES)
    if out["activation"] not in ACTIVATIONS:
        raise ManifestError("output.activation",
                            f"must be one of {', '.join(ACTIVATIONS)}, got {quote(out['activation'])}")
    return classes


def _check_postprocess(post: Any, classes: list[str]) -> None:
    _obj(post, "postprocess", {"threshold", "opening_radius"}, ("threshold", "opening_radius"))
    thr = _obj(post["threshold"], "postprocess.threshold")
    for cls, value in thr.items():
        if cls not in classes:
            raise ManifestError(f"postprocess.threshold.{cls}",
                                f"unknown class {cls!r} (classes: {', '.join(classes)})")
        _num(value, f"postprocess.threshold.{cls}", 0.0, 1.0)
    _int(post["opening_radius"], "postprocess.opening_radius", minimum=0, maximum=MAX_OPENING_RADIUS)


def _check_files(files: Any, required: Iterable[str] = (MODEL_XML, MODEL_BIN)) -> None:
    _obj(files, "files")
    for name, digest in files.items():
        field = f"files[{name!r}]"
        if not safe_relative_path(name):
            raise ManifestError(field, "must be a relative path inside the bundle (no '/', '..', '\\')")
        if name in RESERVED_NAMES:
            raise ManifestError(field, f"{name} is not listed in files (it holds them)")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise ManifestError(field, f"must be a lowercase sha256 hex digest, got {quote(digest)}")
    for name in required:
        if name not in files:
            what = "the OpenVINO IR" if name in (MODEL_XML, MODEL_BIN) else "a chain step's signed manifest"
            raise ManifestError("files", f"must list {name} ({what})")


def _check_encoding(enc: Any, files: dict) -> None:
    _obj(enc, "encoding")
    for name, how in enc.items():
        if name not in files:
            raise ManifestError(f"encoding[{name!r}]", "is not listed in files")
        if how not in ENCODINGS:
            raise ManifestError(f"encoding[{name!r}]", f"must be one of {', '.join(ENCODINGS)}, got {quote(how)}")


def _check_reference(ref: Any, files: dict) -> None:
    _obj(ref, "reference", {"file", "max_abs_diff", "min_mask_agreement"},
         ("file", "max_abs_diff", "min_mask_agreement"))
    name = _str(ref["file"], "reference.file")
    if name not in files:
        raise ManifestError("reference.file", f"{name!r} is not listed in files")
    _num(ref["max_abs_diff"], "reference.max_abs_diff", lo=0.0)
    _num(ref["min_mask_agreement"], "reference.min_mask_agreement", 0.0, 1.0)


def gsd_factor(inp: Mapping[str, Any]) -> int:
    """The binning factor of a manifest's `input` (gsd_m / FRAME_GSD_M, 1 without gsd_m); raises
    ManifestError unless it is a whole number 1..MAX_GSD_FACTOR."""
    if "gsd_m" not in inp:
        return 1
    gsd = _num(inp["gsd_m"], "input.gsd_m")
    factor = gsd / FRAME_GSD_M
    if not (1 <= factor <= MAX_GSD_FACTOR and factor == int(factor)):
        raise ManifestError("input.gsd_m", f"must be a whole multiple of {FRAME_GSD_M:g} m up to "
                                           f"{MAX_GSD_FACTOR * FRAME_GSD_M:g} m, got {gsd!r}")
    return int(factor)


def validate_manifest(manifest: Any) -> dict:
    """Check every field of a manifest (a single model's, or a chain's: `chain` present);
    raise ManifestError naming the first bad one.

    Returns the manifest unchanged (so `m = validate_manifest(json.loads(...))` reads well).
    """
    if isinstance(manifest, dict) and "chain" in manifest:
        return _validate_chain_manifest(manifest)
    m = _obj(manifest, "", _TOP_FIELDS, sorted(_TOP_FIELDS - _OPTIONAL_FIELDS))
    _check_header(m)
    _check_input(m["input"])
    classes = _check_output(m["output"])
    _check_postprocess(m["postprocess"], classes)
    _check_policy(m["policy"], classes)
    _numbers_tree(_obj(m["metrics"], "metrics"), "metrics")
    _obj(m["lineage"], "lineage")
    _check_files(m["files"])
    _check_reference(m["reference"], m["files"])
    if "encoding" in m:
        _check_encoding(m["encoding"], m["files"])
    if "precision" in m and m["precision"] not in PRECISIONS:
        raise ManifestError("precision", f"must be one of {', '.join(PRECISIONS)}, "
                                         f"got {quote(m['precision'])}")
    _check_profile(m.get("profile", DEFAULT_PROFILE), manifest_precision(m))
    _check_bounds(m)
    return m


def _check_header(m: dict) -> None:
    """format_version, model_id, version, parent, created: the same for a model and a chain."""
    fv = _int(m["format_version"], "format_version")
    if fv != FORMAT_VERSION:
        raise ManifestError("format_version", f"unsupported format version {fv} (this reads {FORMAT_VERSION})")
    model_id = _str(m["model_id"], "model_id", MAX_NAME_CHARS)
    if not _MODEL_ID.match(model_id):
        raise ManifestError("model_id", f"{model_id!r} may only use a-z 0-9 . _ -")
    version = _int(m["version"], "version", minimum=1, maximum=MAX_VERSION)
    if m["parent"] is not None:
        parent = _obj(m["parent"], "parent", {"model_id", "version"}, ("model_id", "version"))
        pid = _str(parent["model_id"], "parent.model_id", MAX_NAME_CHARS)
        if not _MODEL_ID.match(pid):
            raise ManifestError("parent.model_id", f"{pid!r} may only use a-z 0-9 . _ -")
        pv = _int(parent["version"], "parent.version", minimum=1, maximum=MAX_VERSION)
        if pid == model_id and pv >= version:
            raise ManifestError("parent.version",
                                f"{pv} must be older than this bundle's version {version}")
    parse_time(m["created"])


def _check_policy(policy: Any, classes: Iterable[str] | None, field: str = "policy") -> None:
    try:
        validate_policy(policy, classes=classes, field=field)
    except PolicyError as exc:
        raise ManifestError(exc.field, str(exc).split(": ", 1)[1]) from None


def _check_bounds(m: dict) -> None:
    # The sections check meaning; this sweep bounds every other value (metrics, lineage).
    problem = tree_problem(m, max_items=MAX_MANIFEST_VALUES)
    if problem:
        raise ManifestError(problem[0].lstrip(".") or "manifest", problem[1])


# ---------------------------------------------------------------------------------------------
# Chains
# ---------------------------------------------------------------------------------------------

def run_if_policy(run_if: Mapping[str, Any]) -> dict:
    """A chain step's `run_if` (one shared.policy `if` block) as a policy whose decision is
    "keep" exactly where it holds: validation and evaluation are shared.policy's own."""
    return {"rules": [{"if": dict(run_if), "then": "keep"}], "default": {"then": "discard"}}


def check_run_if(run_if: Any, field: str, classes: Iterable[str] | None = None) -> None:
    """ManifestError naming `field` (`chain.steps[1].run_if.class`) unless `run_if` is one
    `if` block (over `classes` when given)."""
    if not isinstance(run_if, dict):
        raise ManifestError(field, f"must be an object (one policy `if` block), got {quote(run_if)}")
    inner = f"{field}.rules[0].if"
    try:
        validate_policy(run_if_policy(run_if), classes=classes, field=field)
    except PolicyError as exc:
        where = field + exc.field[len(inner):] if exc.field.startswith(inner) else exc.field
        raise ManifestError(where, str(exc).split(": ", 1)[1]) from None


def chain_steps(m: Mapping[str, Any]) -> list[dict]:
    """The steps of a (validated) chain manifest, gate first."""
    return list(m["chain"]["steps"])


def _check_chain(chain: Any) -> list[dict]:
    _obj(chain, "chain", {"steps"}, ("steps",))
    steps = chain["steps"]
    if not isinstance(steps, list) or not MIN_CHAIN_STEPS <= len(steps) <= MAX_CHAIN_STEPS:
        got = len(steps) if isinstance(steps, list) else quote(steps)
        raise ManifestError("chain.steps", f"must be a list of {MIN_CHAIN_STEPS}..{MAX_CHAIN_STEPS} "
                                           f"steps, got {got}")
    seen: dict[str, int] = {}
    for i, step in enumerate(steps):
        field = f"chain.steps[{i}]"
        _obj(step, field, {"name", "dir", "run_if"}, ("name", "dir"))
        name = _str(step["name"], f"{field}.name", MAX_STEP_NAME_CHARS)
        if not _STEP_NAME.match(name):
            raise ManifestError(f"{field}.name", f"{name!r} may only use a-z 0-9 _ -")
        if name in seen:
            raise ManifestError(f"{field}.name", f"duplicate step name {name!r} (step {seen[name]})")
        seen[name] = i
        if step["dir"] != f"{STEPS_DIR}/{name}":
            raise ManifestError(f"{field}.dir", f"must be {STEPS_DIR}/{name!r}, got {quote(step['dir'])}")
        if i == 0 and "run_if" in step:
            raise ManifestError(f"{field}.run_if", "the first step (the gate) runs on the whole "
                                                   "frame: it takes no run_if")
        if i > 0:
            if "run_if" not in step:
                raise ManifestError(f"{field}.run_if", "missing (every step after the gate says "
                                                       "where it runs)")
            check_run_if(step["run_if"], f"{field}.run_if")
    return steps


def _check_chain_files(files: dict, steps: list[dict]) -> None:
    dirs = [step["dir"] + "/" for step in steps]
    _check_files(files, required=[d + name for d in dirs for name in RESERVED_NAMES])
    for name in files:
        if not any(name.startswith(d) for d in dirs):
            raise ManifestError(f"files[{name!r}]", f"outside the step folders ({', '.join(dirs)}): "
                                                    "a chain carries only its steps")


def _validate_chain_manifest(manifest: dict) -> dict:
    m = _obj(manifest, "", _CHAIN_FIELDS, sorted(_CHAIN_FIELDS - _CHAIN_OPTIONAL_FIELDS))
    _check_header(m)
    steps = _check_chain(m["chain"])
    _check_policy(m["policy"], None)        # its classes: shared.chain.check_chain, with the steps
    if "metrics" in m:
        _numbers_tree(_obj(m["metrics"], "metrics"), "metrics")
    if "lineage" in m:
        _obj(m["lineage"], "lineage")
    _check_chain_files(m["files"], steps)
    if "encoding" in m:
        _check_encoding(m["encoding"], m["files"])
    _check_bounds(m)
    return m


def is_chain(manifest: Mapping[str, Any]) -> bool:
    """Whether a (validated) manifest declares a model chain rather than one model."""
    return "chain" in manifest


def _check_profile(name: Any, precision: str) -> None:
    if not isinstance(name, str) or name not in PROFILES:
        raise ManifestError("profile", f"must be one of {', '.join(PROFILES)}, got {name!r}")
    if precision not in PROFILES[name].precisions:
        raise ManifestError("profile", f"{name} does not run {precision} bundles "
                                       f"(it runs {', '.join(PROFILES[name].precisions)})")


def manifest_profile(manifest: Mapping[str, Any]) -> str:
    """The device profile a (validated) manifest was checked against; "cpu-x86" when it does not say."""
    return manifest.get("profile", DEFAULT_PROFILE)


def manifest_precision(manifest: Mapping[str, Any]) -> str:
    """The precision a (validated) manifest was validated at; "fp32" when it does not say."""
    return manifest.get("precision", DEFAULT_PRECISION)


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------

def hash_files(files: Mapping[str, str | os.PathLike]) -> dict[str, str]:
    """{arcname: sha256} for {arcname: path}; a missing file names both."""
    out = {}
    for name, path in sorted(files.items()):
        if not Path(path).is_file():
            raise FileNotFoundError(f"file for {name!r} not found: {path}")
        out[name] = sha256_file(path)
    return out


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def fill_defaults(partial: Mapping[str, Any],
                  files: Mapping[str, str | os.PathLike] | None = None) -> dict:
    """A complete manifest from a partial one: format_version, created (now, UTC), parent null,
    empty metrics/lineage, the default policy and reference, precision "fp32", and `files`
    hashed when given.
    Fields already present are kept. Does not validate (call `validate_manifest`)."""
    m = json.loads(json.dumps(dict(partial)))   # deep copy; also proves it is JSON
    m.setdefault("format_version", FORMAT_VERSION)
    m.setdefault("parent", None)
    m.setdefault("created", utc_now())
    m.setdefault("policy", json.loads(json.dumps(DEFAULT_POLICY)))
    m.setdefault("metrics", {})
    m.setdefault("lineage", {})
    m.setdefault("reference", dict(DEFAULT_REFERENCE))
    m.setdefault("precision", DEFAULT_PRECISION)
    post = m.setdefault("postprocess", {})
    if isinstance(post, dict):
        post.setdefault("threshold", {})
        post.setdefault("opening_radius", 2)
    inp = m.get("input")
    if isinstance(inp, dict):
        inp.setdefault("dtype", "float32")
    out = m.get("output")
    if isinstance(out, dict):
        out.setdefault("activation", "softmax")
    if files is not None:
        m["files"] = hash_files(files)
    else:
        m.setdefault("files", {})
    return m


def make_manifest(*, model_id: str, version: int, bands: Iterable[str],
                  mean: Iterable[float], std: Iterable[float], classes: Iterable[str],
                  tile_size: int = 256, overlap: int = 32, activation: str = "softmax",
                  threshold: Mapping[str, float] | None = None, opening_radius: int = 2,
                  policy: dict | None = None, metrics: dict | None = None,
                  reference: dict | None = None, lineage: dict | None = None,
                  parent: dict | None = None, created: str | None = None,
                  files: Mapping[str, str | os.PathLike] | None = None,
                  precision: str = DEFAULT_PRECISION, profile: str = DEFAULT_PROFILE,
                  gsd_m: float | None = None) -> dict:
    """A validated manifest from plain arguments; band aliases (`B2`, `NIR`) become canonical,
    and `files` ({arcname: path}) is hashed. `precision` is the one the reference outputs and
    tolerances were computed at (one of PRECISIONS); `profile` the device profile the IR was checked
    against (shared.profiles). Raises ManifestError naming a bad field."""
    try:
        canon = [canonical_band(b) for b in bands]
    except UnknownBandError as exc:
        raise ManifestError("input.bands", str(exc)) from None
    partial = {
        "model_id": model_id, "version": version, "parent": parent,
        "input": {"bands": canon, "dtype": "float32",
                  "scaling": {"mean": [float(v) for v in mean], "std": [float(v) for v in std]},
                  "tile_size": tile_size, "overlap": overlap,
                  **({} if gsd_m is None else {"gsd_m": float(gsd_m)})},
        "output": {"classes": list(classes), "activation": activation},
        "postprocess": {"threshold": dict(threshold or {}), "opening_radius": opening_radius},
        "precision": precision,
        "profile": profile,
    }
    for key, value in (("policy", policy), ("metrics", metrics), ("reference", reference),
                       ("lineage", lineage), ("created", created)):
        if value is not None:
            partial[key] = value
    return validate_manifest(fill_defaults(partial, files))


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The canonical encoding that gets signed: UTF-8 JSON, sorted keys, 2-space indent."""
    return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False,
                       allow_nan=False) + "\n").encode("utf-8")


def parse_manifest(data: bytes, source: str = MANIFEST_NAME) -> dict:
    """Decode and validate manifest bytes; a decoding error names `source`."""
    try:
        m = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError("", f"{source}: not valid UTF-8 JSON ({exc})") from None
    return validate_manifest(m)
