"""Segmentation scores from a confusion matrix, and the Airbus Ship Detection object-level F2.

Conventions (sklearn's where one exists, so the numbers can be checked against it):
- the confusion matrix has true classes in rows, predicted classes in columns;
- a per-class score whose denominator is zero is NaN (undefined), never a silent 0;
  `as_dict()` writes it as JSON null.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


# ----------------------------------------------------------------------------- confusion matrix

def _labels(name: str, a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == np.bool_:
        return a.astype(np.int64)
    if np.issubdtype(a.dtype, np.integer):
        return a
    if np.issubdtype(a.dtype, np.floating) and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
        return a.astype(np.int64)
    raise ValueError(f"{name} must hold integer class labels, got dtype {a.dtype}")


def _out_of_range(name: str, values: np.ndarray, num_classes: int) -> None:
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        shown = np.unique(bad)[:10].tolist()
        raise ValueError(f"{name} has label(s) {shown} outside 0..{num_classes - 1} "
                         f"(num_classes={num_classes}) in {bad.size} pixel(s)")


def confusion_matrix(y_true, y_pred, num_classes: int, ignore_index: int | None = None
                     ) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = truth, columns = prediction.

    Pixels whose truth equals `ignore_index` are left out whatever was predicted there.
    Raises ValueError for differing shapes or labels outside 0..num_classes-1."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    t, p = _labels("y_true", y_true), _labels("y_pred", y_pred)
    if t.shape != p.shape:
        raise ValueError(f"y_true shape {t.shape} and y_pred shape {p.shape} differ")
    t, p = t.ravel(), p.ravel()
    if ignore_index is not None:
        keep = t != ignore_index
        t, p = t[keep], p[keep]
    _out_of_range("y_true", t, num_classes)
    _out_of_range("y_pred", p, num_classes)
    k = int(num_classes)
    codes = t.astype(np.int64) * k + p.astype(np.int64)
    return np.bincount(codes, minlength=k * k).reshape(k, k)


# ------------------------------------------------------------------------- segmentation scores

def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _json_number(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


@dataclass(frozen=True, eq=False)
class SegmentationScores:
    """Per-class and overall scores of one confusion matrix (rows truth, columns prediction).

    A class is *present* when it occurs in the truth or in the prediction (tp + fp + fn > 0).
    Per-class scores with a zero denominator are NaN: `iou` of an absent class, `precision`
    of a class never predicted, `recall` of a class not in the truth. `miou` is the mean IoU
    over the present classes only (sklearn's `jaccard_score(average="macro")`), so a class
    missing from a small test chip does not drag the mean to 0 or make it NaN."""

    confusion: np.ndarray
    class_names: tuple[str, ...]

    @classmethod
    def from_confusion(cls, cm, class_names: Sequence[str] | None = None) -> "SegmentationScores":
        cm = np.asarray(cm)
        if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
            raise ValueError(f"confusion matrix must be square (K, K), got shape {cm.shape}")
        if not (np.issubdtype(cm.dtype, np.integer) or np.all(cm == np.round(cm))) or np.any(cm < 0):
            raise ValueError("confusion matrix must hold non-negative integer counts")
        k = cm.shape[0]
        if class_names is None:
            names = tuple(str(i) for i in range(k))
        else:
            names = tuple(str(n) for n in class_names)
            if len(names) != k:
                raise ValueError(f"class_names has {len(names)} names for a {k}-class confusion "
                                 f"matrix: {list(names)}")
            if len(set(names)) != k:
                raise ValueError(f"class_names must be unique: {list(names)}")
        return cls(cm.astype(np.int64), names)

    @classmethod
    def from_labels(cls, y_true, y_pred, num_classes: int, ignore_index: int | None = None,
                    class_names: Sequence[str] | None = None) -> "SegmentationScores":
        return cls.from_confusion(confusion_matrix(y_true, y_pred, num_classes, ignore_index),
                                  class_names)

    # counts
    @property
    def tp(self) -> np.ndarray:
        return np.diag(self.confusion)

    @property
    def fp(self) -> np.ndarray:
        return self.confusion.sum(axis=0) - self.tp

    @property
    def fn(self) -> np.ndarray:
        return self.confusion.sum(axis=1) - self.tp

    @property
    def support(self) -> np.ndarray:
        """Pixels of each class in the truth."""
        return self.confusion.sum(axis=1)

    @property
    def total(self) -> int:
        return int(self.confusion.sum())

    @property
    def present(self) -> np.ndarray:
        """Classes that occur in the truth or the prediction."""
        return (self.tp + self.fp + self.fn) > 0

    # scores
    @property
    def iou(self) -> np.ndarray:
        return _ratio(self.tp, self.tp + self.fp + self.fn)

    @property
    def miou(self) -> float:
        """Mean IoU over the classes present in truth or prediction (NaN if none)."""
        iou = self.iou[self.present]
        return float(iou.mean()) if iou.size else math.nan

    @property
    def precision(self) -> np.ndarray:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> np.ndarray:
        return _ratio(self.tp, self.tp + self.fn)

    def fbeta(self, beta: float) -> np.ndarray:
        """Per-class F-beta = (1+b^2) tp / ((1+b^2) tp + b^2 fn + fp); NaN for absent classes."""
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta!r}")
        b2 = float(beta) ** 2
        return _ratio((1 + b2) * self.tp, (1 + b2) * self.tp + b2 * self.fn + self.fp)

    @property
    def f1(self) -> np.ndarray:
        return self.fbeta(1.0)

    @property
    def macro_f1(self) -> float:
        """Mean F1 over the present classes (sklearn `f1_score(average="macro")`)."""
        f1 = self.f1[self.present]
        return float(f1.mean()) if f1.size else math.nan

    @property
    def accuracy(self) -> float:
        """Pixel accuracy: correctly labelled pixels / all counted pixels."""
        return float(_ratio(self.tp.sum(), self.total))

    @property
    def kappa(self) -> float:
        """Cohen's kappa (po - pe) / (1 - pe); NaN when pe == 1 (a single class everywhere)."""
        n = self.total
        if n == 0:
            return math.nan
        po = self.tp.sum() / n
        pe = float(np.dot(self.confusion.sum(axis=1), self.confusion.sum(axis=0))) / n / n
        return math.nan if pe == 1.0 else float((po - pe) / (1.0 - pe))

    def as_dict(self) -> dict:
        """JSON-ready: plain floats/ints/lists, NaN as None."""
        per_class = {}
        iou, prec, rec, f1 = self.iou, self.precision, self.recall, self.f1
        for i, name in enumerate(self.class_names):
            per_class[name] = {"iou": _json_number(iou[i]), "precision": _json_number(prec[i]),
                               "recall": _json_number(rec[i]), "f1": _json_number(f1[i]),
                               "support": int(self.support[i])}
        return {"classes": list(self.class_names), "pixels": self.total,
                "accuracy": _json_number(self.accuracy), "miou": _json_number(self.miou),
                "macro_f1": _json_number(self.macro_f1), "kappa": _json_number(self.kappa),
                "per_class": per_class, "confusion": self.confusion.tolist()}


# ------------------------------------------------------------------ Airbus object-level F2

# 0.5, 0.55, .., 0.95, rounded so that an IoU of exactly 0.8 is not "above 0.8000000000000003"
AIRBUS_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def _instances(name: str, a) -> np.ndarray:
    a = np.asarray(a)
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise ValueError(f"{name} must be an integer instance label image, got dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise ValueError(f"{name} has negative instance labels (0 is background, objects > 0)")
    return a


def instance_iou(true_objects, pred_objects) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU between every true and every predicted object of two instance label images
    (0 = background): (iou (n_true, n_pred), true ids, pred ids). One bincount over pixel
    pairs gives all intersections at once."""
    t = _instances("true_objects", true_objects)
    p = _instances("pred_objects", pred_objects)
    if t.shape != p.shape:
        raise ValueError(f"true_objects shape {t.shape} and pred_objects shape {p.shape} differ")
    t_ids, p_ids = np.unique(t[t > 0]), np.unique(p[p > 0])
    nt, np_ = len(t_ids), len(p_ids)
    if nt == 0 or np_ == 0:
        return np.zeros((nt, np_)), t_ids, p_ids
    # compact indices: 0 background, 1..n objects
    ti = np.where(t > 0, np.searchsorted(t_ids, t) + 1, 0).ravel()
    pi = np.where(p > 0, np.searchsorted(p_ids, p) + 1, 0).ravel()
    counts = np.bincount(ti * (np_ + 1) + pi, minlength=(nt + 1) * (np_ + 1))
    counts = counts.reshape(nt + 1, np_ + 1)
    inter = counts[1:, 1:]
    area_t, area_p = counts[1:, :].sum(axis=1), counts[:, 1:].sum(axis=0)
    union = area_t[:, None] + area_p[None, :] - inter
    return inter / union, t_ids, p_ids


def airbus_f2(true_objects, pred_objects, thresholds: Sequence[float] = AIRBUS_THRESHOLDS,
              beta: float = 2.0) -> float:
    """Object-level F2 of one image, as in Kaggle's Airbus Ship Detection Challenge
    (https://www.kaggle.com/c/airbus-ship-detection#evaluation): at each IoU threshold t a
    predicted object is a hit when its IoU with a true object is *above* t;
    F2(t) = 5 TP / (5 TP + 4 FN + FP); the image's score is the mean over t = 0.5 .. 0.95.

    Matching is one-to-one without a search: objects of one image do not overlap, and
    IoU > 0.5 means sharing more than half of both objects, so no object can pass a threshold
    >= 0.5 with two others. Thresholds below 0.5 are refused for that reason.

    An image with no true and no predicted objects scores 1. The evaluation page's formula is
    0/0 there and it states no rule; we take "nothing there, nothing found" as a perfect
    answer, the convention of public re-implementations of the metric (an image with no true
    objects and any prediction scores 0, as the formula gives)."""
    ts = [float(t) for t in thresholds]
    if not ts or min(ts) < 0.5 or max(ts) >= 1.0:
        raise ValueError(f"thresholds must be non-empty and within [0.5, 1), got {list(thresholds)}")
    iou, t_ids, p_ids = instance_iou(true_objects, pred_objects)
    nt, np_ = len(t_ids), len(p_ids)
    if nt == 0 and np_ == 0:
        return 1.0
    b2 = beta * beta
    scores = []
    for t in ts:
        tp = int(np.count_nonzero(iou > t))
        fn, fp = nt - tp, np_ - tp
        scores.append((1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp))
    return float(np.mean(scores))


def airbus_f2_mean(true_images: Sequence, pred_images: Sequence,
                   thresholds: Sequence[float] = AIRBUS_THRESHOLDS) -> float:
    """The competition score over several images: the mean of their `airbus_f2`."""
    true_images, pred_images = list(true_images), list(pred_images)
    if len(true_images) != len(pred_images):
        raise ValueError(f"{len(true_images)} true images but {len(pred_images)} predicted images")
    if not true_images:
        raise ValueError("airbus_f2_mean needs at least one image")
    return float(np.mean([airbus_f2(t, p, thresholds) for t, p in zip(true_images, pred_images)]))
