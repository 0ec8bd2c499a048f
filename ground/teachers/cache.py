"""Teacher outputs cached on disk: a slow teacher runs once per (image, augmentation), not once per
training step, and not again in the next run with the same teacher and imagery.

Key = sha256(teacher identity, image content, D4 transform index). Value = class probabilities
(K, H, W) stored as float16 `.npy` (half the space; the students train on soft targets where 1e-3
resolution is plenty).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ground.data.augment import dihedral


class TeacherCache:
    def __init__(self, root: str | Path, teacher):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.teacher = teacher
        self._teacher_key = hashlib.sha256(teacher.identity.encode()).hexdigest()[:16]
        self.hits = 0
        self.misses = 0

    def path_for(self, sample, k: int) -> Path:
        key = hashlib.sha256(f"{self._teacher_key}:{sample.digest()}:{k}".encode()).hexdigest()[:32]
        return self.root / self._teacher_key / f"{key}.npy"

    def probs(self, sample, k: int = 0) -> np.ndarray:
        """The teacher's probabilities for `sample` seen through D4 transform `k` (in that frame)."""
        path = self.path_for(sample, k)
        if path.exists():
            try:
                out = np.load(path)
                self.hits += 1
                return out
            except (OSError, ValueError):
                path.unlink(missing_ok=True)        # a torn write: recompute
        self.misses += 1
        out = self.teacher.predict_proba(dihedral(sample.image, k)).astype(np.float16)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npy")
        np.save(tmp, out)
        tmp.replace(path)
        return out

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "root": str(self.root)}
