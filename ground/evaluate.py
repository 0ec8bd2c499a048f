"""Evaluation as the daemon will see it: tiled inference with overlap, the operating point
(per-class thresholds + opening, the very functions of shared.postprocess the daemon runs), then
scores (shared.metrics) against labels where they exist and agreement with the teacher always.

The threshold sweep picks the operating point on calibration imagery (never the held-out rows).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from ground.data import IGNORE, Normalization


def model_proba(model: torch.nn.Module, image: np.ndarray, norm: Normalization, tile: int = 256,
                overlap: int = 64, batch: int = 8) -> np.ndarray:
    """Class probabilities (K, H, W) of a torch model on a reflectance image (bands, H, W)."""
    from ground.teachers import tiled_predict
    model.eval()

    def infer(tiles):
        with torch.no_grad():
            return torch.softmax(model(torch.from_numpy(np.array(tiles))), 1).numpy()
    return tiled_predict(norm.apply(image), infer, tile, overlap, batch)


@dataclass
class OperatingPoint:
    """Per-class thresholds (None: not thresholded) and the opening radius, as the manifest's
    post-processing section carries them."""
    thresholds: list = field(default_factory=list)
    opening_radius: int = 0

    def apply(self, probs: np.ndarray) -> np.ndarray:
        from shared.postprocess import open_classes, threshold
        mask = threshold(probs, self.thresholds or None)
        return open_classes(mask, int(self.opening_radius)) if self.opening_radius else mask

    def as_dict(self, class_names=None) -> dict:
        d = {"thresholds": self.thresholds, "opening_radius": self.opening_radius}
        if class_names:
            d["threshold_by_class"] = {n: t for n, t in zip(class_names, self.thresholds) if t is not None}
        return d


def scores(pred: np.ndarray, ref: np.ndarray, num_classes: int, class_names=None) -> dict:
    """shared.metrics scores as JSON: accuracy, mIoU, macro F1, per-class IoU/F1 (IGNORE pixels skipped)."""
    from shared.metrics import SegmentationScores
    s = SegmentationScores.from_labels(ref, pred, num_classes, ignore_index=IGNORE, class_names=class_names)
    return s.as_dict()


def sweep_thresholds(probs: list[np.ndarray], refs: list[np.ndarray], num_classes: int,
                     opening_radius: int = 0, grid=None, background: int = 0) -> tuple[OperatingPoint, list[dict]]:
    """Per-class thresholds (the background class stays unthresholded) maximising mIoU of the
    post-processed masks against `refs` (human labels or teacher labels of *calibration* imagery).
    Coordinate ascent: one class at a time over `grid`, twice round. Returns the point and the trace."""
    from shared.metrics import SegmentationScores, confusion_matrix
    grid = list(grid if grid is not None else np.round(np.arange(0.1, 0.95, 0.05), 2))
    fg = [c for c in range(num_classes) if c != background]

    def miou(thr):
        point = OperatingPoint([None if t is None else float(t) for t in thr], opening_radius)
        cm = sum(confusion_matrix(r, point.apply(p), num_classes, ignore_index=IGNORE) for p, r in zip(probs, refs))
        return SegmentationScores.from_confusion(cm).miou

    best = [None] * num_classes
    best_score = miou(best)
    trace = [{"thresholds": list(best), "miou": best_score}]
    for _, c in itertools.product(range(2), fg):
        for t in [None] + grid:
            trial = list(best)
            trial[c] = t
            s = miou(trial)
            trace.append({"thresholds": trial, "miou": s})
            if s > best_score + 1e-9:
                best, best_score = trial, s
    return OperatingPoint([None if t is None else float(t) for t in best], opening_radius), trace


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
