"""The model store: verify -> stage -> self-test -> atomic activation -> rollback, on real
signed bundles holding real OpenVINO IRs (tests/onboard_models.py), run by the real pipeline.

The bundle helpers here (`BundleFactory`) are shared with tests/test_daemon.py.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from onboard_models import (BANDS_6, CLASSES_3, make_int8_test_model_files, make_test_manifest,
                            make_test_model_files, synthetic_frame)
from shared.bundle import build_bundle
from shared.keys import generate_keypair

TILE = 64
# A hung OpenVINO call or socket wait fails its test instead of stalling the suite.
pytestmark = pytest.mark.timeout(180)


class BundleFactory:
    """Real signed bundles of the brightness->cloud test model, and damaged variants."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.private, self.public = generate_keypair(self.root / "keys")
        self.other_private, _ = generate_keypair(self.root / "other-keys")
        self._n = 0

    def build(self, version: int, *, model_id: str = "cloud-test", reference_gain: float | None = None,
              private=None, policy: dict | None = None, precision: str = "fp32") -> Path:
        """A bundle declaring `precision` (its reference stays what the fp32 model computes:
        for bundles a test expects refused, or run at an fp32 override)."""
        self._n += 1
        folder = self.root / f"files-{self._n}"
        files = make_test_model_files(folder, bands=BANDS_6, classes=CLASSES_3, tile=TILE,
                                      reference_gain=reference_gain, n_reference=2)
        return self._sign(version, files, model_id, private, policy, precision)

    def int8(self, version: int, *, model_id: str = "cloud-test") -> Path:
        """A bundle validated at int8: an NNCF-quantised IR and its own reference outputs."""
        self._n += 1
        files = make_int8_test_model_files(self.root / f"files-{self._n}", bands=BANDS_6,
                                           classes=CLASSES_3, tile=TILE, n_reference=2)
        return self._sign(version, files, model_id, None, None, "int8")

    def _sign(self, version: int, files: dict, model_id: str, private, policy: dict | None,
              precision: str) -> Path:
        manifest = make_test_manifest(files, model_id=model_id, version=version, tile=TILE,
                                      overlap=8, policy=policy, precision=precision)
        out = self.root / f"{model_id}-v{version}-{self._n}.tar"
        return build_bundle(out, files, manifest, private or self.private)

    def tampered(self, version: int) -> Path:
        """A signed bundle with one byte of model.bin flipped after signing."""
        path = self.build(version)
        data = bytearray(path.read_bytes())
        with tarfile.open(path) as tf:
            member = tf.getmember("model.bin")
        data[member.offset_data + member.size // 2] ^= 0xFF
        out = path.with_name(path.stem + "-tampered.tar")
        out.write_bytes(bytes(data))
        return out

    def unsigned(self, version: int) -> Path:
        """The same archive without manifest.sig."""
        path = self.build(version)
        out = path.with_name(path.stem + "-unsigned.tar")
        with tarfile.open(path) as src, tarfile.open(out, "w") as dst:
            for member in src.getmembers():
                if member.name != "manifest.sig":
                    dst.addfile(member, io.BytesIO(src.extractfile(member).read()))
        return out

    def self_test_failing(self, version: int) -> Path:
        """Signed and intact, but its reference outputs are not what its model computes."""
        return self.build(version, reference_gain=10.0)

    def wrong_key(self, version: int) -> Path:
        return self.build(version, private=self.other_private)


def frame(kind: str, size: int = 96) -> tuple[np.ndarray, list[str]]:
    """A uint16 frame whose truth is known: 'cloudy' (all cloud) or 'clear' (some shadow)."""
    if kind == "cloudy":
        data, _ = synthetic_frame(BANDS_6, size, size, clouds=[(0, size, 0, size)])
    else:
        data, _ = synthetic_frame(BANDS_6, size, size, shadows=[(0, size // 3, 0, size // 3)])
    return data, list(BANDS_6)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> BundleFactory:
    return BundleFactory(tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="module")
def v1(bundles) -> Path:
    return bundles.build(1)


@pytest.fixture(scope="module")
def v2(bundles) -> Path:
    return bundles.build(2)


def open_store(root: Path, bundles: BundleFactory):
    from onboard.store import ModelStore
    return ModelStore(root, bundles.public)


def slot_names(root: Path) -> set[str]:
    return {p.name for p in (root / "slots").iterdir()}


def test_install_activates_and_survives_reopening(tmp_path, bundles, v1):
    store = open_store(tmp_path / "store", bundles)
    assert store.active() is None
    result = store.install(v1)
    assert result.ok, result.reason
    assert (result.code, result.model_id, result.version) == ("installed", "cloud-test", 1)
    assert result.self_test["ok"] and result.self_test["max_abs_diff"] < 1e-2
    assert json.loads(json.dumps(result.as_dict()))["slot"] == result.slot
    state = json.loads((tmp_path / "store" / "state.json").read_text())
    assert state["active"] == result.slot and state["previous"] is None
    assert not list((tmp_path / "store").glob(".*.tmp")), "temporary state file left behind"

    # A new process (a restart) finds the same active model, re-checks it, and it decides.
    again = open_store(tmp_path / "store", bundles)
    info, pipeline = again.load_active()
    assert (info.model_id, info.version, info.slot) == ("cloud-test", 1, result.slot)
    cloudy = pipeline.process(*frame("cloudy"), scale=1e-4)
    clear = pipeline.process(*frame("clear"), scale=1e-4)
    assert cloudy.keep is False and clear.keep is True


def test_newer_install_keeps_previous_and_rollback_swaps(tmp_path, bundles, v1, v2):
    store = open_store(tmp_path / "store", bundles)
    assert store.install(v1).ok
    result = store.install(v2)
    assert result.ok and result.version == 2 and result.previous["version"] == 1
    assert (store.active().version, store.previous().version) == (2, 1)
    assert len(slot_names(tmp_path / "store")) == 2

    back = store.rollback()
    assert back.ok and back.code == "rolled_back" and back.version == 1
    assert (store.active().version, store.previous().version) == (1, 2)
    assert back.pipeline.process(*frame("cloudy"), scale=1e-4).keep is False
    # The rollback is on disk: a restart comes back with version 1.
    assert open_store(tmp_path / "store", bundles).active().version == 1
    # A second rollback undoes the first.
    assert store.rollback().version == 2


@pytest.mark.parametrize("kind, code", [
    ("tampered", "checksum_mismatch"),
    ("unsigned", "missing_signature"),
    ("older", "version_too_old"),
    ("same", "version_too_old"),
    ("wrong_key", "wrong_key"),
    ("self_test_failing", "self_test_failed"),
])
def test_refused_bundle_leaves_active_model_serving(tmp_path, bundles, v1, v2, kind, code):
    store = open_store(tmp_path / "store", bundles)
    assert store.install(v1).ok and store.install(v2).ok
    before_state = (tmp_path / "store" / "state.json").read_bytes()
    before_slots = slot_names(tmp_path / "store")
    bad = {"tampered": lambda: bundles.tampered(3), "unsigned": lambda: bundles.unsigned(3),
           "older": lambda: v1, "same": lambda: bundles.build(2),
           "wrong_key": lambda: bundles.wrong_key(3),
           "self_test_failing": lambda: bundles.self_test_failing(3)}[kind]()
    result = store.install(bad)
    assert not result.ok
    assert result.code == code, result.reason
    assert result.reason                              # says why, in words
    assert result.active["version"] == 2              # and what still serves
    if kind == "self_test_failing":
        assert result.self_test["ok"] is False and result.self_test["max_abs_diff"] > 1e-2
    if kind in ("older", "same"):
        assert "not newer than version 2" in result.reason
    # Nothing changed on disk: same state, no staged slot left behind.
    assert (tmp_path / "store" / "state.json").read_bytes() == before_state
    assert slot_names(tmp_path / "store") == before_slots
    info, pipeline = open_store(tmp_path / "store", bundles).load_active()
    assert info.version == 2 and pipeline.process(*frame("clear"), scale=1e-4).keep is True


def test_missing_bundle_and_garbage_file_are_refused(tmp_path, bundles):
    store = open_store(tmp_path / "store", bundles)
    assert store.install(tmp_path / "nope.tar").code == "not_found"
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    result = store.install(garbage)
    assert not result.ok and result.code == "not_a_bundle"
    assert store.active() is None


def test_rollback_without_previous_is_refused(tmp_path, bundles, v1):
    store = open_store(tmp_path / "store", bundles)
    assert store.rollback().code == "no_previous"
    assert store.install(v1).ok
    result = store.rollback()
    assert not result.ok and result.code == "no_previous" and result.active["version"] == 1


def test_failed_activation_write_keeps_old_state(tmp_path, bundles, v1, v2, monkeypatch):
    import onboard.store as store_module
    store = open_store(tmp_path / "store", bundles)
    assert store.install(v1).ok

    def disk_full(path, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(store_module, "write_json_atomic", disk_full)
    result = store.install(v2)
    assert not result.ok and result.code == "activation_failed" and "No space" in result.reason
    monkeypatch.undo()
    assert store.active().version == 1
    assert open_store(tmp_path / "store", bundles).active().version == 1
    assert len(slot_names(tmp_path / "store")) == 1


def test_interrupted_install_debris_is_removed_at_open(tmp_path, bundles, v1):
    store = open_store(tmp_path / "store", bundles)
    assert store.install(v1).ok
    debris = tmp_path / "store" / "slots" / "cloud-test-v2-deadbeef"
    debris.mkdir()
    (debris / "model.bin").write_bytes(b"half written")
    open_store(tmp_path / "store", bundles)
    assert not debris.exists()
    assert store.active().version == 1


def test_corrupt_active_slot_is_caught_at_start(tmp_path, bundles, v1, v2):
    from onboard.store import StoreError
    store = open_store(tmp_path / "store", bundles)
    assert store.install(v1).ok and store.install(v2).ok
    model_bin = store.active().path / "model.bin"
    data = bytearray(model_bin.read_bytes())
    data[len(data) // 2] ^= 0x01                      # one bit flipped on disk
    model_bin.write_bytes(bytes(data))
    with pytest.raises(StoreError) as err:
        open_store(tmp_path / "store", bundles).load_active()
    assert err.value.code == "slot_corrupt" and "model.bin" in str(err.value)


def test_daemon_start_falls_back_to_previous_when_active_slot_is_corrupt(tmp_path, bundles, v1, v2):
    # A real daemon process: an in-process Daemon here shared the suite's process with every
    # earlier test's OpenVINO and torch state, and the interpreter crashed at its start-up.
    from test_daemon import DaemonProcess            # test_daemon imports this module
    store = open_store(tmp_path / "store", bundles)
    assert store.install(v1).ok and store.install(v2).ok
    (store.active().path / "model.xml").write_text("<net/>")
    daemon = DaemonProcess(tmp_path, bundles.public)
    try:
        assert daemon.start().ready["model"]["version"] == 1
    finally:
        daemon.cleanup()
    assert open_store(tmp_path / "store", bundles).active().version == 1


def test_policy_override_persists_per_slot(tmp_path, bundles, v1, v2):
    store = open_store(tmp_path / "store", bundles)
    assert store.install(v1).ok
    policy = {"rules": [], "default": {"then": "discard"}}
    store.set_policy_override(policy)
    assert open_store(tmp_path / "store", bundles).policy_override() == policy
    assert store.install(v2).ok
    assert store.policy_override() is None            # a new model brings its own policy
    store.rollback()
    assert store.policy_override() == policy          # and the old one gets its override back


def test_exclusive_store_refuses_a_second_owner(tmp_path, bundles, v1):
    from onboard.store import ModelStore, StoreError
    owner = ModelStore(tmp_path / "store", bundles.public, exclusive=True)
    try:
        with pytest.raises(StoreError) as err:
            ModelStore(tmp_path / "store", bundles.public, exclusive=True)
        assert err.value.code == "store_in_use" and str(os.getpid()) in str(err.value)
        # A reader beside the owner must not mistake the owner's staged slot for debris.
        staged = tmp_path / "store" / "slots" / "staging-0000abcd"
        staged.mkdir()
        ModelStore(tmp_path / "store", bundles.public)
        assert staged.exists()
    finally:
        owner.close()
    ModelStore(tmp_path / "store", bundles.public, exclusive=True).close()   # free again
    assert not staged.exists()


def test_unknown_device_is_a_load_failure_naming_it(tmp_path, bundles, v1):
    from onboard.store import ModelStore
    store = ModelStore(tmp_path / "store", bundles.public, device="MYRIAD")
    result = store.install(v1)
    assert not result.ok and result.code == "load_failed" and "MYRIAD" in result.reason
    assert store.active() is None and slot_names(tmp_path / "store") == set()


# ------------------------------------------------------------------------------ precision
def test_a_bundle_validated_at_int8_installs_and_runs_int8_kernels(tmp_path, bundles):
    from onboard.store import ModelStore
    from onboard_models import is_int8_ir
    store = ModelStore(tmp_path / "store", bundles.public, capabilities=("FP32", "INT8"))
    result = store.install(bundles.int8(1))
    assert result.ok, result.reason
    assert result.self_test["ok"] and result.self_test["precision"] == "int8"
    pipeline = result.pipeline
    assert is_int8_ir(pipeline.model.xml_path)
    assert pipeline.precision.as_dict() == {"declared": "int8", "running": "int8", "overridden": False,
                                            "hint": "f32", "capabilities": ["FP32", "INT8"]}
    assert pipeline.model.properties()["inference_precision_hint"] == "f32"
    # FakeQuantize -> 8-bit integer kernels: i8 on an AVX-512 Xeon, u8 (unsigned activations) on
    # an AVX2 AMD EPYC: never f32
    assert set(pipeline.model.layer_precisions()["Convolution"]) <= {"i8", "u8"}
    decision = pipeline.process(*frame("cloudy"), scale=1e-4)
    assert decision.keep is False and decision.stats["fractions"]["cloud"] > 0.9


def test_a_precision_the_device_cannot_run_is_refused_and_the_active_model_stays(tmp_path, bundles, v1):
    from onboard.store import ModelStore
    store = ModelStore(tmp_path / "store", bundles.public, capabilities=("FP32", "INT8"))
    assert store.install(v1).ok
    before = slot_names(tmp_path / "store")
    result = store.install(bundles.build(2, precision="bf16"))
    assert not result.ok and result.code == "precision_unsupported"
    assert "precision bf16 needs BF16" in result.reason and "FP32, INT8" in result.reason
    assert result.self_test is None                 # refused before compiling anything
    assert store.active().version == 1 and slot_names(tmp_path / "store") == before


def test_the_config_override_compiles_at_its_precision_and_says_so(tmp_path, bundles):
    from onboard.store import ModelStore
    store = ModelStore(tmp_path / "store", bundles.public, precision="fp32",
                       capabilities=("FP32", "INT8"))
    result = store.install(bundles.build(1, precision="bf16"))
    assert result.ok, result.reason
    assert result.pipeline.precision.as_dict() == {"declared": "bf16", "running": "fp32",
                                                   "overridden": True, "hint": "f32",
                                                   "capabilities": ["FP32", "INT8"]}
    assert result.pipeline.model.properties()["inference_precision_hint"] == "f32"
    # An override the device cannot run is refused too, naming the override.
    fp16 = ModelStore(tmp_path / "store16", bundles.public, precision="fp16",
                      capabilities=("FP32", "INT8"))
    refused = fp16.install(bundles.build(1))
    assert refused.code == "precision_unsupported" and "forced by [runtime] precision" in refused.reason


def test_precision_hint_follows_the_bundle(tmp_path, bundles):
    """A bf16 bundle is compiled at the bf16 hint where the device runs BF16 (declared here, so
    the test runs on any CPU: OpenVINO computes in f32 where BF16 is missing)."""
    from onboard.pipeline import FramePipeline
    from shared.bundle import extract_bundle
    extract_bundle(bundles.build(1, precision="bf16"), tmp_path / "m", bundles.public)
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    pipeline = FramePipeline(manifest, tmp_path / "m", capabilities=("FP32", "BF16"))
    assert (pipeline.precision.running, pipeline.precision.hint) == ("bf16", "bf16")
    assert pipeline.info()["precision"]["running"] == "bf16"
    assert pipeline.model.properties()["precision"] == "bf16"
