"""Confusion matrix and scores (hand-computed and against sklearn), Airbus object-level F2."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from sklearn import metrics as skm

from shared.metrics import (AIRBUS_THRESHOLDS, SegmentationScores, airbus_f2, airbus_f2_mean,
                            confusion_matrix, instance_iou)


# ------------------------------------------------------------------------ hand-computed cases

def test_confusion_and_scores_by_hand():
    y_true = np.array([0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 0])
    cm = confusion_matrix(y_true, y_pred, 3)
    # rows truth, cols prediction: (0,0) (0,1) (1,1) (1,1) (2,0)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    s = SegmentationScores.from_confusion(cm, ["a", "b", "c"])
    # tp = [1, 2, 0]; fp (column sums - tp) = [1, 1, 0]; fn (row sums - tp) = [1, 0, 1]
    np.testing.assert_array_equal(s.tp, [1, 2, 0])
    # IoU = tp / (tp + fp + fn) = [1/3, 2/3, 0/1]
    np.testing.assert_allclose(s.iou, [1 / 3, 2 / 3, 0.0])
    assert s.miou == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    # precision = tp / (tp + fp) = [1/2, 2/3, 0/0 -> NaN: class c never predicted]
    np.testing.assert_allclose(s.precision, [0.5, 2 / 3, np.nan])
    # recall = tp / (tp + fn) = [1/2, 2/2, 0/1]
    np.testing.assert_allclose(s.recall, [0.5, 1.0, 0.0])
    # F1 = 2tp / (2tp + fn + fp) = [2/4, 4/5, 0/1]
    np.testing.assert_allclose(s.f1, [0.5, 0.8, 0.0])
    # F2 = 5tp / (5tp + 4fn + fp) = [5/10, 10/11, 0]
    np.testing.assert_allclose(s.fbeta(2), [0.5, 10 / 11, 0.0])
    assert s.accuracy == pytest.approx(3 / 5)
    # kappa: po = 3/5; row sums [2, 2, 1], col sums [2, 3, 0]; pe = (4 + 6 + 0) / 25 = 0.4
    # (0.6 - 0.4) / (1 - 0.4) = 1/3
    assert s.kappa == pytest.approx(1 / 3)
    d = s.as_dict()
    json.dumps(d, allow_nan=False)            # NaN must have become null
    assert d["per_class"]["c"]["precision"] is None
    assert d["per_class"]["b"]["iou"] == pytest.approx(2 / 3)
    assert d["confusion"] == cm.tolist() and d["pixels"] == 5


def test_miou_ignores_classes_absent_from_truth_and_prediction():
    # 4 classes, class 3 never appears: its IoU is undefined and left out of the mean
    s = SegmentationScores.from_labels([0, 1, 2, 2], [0, 1, 2, 1], 4)
    # IoU = [1/1, 1/2 (tp 1, fp 1), 1/2 (tp 1, fn 1), NaN]
    np.testing.assert_allclose(s.iou, [1.0, 0.5, 0.5, np.nan])
    assert s.miou == pytest.approx(2 / 3)
    assert s.as_dict()["per_class"]["3"]["iou"] is None


def test_ignore_index_drops_pixels_whatever_was_predicted():
    y_true = np.array([[0, 255], [1, 255]])
    y_pred = np.array([[0, 7], [0, 1]])      # 7 is out of range but sits on an ignored pixel
    cm = confusion_matrix(y_true, y_pred, 2, ignore_index=255)
    np.testing.assert_array_equal(cm, [[1, 0], [1, 0]])


def test_kappa_is_nan_when_a_single_class_is_everywhere():
    s = SegmentationScores.from_labels([1, 1, 1], [1, 1, 1], 2)
    assert s.accuracy == 1.0 and math.isnan(s.kappa)
    assert s.as_dict()["kappa"] is None


@pytest.mark.parametrize("args, message", [
    (([0, 1], [0, 1, 1], 2), r"y_true shape \(2,\) and y_pred shape \(3,\) differ"),
    (([0, 3], [0, 1], 2), r"y_true has label\(s\) \[3\] outside 0..1"),
    (([0, 1], [-1, 5], 2), r"y_pred has label\(s\) \[-1, 5\] outside 0..1"),
    (([0, 1], [0.5, 1], 2), "y_pred must hold integer class labels"),
    (([0, 1], [0, 1], 0), "num_classes must be a positive integer"),
])
def test_confusion_matrix_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        confusion_matrix(*args)


def test_scores_reject_bad_confusion_and_names():
    with pytest.raises(ValueError, match="square"):
        SegmentationScores.from_confusion(np.zeros((2, 3), dtype=int))
    with pytest.raises(ValueError, match="non-negative"):
        SegmentationScores.from_confusion([[1, -1], [0, 1]])
    with pytest.raises(ValueError, match="class_names has 1 names"):
        SegmentationScores.from_confusion(np.eye(2, dtype=int), ["only"])
    with pytest.raises(ValueError, match="beta"):
        SegmentationScores.from_confusion(np.eye(2, dtype=int)).fbeta(0)


# ------------------------------------------------------------------------------ vs sklearn

@st.composite
def labelings(draw):
    k = draw(st.integers(2, 5))
    n = draw(st.integers(1, 300))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # a random class subset, so that some classes are absent from truth and/or prediction
    t_classes = rng.choice(k, size=draw(st.integers(1, k)), replace=False)
    p_classes = rng.choice(k, size=draw(st.integers(1, k)), replace=False)
    y_true = rng.choice(t_classes, n)
    y_pred = np.where(rng.random(n) < 0.5, y_true, rng.choice(p_classes, n))
    return k, y_true, y_pred


@pytest.mark.filterwarnings("ignore::UserWarning")   # sklearn on single-label draws
@settings(max_examples=150, deadline=None)
@given(labelings())
def test_scores_match_sklearn(case):
    k, y_true, y_pred = case
    s = SegmentationScores.from_labels(y_true, y_pred, k)
    labels = list(range(k))
    np.testing.assert_array_equal(s.confusion, skm.confusion_matrix(y_true, y_pred, labels=labels))
    # per-class IoU: sklearn writes 0 for absent classes where we write NaN
    sk_iou = skm.jaccard_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    np.testing.assert_allclose(s.iou[s.present], sk_iou[s.present])
    assert np.all(np.isnan(s.iou[~s.present]))
    # mIoU over present classes == sklearn macro over the labels seen in truth or prediction
    assert s.miou == pytest.approx(skm.jaccard_score(y_true, y_pred, average="macro"))
    nan = dict(labels=labels, average=None, zero_division=np.nan)
    np.testing.assert_allclose(s.precision, skm.precision_score(y_true, y_pred, **nan))
    np.testing.assert_allclose(s.recall, skm.recall_score(y_true, y_pred, **nan))
    np.testing.assert_allclose(s.f1, skm.f1_score(y_true, y_pred, **nan))
    for beta in (0.5, 2.0):
        np.testing.assert_allclose(s.fbeta(beta), skm.fbeta_score(y_true, y_pred, beta=beta, **nan))
    assert s.macro_f1 == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))
    assert s.accuracy == pytest.approx(skm.accuracy_score(y_true, y_pred))
    sk_kappa = skm.cohen_kappa_score(y_true, y_pred)
    if math.isnan(sk_kappa):
        assert math.isnan(s.kappa)
    else:
        assert s.kappa == pytest.approx(sk_kappa, abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(labelings(), st.integers(0, 4))
def test_ignore_index_equals_masking_first(case, ignored):
    k, y_true, y_pred = case
    masked = confusion_matrix(y_true[y_true != ignored], y_pred[y_true != ignored], k)
    np.testing.assert_array_equal(confusion_matrix(y_true, y_pred, k, ignore_index=ignored), masked)


# ----------------------------------------------------------------------- Airbus object F2

def _image(*boxes, shape=(12, 12)):
    """Instance image with rectangular objects (r0, r1, c0, c1), ids 1, 2, ..."""
    img = np.zeros(shape, dtype=np.int32)
    for i, (r0, r1, c0, c1) in enumerate(boxes, start=1):
        img[r0:r1, c0:c1] = i
    return img


def test_airbus_thresholds():
    assert AIRBUS_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def test_airbus_perfect_and_empty_conventions():
    ship = _image((2, 5, 2, 6))
    assert airbus_f2(ship, ship * 7) == 1.0                 # ids need not match, only pixels
    empty = np.zeros((12, 12), dtype=np.int32)
    assert airbus_f2(empty, empty) == 1.0                   # no ships, none found: convention
    assert airbus_f2(empty, ship) == 0.0                    # TP 0, FP 1 -> 0 / 1
    assert airbus_f2(ship, empty) == 0.0                    # TP 0, FN 1 -> 0 / 4


def test_airbus_partial_overlap_by_hand():
    truth = _image((0, 2, 0, 5))                            # 10 pixels
    pred = _image((0, 2, 0, 4))                             # 8 of them, nothing else
    iou, _, _ = instance_iou(truth, pred)
    assert iou[0, 0] == pytest.approx(0.8)                  # 8 / 10
    # hit at t = .5 .55 .6 .65 .7 .75 (6 thresholds): F2 = 5/5 = 1
    # miss at t = .8 (not above) .85 .9 .95: TP 0, FN 1, FP 1 -> 0
    assert airbus_f2(truth, pred) == pytest.approx(6 / 10)


def test_airbus_counts_misses_and_false_alarms_by_hand():
    truth = _image((0, 3, 0, 3), (6, 9, 6, 9))
    pred = _image((0, 3, 0, 3), (0, 2, 8, 10))              # one exact, one in open water
    # every threshold: TP 1, FN 1, FP 1 -> 5 / (5 + 4 + 1) = 0.5
    assert airbus_f2(truth, pred) == pytest.approx(0.5)
    # F2 weighs misses over false alarms: two preds for one ship (one exact, one false) ...
    one = _image((0, 3, 0, 3))
    assert airbus_f2(one, pred) == pytest.approx(5 / 6)     # TP 1, FN 0, FP 1 -> 5/6
    # ... scores better than finding one of two ships: TP 1, FN 1, FP 0 -> 5/9
    assert airbus_f2(truth, one) == pytest.approx(5 / 9)


def test_airbus_multi_image_mean():
    ship = _image((2, 5, 2, 6))
    empty = np.zeros_like(ship)
    truth = [ship, _image((0, 3, 0, 3), (6, 9, 6, 9)), ship]
    pred = [ship, _image((0, 3, 0, 3), (0, 2, 8, 10)), empty]
    # (1 + 0.5 + 0) / 3
    assert airbus_f2_mean(truth, pred) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 true images but 1 predicted"):
        airbus_f2_mean(truth[:2], pred[:1])


def test_airbus_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        airbus_f2(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(ValueError, match="integer instance label"):
        airbus_f2(np.zeros((4, 4)), np.zeros((4, 4), int))
    with pytest.raises(ValueError, match="negative"):
        airbus_f2(-np.ones((4, 4), int), np.zeros((4, 4), int))
    with pytest.raises(ValueError, match="thresholds"):
        airbus_f2(np.zeros((4, 4), int), np.zeros((4, 4), int), thresholds=[0.3])


def _reference_f2(truth, pred):
    """Brute force: IoU from boolean masks, then an explicit maximum one-to-one matching."""
    t_ids = [i for i in np.unique(truth) if i]
    p_ids = [i for i in np.unique(pred) if i]
    if not t_ids and not p_ids:
        return 1.0
    iou = np.zeros((len(t_ids), len(p_ids)))
    for a, i in enumerate(t_ids):
        for b, j in enumerate(p_ids):
            inter = np.logical_and(truth == i, pred == j).sum()
            union = np.logical_or(truth == i, pred == j).sum()
            iou[a, b] = inter / union
    scores = []
    for t in AIRBUS_THRESHOLDS:
        hits = (iou > t).astype(float)
        tp = 0
        if hits.size:
            rows, cols = linear_sum_assignment(-hits)
            tp = int(hits[rows, cols].sum())
        fn, fp = len(t_ids) - tp, len(p_ids) - tp
        scores.append(5 * tp / (5 * tp + 4 * fn + fp))
    return float(np.mean(scores))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_airbus_matches_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    truth, _ = ndimage.label(ndimage.binary_opening(rng.random((24, 24)) < 0.45))
    # predictions: the truth with pixels flipped, so IoUs spread over the thresholds
    noisy = (truth > 0) ^ (rng.random(truth.shape) < rng.uniform(0.0, 0.2))
    pred, _ = ndimage.label(noisy)
    pred = pred * 3 + (pred > 0)                           # ids that are not 1..n
    assert airbus_f2(truth, pred) == pytest.approx(_reference_f2(truth, pred))
