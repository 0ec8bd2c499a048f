"""ground.openvino: the IR has FP16 (or FP32) weights as asked, a dynamic tile and batch, OpenVINO
computes what torch computes on real tiles, and the parity check can tell a wrong model. The tiles
come from the imagery given (ground.data.reference), one image after another."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from ground.data.normalization import Normalization
from ground.data.reference import reference_tiles
from ground.data.sample import Sample
from ground.data.sources import load_source
from ground.errors import DataError
from ground.models.tiny_unet import TinyUNet
from ground.openvino.export import export_openvino
from ground.openvino.runtime import openvino_latency, parity

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
    [chip] = load_source({"source": "ukis", "rows": [0, 256]}, UKIS)
    tiles, where = reference_tiles([chip], n=2, tile=64)
    assert [(w["sample"], w["row"], w["col"]) for w in where] == [("ukis[0:256]", 0, 0), ("ukis[0:256]", 0, 64)]
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


def test_reference_tiles_come_from_every_image_given_and_say_where():
    rng = np.random.default_rng(0)
    a = Sample(rng.uniform(0, 0.5, (6, 64, 96)).astype(np.float32), name="a.npz", files=["/x/a.npz"])
    b = Sample(rng.uniform(0, 0.5, (6, 32, 40)).astype(np.float32), name="b.npz", files=["/x/b.npz"])
    tiles, where = reference_tiles([a, b], n=4, tile=32)
    # one image after another: a's first tile, b's only tile, then a's next ones
    assert [(w["sample"], w["row"], w["col"]) for w in where] == [("a.npz", 0, 0), ("b.npz", 0, 0),
                                                                   ("a.npz", 0, 32), ("a.npz", 0, 64)]
    assert where[1]["files"] == ["/x/b.npz"]
    assert tiles.shape == (4, 6, 32, 32) and tiles.dtype == np.float32
    np.testing.assert_array_equal(tiles[1], b.image[:, :32, :32])
    np.testing.assert_array_equal(tiles[3], a.image[:, :32, 64:96])
    # never more than the images hold (a: 2 x 3 tiles, b: 1)
    assert len(reference_tiles([a, b], n=50, tile=32)[1]) == 7
    norm = Normalization(UKIS, (0.25,) * 6, (0.1,) * 6)
    normalised, _ = reference_tiles([a, b], n=2, tile=32, norm=norm)
    np.testing.assert_allclose(normalised, (tiles[:2] - 0.25) / 0.1, rtol=1e-5, atol=1e-5)
    with pytest.raises(DataError, match=r"no training image holds a 128x128 tile .*\(32, 40\)"):
        reference_tiles([a, b], n=1, tile=128)
    with pytest.raises(DataError, match="n must be >= 1"):
        reference_tiles([a], n=0, tile=32)
