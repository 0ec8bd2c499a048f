"""The frame graph (thresholds, scaling constants and binning inside OpenVINO) and the processing
ground sampling distance (`input.gsd_m`): the same masks as the plain stages, at 10 m and 20 m."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
from onboard_models import BANDS_6, synthetic_frame  # noqa: E402
# the module's IR and manifest are test_pipeline's fixtures
from test_pipeline import TILE, boxes_frame, manifest, model_dir, reference_mask  # noqa: E402,F401

from onboard.pipeline import FramePipeline  # noqa: E402
from onboard.runtime import OpenVinoModel  # noqa: E402
from shared.errors import ManifestError  # noqa: E402
from shared.manifest import gsd_factor, validate_manifest  # noqa: E402
from shared.postprocess import threshold, upsample_mask  # noqa: E402


def with_gsd(manifest: dict, gsd_m: float) -> dict:
    return {**manifest, "input": {**manifest["input"], "gsd_m": gsd_m}}


@pytest.mark.parametrize("thresholds", [[np.nan] * 3, [np.nan, 0.5, np.nan], [0.9, 0.9, 0.9],
                                        [np.nan, 0.34, 0.34]])
def test_frame_graph_thresholds_like_shared_postprocess(model_dir, thresholds):
    model = OpenVinoModel(model_dir / "model.xml", batch_size=2, activation="softmax")
    rng = np.random.default_rng(0)
    tiles = rng.uniform(0, 0.6, (5, 6, TILE, TILE)).astype(np.float32)
    tiles[0] = 0.3                     # flat tiles: every class near 1/3, ties and nothing eligible
    gain, offset = np.full(6, 4.0, np.float32), np.full(6, -1.0, np.float32)
    probs = model.infer(tiles, gain=gain, offset=offset)
    masks = model.infer_masks(tiles, gain, offset, np.asarray(thresholds, np.float32))
    assert masks.dtype == np.uint8 and masks.shape == (5, TILE, TILE)
    assert np.array_equal(masks, threshold(probs, thresholds))


@pytest.mark.parametrize("n", [1, 3, 7, 8])
def test_tiles_left_after_whole_batches_run_through_a_one_tile_variant(model_dir, n):
    """7 tiles at batch 4: one batch of 4, then 3 one-tile requests (not a batch padded to 4)."""
    tiles = np.random.default_rng(n).uniform(0, 0.6, (n, 6, TILE, TILE)).astype(np.float32)
    gain, offset = np.full(6, 4.0, np.float32), np.full(6, -1.0, np.float32)
    thresholds = np.asarray([np.nan, 0.4, np.nan], np.float32)
    model = OpenVinoModel(model_dir / "model.xml", batch_size=4, activation="softmax")
    masks, scores = model.infer_masks(tiles, gain, offset, thresholds, scores=True)
    single = OpenVinoModel(model_dir / "model.xml", batch_size=1, activation="softmax")
    expected, expected_scores = single.infer_masks(tiles, gain, offset, thresholds, scores=True)
    assert np.array_equal(masks, expected) and np.allclose(scores, expected_scores, atol=1e-5)
    (by_batch,) = model._mask_variants.values()
    assert sorted(by_batch) == ([1, 4] if n % 4 else [4])


def test_gsd_m_is_optional_and_a_whole_multiple_of_10_m(manifest):
    assert gsd_factor(manifest["input"]) == 1
    assert gsd_factor(validate_manifest(with_gsd(manifest, 20))["input"]) == 2
    for bad in (15, 5, 0, -20, "20", 1000):
        with pytest.raises(ManifestError, match="input.gsd_m"):
            validate_manifest(with_gsd(manifest, bad))


def test_upsample_mask_repeats_pixels_and_crops_the_far_edge():
    mask = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert np.array_equal(upsample_mask(mask, 2, (3, 5)), np.repeat(np.repeat(mask, 2, 0), 2, 1)[:3, :5])
    with pytest.raises(ValueError):
        upsample_mask(mask, 2, (5, 5))


def bin_frame(data: np.ndarray, f: int) -> np.ndarray:
    c, h, w = data.shape
    return data.astype(np.float32).reshape(c, h // f, f, w // f, f).mean(axis=(2, 4))


@pytest.mark.parametrize("h,w,seed", [(300, 260, 0), (128, 128, 1)])
def test_pipeline_at_20_m_is_the_plain_stages_on_the_binned_frame(manifest, model_dir, h, w, seed):
    data, _ = boxes_frame(BANDS_6, h, w, seed)
    p20 = FramePipeline(with_gsd(manifest, 20.0), model_dir, batch_size=2)
    result = p20.process(data, BANDS_6, 1e-4)
    assert p20.info()["gsd_factor"] == 2 and result.class_mask.shape == (h, w)
    want = upsample_mask(reference_mask(manifest, bin_frame(data, 2), 1e-4, 2), 2, (h, w))
    # binning in the graph (float32 sums in OpenVINO's order) vs numpy's mean: a pixel whose
    # class sits on a threshold may flip; nothing else
    assert np.mean(result.class_mask == want) > 0.999
    # one policy cell per model tile: 2 * 64 frame pixels
    cells = result.tile_decisions
    assert {(c["height"], c["width"]) for c in cells if c["row"] == 0 and c["col"] == 0} == {(128, 128)}
    assert len(cells) == -(-h // 128) * -(-w // 128)


def test_pipeline_at_20_m_takes_odd_frames_and_finds_big_clouds(manifest, model_dir):
    data, truth = synthetic_frame(BANDS_6, 257, 301, clouds=[(20, 180, 30, 250)])
    result = FramePipeline(with_gsd(manifest, 20.0), model_dir).process(data, BANDS_6, 1e-4)
    assert result.class_mask.shape == (257, 301)
    inside = result.class_mask[30:170, 40:240]
    assert (inside == 1).all() and (result.class_mask[200:, :] == 0).all()
    assert result.stats["fractions"]["cloud"] == pytest.approx((truth == 1).mean(), abs=0.01)


def _first_layer_model(kind: str, channels: int = 4, tile: int = 16):
    """input -> `kind` (3x3 convolution, padding 1; a depthwise one; an 8-bit FakeQuantize; or an
    Add before the convolution) -> output: raw network outputs, to compare to the last bit."""
    import openvino as ov
    import openvino.opset10 as ops

    rng = np.random.default_rng(1)
    x = ops.parameter([2, channels, tile, tile], ov.Type.f32, name="x")
    if kind == "quantized":            # what NNCF puts in front of an INT8 IR's first convolution
        lo, hi = ops.constant(np.float32(-3.0)), ops.constant(np.float32(5.0))
        y = ops.fake_quantize(x, lo, hi, lo, hi, 256)
    elif kind == "depthwise":
        w = rng.normal(0, 1, (channels, 1, 1, 3, 3)).astype(np.float32)
        y = ops.group_convolution(x, ops.constant(w), [1, 1], [1, 1], [1, 1], [1, 1])
    else:
        w = rng.normal(0, 1, (5, channels, 3, 3)).astype(np.float32)
        source = ops.add(x, ops.constant(np.float32(1.0))) if kind == "add first" else x
        y = ops.convolution(source, ops.constant(w), [1, 1], [1, 1], [1, 1], [1, 1])
    return ov.Model([ops.result(y)], [x])


@pytest.mark.parametrize("kind", ["convolution", "depthwise", "quantized"])
def test_scaling_folded_into_the_first_layer_computes_the_same(kind):
    """conv(x * g + o) computed as conv_{W g}(x) + conv_W(o): equal everywhere, the borders
    (where the network's zero padding meets the offsets) included; FQ(x * g + o; lo, hi) as
    FQ(x; (lo - o) / g, (hi - o) / g), the same quantisation levels."""
    import openvino as ov
    import openvino.opset10 as ops

    from onboard.runtime import _folded_scaling

    gain = np.array([1e-4, 2e-4, 5e-5, 1e-3], np.float32)
    offset = np.array([-1.5, 0.3, -2.0, 4.0], np.float32)
    raw = np.random.default_rng(2).integers(0, 10000, (2, 4, 16, 16)).astype(np.float32)
    core = ov.Core()

    def run(model):
        return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(raw)[0]

    explicit = _first_layer_model(kind)
    x = explicit.get_parameters()[0]
    scaled = ops.add(ops.multiply(x, ops.constant(gain.reshape(1, -1, 1, 1))),
                     ops.constant(offset.reshape(1, -1, 1, 1)))
    for target in list(x.output(0).get_target_inputs()):
        if target.get_node() is not scaled.input_value(0).get_node():
            target.replace_source_output(scaled.output(0))
    want = run(explicit)
    folded = _first_layer_model(kind)
    p = folded.get_parameters()[0]
    assert _folded_scaling(p.output(0).get_target_inputs(), p, gain, offset, core)
    got = run(folded)
    if kind == "quantized":         # one level apart at most, where x g + o rounds onto a level's edge
        step = 8.0 / 255
        assert np.abs(got - want).max() <= step * 1.001 and np.mean(got == want) > 0.999
        assert len(np.unique(want)) > 100           # the ranges were used, not saturated
        return
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
    # what the offsets alone give (raw zeros) differs at the borders from the interior: a bias
    # (the interior value) in place of the constant map would be wrong there
    raw[...] = 0
    offsets_only = run(explicit)
    assert np.abs(offsets_only[..., 0, :] - offsets_only[..., 8:9, 8:9][..., 0, :]).max() > 0.1
    assert np.abs(run(folded) - offsets_only).max() <= 1e-5 * max(1.0, np.abs(offsets_only).max())


def test_scaling_is_not_folded_where_the_input_feeds_anything_but_convolutions():
    from onboard.runtime import _folded_scaling

    model = _first_layer_model("add first")
    p = model.get_parameters()[0]
    before = [t.get_node().get_type_name() for t in p.output(0).get_target_inputs()]
    assert not _folded_scaling(p.output(0).get_target_inputs(), p, np.ones(4, np.float32),
                               np.zeros(4, np.float32), None)
    assert [t.get_node().get_type_name() for t in p.output(0).get_target_inputs()] == before == ["Add"]
