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
    # a downlinked learning sample's record (ground.data.learning): frame, window, the tile's
    # georeference, the model id and version that chose it, its scores, file and sha256
    origin: dict | None = None

    def digest(self) -> str:
        """A content hash: names the sample in the teacher cache and in lineage."""
        h = hashlib.sha256(np.ascontiguousarray(self.image, dtype=np.float32).tobytes())
        h.update(str(self.image.shape).encode())
        return h.hexdigest()


def bin_sample(sample: Sample, factor: int) -> Sample:
    """The sample at `factor` x its pixel size, as the daemon sees a frame at a coarser processing
    GSD: the image averaged over factor x factor blocks (the daemon's in-graph binning), the
    labels by the most frequent label of each block (IGNORE where no pixel is labelled); the far
    rows/columns that do not fill a block are dropped."""
    if factor == 1:
        return sample
    c, h, w = sample.image.shape
    hb, wb = h // factor, w // factor
    if hb == 0 or wb == 0:
        raise ValueError(f"{sample.name}: {h}x{w} pixels is smaller than one {factor}x{factor} block")
    image = sample.image[:, :hb * factor, :wb * factor].reshape(c, hb, factor, wb, factor)
    labels = None
    if sample.labels is not None:
        blocks = sample.labels[:hb * factor, :wb * factor].reshape(hb, factor, wb, factor)
        counts = _block_label_counts(blocks)
        labels = np.where(counts.max(axis=0) > 0, counts.argmax(axis=0), IGNORE).astype(np.uint8)
    return Sample(image.mean(axis=(2, 4), dtype=np.float32), labels, sample.name, sample.files, sample.origin)


def _block_label_counts(blocks: np.ndarray) -> np.ndarray:
    """(K, hb, wb) pixels of each label 0..K-1 present (IGNORE excluded) per block."""
    present = np.unique(blocks[blocks != IGNORE])
    k = int(present.max()) + 1 if present.size else 1
    return np.stack([(blocks == label).sum(axis=(1, 3)) for label in range(k)], axis=0)
