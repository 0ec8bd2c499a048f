"""Threshold and opening: OpenCV must give exactly what scikit-image gives, borders included."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from skimage import morphology

from shared.postprocess import disk, open_classes, opening, threshold, threshold_vector


@pytest.mark.parametrize("radius", range(0, 11))
def test_disk_is_skimage_disk(radius):
    ours, theirs = disk(radius), morphology.disk(radius)
    assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2", None])
def test_disk_rejects_bad_radius(bad):
    with pytest.raises(ValueError, match="radius"):
        disk(bad)


masks = hnp.arrays(np.bool_, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40))


@settings(max_examples=200, deadline=None)
@given(masks, st.integers(0, 4), st.sampled_from([np.bool_, np.uint8]))
def test_opening_matches_skimage(mask, radius, dtype):
    mask = mask.astype(dtype)
    ours = opening(mask, radius)
    theirs = morphology.opening(mask, morphology.disk(radius))
    assert ours.dtype == mask.dtype
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("seed", range(5))
def test_opening_matches_skimage_on_large_random_masks(seed):
    rng = np.random.default_rng(seed)
    # blobs of many sizes (smoothed noise) with speckles: what a cloud mask looks like
    field = rng.random((300, 257))
    mask = (field + np.roll(field, 1, 0) + np.roll(field, 1, 1)) > 1.6
    for radius in (1, 2, 3):
        assert np.array_equal(opening(mask, radius), morphology.opening(mask, morphology.disk(radius)))


def test_opening_keeps_the_border_and_removes_specks():
    mask = np.zeros((20, 20), bool)
    mask[:, :6] = True          # a band touching the left edge: the border must not erode it
    mask[10, 15] = True         # a speck
    out = opening(mask, 2)
    assert out[:, :6].all() and not out[:, 6:].any()


def test_opening_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        opening(np.zeros((2, 3, 3), bool), 1)


def test_threshold_without_thresholds_is_argmax():
    rng = np.random.default_rng(1)
    p = rng.random((4, 33, 17)).astype(np.float32)
    assert np.array_equal(threshold(p), np.argmax(p, axis=0).astype(np.uint8))
    assert np.array_equal(threshold(p, [None] * 4), np.argmax(p, axis=0))
    batch = rng.random((3, 4, 8, 8)).astype(np.float32)
    assert np.array_equal(threshold(batch), np.argmax(batch, axis=1))


def test_threshold_below_threshold_falls_back_to_the_next_eligible_class():
    # pixel 0: cloud most probable but below 0.5 -> best of the others (clear)
    # pixel 1: cloud above 0.5 -> cloud; pixel 2: shadow best, not thresholded -> shadow
    p = np.array([[0.30, 0.20, 0.10], [0.45, 0.70, 0.20], [0.25, 0.10, 0.70]], np.float32).T[:, None, :]
    assert threshold(p, [None, 0.5, None]).tolist() == [[0, 1, 2]]
    assert threshold(p, [None, 0.8, 0.8]).tolist() == [[0, 0, 0]]
    assert threshold(p, [None, 0.69, 0.8]).tolist() == [[0, 1, 0]]


def test_threshold_all_classes_thresholded_none_reached_gives_background():
    p = np.full((3, 2, 2), 1 / 3, np.float32)
    assert not threshold(p, [0.9, 0.9, 0.9]).any()
    p[2] = 0.95
    assert (threshold(p, [0.9, 0.9, 0.9]) == 2).all()


def test_threshold_ties_go_to_the_lower_class_like_argmax():
    p = np.full((3, 1, 1), 0.5, np.float32)
    assert threshold(p, [None, 0.5, None])[0, 0] == 0


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5), st.data())
def test_threshold_matches_a_plain_reference(k, data):
    p = data.draw(hnp.arrays(np.float32, (k, 5, 6), elements=st.floats(0, 1, width=32)))
    thr = data.draw(st.lists(st.none() | st.floats(0, 1, width=32), min_size=k, max_size=k))
    got = threshold(p, thr)
    for i in range(5):
        for j in range(6):
            eligible = [c for c in range(k) if thr[c] is None or p[c, i, j] >= thr[c]]
            want = max(eligible, key=lambda c: (p[c, i, j], -c)) if eligible else 0
            assert got[i, j] == want


def test_threshold_writes_into_out():
    p = np.random.default_rng(2).random((2, 8, 8)).astype(np.float32)
    frame = np.full((10, 10), 9, np.uint8)
    threshold(p, [None, 0.3], out=frame[1:9, 2:10])
    assert np.array_equal(frame[1:9, 2:10], threshold(p, [None, 0.3]))
    assert (frame[0] == 9).all() and (frame[:, :2] == 9).all()


def test_threshold_errors_name_the_problem():
    with pytest.raises(ValueError, match="2 thresholds for 3 classes"):
        threshold(np.zeros((3, 2, 2)), [0.5, 0.5])
    with pytest.raises(ValueError, match="shape"):
        threshold(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="out must be uint8"):
        threshold(np.zeros((2, 2, 2)), out=np.zeros((2, 2), np.int32))


def test_threshold_vector_from_manifest_names():
    v = threshold_vector(["clear", "cloud", "shadow"], {"cloud": 0.4})
    assert np.isnan(v[0]) and v[1] == pytest.approx(0.4) and np.isnan(v[2])
    with pytest.raises(ValueError, match="unknown class 'snow'"):
        threshold_vector(["clear", "cloud"], {"snow": 0.5})
    with pytest.raises(ValueError, match="0..1"):
        threshold_vector(["clear", "cloud"], {"cloud": 1.5})


@pytest.mark.parametrize("seed", range(3))
def test_open_classes_equals_per_class_skimage_opening(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, (64, 80)).astype(np.uint8)
    labels[10:40, 10:50] = 1           # a big cloud that survives
    labels[45:60, 5:30] = 2            # a big shadow that survives
    expected = labels.copy()
    for c in (1, 2):
        binary = labels == c
        removed = binary & ~morphology.opening(binary, morphology.disk(2))
        expected[removed] = 0
    got = open_classes(labels.copy(), 2)
    assert np.array_equal(got, expected)
    assert (got[12:38, 12:48] == 1).all() and (got[47:58, 7:28] == 2).all()


def test_open_classes_only_the_named_classes_and_radius_zero():
    labels = np.zeros((9, 9), np.uint8)
    labels[4, 4] = 1
    labels[1, 1] = 2
    assert np.array_equal(open_classes(labels.copy(), 0), labels)
    out = open_classes(labels.copy(), 1, classes=[1])
    assert out[4, 4] == 0 and out[1, 1] == 2
    with pytest.raises(ValueError, match="uint8"):
        open_classes(labels.astype(np.int32), 1)
