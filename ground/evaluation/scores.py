"""Scores (shared.metrics) of post-processed masks against labels where they exist and agreement
with the teacher always; `summary` is the row a table shows."""
from __future__ import annotations

import numpy as np

from shared.metrics import SegmentationScores
from ground.data.sample import IGNORE
from ground.evaluation.operating_point import OperatingPoint


def scores(pred: np.ndarray, ref: np.ndarray, num_classes: int, class_names=None) -> dict:
    """shared.metrics scores as JSON: accuracy, mIoU, macro F1, per-class IoU/F1 (IGNORE pixels skipped)."""
    s = SegmentationScores.from_labels(ref, pred, num_classes, ignore_index=IGNORE, class_names=class_names)
    return s.as_dict()


def evaluate_probs(probs, point: OperatingPoint, num_classes: int, class_names=None, labels=None,
                   teacher_mask=None) -> dict:
    """Scores at an operating point, vs labels (if any) and vs the teacher's mask (if any). Takes one
    probability map (K, H, W) or a list of them (a patch dataset: pixels pooled over all patches)."""
    many = isinstance(probs, (list, tuple))
    probs = list(probs) if many else [probs]
    labels = (list(labels) if many else [labels]) if labels is not None else None
    teacher = (list(teacher_mask) if many else [teacher_mask]) if teacher_mask is not None else None
    masks = [point.apply(p) for p in probs]
    flat = np.concatenate([m.ravel() for m in masks])
    out = {"operating_point": point.as_dict(class_names)}
    if labels is not None and all(lab is not None for lab in labels):
        out["vs_labels"] = scores(flat, np.concatenate([lab.ravel() for lab in labels]), num_classes, class_names)
    if teacher is not None:
        out["vs_teacher"] = scores(flat, np.concatenate([t.ravel() for t in teacher]), num_classes, class_names)
    return out


def summary(result: dict) -> dict:
    """The table columns of one evaluation: mIoU, macro F1, accuracy, per-class IoU, agreement."""
    row = {}
    if "vs_labels" in result:
        v = result["vs_labels"]
        row.update(miou=v["miou"], f1=v["macro_f1"], accuracy=v["accuracy"],
                   iou={k: c["iou"] for k, c in v["per_class"].items()})
    if "vs_teacher" in result:
        row.update(agreement=result["vs_teacher"]["accuracy"], agreement_miou=result["vs_teacher"]["miou"])
    return row


def evaluate_on(probs: list, point: OperatingPoint, classes: list[str], samples: list,
                teacher_masks: list | None) -> dict:
    """Scores at `point` and of the plain argmax (`argmax`), against labels and the teacher."""
    labels = [s.labels for s in samples] if all(s.labels is not None for s in samples) else None
    out = evaluate_probs(probs, point, len(classes), classes, labels, teacher_masks)
    raw = evaluate_probs(probs, OperatingPoint([None] * len(classes), 0), len(classes), classes,
                         labels, teacher_masks)
    out["argmax"] = {k: v for k, v in raw.items() if k != "operating_point"}
    return out
