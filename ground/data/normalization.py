"""Statistics carried forward: per-band normalisation (to the manifest) and class weights."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ground.data.sample import IGNORE, Sample
from ground.errors import DataError


@dataclass
class Normalization:
    """Per-band mean/std on reflectance, computed on the training imagery; goes to the bundle manifest
    (input.scaling) so the daemon normalises exactly as training did."""
    bands: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, samples: list[Sample], bands) -> "Normalization":
        if not samples:
            raise DataError("cannot compute normalisation statistics: no training imagery")
        n = sum(s.image[0].size for s in samples)
        mean = sum(s.image.reshape(s.image.shape[0], -1).astype(np.float64).sum(1) for s in samples) / n
        var = sum(((s.image.reshape(s.image.shape[0], -1) - mean[:, None]) ** 2).sum(1) for s in samples) / n
        return cls(tuple(bands), tuple(float(v) for v in mean), tuple(float(v) for v in np.sqrt(var).clip(1e-6)))

    def apply(self, image: np.ndarray) -> np.ndarray:
        m = np.asarray(self.mean, np.float32)[:, None, None]
        s = np.asarray(self.std, np.float32)[:, None, None]
        return (image - m) / s

    def as_dict(self) -> dict:
        return {"bands": list(self.bands), "mean": list(self.mean), "std": list(self.std),
                "on": "reflectance 0..1", "formula": "(x - mean) / std"}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        try:
            return cls(tuple(d["bands"]), tuple(map(float, d["mean"])), tuple(map(float, d["std"])))
        except KeyError as exc:
            raise DataError(f"normalisation statistics: missing field {exc.args[0]!r}") from None


def class_weights(samples: list[Sample], num_classes: int, method: str | list = "none") -> np.ndarray:
    """Per-class loss weights from label frequencies: 'none', 'inverse' (N / (K n_c)),
    'log' (1 / ln(1.02 + f_c), as MARIDA/MADOS train), or an explicit list."""
    if isinstance(method, (list, tuple)):
        if len(method) != num_classes:
            raise DataError(f"class_weights: {len(method)} values for {num_classes} classes")
        return np.asarray(method, np.float32)
    if method == "none":
        return np.ones(num_classes, np.float32)
    counts = np.zeros(num_classes, np.float64)
    for s in samples:
        if s.labels is not None:
            lab = s.labels[s.labels != IGNORE]
            counts += np.bincount(lab.ravel(), minlength=num_classes)[:num_classes]
    if counts.sum() == 0:
        raise DataError("class_weights: no labelled pixels to count")
    freq = counts / counts.sum()
    if method == "inverse":
        w = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    elif method == "log":
        w = 1.0 / np.log(1.02 + freq)
    else:
        raise DataError(f"class_weights: unknown method {method!r}; known: none, inverse, log, or a list")
    return (w / w[counts > 0].mean()).astype(np.float32)


def normalize(x: torch.Tensor, norm: "Normalization") -> torch.Tensor:
    """Raw reflectance batch (N, C, H, W) -> the model's input: (x - mean) / std per band."""
    m = torch.tensor(norm.mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(norm.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s
