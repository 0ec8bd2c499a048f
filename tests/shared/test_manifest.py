"""The manifest schema: every bad field is refused with its path in the message."""
from __future__ import annotations

import copy
import hashlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.manifest import (DEFAULT_REFERENCE, ManifestError, fill_defaults, make_manifest,
                             manifest_bytes, manifest_precision, parse_manifest, validate_manifest)

SHA = "ab" * 32


_good = fill_defaults({
    "model_id": "cloudmask-6b", "version": 4, "parent": {"model_id": "cloudmask-6b", "version": 3},
    "created": "2026-03-01T12:00:00Z",
    "input": {"bands": ["B02", "B03", "B04", "B08", "B11", "B12"],
              "scaling": {"mean": [0.1, 0.1, 0.1, 0.2, 0.2, 0.1], "std": [0.1] * 6},
              "tile_size": 256, "overlap": 32},
    "output": {"classes": ["clear", "cloud", "shadow"]},
    "postprocess": {"threshold": {"cloud": 0.4, "shadow": 0.6}, "opening_radius": 2},
    "policy": {"rules": [{"if": {"class": "cloud", "fraction_above": 0.7}, "then": "discard"}],
               "default": {"then": "keep", "priority": 5}},
    "metrics": {"miou": 0.77, "iou": {"cloud": 0.75}},
    "files": {"model.xml": SHA, "model.bin": SHA, "reference.npz": SHA},
})


def test_a_complete_manifest_validates():
    m = validate_manifest(copy.deepcopy(_good))
    assert m["format_version"] == 1 and m["output"]["activation"] == "softmax"
    assert m["input"]["dtype"] == "float32" and m["reference"] == DEFAULT_REFERENCE
    assert m["lineage"] == {}


def test_make_manifest_canonicalises_bands_and_hashes_files(tmp_path):
    (tmp_path / "model.xml").write_text("<net/>")
    (tmp_path / "model.bin").write_bytes(b"\x00\x01")
    (tmp_path / "reference.npz").write_bytes(b"ref")
    m = make_manifest(model_id="m", version=1, bands=["B2", "Green", "b04", "NIR", "SWIR16", "B12"],
                      mean=[0] * 6, std=[1] * 6, classes=["clear", "cloud"],
                      files={n: tmp_path / n for n in ("model.xml", "model.bin", "reference.npz")})
    assert m["input"]["bands"] == ["B02", "B03", "B04", "B08", "B11", "B12"]
    assert m["files"]["model.bin"] == hashlib.sha256(b"\x00\x01").hexdigest()
    assert m["parent"] is None and m["created"].endswith("+00:00")
    assert m["policy"]["default"] == {"then": "keep", "priority": 5}
    with pytest.raises(ManifestError, match="input.bands: unknown Sentinel-2 band 'B13'"):
        make_manifest(model_id="m", version=1, bands=["B13"], mean=[0], std=[1], classes=["a"],
                      files={n: tmp_path / n for n in ("model.xml", "model.bin", "reference.npz")})


def _set(path: str, value):
    """A copy of the good manifest with the field at dotted `path` set (or deleted for ...)."""
    m = copy.deepcopy(_good)
    keys = path.split(".")
    node = m
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    elif value is ...:
        del node[last]
    else:
        node[last] = value
    return m


@pytest.mark.parametrize("path, value, message", [
    ("input.scaling.std.3", 0.0, "input.scaling.std[3]: must be > 0"),
    ("input.scaling.std.1", -1, "input.scaling.std[1]: must be > 0"),
    ("input.scaling.mean.0", "x", "input.scaling.mean[0]: must be a finite number"),
    ("input.scaling.mean", [0.1] * 5, "input.scaling.mean: has 5 values for 6 bands"),
    ("input.bands.1", "B02", "input.bands[1]: duplicate 'B02'"),
    ("input.bands.0", "B2", "input.bands[0]: 'B2' is not a canonical Sentinel-2 band name; write 'B02'"),
    ("input.bands.0", "B13", "input.bands[0]: 'B13' is not a canonical"),
    ("input.dtype", "uint16", "input.dtype: must be one of float32"),
    ("input.tile_size", 256.0, "input.tile_size: must be an integer"),
    ("input.overlap", 256, "input.overlap: must be < tile_size (256)"),
    ("input.overlap", -1, "input.overlap: must be >= 0"),
    ("input.tile_sise", 3, "input.tile_sise: unknown field"),
    ("input.scaling", ..., "input.scaling: missing"),
    ("output.activation", "relu", "output.activation: must be one of softmax, sigmoid, none"),
    ("output.classes", [], "output.classes: must be a non-empty list"),
    ("postprocess.threshold.snow", 0.5, "postprocess.threshold.snow: unknown class 'snow'"),
    ("postprocess.threshold.cloud", 1.5, "postprocess.threshold.cloud: must be 0..1"),
    ("postprocess.opening_radius", -2, "postprocess.opening_radius: must be >= 0"),
    ("format_version", 2, "format_version: unsupported format version 2"),
    ("model_id", "Cloud Mask", "model_id: 'Cloud Mask' may only use a-z 0-9 . _ -"),
    ("version", 0, "version: must be >= 1"),
    ("version", True, "version: must be an integer"),
    ("parent.version", 4, "parent.version: 4 must be older than this bundle's version 4"),
    ("parent.model_id", ..., "parent.model_id: missing"),
    ("created", "yesterday", "created: not an ISO 8601 time"),
    ("metrics.miou", "high", "metrics.miou: must be a number"),
    ("metrics.iou.cloud", None, "metrics.iou.cloud: must be a number"),
    ("lineage", [], "lineage: must be an object"),
    ("policy.rules.0.if.class", "shipp", "policy.rules[0].if.class: unknown class 'shipp'"),
    ("policy.default.then", "maybe", "policy.default.then: must be one of keep, discard"),
    ("reference.file", "other.npz", "reference.file: 'other.npz' is not listed in files"),
    ("reference.min_mask_agreement", 2, "reference.min_mask_agreement: must be 0..1"),
    ("reference.max_abs_diff", -0.1, "reference.max_abs_diff: must be >= 0"),
    ("extra", 1, "extra: unknown field"),
    ("precision", "fp64", "precision: must be one of fp32, fp16, bf16, int8, got 'fp64'"),
    ("precision", "INT8", "precision: must be one of fp32, fp16, bf16, int8"),
    ("precision", None, "precision: must be one of"),
    ("files", ..., "files: missing"),
])
def test_each_bad_field_is_named(path, value, message):
    with pytest.raises(ManifestError) as exc:
        validate_manifest(_set(path, value))
    assert str(exc.value).startswith(message), str(exc.value)
    assert exc.value.field == message.split(":")[0]


@pytest.mark.parametrize("files, message", [
    ({"model.xml": SHA, "reference.npz": SHA}, "files: must list model.bin"),
    ({"model.xml": SHA, "model.bin": "ABC", "reference.npz": SHA},
     "files['model.bin']: must be a lowercase sha256 hex digest"),
    ({"model.xml": SHA, "model.bin": SHA, "reference.npz": SHA, "../etc/passwd": SHA},
     "files['../etc/passwd']: must be a relative path"),
    ({"model.xml": SHA, "model.bin": SHA, "reference.npz": SHA, "/abs": SHA},
     "files['/abs']: must be a relative path"),
    ({"model.xml": SHA, "model.bin": SHA, "reference.npz": SHA, "manifest.sig": SHA},
     "files['manifest.sig']: manifest.sig is not listed"),
])
def test_files_field(files, message):
    m = copy.deepcopy(_good)
    m["files"] = files
    with pytest.raises(ManifestError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_manifest(m)


def test_parse_and_canonical_bytes_round_trip():
    raw = manifest_bytes(_good)
    assert parse_manifest(raw) == _good
    assert manifest_bytes(json.loads(raw)) == raw          # canonical: stable under re-encoding
    with pytest.raises(ManifestError, match="^manifest: must be an object, got list"):
        parse_manifest(b"[1, 2]")
    with pytest.raises(ManifestError, match="manifest.json: not valid UTF-8 JSON"):
        parse_manifest(b"{nope")
    with pytest.raises(ManifestError, match="input.scaling.std\\[0\\]: must be a finite number"):
        parse_manifest(json.dumps(_set("input.scaling.std.0", float("nan"))).encode())


def test_precision_is_optional_fp32_and_set_by_make_manifest(tmp_path):
    older = _set("precision", ...)                     # a bundle made before the field existed
    assert "precision" not in validate_manifest(older) and manifest_precision(older) == "fp32"
    assert _good["precision"] == "fp32"                # fill_defaults writes it
    for name in ("model.xml", "model.bin", "reference.npz"):
        (tmp_path / name).write_bytes(name.encode())
    files = {n: tmp_path / n for n in ("model.xml", "model.bin", "reference.npz")}
    common = dict(model_id="m", version=1, bands=["B02"], mean=[0], std=[1], classes=["a", "b"],
                  files=files)
    assert make_manifest(**common)["precision"] == "fp32"
    m = make_manifest(**common, precision="int8")
    assert m["precision"] == "int8" and manifest_precision(m) == "int8"
    with pytest.raises(ManifestError, match="^precision: must be one of") as exc:
        make_manifest(**common, precision="fp64")
    assert exc.value.field == "precision"


def test_fill_defaults_keeps_given_fields():
    m = fill_defaults({"reference": {"file": "r.npz", "max_abs_diff": 0, "min_mask_agreement": 1},
                       "output": {"classes": ["a"], "activation": "sigmoid"}})
    assert m["reference"]["file"] == "r.npz" and m["output"]["activation"] == "sigmoid"
    assert m["postprocess"] == {"threshold": {}, "opening_radius": 2}


# Any JSON value dropped anywhere into a good manifest gives ManifestError or passes: never a
# KeyError, TypeError or AttributeError escaping to the daemon.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=True) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


ALL_PATHS = [p for p in _paths(_good) if p]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ALL_PATHS), json_values)
def test_random_values_anywhere_only_raise_manifest_error(path, value):
    m = copy.deepcopy(_good)
    node = m
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    try:
        validate_manifest(m)
    except ManifestError as exc:
        assert str(exc).split(":")[0]          # every message starts with a field path


def test_every_precision_has_a_hint_and_a_capability():
    """The ground and the daemon compile from these two maps: they cover the same precisions."""
    from shared.manifest import INFERENCE_HINTS, PRECISIONS, REQUIRED_CAPABILITY
    assert set(INFERENCE_HINTS) == set(REQUIRED_CAPABILITY) == set(PRECISIONS)
