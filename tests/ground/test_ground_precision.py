"""Precision on the ground: the export stage at int8 (NNCF post-training quantisation under
accuracy control, or quantisation-aware fine-tuning) writes an IR with FakeQuantize nodes, scored
and timed at int8; the bundle declares the precision and its reference outputs are the int8 IR's;
a precision this CPU does not compute is refused naming it; the deployment-gap table has a row per
precision. All on a small generated run (tests/ground/mini_run.py), no ../shared/data."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("nncf")

from shared.bundle import extract_bundle, load_reference, verify_bundle  # noqa: E402
from shared.keys import generate_keypair  # noqa: E402
from ground.compression.quantize import int8_layers, use_eager_cpu_kernels  # noqa: E402
from ground.errors import GroundError  # noqa: E402
from ground.openvino import runtime  # noqa: E402
from ground.openvino.runtime import compile_ir, softmax  # noqa: E402
from ground.stages.bundle import bundle  # noqa: E402
from ground.stages.export import export  # noqa: E402
from ground.stages.gap import deployment_gap  # noqa: E402
from ground.stages.run import Run  # noqa: E402
from mini_run import make_run  # noqa: E402

warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs"))


def _open(run_dir) -> Run:
    return Run.open(run_dir, progress=False)


def test_int8_export_is_quantised_scored_and_timed_at_int8(run_dir):
    rec = export(_open(run_dir), name="q8", precision="int8", max_drop=0.05)
    xml = run_dir / "export" / "q8" / "model.xml"
    assert int8_layers(xml) > 0                               # FakeQuantize nodes: int8 kernels
    assert int8_layers(run_dir / "export" / "q8" / "float" / "model.xml") == 0
    assert rec["precision"] == "int8" and rec["int8"]["method"] == "ptq-accuracy-control"
    assert rec["latency"]["precision"] == "int8" and rec["metrics"]["openvino"]["miou"] is not None
    saved = json.loads((run_dir / "export" / "q8" / "export.json").read_text())
    assert saved["precision"] == "int8" and saved["int8"]["fake_quantize"] == int8_layers(xml)
    stage = [s for s in _open(run_dir).folder.stages() if s["stage"] == "export:q8"][-1]
    assert stage["params"]["precision"] == "int8"


def test_int8_bundle_declares_its_precision_and_int8_references(run_dir, tmp_path):
    export(_open(run_dir), name="q8b", precision="int8", max_drop=0.05)
    sk, pk = generate_keypair(tmp_path / "keys")
    res = bundle(_open(run_dir), "export/q8b", sk, "cloud8", 1, reference_tiles=1, max_bytes="2MB")
    assert res["precision"] == "int8"
    v = verify_bundle(res["bundle"], pk)
    assert v.manifest["precision"] == "int8"
    extract_bundle(res["bundle"], tmp_path / "b", pk)           # members may be stored xz-compressed
    tiles, probs = load_reference(tmp_path / "b" / "reference.npz", v.manifest)
    scaling = v.manifest["input"]["scaling"]
    m = np.asarray(scaling["mean"], np.float32)[None, :, None, None]
    s = np.asarray(scaling["std"], np.float32)[None, :, None, None]
    int8 = softmax(np.asarray(compile_ir(tmp_path / "b" / "model.xml", precision="int8")((tiles - m) / s)[0]))
    assert np.abs(int8 - probs).max() <= 2 ** -10           # the int8 IR's own outputs, on the grid
    assert v.manifest["reference"]["max_abs_diff"] >= 0.01


def test_quantisation_aware_fine_tuning_gives_an_int8_ir(run_dir):
    rec = export(_open(run_dir), name="qat", precision="int8", qat_steps=2)
    assert rec["int8"]["method"] == "qat" and rec["int8"]["steps"] == 2
    assert int8_layers(run_dir / "export" / "qat" / "model.xml") > 0


def test_fake_quantisers_use_eager_torch_not_a_compiled_extension(tmp_path, monkeypatch):
    # A killed g++ build leaves NNCF's lock file behind for good: with a stale lock in the build
    # folder, the compiled kernels would wait on it; the eager reference never looks there.
    from nncf.torch.quantization.extensions import QuantizedFunctionsCPU
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (tmp_path / "lock").touch()
    use_eager_cpu_kernels()
    x = torch.linspace(-2, 2, 101)
    low, rng = torch.tensor(-1.0), torch.tensor(2.0)
    y = QuantizedFunctionsCPU.get("Quantize_forward")(x, low, rng, 256)
    step = 2.0 / 255
    assert len(torch.unique(y)) < len(x)                       # snapped to a grid
    assert float((y - x.clamp(-1, 1)).abs().max()) <= step      # within a step of the clipped input
    assert not any(tmp_path.rglob("*.so"))


def test_a_precision_this_cpu_cannot_compute_is_refused(run_dir, monkeypatch):
    monkeypatch.setattr(runtime, "capabilities", lambda device="CPU": ["FP32", "INT8"])
    with pytest.raises(GroundError, match="bf16") as err:
        export(_open(run_dir), name="nope", precision="bf16")
    assert "FP32, INT8" in str(err.value)
    assert not (run_dir / "export" / "nope").exists()
    with pytest.raises(GroundError, match="precision must be one of"):
        runtime.check_precision("fp64")


def test_fp16_exports_on_a_cpu_without_fp16_checked_at_f32(run_dir, monkeypatch):
    """A Pi 5 or a VPU computes fp16, an AVX2 ground host does not: the FP16 IR is still exported,
    checked at f32 here with the torch FP16 emulation beside it."""
    monkeypatch.setattr(runtime, "capabilities", lambda device="CPU": ["FP32", "INT8"])
    import ground.stages.export as export_stage
    monkeypatch.setattr(export_stage, "capabilities", lambda device="CPU": ["FP32", "INT8"])
    record = export(_open(run_dir), name="fp16-here", precision="fp16", evaluate=False)
    assert record["precision"] == "fp16" and record["fp16"] is True
    assert record["parity"]["mask_agreement"] > 0.99 and "fp16_emulated_vs_ir" in record["parity"]


def test_gap_table_has_a_row_per_precision(run_dir, monkeypatch):
    # a CPU without BF16: its row says so instead of timing a silent f32 run
    monkeypatch.setattr(runtime, "capabilities", lambda device="CPU": ["FP32", "FP16", "INT8"])
    res = deployment_gap(_open(run_dir), name="g", rounds=1, max_drop=0.05)
    rows = {r["precision"]: r for r in res["rows"]}
    assert set(rows) == {"torch FP32", "torch, emulated FP16", "FP32 IR", "FP16 IR", "BF16 IR", "INT8 IR"}
    assert "bf16" in rows["BF16 IR"]["skipped"]
    assert rows["FP32 IR"]["speedup_vs_fp32_ir"] == pytest.approx(1.0)
    assert rows["FP32 IR"]["agreement_fp32"] > 0.99 and rows["INT8 IR"]["ms_per_tile"] > 0
    assert rows["INT8 IR"]["kernels"] and rows["INT8 IR"]["bundle_bytes"] > rows["INT8 IR"]["bytes"] > 0
    md = (run_dir / "gap" / "g" / "gap.md").read_text()
    assert "INT8 IR" in md and "not on this CPU" in md


def test_gap_refuses_zero_rounds_before_any_work(run_dir):
    from ground.errors import ConfigError
    with pytest.raises(ConfigError, match="rounds"):
        deployment_gap(_open(run_dir), name="zero", rounds=0)
    assert not (run_dir / "export" / "zero-fp32").exists()
