"""Teachers run by OpenVINO: any external ONNX or IR model (`openvino:PATH`), and the cloud/shadow
models that the PyPI package ukis-csmask ships (band order and mean/std from its JSON)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import openvino as ov

from shared.bands import canonical_band
from shared.hashing import sha256_file
from ground.errors import GroundError
from ground.openvino.runtime import softmax
from ground.teachers.base import Teacher, tiled_predict


class OpenVINOTeacher(Teacher):
    """An external ONNX or OpenVINO IR model with fixed-size (or dynamic) NCHW input, logits out."""

    def __init__(self, model_path: str | Path, bands: Sequence[str], mean: Sequence[float], std: Sequence[float],
                 num_classes: int, tile: int = 256, overlap: int = 128, name: str | None = None,
                 outputs: str = "logits", threads: int | None = None, device: str = "best"):
        self.path = Path(model_path)
        if not self.path.exists():
            raise FileNotFoundError(f"teacher model {self.path} not found")
        if not len(bands) == len(mean) == len(std):
            raise GroundError(f"teacher {self.path.name}: bands ({len(bands)}), mean ({len(mean)}) and std "
                             f"({len(std)}) must have the same length")
        if outputs not in ("logits", "probabilities"):
            raise GroundError(f"teacher outputs must be 'logits' or 'probabilities', got {outputs!r}")
        self.name = name or f"openvino:{self.path}"
        self.bands = tuple(canonical_band(b) for b in bands)
        self.mean = np.asarray(mean, np.float32)[:, None, None]
        self.std = np.asarray(std, np.float32)[:, None, None]
        self.num_classes = int(num_classes)
        self.tile, self.overlap, self.outputs = int(tile), int(overlap), outputs
        core = ov.Core()
        model = core.read_model(str(self.path))
        shape = model.inputs[0].get_partial_shape()
        if shape.rank.get_length() != 4:
            raise GroundError(f"teacher {self.path.name}: expected an NCHW input, got {shape}")
        if shape[1].is_static and shape[1].get_length() != len(self.bands):
            raise GroundError(f"teacher {self.path.name}: takes {shape[1].get_length()} bands, "
                             f"{len(self.bands)} band names given")
        if shape[2].is_static and shape[2].get_length() != self.tile:
            self.tile = shape[2].get_length()       # a fixed-size model dictates the tile
        # weights = floating-point constants of the graph (shape constants are integers)
        self.params = int(sum(np.prod(list(op.get_output_shape(0))) for op in model.get_ops()
                              if op.get_type_name() == "Constant" and op.get_output_element_type(0).is_real()))
        self._digest = sha256_file(self.path)
        self._ort = onnxruntime_cuda_session(self.path) if device in ("best", "cuda") else None
        if self._ort is None:
            self.device = openvino_device(core, device)
            config = {"INFERENCE_NUM_THREADS": int(threads)} if threads and self.device == "CPU" else {}
            self._compiled = core.compile_model(model, self.device, config)
        else:
            self.device = "onnxruntime:CUDA"

    @property
    def identity(self) -> str:
        return json.dumps({"model": self._digest, "mean": self.mean.ravel().tolist(),
                           "std": self.std.ravel().tolist(), "tile": self.tile, "overlap": self.overlap})

    def _infer(self, tiles: np.ndarray) -> np.ndarray:
        if self._ort is not None:
            out = self._ort.run(None, {self._ort.get_inputs()[0].name: np.ascontiguousarray(tiles, np.float32)})[0]
        else:
            out = self._compiled(tiles)[0]
        return softmax(out) if self.outputs == "logits" else out

    def predict_proba(self, image: np.ndarray) -> np.ndarray:
        if image.shape[0] != len(self.bands):
            raise GroundError(f"teacher {self.name} takes {len(self.bands)} bands {self.bands}, got {image.shape[0]}")
        return tiled_predict((image - self.mean) / self.std, self._infer, self.tile, self.overlap)


def openvino_device(core: ov.Core, device: str = "best") -> str:
    """OpenVINO's device for a teacher: "best" = a GPU plugin when the machine has one, else the CPU;
    or a device OpenVINO names ("CPU", "GPU.1", "AUTO")."""
    have = list(core.available_devices)
    if device in ("best", "cuda"):
        return next((d for d in have if d.startswith("GPU")), "CPU")
    if device.split(":")[0] not in ("AUTO", "MULTI", "HETERO") and device not in have:
        raise GroundError(f"OpenVINO device {device!r} not on this machine (here: {', '.join(have)})")
    return device


def onnxruntime_cuda_session(path: Path):
    """An onnxruntime session on CUDA for an .onnx teacher when onnxruntime-gpu is installed and sees a
    GPU; None otherwise (OpenVINO runs it)."""
    if path.suffix.lower() != ".onnx" or importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime as ort          # optional: only where it is installed
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    return ort.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def ukis_csmask_teacher(variant: str = "6b-l1c", **kw) -> OpenVINOTeacher:
    """The ukis-csmask model `model_{variant}.onnx` with the band order and statistics of its JSON."""
    spec = importlib.util.find_spec("ukis_csmask")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the teacher ukis-csmask needs the PyPI package ukis-csmask", name="ukis_csmask")
    folder = Path(list(spec.submodule_search_locations)[0])
    onnx = folder / f"model_{variant.replace('-', '_')}.onnx"
    meta_path = onnx.with_suffix(".json")
    if not onnx.exists():
        raise FileNotFoundError(f"ukis-csmask has no model {onnx.name} (variants: 6b-l1c, 6b-l2a, 4b-l1c, 4b-l2a)")
    meta = json.loads(meta_path.read_text())
    try:
        mean, std = meta["data"]["dataset_statistics"]["img"]
        names = meta["data"]["dataset_statistics"]["band_names"]
        classes = int(meta["data"]["classes"])
    except (KeyError, ValueError) as exc:
        raise GroundError(f"{meta_path}: missing field {exc}") from None
    kw.setdefault("tile", int(meta["data"].get("target_size", [256])[0]))
    return OpenVINOTeacher(onnx, names, mean, std, classes, name=f"ukis-csmask-{variant}", **kw)
