"""Augmentation: the 8 flips/90-degree rotations (the dihedral group D4) and random crops.

A D4 transform is an index 0..7, so a teacher's output can be cached per (image, transform) and the
student sees exactly the image the teacher labelled. Works on any array (..., H, W).
"""
from __future__ import annotations

import numpy as np

from ground.errors import ConfigError, GroundError

D4 = tuple(range(8))          # 0..3: rotate k*90 degrees; 4..7: mirror, then rotate
IDENTITY = (0,)


def dihedral(x: np.ndarray, k: int) -> np.ndarray:
    if not 0 <= k < 8:
        raise GroundError(f"dihedral transform index must be 0..7, got {k}")
    if k >= 4:
        x = x[..., ::-1]
    return np.ascontiguousarray(np.rot90(x, k % 4, axes=(-2, -1)))


def transforms_for(names: list[str] | tuple[str, ...]) -> tuple[int, ...]:
    """D4 indices allowed by the config's augmentation names ('flip', 'rot90'; 'crop' is separate)."""
    unknown = set(names) - {"flip", "rot90", "crop"}
    if unknown:
        raise ConfigError(f"augment: unknown augmentation(s) {sorted(unknown)}; known: flip, rot90, crop")
    flips, rots = "flip" in names, "rot90" in names
    if flips and rots:
        return D4
    if rots:
        return (0, 1, 2, 3)
    if flips:
        return (0, 4, 6)       # mirror left-right; mirror then rotate 180 = mirror up-down
    return IDENTITY


def random_crop(arrays: list[np.ndarray], size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """The same random `size` x `size` window of every array (..., H, W) (the top-left one when `rng`
    is None); pads what is smaller by mirroring."""
    h, w = arrays[0].shape[-2:]
    r = int(rng.integers(0, max(h - size, 0) + 1)) if rng is not None else 0
    c = int(rng.integers(0, max(w - size, 0) + 1)) if rng is not None else 0
    out = []
    for a in arrays:
        a = a[..., r:r + size, c:c + size]
        ph, pw = size - a.shape[-2], size - a.shape[-1]
        if ph or pw:
            pad = [(0, 0)] * (a.ndim - 2) + [(0, ph), (0, pw)]
            # one mode for images, labels and teacher outputs, so they stay aligned
            a = np.pad(a, pad, mode="symmetric")
        out.append(a)
    return out
