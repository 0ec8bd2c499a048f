"""onboard.ov: the one bridge to OpenVINO's Python API (2022.3's openvino.runtime, 2023.1+'s
openvino), and onboard using it alone. The 2022.3 side runs in .ci/myriad.sh (Python 3.10)."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import openvino

from onboard import ov
from onboard.runtime import OpenVinoModel
from onboard_models import BANDS_6, CLASSES_3, make_test_model_files

ONBOARD = Path(__file__).resolve().parents[2] / "onboard"


def test_the_bridge_names_this_runtime():
    assert ov.VERSION == openvino.get_version()
    assert ov.Core is openvino.Core              # 2023.1+: the top-level API
    assert ov.ops.parameter([1], ov.Type.f32).get_type_info().version_id == "opset1"


def test_shared_tensor_is_the_array_itself():
    a = np.zeros((2, 3), np.float32)
    t = ov.shared_tensor(a)
    t.data[0, 0] = 5
    assert a[0, 0] == 5


def test_text_of_properties_and_runtime_info():
    assert ov.property_string(ov.Type.f32) == "f32"
    assert ov.property_string(4) == "4"
    assert ov.rt_string("Convolution") == "Convolution"


def test_only_the_bridge_imports_openvino():
    """No shim elsewhere: every other onboard module imports OpenVINO through onboard.ov."""
    offenders = []
    for path in ONBOARD.glob("*.py"):
        if path.name == "ov.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "openvino"]
    assert offenders == []


def test_the_runtime_runs_through_the_bridge(tmp_path):
    files = make_test_model_files(tmp_path, bands=BANDS_6, classes=CLASSES_3, tile=32, n_reference=1)
    model = OpenVinoModel(files["model.xml"], tile=32, activation="softmax", precision="fp32")
    out = model.infer(np.full((1, 6, 32, 32), 0.2, np.float32))
    assert out.shape == (1, 3, 32, 32) and np.allclose(out.sum(1), 1, atol=1e-5)
    assert model.properties()["inference_precision_hint"] == "f32"
    assert model.layer_precisions()
