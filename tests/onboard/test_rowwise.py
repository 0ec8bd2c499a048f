"""Post-processing band by band while later tiles still infer (shared.postprocess.RowwiseOpening,
upsample_rows, onboard.stats.CellStats): the same mask, statistics and decisions as the
whole-frame functions, frame edges included, on random masks and on the pipeline's own output."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage import morphology

sys.path.insert(0, str(Path(__file__).parents[1]))
from onboard_models import BANDS_6, make_int8_test_model_files, make_test_manifest  # noqa: E402
# the module's IR and manifest are test_pipeline's fixtures
from test_pipeline import CLASSES_3, OVERLAP, TILE, boxes_frame, manifest, model_dir  # noqa: E402,F401

from onboard.pipeline import FramePipeline  # noqa: E402
from onboard.products import MaskPng, decode_mask_png, mask_png, quicklook_jpg  # noqa: E402
from onboard.stats import CellStats, frame_and_cell_stats  # noqa: E402
from shared.postprocess import RowwiseOpening, open_classes, upsample_mask, upsample_rows  # noqa: E402


def skimage_opening(mask: np.ndarray, radius: int, classes) -> np.ndarray:
    """The whole-mask opening written independently: each class opened from the mask as it
    came (scikit-image), what it removed set to the background."""
    out = mask.copy()
    for c in classes:
        binary = mask == c
        out[binary & ~morphology.opening(binary, morphology.disk(radius))] = 0
    return out


def random_mask(rng, h: int, w: int, k: int) -> np.ndarray:
    """Specks (noise) and boxes of every class, some touching the top and bottom edges."""
    mask = (rng.random((h, w)) < 0.2).astype(np.uint8) * rng.integers(1, k, (h, w)).astype(np.uint8)
    for _ in range(6):
        r0, c0 = rng.integers(-3, h), rng.integers(-3, w)
        mask[max(r0, 0):r0 + rng.integers(2, 12), max(c0, 0):c0 + rng.integers(2, 12)] = rng.integers(0, k)
    return mask


def schedule(rng, h: int) -> list[int]:
    """Increasing row counts as tile rows complete (repeats and single rows included), ending at h."""
    cuts = sorted(rng.integers(0, h + 1, rng.integers(0, 8)).tolist())
    return cuts + [h]


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 60), st.integers(1, 40), st.integers(0, 3), st.integers(2, 4),
       st.integers(0, 2**32 - 1))
def test_rowwise_opening_equals_the_whole_mask_opening(h, w, radius, k, seed):
    rng = np.random.default_rng(seed)
    mask = random_mask(rng, h, w, k)
    want = skimage_opening(mask, radius, range(1, k))
    got = mask.copy()
    opener = RowwiseOpening(got, radius, range(1, k))
    for final in schedule(rng, h):
        done = opener.advance(final)
        # rows reported opened are final already: what the whole-mask opening gives
        assert done <= final and np.array_equal(got[:done], want[:done])
    assert opener.done == h and np.array_equal(got, want)
    assert np.array_equal(open_classes(mask.copy(), radius, classes=range(1, k)), want)


def test_rowwise_opening_band_edges_and_frame_edges():
    # a 5-row speck straddling a band edge survives disk(2) only if the rows below are seen
    mask = np.zeros((40, 20), np.uint8)
    mask[8:13, 5:10] = 1            # survives the opening (5 x 5 holds disk(2))
    mask[18:22, 5:10] = 1           # 4 rows: removed
    mask[0:5, 12:17] = 2            # at the top edge: survives (the edge does not erode)
    mask[35:40, 0:5] = 2            # at the bottom-left corner: survives
    want = skimage_opening(mask, 2, (1, 2))
    for cuts in ([10, 11, 12, 40], [5, 9, 21, 22, 39, 40], [40]):
        got = mask.copy()
        opener = RowwiseOpening(got, 2, (1, 2))
        for final in cuts:
            opener.advance(final)
        assert np.array_equal(got, want), cuts
    assert want[8:13, 5:10].any() and not want[18:22].any() and want[0:3, 12:17].all()


@pytest.mark.parametrize("factor,shape", [(2, (7, 5)), (3, (10, 11)), (2, (8, 8))])
def test_upsample_rows_band_by_band_equals_upsample_mask(factor, shape):
    rng = np.random.default_rng(factor)
    mask = rng.integers(0, 3, (-(-shape[0] // factor), -(-shape[1] // factor))).astype(np.uint8)
    out = np.full(shape, 99, np.uint8)
    for r0, r1 in ((0, 1), (1, 1), (1, 3), (3, mask.shape[0])):
        upsample_rows(mask, factor, out, r0, r1)
    assert np.array_equal(out, upsample_mask(mask, factor, shape))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 50), st.integers(1, 50), st.integers(1, 16), st.integers(0, 2**32 - 1))
def test_cell_stats_band_by_band_equal_the_whole_mask(h, w, cell, seed):
    rng = np.random.default_rng(seed)
    mask = random_mask(rng, h, w, 3)
    classes, counted = ("clear", "cloud", "shadow"), ("cloud",)
    stats = CellStats(mask.shape, classes, cell, counted)
    for final in schedule(rng, h):
        stats.advance(mask, final)
        # only whole rows of cells inside the final rows are counted
        assert all(c["row"] + c["height"] <= final for c in stats.cells)
    assert stats.result(mask) == frame_and_cell_stats(mask, classes, cell, counted)


def with_radius(manifest: dict, radius: int, gsd_m: float | None = None) -> dict:
    m = {**manifest, "postprocess": {**manifest["postprocess"], "opening_radius": radius}}
    if gsd_m is not None:
        m["input"] = {**m["input"], "gsd_m": gsd_m}
    return m


@pytest.mark.parametrize("gsd_m,h,w,seed", [(None, 300, 170, 0), (None, 131, 64, 1), (20.0, 301, 150, 2)])
def test_pipeline_opens_band_by_band_as_the_whole_frame(manifest, model_dir, gsd_m, h, w, seed):
    """The pipeline's mask (opened as tile rows complete) equals the whole-frame opening of its
    own unopened mask (radius 0), and its statistics and decisions those of the whole mask."""
    data, _ = boxes_frame(BANDS_6, h, w, seed)
    raw = FramePipeline(with_radius(manifest, 0, gsd_m), model_dir, batch_size=2).process(data, BANDS_6, 1e-4)
    policy = {"rules": [{"if": {"class": "cloud", "largest_component_at_least": 200}, "then": "keep",
                         "priority": 2},
                        {"if": {"class": "shadow", "fraction_above": 0.2}, "then": "discard"}],
              "default": {"then": "keep"}}
    pipeline = FramePipeline(with_radius(manifest, 2, gsd_m), model_dir, batch_size=2)
    got = pipeline.process(data, BANDS_6, 1e-4, policy=policy)
    f = pipeline.factor
    if f == 1:
        want = open_classes(raw.class_mask.copy(), 2, classes=(1, 2))
    else:      # the mask is opened at the processing GSD, then brought back to 10 m
        coarse = raw.class_mask[::f, ::f].copy()
        want = upsample_mask(open_classes(coarse, 2, classes=(1, 2)), f, (h, w))
    assert np.array_equal(got.class_mask, want)
    assert not np.array_equal(raw.class_mask, want)            # the opening did change something
    frame, cells = frame_and_cell_stats(want, pipeline.classes, pipeline.cell, ("cloud",))
    assert got.stats["fractions"] == frame["fractions"]
    assert [t["fractions"] for t in got.tile_decisions] == [c["stats"]["fractions"] for c in cells]
    assert got.stats["component_counts"]["cloud"] == len(frame["components"]["cloud"])
    assert "opening_overlapped" in got.timings_ms and "stats_overlapped" in got.timings_ms


def test_pipeline_opens_before_the_last_tile_row_is_inferred(manifest, model_dir, monkeypatch):
    """The bands really are opened while tiles are still out: advance() is called with rows
    short of the frame's height before the last call."""
    finals = []
    advance = RowwiseOpening.advance

    def spy(self, final):
        finals.append(int(final))
        return advance(self, final)

    monkeypatch.setattr(RowwiseOpening, "advance", spy)
    data, _ = boxes_frame(BANDS_6, 300, 100, 3)
    FramePipeline(manifest, model_dir, batch_size=1).process(data, BANDS_6, 1e-4)
    assert finals[-1] == 300 and len([f for f in finals if f < 300]) >= 3
    assert finals == sorted(finals)


@pytest.mark.parametrize("h,w", [(1, 1), (300, 7), (600, 130)])
def test_mask_png_band_by_band_decodes_to_the_mask(h, w):
    mask = random_mask(np.random.default_rng(h), h, w, 4)
    png = MaskPng(h, w)
    for r0, r1 in zip([0] + schedule(np.random.default_rng(w), h)[:-1], schedule(np.random.default_rng(w), h)):
        png.add(mask[r0:r1])
    data = png.finish()
    assert data.startswith(b"\x89PNG") and np.array_equal(decode_mask_png(data), mask)
    assert np.array_equal(decode_mask_png(mask_png(mask)), mask)
    short = MaskPng(h, w)
    with pytest.raises(ValueError, match="rows added"):
        short.finish()
    with pytest.raises(ValueError, match="do not continue"):
        short.add(np.zeros((h + 1, w), np.uint8))


def test_pipeline_products_made_during_inference_are_the_frame_products(manifest, model_dir):
    data, _ = boxes_frame(BANDS_6, 300, 170, 4)
    r = FramePipeline(manifest, model_dir, batch_size=2).process(
        data, BANDS_6, 1e-4, policy={"rules": [], "default": {"then": "keep"}})
    assert r.keep and np.array_equal(decode_mask_png(r.products["mask_png"]), r.class_mask)
    assert r.products["quicklook_jpg"] == quicklook_jpg(data, BANDS_6, 1e-4)
    assert r.timings_ms["products_overlapped"] > 0


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_frame_graph_input_dtype_per_precision_leaves_the_masks(manifest, model_dir, precision, monkeypatch,
                                                                 tmp_path):
    """fp32 and int8 feed float32 tiles (numpy converts while cutting), the same masks as tiles
    in the frame's dtype; a precision GRAPH_INPUT_DTYPE does not name keeps the frame's dtype."""
    import onboard.pipeline as pipeline_mod
    from onboard.runtime import OpenVinoModel

    if precision == "int8":
        model_dir = tmp_path / "int8"
        files = make_int8_test_model_files(model_dir, bands=BANDS_6, classes=CLASSES_3, tile=TILE)
        manifest = make_test_manifest(files, tile=TILE, overlap=OVERLAP, bands=BANDS_6, classes=CLASSES_3,
                                      precision="int8")

    seen = []
    run_masks = OpenVinoModel.run_masks

    def spy(self, n_tiles, dtype, *args, **kwargs):
        seen.append(dtype)
        return run_masks(self, n_tiles, dtype, *args, **kwargs)

    monkeypatch.setattr(OpenVinoModel, "run_masks", spy)
    data, _ = boxes_frame(BANDS_6, 200, 150, 5)
    pipeline = FramePipeline(manifest, model_dir, batch_size=2, precision=precision)
    as_float = pipeline.process(data, BANDS_6, 1e-4)
    monkeypatch.setattr(pipeline_mod, "GRAPH_INPUT_DTYPE", {})
    as_frame = pipeline.process(data, BANDS_6, 1e-4)
    assert seen == ["float32", "uint16"]
    assert np.array_equal(as_float.class_mask, as_frame.class_mask)
    assert as_float.stats == as_frame.stats and as_float.tile_decisions == as_frame.tile_decisions
