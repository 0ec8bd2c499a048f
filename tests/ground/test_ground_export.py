"""ground.export: the IR has FP16 (or FP32) weights as asked, a dynamic tile and batch, OpenVINO
computes what torch computes on real tiles, and the parity check can tell a wrong model."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from ground.export import export_openvino, openvino_latency, parity, parity_tiles
from ground.students import TinyUNet

warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
UKIS = ("B02", "B03", "B04", "B08", "B11", "B12")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyUNet(6, 3, (8, 16, 32)).eval()


def _weights(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_fp16_and_fp32_irs_are_what_was_asked(model, tmp_path):
    import openvino as ov
    half = export_openvino(model, tmp_path / "h", fp16=True)
    full = export_openvino(model, tmp_path / "f", fp16=False)
    n = _weights(model)
    # BN is folded by OpenVINO, so the weights stored are about the parameter count
    assert half.sizes["model.bin"] < 2.2 * n < full.sizes["model.bin"] <= 4.4 * n
    assert half.fp16 and not full.fp16
    types = {op.get_output_element_type(0).get_type_name() for op in ov.Core().read_model(half.xml).get_ops()
             if op.get_type_name() == "Constant"}
    assert "f16" in types
    ir = ov.Core().read_model(half.xml)
    shape = ir.inputs[0].get_partial_shape()
    assert shape[1].get_length() == 6 and shape[0].is_dynamic and shape[2].is_dynamic


def test_parity_on_real_tiles(model, tmp_path, data_root):
    tiles = parity_tiles(UKIS, n=2, tile=64)
    assert tiles.shape == (2, 6, 64, 64) and 0 < tiles.mean() < 1          # reflectance
    norm_tiles = (tiles - tiles.mean(axis=(0, 2, 3), keepdims=True)) / tiles.std(axis=(0, 2, 3), keepdims=True)
    res = export_openvino(model, tmp_path, tiles=norm_tiles, tile=64, onnx=True)
    p = res.parity
    assert p["tiles"] == 2 and p["max_abs_diff"] < 5e-3 and p["mask_agreement"] > 0.99
    assert p["fp16_emulated_vs_ir"]["max_abs_diff"] < 2e-2
    assert p["onnx"]["max_abs_diff"] < 1e-4          # ONNX keeps FP32 weights
    assert res.onnx is not None and res.onnx.exists()


def test_parity_catches_a_different_model(model, tmp_path):
    res = export_openvino(model, tmp_path)
    torch.manual_seed(1)
    other = TinyUNet(6, 3, (8, 16, 32)).eval()
    with torch.no_grad():
        other.head.bias += torch.tensor([3.0, 0.0, 0.0])      # a model that prefers class 0
    x = np.random.default_rng(0).standard_normal((1, 6, 32, 32)).astype(np.float32)
    p = parity(res.xml, other, x, with_fp16=False)
    assert p["max_abs_diff"] > 0.1 and p["mask_agreement"] < 0.99
    with pytest.raises(ValueError, match="parity tiles"):
        parity(res.xml, model, x[0])


def test_latency_reports_figures(model, tmp_path):
    res = export_openvino(model, tmp_path)
    lat = openvino_latency(res.xml, tile=64, threads=1, repeats=3, warmup=1)
    assert lat["ms_per_tile"] > 0 and lat["p10_ms"] <= lat["ms_per_tile"] <= lat["p90_ms"]
    assert lat["tile"] == 64 and lat["threads"] == 1 and len(lat["load_avg_1min"]) == 2


def test_a_model_without_convolution_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no convolution"):
        export_openvino(torch.nn.Sequential(torch.nn.Identity()), tmp_path)
