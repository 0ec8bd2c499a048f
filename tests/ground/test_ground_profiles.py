"""Exports for a device profile: op versions rewritten where the semantics are equal, the static
IR check (`eoedge ground check-ir`), and `bundle` refusing an IR its profile cannot run."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from mini_run import make_run  # noqa: E402  (tests/ground/mini_run.py)

from ground.cli import main as ground_main  # noqa: E402
from ground.errors import GroundError, IncompatibleIR  # noqa: E402
from ground.models.tiny_unet import TinyUNet  # noqa: E402
from ground.openvino.compat import check_ir, downgrade, ir_layers  # noqa: E402
from ground.openvino.export import export_openvino  # noqa: E402
from ground.stages.bundle import bundle  # noqa: E402
from ground.stages.export import export  # noqa: E402
from ground.stages.run import Run  # noqa: E402
from shared.bundle import verify_bundle  # noqa: E402
from shared.keys import generate_keypair  # noqa: E402
from shared.profiles import get_profile  # noqa: E402

warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def irs(tmp_path_factory):
    """One TinyUNet (max-pooling, bilinear upsampling) exported for cpu-x86 and for myriadx."""
    root = tmp_path_factory.mktemp("irs")
    torch.manual_seed(0)
    model = TinyUNet(6, 3, (8, 16, 32)).eval()
    return {p: export_openvino(model, root / p, tile=64, profile=p) for p in ("cpu-x86", "myriadx")}


def _ops(xml) -> set[str]:
    return {f"{x['type']}-{x['opset']}" for x in ir_layers(xml)}


def test_the_2026_ir_has_ops_2022_3_cannot_read_and_the_checker_names_them(irs):
    xml = irs["cpu-x86"].xml
    assert {"MaxPool-14", "Interpolate-11"} <= _ops(xml)
    problems = check_ir(xml, "myriadx")
    assert {p["op"] for p in problems} == {"MaxPool-14", "Interpolate-11"}
    assert all("opset1..opset10" in p["reason"] and p["layer"] for p in problems)
    assert check_ir(xml, "cpu-x86") == [] and irs["cpu-x86"].rewrites == []


def test_the_myriadx_export_is_downgraded_and_computes_the_same(irs):
    res = irs["myriadx"]
    assert {"MaxPool-8", "Interpolate-4"} <= _ops(res.xml)
    assert not {"MaxPool-14", "Interpolate-11"} & _ops(res.xml)
    assert check_ir(res.xml, "myriadx") == []
    assert {(r["from"], r["to"]) for r in res.rewrites} == {("MaxPool-14", "MaxPool-8"),
                                                           ("Interpolate-11", "Interpolate-4")}
    core = ov.Core()
    x = np.random.default_rng(0).normal(size=(2, 6, 64, 64)).astype(np.float32)
    a, b = (core.compile_model(str(irs[p].xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]
            for p in ("cpu-x86", "myriadx"))
    assert np.abs(a - b).max() == 0.0


def test_a_rewrite_that_would_change_the_semantics_fails_naming_the_layer(irs):
    model = ov.Core().read_model(str(irs["cpu-x86"].xml))
    import openvino.opset14 as opset14
    pool = next(op for op in model.get_ordered_ops() if op.get_type_info().name == "MaxPool")
    a = pool.get_attributes()
    ceil = opset14.max_pool(pool.input_value(0), a["strides"], a["dilations"], a["pads_begin"], a["pads_end"],
                            a["kernel"], "ceil_torch", a["auto_pad"], a["index_element_type"], a["axis"],
                            name="pool_ceil_torch")
    for target in list(pool.output(0).get_target_inputs()):
        target.replace_source_output(ceil.output(0))
    with pytest.raises(IncompatibleIR, match="pool_ceil_torch.*MaxPool-14 cannot become MaxPool-8.*ceil_torch"):
        downgrade(model, get_profile("myriadx"))


def test_check_ir_command_text_json_and_exit_codes(irs, capsys):
    assert ground_main(["check-ir", str(irs["cpu-x86"].xml), "--profile", "myriadx"]) == 1
    out = capsys.readouterr().out
    assert "NOT compatible with myriadx" in out and "MaxPool-14" in out and "Interpolate-11" in out
    assert ground_main(["check-ir", str(irs["myriadx"].xml), "--profile", "myriadx", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["compatible"] and r["problems"] == [] and r["ops"]["MaxPool-8"] == 2


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("profile-run"))


def test_bundle_refuses_an_ir_its_profile_cannot_run_before_signing(run_folder, tmp_path):
    run = Run.open(run_folder, progress=False)
    record = export(run, name="x86", evaluate=False, profile="cpu-x86")
    assert record["profile"] == "cpu-x86"
    sk, pk = generate_keypair(tmp_path / "keys")
    with pytest.raises(IncompatibleIR, match=r"MaxPool-14 \(layer .*\) cannot run on myriadx") as exc:
        bundle(run, "export/x86", sk, "cloud", 1, profile="myriadx")
    assert exc.value.code == "incompatible_ir" and len(exc.value.problems) == 4     # 2 pools, 2 upsamplings
    assert not (run_folder / "bundles" / "cloud-v1.tar").exists()


def test_a_myriadx_bundle_records_its_profile_and_tolerance(run_folder, tmp_path):
    run = Run.open(run_folder, progress=False)
    export(run, name="vpu", evaluate=False, profile="myriadx")
    sk, pk = generate_keypair(tmp_path / "keys")
    res = bundle(run, "export/vpu", sk, "cloud-vpu", 1)          # the export's profile
    assert res["profile"] == "myriadx"
    manifest = verify_bundle(res["bundle"], pk).manifest
    assert manifest["profile"] == "myriadx"
    assert manifest["reference"]["max_abs_diff"] >= get_profile("myriadx").self_test.max_abs_diff


def test_export_refuses_a_precision_its_profile_does_not_run(run_folder):
    with pytest.raises(GroundError, match="profile rpi4 does not run bf16"):
        export(Run.open(run_folder, progress=False), name="no", evaluate=False, precision="bf16", profile="rpi4")
