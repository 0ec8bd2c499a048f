"""What every teacher offers, and the tiled inference they (and the students' evaluation) share.

Every teacher answers `predict_proba(image)` on a reflectance image (bands, H, W) of any size:
it tiles (shared.tiling), normalises, infers and stitches class probabilities (K, H, W).
"""
from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
import torch

from shared.tiling import stitch, tile as cut


def tiled_predict(image: np.ndarray, infer: Callable[[np.ndarray], np.ndarray], tile: int, overlap: int,
                  batch: int = 8) -> np.ndarray:
    """Probabilities (K, H, W) of `image` (C, H, W, already normalised) from `infer` on (N, C, t, t)
    tiles -> (N, K, t, t) probabilities; tiles overlap and are blended (shared.tiling)."""
    tiles, grid = cut(np.ascontiguousarray(image, np.float32), tile, overlap, pad_mode="reflect")
    out = np.concatenate([infer(tiles[i:i + batch]) for i in range(0, len(tiles), batch)])
    return stitch(out.astype(np.float32), grid, mode="blend")


class Teacher:
    """What a teacher offers: its bands, classes, and probabilities for a reflectance image."""
    name: str
    bands: tuple[str, ...]
    num_classes: int

    @property
    def identity(self) -> str:
        """Changes whenever the teacher's outputs could (weights, normalisation): the cache key."""
        raise NotImplementedError

    def predict_proba(self, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def state_digest(model: torch.nn.Module) -> str:
    """sha256 over a model's state (names and values): a torch teacher's cache key."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()
