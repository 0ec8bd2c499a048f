"""Predictors: a reflectance image (C, H, W) -> class probabilities (K, H, W), tiled with overlap
as the daemon tiles, for a torch model (as is, or in emulated FP16) and an OpenVINO IR."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ground.compression.fp16 import emulate_fp16
from ground.data.normalization import Normalization
from ground.openvino.runtime import compile_ir, softmax
from ground.teachers.base import tiled_predict

Predict = Callable[[np.ndarray], np.ndarray]       # reflectance image (C, H, W) -> probabilities (K, H, W)


def model_proba(model: torch.nn.Module, image: np.ndarray, norm: Normalization, tile: int = 256,
                overlap: int = 64, batch: int = 8) -> np.ndarray:
    """Class probabilities (K, H, W) of a torch model on a reflectance image (bands, H, W)."""
    model.eval()

    def infer(tiles):
        with torch.no_grad():
            x = torch.from_numpy(np.array(tiles)).to(device)      # the model's device (CPU or GPU)
            return torch.softmax(model(x).float(), 1).cpu().numpy()
    device = next(model.parameters()).device
    return tiled_predict(norm.apply(image), infer, tile, overlap, batch)


def torch_predictor(model: torch.nn.Module, norm: Normalization, tile: int, overlap: int,
                    fp16: str | None = None) -> Predict:
    """Probabilities of a torch model, as is or in emulated FP16 ("round" or "half")."""
    m = emulate_fp16(model, fp16) if fp16 else model.eval()
    return lambda image: model_proba(m, image, norm, tile, overlap)


def ir_predictor(xml: str | Path, norm: Normalization, tile: int, overlap: int,
                 precision: str = "fp32") -> Predict:
    """Probabilities of an OpenVINO IR run by OpenVINO on this CPU at `precision`, as the daemon
    runs a bundle validated at it."""
    compiled = compile_ir(xml, precision=precision)
    infer = lambda tiles: softmax(np.asarray(compiled(tiles)[0]))
    return lambda image: tiled_predict(norm.apply(image), infer, tile, overlap)
