"""Device profiles (shared.profiles) and the manifest's `profile` field."""
from __future__ import annotations

import pytest

from shared.errors import ManifestError, UnknownProfile
from shared.manifest import make_manifest, manifest_profile, validate_manifest
from shared.profiles import DEFAULT_PROFILE, PROFILES, get_profile, version_tuple


def test_the_four_targets_are_there():
    assert set(PROFILES) == {"cpu-x86", "rpi4", "rpi5", "myriadx"}
    assert get_profile("rpi5").computes == "f16" and get_profile("rpi4").computes == "f32"


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(UnknownProfile, match="cpu-x86, rpi4, rpi5, myriadx") as exc:
        get_profile("jetson")
    assert exc.value.code == "unknown_profile"


def test_myriadx_refuses_new_opsets_and_ops_its_plugin_lacks():
    m = get_profile("myriadx")
    assert "opset1..opset10" in m.refusal("MaxPool", 14)
    assert m.refusal("MaxPool", 8) is None
    assert "Interpolate-1, Interpolate-4" in m.refusal("Interpolate", 5)
    assert m.refusal("Interpolate", 4) is None
    assert "not run by MYRIAD" in m.refusal("NonMaxSuppression", 9)
    assert "standard opset" in m.refusal("MyCustomOp", None)
    assert get_profile("cpu-x86").refusal("MaxPool", 14) is None


def test_runtime_ranges():
    m = get_profile("myriadx")
    assert m.runtime_accepts("2022.3.2-9279-e2c7e4d7b4d-releases/2022/3")
    assert not m.runtime_accepts("2026.4.1-22982-e213a147257-releases/2026/4")
    assert get_profile("rpi5").runtime_accepts("2026.4.1")
    assert version_tuple("2022.3.2-9279") == (2022, 3, 2)


def _manifest(**kw):
    files = kw.pop("files")
    return make_manifest(model_id="m", version=1, bands=["B02"], mean=[0.1], std=[0.1],
                         classes=["clear", "cloud"], files=files, **kw)


@pytest.fixture
def files(tmp_path):
    for name in ("model.xml", "model.bin", "reference.npz"):
        (tmp_path / name).write_bytes(b"x")
    return {n: tmp_path / n for n in ("model.xml", "model.bin", "reference.npz")}


def test_manifest_records_the_profile(files):
    m = _manifest(files=files, profile="myriadx")
    assert manifest_profile(m) == "myriadx"
    old = dict(m)
    del old["profile"]                       # a bundle made before the field existed
    assert manifest_profile(validate_manifest(old)) == DEFAULT_PROFILE


def test_manifest_refuses_an_unknown_profile_or_a_precision_it_cannot_run(files):
    m = _manifest(files=files)
    with pytest.raises(ManifestError, match="profile: must be one of"):
        validate_manifest({**m, "profile": "jetson"})
    with pytest.raises(ManifestError, match="profile: rpi4 does not run bf16"):
        validate_manifest({**m, "profile": "rpi4", "precision": "bf16"})
