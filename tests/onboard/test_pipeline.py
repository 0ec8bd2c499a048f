"""The OpenVINO runtime and the frame pipeline, on small real IRs built with openvino's opset API
(tests/onboard_models.py) and on the real ukis-csmask teacher and Sentinel-2 chip."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage import morphology

sys.path.insert(0, str(Path(__file__).parents[1]))
from onboard_models import (BANDS_6, BANDS_13, CLASSES_2, CLASSES_3, default_scaling,  # noqa: E402
                            expected_outputs, make_test_ir, make_test_manifest, make_test_model_files,
                            synthetic_frame)

from onboard.pipeline import FRAME_ERROR_CODES, FrameError, FramePipeline  # noqa: E402
from onboard.products import decode_mask_png  # noqa: E402
from onboard.runtime import ModelLoadError, OpenVinoModel  # noqa: E402
from onboard.stats import cell_class_counts, component_sizes  # noqa: E402
from shared.policy import PolicyError  # noqa: E402
from shared.postprocess import open_classes, threshold, threshold_vector  # noqa: E402
from shared.tiling import stitch, tile  # noqa: E402

TILE, OVERLAP = 64, 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model6")
    make_test_model_files(d, bands=BANDS_6, classes=CLASSES_3, tile=TILE)
    return d


@pytest.fixture(scope="module")
def manifest(model_dir) -> dict:
    files = {n: model_dir / n for n in ("model.xml", "model.bin", "reference.npz")}
    return make_test_manifest(files, tile=TILE, overlap=OVERLAP, bands=BANDS_6, classes=CLASSES_3)


@pytest.fixture(scope="module")
def pipeline(manifest, model_dir) -> FramePipeline:
    return FramePipeline(manifest, model_dir, batch_size=3)


def boxes_frame(bands, h, w, seed, dtype="uint16", scale=1e-4):
    """Random cloud and shadow boxes that cross tile borders, on a noisy clear background."""
    rng = np.random.default_rng(seed)
    def boxes(n):
        out = []
        for _ in range(n):
            r, c = rng.integers(0, h - 4), rng.integers(0, w - 4)
            out.append((r, r + rng.integers(4, h // 2), c, c + rng.integers(4, w // 2)))
        return out
    return synthetic_frame(bands, h, w, clouds=boxes(4), shadows=boxes(3), dtype=dtype, scale=scale, seed=seed)


def reference_mask(manifest, data, scale, radius):
    """The pipeline's stages written plainly with shared.tiling + numpy outputs of the test IR."""
    refl = data.astype(np.float32) * np.float32(scale)
    tiles, grid = tile(refl, manifest["input"]["tile_size"], manifest["input"]["overlap"])
    mean, std = manifest["input"]["scaling"]["mean"], manifest["input"]["scaling"]["std"]
    probs = expected_outputs(tiles, manifest["output"]["classes"], mean=mean, std=std)
    stitched = stitch(probs, grid, mode="center")
    thr = threshold_vector(manifest["output"]["classes"], manifest["postprocess"]["threshold"])
    return open_classes(threshold(stitched, thr), radius, classes=range(1, len(thr)))


# --------------------------------------------------------------------------------------------
# runtime

@pytest.mark.parametrize("batch_size,n", [(1, 5), (2, 5), (4, 3), (3, 9)])
def test_runtime_matches_numpy_model_for_any_batching(model_dir, batch_size, n):
    model = OpenVinoModel(model_dir / "model.xml", batch_size=batch_size, activation="softmax")
    assert (model.channels, model.tile, model.num_classes) == (6, TILE, 3)
    refl, _ = synthetic_frame(BANDS_6, n * TILE, TILE, clouds=[(0, TILE, 0, 20)], dtype="float32", scale=1.0)
    tiles = refl.reshape(6, n, TILE, TILE).transpose(1, 0, 2, 3).copy()
    mean, std = (np.asarray(v, np.float32) for v in default_scaling(6))
    want = expected_outputs(tiles, CLASSES_3)
    normalised = (tiles - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(model.infer(normalised), want, atol=1e-5)
    # raw values with the scaling done inside the graph
    np.testing.assert_allclose(model.infer(tiles, gain=1 / std, offset=-mean / std), want, atol=1e-5)
    digital = np.rint(tiles * 1e4).astype(np.uint16)
    got = model.infer(digital, gain=np.float32(1e-4) / std, offset=-mean / std)
    np.testing.assert_allclose(got, expected_outputs(digital * np.float32(1e-4), CLASSES_3), atol=1e-5)


@pytest.mark.parametrize("activation", ["none", "sigmoid"])
def test_runtime_activation_is_applied_in_the_graph(model_dir, activation):
    model = OpenVinoModel(model_dir / "model.xml", activation=activation)
    refl, _ = synthetic_frame(BANDS_6, TILE, TILE, clouds=[(0, 30, 0, 30)], dtype="float32", scale=1.0)
    mean, std = (np.asarray(v, np.float32) for v in default_scaling(6))
    got = model.infer(refl[None], gain=1 / std, offset=-mean / std)
    np.testing.assert_allclose(got, expected_outputs(refl[None], CLASSES_3, activation=activation),
                               atol=1e-4, rtol=1e-5)


def test_runtime_errors(tmp_path, model_dir):
    with pytest.raises(ModelLoadError, match="not found"):
        OpenVinoModel(tmp_path / "missing.xml")
    (tmp_path / "bad.xml").write_text("<net>not an IR")
    with pytest.raises(ModelLoadError, match="bad.xml"):
        OpenVinoModel(tmp_path / "bad.xml")
    model = OpenVinoModel(model_dir / "model.xml")
    with pytest.raises(ValueError, match=r"\(N, 6, 64, 64\)"):
        model.infer(np.zeros((2, 5, TILE, TILE), np.float32))
    with pytest.raises(ValueError, match="one per band"):
        model.infer(np.zeros((1, 6, TILE, TILE), np.float32), gain=np.ones(3))


def test_runtime_postprocessing_exception_reaches_the_caller_and_queue_recovers(model_dir):
    model = OpenVinoModel(model_dir / "model.xml", batch_size=1)

    def boom(start, probs):
        if start == 2:
            raise RuntimeError("post-processing failed on tile 2")

    with pytest.raises(RuntimeError, match="tile 2"):
        model.run(6, "float32", lambda s, buf: buf.fill(0), boom)
    out = model.infer(np.zeros((3, 6, TILE, TILE), np.float32))     # still usable
    assert out.shape == (3, 3, TILE, TILE) and np.isfinite(out).all()


def test_test_ir_is_fp16_and_softmax_variant(tmp_path):
    xml, bin_ = make_test_ir(tmp_path, BANDS_13, CLASSES_2, tile=32, softmax=True)
    assert "f16" in xml.read_text() and bin_.stat().st_size == (2 * 13 + 2) * 2
    model = OpenVinoModel(xml)                         # softmax already inside: no activation
    refl, _ = synthetic_frame(BANDS_13, 32, 32, clouds=[(0, 16, 0, 32)], dtype="float32", scale=1.0)
    mean, std = (np.asarray(v, np.float32) for v in default_scaling(13))
    got = model.infer(refl[None], gain=1 / std, offset=-mean / std)
    np.testing.assert_allclose(got, expected_outputs(refl[None], CLASSES_2), atol=1e-5)


# --------------------------------------------------------------------------------------------
# pipeline: the result equals the stages done plainly, for any frame size, dtype and band order

@pytest.mark.parametrize("h,w,dtype,seed", [(150, 170, "uint16", 0), (64, 64, "int16", 1),
                                            (200, 90, "float32", 2), (40, 23, "uint16", 3)])
def test_pipeline_mask_equals_plain_stages(manifest, pipeline, h, w, dtype, seed):
    scale = 1.0 if dtype == "float32" else 1e-4
    data, _ = boxes_frame(BANDS_6, h, w, seed, dtype=dtype, scale=scale)
    result = pipeline.process(data, BANDS_6, scale)
    want = reference_mask(manifest, data, scale, manifest["postprocess"]["opening_radius"])
    assert result.class_mask.shape == (h, w) and result.class_mask.dtype == np.uint8
    assert np.array_equal(result.class_mask, want)


def test_pipeline_selects_and_orders_bands_by_name(tmp_path, manifest):
    # a model that looks at B11 only: reading any other band in its place changes the answer
    make_test_model_files(tmp_path, bands=BANDS_6, classes=CLASSES_3, tile=TILE,
                          band_weights=[0, 0, 0, 0, 1, 0])
    p = FramePipeline(manifest, tmp_path)
    data, _ = synthetic_frame(BANDS_6, 130, 140)
    data[4, 20:80, 30:90] = 6000                                   # bright in B11 only
    base = p.process(data, BANDS_6, 1e-4).class_mask
    assert (base[25:75, 35:85] == 1).all() and (base[:, 100:] == 0).all()
    # the payload sends 13 bands in another order, with aliases: same answer
    order = [5, 2, 0, 4, 1, 3]
    extra = np.full((7, 130, 140), 6000, np.uint16)                # bright bands the model ignores
    shuffled = np.concatenate([extra[:3], data[order], extra[3:]])
    names = ["B01", "B05", "B06"] + [["Blue", "B3", "red", "NIR", "swir16", "B12"][i] for i in order] + \
            ["B07", "B8A", "B09", "B10"]
    assert np.array_equal(p.process(shuffled, names, 1e-4).class_mask, base)
    # the same data under another band order is another frame
    assert not np.array_equal(p.process(data[::-1].copy(), BANDS_6, 1e-4).class_mask, base)


def test_pipeline_finds_the_truth(pipeline):
    data, truth = synthetic_frame(BANDS_6, 256, 256, clouds=[(20, 120, 30, 200)],
                                  shadows=[(150, 230, 60, 140)])
    result = pipeline.process(data, BANDS_6, 1e-4)
    # the opening rounds the boxes' corners off; nothing else differs
    assert np.array_equal(result.class_mask, open_classes(truth.copy(), 2, classes=[1, 2]))
    f = result.stats["fractions"]
    assert f["cloud"] == pytest.approx(100 * 170 / 256**2, abs=1e-3)
    assert f["shadow"] == pytest.approx(80 * 80 / 256**2, abs=1e-3)


def test_opening_removes_specks(manifest, model_dir):
    data, _ = synthetic_frame(BANDS_6, 128, 128)
    data[:, 50:52, 70:72] = 6000           # a 2x2 bright speck: cloud before the opening
    data[:, 10:40, 10:40] = 6000           # a real cloud
    r0 = FramePipeline({**manifest, "postprocess": {**manifest["postprocess"], "opening_radius": 0}}, model_dir)
    assert r0.process(data, BANDS_6, 1e-4).class_mask[50:52, 70:72].all()
    mask = FramePipeline(manifest, model_dir).process(data, BANDS_6, 1e-4).class_mask
    assert not mask[50:52, 70:72].any() and (mask[12:38, 12:38] == 1).all()


def test_threshold_from_the_manifest(manifest, model_dir):
    # a haze brightness where cloud is the most probable class but below a strict threshold
    data = np.full((6, 64, 64), 3150, np.uint16)
    loose = FramePipeline(manifest, model_dir).process(data, BANDS_6, 1e-4)
    strict_manifest = {**manifest, "postprocess": {**manifest["postprocess"], "threshold": {"cloud": 0.95}}}
    strict = FramePipeline(strict_manifest, model_dir).process(data, BANDS_6, 1e-4)
    assert (loose.class_mask == 1).all() and (strict.class_mask == 0).all()


# --------------------------------------------------------------------------------------------
# decisions, tiles and products

def test_cloudy_frame_is_discarded_without_products(pipeline):
    data, _ = synthetic_frame(BANDS_6, 128, 128, clouds=[(0, 128, 0, 100)])
    r = pipeline.process(data, BANDS_6, 1e-4)
    assert not r.keep and r.priority == 0 and "rule 0" in r.reason and r.products == {}


def test_shadow_frame_is_kept_urgently_with_products(pipeline):
    data, _ = synthetic_frame(BANDS_6, 150, 128, shadows=[(0, 40, 0, 128)], clouds=[(100, 150, 0, 128)])
    r = pipeline.process(data, BANDS_6, 1e-4)
    assert r.keep and r.priority == 1 and "rule 1" in r.reason
    assert np.array_equal(decode_mask_png(r.products["mask_png"]), r.class_mask)
    # tiles are tile_size cells: rows 0, 64, 128 (22 rows), cols 0, 64
    cells = [(t["row"], t["col"], t["height"], t["width"]) for t in r.tile_decisions]
    assert cells == [(0, 0, 64, 64), (0, 64, 64, 64), (64, 0, 64, 64), (64, 64, 64, 64),
                     (128, 0, 22, 64), (128, 64, 22, 64)]
    # the bottom row of cells is all cloud: discarded; the others kept
    assert [t["keep"] for t in r.tile_decisions] == [True, True, True, True, False, False]
    boxes = r.products["tile_boxes"]
    assert boxes.tolist() == [list(c) for c in cells[:4]]
    for (row, col, hh, ww), t in zip(boxes, r.products["tiles"]):
        assert t.dtype == np.uint16 and np.array_equal(t[:, :hh, :ww], data[:, row:row + hh, col:col + ww])
    assert "4/6 tiles kept" in r.reason and "frame" not in r.products
    assert set(r.timings_ms) >= {"validate", "tile_infer_threshold", "opening", "stats", "policy",
                                 "products", "total"}


def test_every_tile_kept_sends_the_frame_itself(pipeline):
    data, _ = synthetic_frame(BANDS_6, 100, 70, shadows=[(0, 100, 0, 10)])
    r = pipeline.process(data, BANDS_6, 1e-4)
    assert r.keep and all(t["keep"] for t in r.tile_decisions) and "tiles" not in r.products
    assert r.products["frame"] is data                       # no copy
    assert r.products["tile_boxes"].tolist() == [[0, 0, 64, 64], [0, 64, 64, 6], [64, 0, 36, 64], [64, 64, 36, 6]]


def test_result_travels_as_decision_and_product_messages(pipeline):
    from shared.messages import Message, decode, encode

    data, _ = synthetic_frame(BANDS_6, 100, 130, shadows=[(0, 30, 0, 130)], clouds=[(60, 100, 0, 130)])
    data.flags.writeable = False            # as a zmq frame is: the pipeline must never write into it
    frame = decode(encode(Message("frame", {"frame_id": "f7", "bands": list(BANDS_6), "scale": 1e-4},
                                  {"data": data})))
    assert not frame.arrays["data"].flags.writeable
    r = pipeline.process(frame.arrays["data"], frame.body["bands"], frame.body["scale"])
    decision = decode(encode(frame.reply("decision", {"frame_id": "f7", **r.summary()})))
    assert decision.body["keep"] is True and len(decision.body["tile_decisions"]) == 6
    product = decode(encode(Message("product", {"frame_id": "f7", "priority": r.priority}, r.products)))
    assert np.array_equal(decode_mask_png(product.arrays["mask_png"].tobytes()), r.class_mask)
    assert np.array_equal(product.arrays["tiles"], r.products["tiles"])


def test_quicklook_is_a_true_colour_jpeg(pipeline):
    import cv2

    data, _ = synthetic_frame(BANDS_13, 600, 300, shadows=[(0, 100, 0, 300)])
    data[3] = 0                                                  # B04 (red) dark
    r = pipeline.process(data, BANDS_13, 1e-4)
    img = cv2.imdecode(np.frombuffer(r.products["quicklook_jpg"], np.uint8), cv2.IMREAD_UNCHANGED)
    assert img.shape == (300, 150, 3)                            # max side 512 -> shrink by 2
    b, g, red = (img[..., i].astype(int).mean() for i in range(3))
    assert red < 10 < b and g > 10


def test_component_policy_counts_connected_components(manifest, model_dir):
    policy = {"rules": [{"if": {"class": "cloud", "largest_component_at_least": 300}, "then": "keep",
                         "priority": 2}], "default": {"then": "discard"}}
    p = FramePipeline(manifest, model_dir)
    p.set_policy(policy)
    small, _ = synthetic_frame(BANDS_6, 128, 128, clouds=[(10, 20, 10, 20), (50, 60, 50, 60)])
    big, _ = synthetic_frame(BANDS_6, 128, 128, clouds=[(10, 40, 10, 40)])
    rs, rb = p.process(small, BANDS_6, 1e-4), p.process(big, BANDS_6, 1e-4)
    def opened_area(n):          # an n x n box after the opening (disk(2) rounds its corners off)
        return int(morphology.opening(_box(n), morphology.disk(2)).sum())
    assert not rs.keep and rs.stats["component_counts"] == {"cloud": 2}
    assert rs.stats["components"]["cloud"] == [opened_area(10)] * 2 and opened_area(10) < 100
    assert rb.keep and rb.priority == 2 and rb.stats["components"]["cloud"] == [opened_area(30)]
    # the policy override per call, and a policy naming an unknown class is refused
    assert p.process(small, BANDS_6, 1e-4, policy={"rules": [], "default": {"then": "keep"}}).keep
    with pytest.raises(PolicyError, match="snow"):
        p.set_policy({"rules": [{"if": {"class": "snow", "fraction_above": 0.1}, "then": "keep"}]})


def _box(n):
    m = np.zeros((n + 8, n + 8), bool)
    m[4:4 + n, 4:4 + n] = True
    return m


# --------------------------------------------------------------------------------------------
# bad frames

GOOD = np.zeros((6, 32, 32), np.uint16)


@pytest.mark.parametrize("data,bands,scale,code", [
    (GOOD.astype(np.uint8), BANDS_6, 1e-4, "wrong_dtype"),
    (GOOD.astype(np.float64), BANDS_6, 1e-4, "wrong_dtype"),
    (GOOD.astype(">u2"), BANDS_6, 1e-4, "wrong_dtype"),
    (GOOD.tolist(), BANDS_6, 1e-4, "wrong_dtype"),
    (GOOD[0], BANDS_6, 1e-4, "wrong_shape"),
    (GOOD[None], BANDS_6, 1e-4, "wrong_shape"),
    (GOOD, BANDS_6[:5], 1e-4, "band_mismatch"),
    (GOOD, "B02B03", 1e-4, "band_mismatch"),
    (GOOD, None, 1e-4, "band_mismatch"),
    (GOOD[:, :0], BANDS_6, 1e-4, "empty_frame"),
    (GOOD, BANDS_6, 0.0, "bad_scale"),
    (GOOD, BANDS_6, float("nan"), "bad_scale"),
    (GOOD, ["B02", "B03", "B04", "B08", "B11", "B99"], 1e-4, "unknown_band"),
    (GOOD, ["B02", "B03", "B04", "B08", "B11", "blue"], 1e-4, "duplicate_band"),
    (GOOD, ["B02", "B03", "B04", "B08", "B11", "B01"], 1e-4, "missing_bands"),
])
def test_bad_frames_raise_frame_error_with_code(pipeline, data, bands, scale, code):
    with pytest.raises(FrameError) as info:
        pipeline.process(data, bands, scale)
    assert info.value.code == code and code in FRAME_ERROR_CODES


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused_in_a_used_band_only(pipeline, bad):
    data = np.full((7, 32, 32), 0.15, np.float32)
    names = list(BANDS_6) + ["B01"]
    data[6, 3, 3] = bad                          # B01: not a model band, ignored
    assert pipeline.process(data, names, 1.0).class_mask.shape == (32, 32)
    data[4, 5, 6] = bad
    with pytest.raises(FrameError, match="B11") as info:
        pipeline.process(data, names, 1.0)
    assert info.value.code == "not_finite"


def test_huge_finite_values_are_not_mistaken_for_inf(pipeline):
    data = np.full((6, 64, 64), 1e35, np.float32)          # the float32 sum overflows, values do not
    assert pipeline.process(data, BANDS_6, 1.0).stats["fractions"]["cloud"] == 1.0


def test_pipeline_refuses_a_model_that_does_not_fit_the_manifest(tmp_path, manifest):
    make_test_model_files(tmp_path, bands=BANDS_13, classes=CLASSES_3, tile=TILE)
    with pytest.raises(ModelLoadError, match="13 bands"):
        FramePipeline(manifest, tmp_path)


# --------------------------------------------------------------------------------------------
# self-test

def test_self_test_passes_on_the_bundle_reference(pipeline, model_dir):
    r = pipeline.self_test(model_dir / "reference.npz")
    assert r.ok and r.max_abs_diff < 1e-4 and r.mask_agreement == 1.0 and "3 reference tiles" in r.message


def test_self_test_fails_on_a_wrong_reference(tmp_path, manifest, pipeline):
    make_test_model_files(tmp_path, bands=BANDS_6, classes=CLASSES_3, tile=TILE, reference_gain=10.0)
    r = pipeline.self_test(tmp_path / "reference.npz")
    assert not r.ok and r.max_abs_diff > manifest["reference"]["max_abs_diff"] and "max |diff|" in r.message


def test_self_test_reports_an_unusable_reference(tmp_path, pipeline):
    r = pipeline.self_test(tmp_path / "nothing.npz")
    assert not r.ok and "nothing.npz" in r.message
    np.savez(tmp_path / "shape.npz", tiles=np.zeros((1, 5, TILE, TILE), np.float32),
             probabilities=np.zeros((1, 3, TILE, TILE), np.float32))
    r = pipeline.self_test(tmp_path / "shape.npz")
    assert not r.ok and "tiles shape" in r.message


# --------------------------------------------------------------------------------------------
# the real teacher on the real chip

@pytest.fixture(scope="module")
def ukis(tmp_path_factory, data_root):
    ukis_csmask = pytest.importorskip("ukis_csmask")
    import json

    import openvino as ov

    from shared.datasets import UKIS_TRAIN_ROWS, load_ukis_chip
    from shared.manifest import make_manifest

    pkg = Path(ukis_csmask.__file__).parent
    stats = json.loads((pkg / "model_6b_l1c.json").read_text())["data"]["dataset_statistics"]["img"]
    d = tmp_path_factory.mktemp("ukis")
    ov.save_model(ov.convert_model(pkg / "model_6b_l1c.onnx"), d / "model.xml")   # FP16 IR
    scene, labels = load_ukis_chip(data_root)
    # reference tiles from the training rows only, outputs from the ONNX model itself
    tiles = scene.data[:, UKIS_TRAIN_ROWS][None, :, :256, :256].copy()
    norm = (tiles - np.float32(stats[0])[:, None, None]) / np.float32(stats[1])[:, None, None]
    logits = ov.Core().compile_model(pkg / "model_6b_l1c.onnx", "CPU",
                                     {"INFERENCE_PRECISION_HINT": "f32"})(norm)[0]
    e = np.exp(logits - logits.max(1, keepdims=True))
    from shared.bundle import save_reference
    save_reference(d / "reference.npz", tiles, e / e.sum(1, keepdims=True))
    manifest = make_manifest(model_id="ukis-csmask-6b", version=1, bands=BANDS_6, mean=stats[0], std=stats[1],
                             classes=CLASSES_3, tile_size=256, overlap=32, threshold={}, opening_radius=2,
                             reference={"file": "reference.npz", "max_abs_diff": 2e-2, "min_mask_agreement": 0.99},
                             files={n: d / n for n in ("model.xml", "model.bin", "reference.npz")})
    return FramePipeline(manifest, d), d, scene, labels


def test_real_teacher_on_the_real_chip(ukis):
    from shared.datasets import UKIS_HELD_OUT_ROWS
    from shared.metrics import SegmentationScores, confusion_matrix

    pipeline, d, scene, labels = ukis
    st = pipeline.self_test(d / "reference.npz")
    assert st.ok, st.message                       # the FP16 IR agrees with the FP32 ONNX model
    digital = np.rint(scene.data * 1e4).astype(np.uint16)          # as an L1C payload sends it
    r = pipeline.process(digital, scene.bands, 1e-4)
    held = UKIS_HELD_OUT_ROWS
    scores = SegmentationScores.from_confusion(
        confusion_matrix(labels[held], r.class_mask[held], 3), ["clear", "cloud", "shadow"])
    # DESIGN.md: the teacher scores accuracy 0.910, mIoU 0.776 on these rows (one 512 inference);
    # through this pipeline (256 tiles, overlap 32, FP16 IR, opening r=2) it scored 0.919 / 0.794
    assert scores.accuracy > 0.88 and scores.miou > 0.72, scores.as_dict()


# --------------------------------------------------------------------------------------------
# statistics helpers against plain references

@settings(max_examples=60, deadline=None)
@given(st.integers(1, 70), st.integers(1, 70), st.integers(1, 32), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_cell_class_counts_match_bincount_per_cell(h, w, cell, k, seed):
    mask = np.random.default_rng(seed).integers(0, k, (h, w)).astype(np.uint8)
    counts = cell_class_counts(mask, k, cell)
    for i, r in enumerate(range(0, h, cell)):
        for j, c in enumerate(range(0, w, cell)):
            want = np.bincount(mask[r:r + cell, c:c + cell].ravel(), minlength=k)
            assert counts[i, j].tolist() == want.tolist()


@pytest.mark.parametrize("seed", range(3))
def test_component_sizes_match_skimage_labels(seed):
    from skimage import measure

    mask = (np.random.default_rng(seed).random((60, 80)) < 0.3).astype(np.uint8) * 2
    labels = measure.label(mask == 2, connectivity=2)        # 8-connectivity
    want = sorted(np.bincount(labels.ravel())[1:].tolist(), reverse=True)
    assert component_sizes(mask, 2) == want and component_sizes(mask, 1) == []


def test_device_capabilities_come_from_openvino_or_name_the_device():
    from onboard.runtime import device_capabilities
    assert "FP32" in device_capabilities("CPU")
    assert "FP32" in device_capabilities("AUTO:CPU")        # asked by its plugin's name
    with pytest.raises(ModelLoadError, match=r"device MYRIAD: .*declare \[runtime\] capabilities"):
        device_capabilities("MYRIAD")


def test_choose_precision_maps_hints_and_refuses_what_the_device_lacks():
    from onboard.errors import PrecisionUnsupported
    from onboard.precision import choose_precision
    caps = ("FP32", "FP16", "INT8")
    assert [choose_precision(p, "auto", caps + ("BF16",), "CPU").hint
            for p in ("fp32", "fp16", "bf16", "int8")] == ["f32", "f16", "bf16", "f32"]
    forced = choose_precision("bf16", "fp32", caps, "CPU")
    assert (forced.running, forced.overridden) == ("fp32", True)
    with pytest.raises(PrecisionUnsupported, match="precision bf16 needs BF16, which device CPU "
                                                   "cannot run .its capabilities: FP32, FP16, INT8."):
        choose_precision("bf16", "auto", caps, "CPU")
