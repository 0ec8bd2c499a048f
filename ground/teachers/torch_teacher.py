"""A torch segmentation model as a teacher: an smp model trained here, or any checkpoint of a run
(a pruned student included) with its normalisation statistics."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from shared.hashing import sha256_file
from ground.errors import GroundError
from ground.models.checkpoints import load_model
from ground.teachers.base import Teacher, state_digest, tiled_predict
from ground.training.device import Placement, out_of_memory


class TorchTeacher(Teacher):
    """A torch segmentation model (an smp model trained here) with its normalisation statistics."""

    def __init__(self, model, norm, name: str, tile: int = 256, overlap: int = 64, weights_digest: str = "",
                 device: str = "cpu", batch: int = 8):
        # labelling runs batched on `device` (a GPU when the config says so: ground.training.device)
        self.batch = int(batch)
        self.model = Placement.of(device, "fp32").model(model).eval()
        self.norm = norm
        self.name = name
        self.bands = tuple(norm.bands)
        self.num_classes = int(getattr(model, "classes", None) or _out_channels(model))
        self.tile, self.overlap = tile, overlap
        self._digest = weights_digest or state_digest(model)

    @property
    def identity(self) -> str:
        return json.dumps({"weights": self._digest, "norm": self.norm.as_dict(), "tile": self.tile,
                           "overlap": self.overlap})

    def predict_proba(self, image: np.ndarray) -> np.ndarray:
        # where the model is now (training may have moved it, e.g. for a feature term)
        place = Placement(next(self.model.parameters()).device)

        def infer(tiles):
            (x,) = place.batch(torch.from_numpy(np.array(tiles)))
            with torch.no_grad(), out_of_memory(len(tiles), f"teacher {self.name}", place.device):
                return torch.softmax(self.model(x).float(), 1).cpu().numpy()
        return tiled_predict(self.norm.apply(image), infer, self.tile, self.overlap, self.batch)

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kw) -> "TorchTeacher":
        model, norm, meta = load_model(path)
        return cls(model, norm, meta.get("name", f"checkpoint:{Path(path).name}"),
                   weights_digest=sha256_file(Path(path)), **kw)


def _out_channels(model) -> int:
    head = getattr(model, "segmentation_head", None) or getattr(model, "head", None)
    convs = [m for m in (head.modules() if head is not None else []) if hasattr(m, "out_channels")]
    if not convs:
        raise GroundError("cannot tell the teacher's number of classes; set classes")
    return convs[-1].out_channels
