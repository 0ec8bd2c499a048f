"""Teachers: the big models whose outputs the students learn from. One registry, by name.

- `smp:Arch/encoder` (e.g. `smp:FPN/efficientnet-b4`, the default): any segmentation-models-pytorch
  model, trained here from labels (ground.train), with `encoder_weights=None` (nothing downloads).
- `ukis-csmask-6b-l1c` (and -6b-l2a, -4b-l1c, -4b-l2a): the cloud/shadow models shipped by the PyPI
  package ukis-csmask, run through OpenVINO; band order and mean/std come from the package's JSON.
- `openvino:PATH` (an .onnx or IR .xml): any external model; give bands, mean, std, classes.

Every teacher answers `predict_proba(image)` on a reflectance image (bands, H, W) of any size:
it tiles (shared.tiling), normalises, infers and stitches class probabilities (K, H, W).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

DEFAULT_TEACHER = "smp:FPN/efficientnet-b4"


def softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def tiled_predict(image: np.ndarray, infer: Callable[[np.ndarray], np.ndarray], tile: int, overlap: int,
                  batch: int = 8) -> np.ndarray:
    """Probabilities (K, H, W) of `image` (C, H, W, already normalised) from `infer` on (N, C, t, t)
    tiles -> (N, K, t, t) probabilities; tiles overlap and are blended (shared.tiling)."""
    from shared.tiling import stitch, tile as cut
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


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class OpenVINOTeacher(Teacher):
    """An external ONNX or OpenVINO IR model with fixed-size (or dynamic) NCHW input, logits out."""

    def __init__(self, model_path: str | Path, bands: Sequence[str], mean: Sequence[float], std: Sequence[float],
                 num_classes: int, tile: int = 256, overlap: int = 128, name: str | None = None,
                 outputs: str = "logits", threads: int | None = None):
        import openvino as ov
        from shared.bands import canonical_band
        self.path = Path(model_path)
        if not self.path.exists():
            raise FileNotFoundError(f"teacher model {self.path} not found")
        if not len(bands) == len(mean) == len(std):
            raise ValueError(f"teacher {self.path.name}: bands ({len(bands)}), mean ({len(mean)}) and std "
                             f"({len(std)}) must have the same length")
        if outputs not in ("logits", "probabilities"):
            raise ValueError(f"teacher outputs must be 'logits' or 'probabilities', got {outputs!r}")
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
            raise ValueError(f"teacher {self.path.name}: expected an NCHW input, got {shape}")
        if shape[1].is_static and shape[1].get_length() != len(self.bands):
            raise ValueError(f"teacher {self.path.name}: takes {shape[1].get_length()} bands, "
                             f"{len(self.bands)} band names given")
        if shape[2].is_static and shape[2].get_length() != self.tile:
            self.tile = shape[2].get_length()       # a fixed-size model dictates the tile
        # weights = floating-point constants of the graph (shape constants are integers)
        self.params = int(sum(np.prod(list(op.get_output_shape(0))) for op in model.get_ops()
                              if op.get_type_name() == "Constant" and op.get_output_element_type(0).is_real()))
        config = {"INFERENCE_NUM_THREADS": int(threads)} if threads else {}
        self._compiled = core.compile_model(model, "CPU", config)
        self._digest = _file_digest(self.path)

    @property
    def identity(self) -> str:
        return json.dumps({"model": self._digest, "mean": self.mean.ravel().tolist(),
                           "std": self.std.ravel().tolist(), "tile": self.tile, "overlap": self.overlap})

    def _infer(self, tiles: np.ndarray) -> np.ndarray:
        out = self._compiled(tiles)[0]
        return softmax(out) if self.outputs == "logits" else out

    def predict_proba(self, image: np.ndarray) -> np.ndarray:
        if image.shape[0] != len(self.bands):
            raise ValueError(f"teacher {self.name} takes {len(self.bands)} bands {self.bands}, got {image.shape[0]}")
        return tiled_predict((image - self.mean) / self.std, self._infer, self.tile, self.overlap)


def ukis_csmask_teacher(variant: str = "6b-l1c", **kw) -> OpenVINOTeacher:
    """The ukis-csmask model `model_{variant}.onnx` with the band order and statistics of its JSON."""
    import importlib.util
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
        raise ValueError(f"{meta_path}: missing field {exc}") from None
    kw.setdefault("tile", int(meta["data"].get("target_size", [256])[0]))
    return OpenVINOTeacher(onnx, names, mean, std, classes, name=f"ukis-csmask-{variant}", **kw)


# ---- smp teachers --------------------------------------------------------------------------------

def build_smp_model(spec: str, in_channels: int, num_classes: int, **options):
    """`Arch/encoder` (e.g. `FPN/efficientnet-b4`, `Unet/resnet18`) -> an untrained smp model."""
    import segmentation_models_pytorch as smp
    arch, _, encoder = spec.partition("/")
    if not encoder:
        raise ValueError(f"smp model must be written Arch/encoder (e.g. FPN/efficientnet-b4), got {spec!r}")
    options.setdefault("encoder_weights", None)     # never reach for a hub
    try:
        return smp.create_model(arch, encoder_name=encoder, in_channels=in_channels, classes=num_classes, **options)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"smp model {spec!r}: {exc}") from None


class TorchTeacher(Teacher):
    """A torch segmentation model (an smp model trained here) with its normalisation statistics."""

    def __init__(self, model, norm, name: str, tile: int = 256, overlap: int = 64, weights_digest: str = ""):
        self.model = model.eval()
        self.norm = norm
        self.name = name
        self.bands = tuple(norm.bands)
        self.num_classes = int(getattr(model, "classes", None) or _out_channels(model))
        self.tile, self.overlap = tile, overlap
        self._digest = weights_digest or _state_digest(model)

    @property
    def identity(self) -> str:
        return json.dumps({"weights": self._digest, "norm": self.norm.as_dict(), "tile": self.tile,
                           "overlap": self.overlap})

    def predict_proba(self, image: np.ndarray) -> np.ndarray:
        import torch

        def infer(tiles):
            with torch.no_grad():
                return torch.softmax(self.model(torch.from_numpy(np.array(tiles))), 1).numpy()
        return tiled_predict(self.norm.apply(image), infer, self.tile, self.overlap)

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kw) -> "TorchTeacher":
        from ground.checkpoints import load_model
        model, norm, meta = load_model(path)
        return cls(model, norm, meta.get("name", f"checkpoint:{Path(path).name}"),
                   weights_digest=_file_digest(Path(path)), **kw)


def _out_channels(model) -> int:
    head = getattr(model, "segmentation_head", None) or getattr(model, "head", None)
    convs = [m for m in (head.modules() if head is not None else []) if hasattr(m, "out_channels")]
    if not convs:
        raise ValueError("cannot tell the teacher's number of classes; set classes")
    return convs[-1].out_channels


def _state_digest(model) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


# ---- registry -------------------------------------------------------------------------------------

TEACHERS: dict[str, Callable[..., Teacher]] = {
    "ukis-csmask-6b-l1c": lambda **kw: ukis_csmask_teacher("6b-l1c", **kw),
    "ukis-csmask-6b-l2a": lambda **kw: ukis_csmask_teacher("6b-l2a", **kw),
    "ukis-csmask-4b-l1c": lambda **kw: ukis_csmask_teacher("4b-l1c", **kw),
    "ukis-csmask-4b-l2a": lambda **kw: ukis_csmask_teacher("4b-l2a", **kw),
}


def build_teacher(name: str, **options) -> Teacher:
    """A ready teacher: a registry name, `openvino:PATH` (with bands/mean/std/num_classes options),
    or `checkpoint:PATH` (a torch teacher trained here by ground.train)."""
    if name in TEACHERS:
        return TEACHERS[name](**options)
    if name.startswith("openvino:"):
        missing = [k for k in ("bands", "mean", "std", "num_classes") if k not in options]
        if missing:
            raise ValueError(f"teacher {name}: an external model needs {missing} in the [teacher] table")
        return OpenVINOTeacher(name.split(":", 1)[1], **options)
    if name.startswith("checkpoint:"):
        return TorchTeacher.from_checkpoint(name.split(":", 1)[1], **options)
    raise ValueError(f"unknown teacher {name!r}; known: {sorted(TEACHERS)}, openvino:PATH, checkpoint:PATH "
                     f"(train an smp teacher, e.g. {DEFAULT_TEACHER}, with `eoedge ground train-teacher`)")
