"""A `Sample`: one image (bands, H, W) of reflectance 0..1 in the run's band order, and a label map
(H, W) uint8 with `IGNORE` where no label is (or None: unlabelled, the teacher labels it)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


IGNORE = 255


@dataclass
class Sample:
    image: np.ndarray                 # (bands, H, W) float32 reflectance
    labels: np.ndarray | None = None  # (H, W) uint8 class ids, IGNORE where unlabelled
    name: str = ""
    files: list[str] = field(default_factory=list)   # where it came from (lineage)

    def digest(self) -> str:
        """A content hash: names the sample in the teacher cache and in lineage."""
        h = hashlib.sha256(np.ascontiguousarray(self.image, dtype=np.float32).tobytes())
        h.update(str(self.image.shape).encode())
        return h.hexdigest()
