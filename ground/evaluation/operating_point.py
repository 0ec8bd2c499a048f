"""The operating point (per-class thresholds + opening radius, as the manifest's post-processing
carries them; the very functions of shared.postprocess the daemon runs), the threshold sweep, and
the ONE calibration every stage uses: chosen on training imagery, never the held-out rows."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from shared.metrics import SegmentationScores, confusion_matrix
from shared.postprocess import open_classes, threshold
from ground.data.dataset import Data
from ground.data.sample import IGNORE
from ground.errors import ConfigError
from ground.teachers.cache import TeacherCache


@dataclass
class OperatingPoint:
    """Per-class thresholds (None: not thresholded) and the opening radius, as the manifest's
    post-processing section carries them."""
    thresholds: list = field(default_factory=list)
    opening_radius: int = 0

    def apply(self, probs: np.ndarray) -> np.ndarray:
        mask = threshold(probs, self.thresholds or None)
        return open_classes(mask, int(self.opening_radius)) if self.opening_radius else mask

    def as_dict(self, class_names=None) -> dict:
        d = {"thresholds": self.thresholds, "opening_radius": self.opening_radius}
        if class_names:
            d["threshold_by_class"] = {n: t for n, t in zip(class_names, self.thresholds) if t is not None}
        return d


def sweep_thresholds(probs: list[np.ndarray], refs: list[np.ndarray], num_classes: int,
                     opening_radius: int = 0, grid=None, background: int = 0) -> tuple[OperatingPoint, list[dict]]:
    """Per-class thresholds (the background class stays unthresholded) maximising mIoU of the
    post-processed masks against `refs` (human labels or teacher labels of *calibration* imagery).
    Coordinate ascent: one class at a time over `grid`, twice round. Returns the point and the trace."""
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


CALIBRATIONS = ("auto", "labels", "teacher", "none")


def calibration_source(how: str, uses_labels: bool, data: Data) -> str:
    """"auto" -> "labels" for a model that learnt from labels (when the run has them), else
    "teacher" (label-free models are calibrated against the teacher's masks)."""
    if how not in CALIBRATIONS:
        raise ConfigError(f"eval.calibrate: one of {CALIBRATIONS}, got {how!r}")
    if how == "auto":
        return "labels" if uses_labels and data.labelled else "teacher"
    return how


def calibrate(predict, how: str, data: Data, cache: TeacherCache | None, num_classes: int,
              opening_radius: int) -> OperatingPoint:
    """The operating point of `predict` (image -> probabilities) chosen on *training* imagery:
    thresholds swept against its labels (how="labels") or the teacher's masks (how="teacher");
    "none" keeps the plain argmax. Never the held-out rows."""
    if how == "none":
        return OperatingPoint([None] * num_classes, opening_radius)
    if how == "labels":
        if not data.labelled:
            raise ConfigError("eval.calibrate = 'labels' needs data.labelled")
        samples = data.labelled
        refs = [s.labels for s in samples]
    else:
        samples = data.distill_samples(with_labels=False)
        refs = [cache.probs(s, 0).astype(np.float32).argmax(0).astype(np.uint8) for s in samples]
    point, _trace = sweep_thresholds([predict(s.image) for s in samples], refs, num_classes, opening_radius)
    return point
