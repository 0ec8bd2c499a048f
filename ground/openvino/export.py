"""Export a torch model to what flies: an OpenVINO IR with FP16 weights (optionally ONNX too),
checked against torch on real tiles.

    result = export_openvino(model, "runs/x/export", tiles)       # model.xml + model.bin (FP16)
    result.parity   # {"max_abs_diff": 2e-4, "mask_agreement": 1.0, ...}: IR vs torch on real tiles
    export_openvino(model, out, tiles, profile="myriadx")   # an IR OpenVINO 2022.3 / the VPU runs

`profile` (shared.profiles) is the device the IR is for: op versions its runtime cannot read are
rewritten to older equal ones (ground.openvino.compat: MaxPool-14 -> MaxPool-8, ...) and the IR
written is checked against it; an op it cannot run raises IncompatibleIR naming the layer.

The IR keeps a fixed channel count and a dynamic batch and tile size (the daemon reshapes it to
its tile and batch). `openvino.save_model` compresses weights to FP16 *by default*; here the
choice is always explicit (`fp16=True|False`). On this x86 CPU the FP16 weights are decompressed
and computed in FP32, so parity measures the weight rounding only; what FP16 *arithmetic* adds
on a VPU is measured by `ground.compression.fp16.emulate_fp16` (reported beside it).
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import openvino as ov
import torch

from shared.profiles import DEFAULT_PROFILE
from ground.errors import GroundError
from ground.openvino.compat import save_for
from ground.openvino.runtime import parity


@dataclass
class ExportResult:
    xml: Path
    bin: Path
    onnx: Path | None
    fp16: bool
    in_channels: int
    sizes: dict                       # file name -> bytes
    parity: dict = field(default_factory=dict)
    profile: str = DEFAULT_PROFILE
    rewrites: list = field(default_factory=list)     # [{layer, from, to}] op versions rewritten

    def as_dict(self) -> dict:
        d = asdict(self)
        for k in ("xml", "bin", "onnx"):
            d[k] = None if d[k] is None else str(d[k])
        return d


def _in_channels(model: torch.nn.Module) -> int:
    first = next((m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
    if first is None:
        raise GroundError(f"{type(model).__name__}: no convolution found; cannot tell the input channels")
    return first.in_channels


def export_openvino(model: torch.nn.Module, out_dir: str | Path, tiles: np.ndarray | None = None,
                    name: str = "model", fp16: bool = True, onnx: bool = False, tile: int = 256,
                    profile: str = DEFAULT_PROFILE) -> ExportResult:
    """Write `name.xml` + `name.bin` (FP16 weights unless fp16=False) and, with onnx=True,
    `name.onnx` into `out_dir`, for the device `profile`. With `tiles` (N, C, t, t) *normalised* model inputs (real imagery,
    please), the IR is checked against torch on them (`result.parity`)."""
    model = model.eval()
    channels = _in_channels(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, channels, tile, tile)
    with torch.no_grad(), warnings.catch_warnings():
        # tracing notes that shape checks in forward() become constants: the IR takes any tile the
        # model accepts, which the daemon fixes at load (reshape to its tile and batch)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        ov_model = ov.convert_model(model, example_input=example,
                                    input=[ov.PartialShape([-1, channels, -1, -1])])
    xml = out_dir / f"{name}.xml"
    rewrites = save_for(ov_model, xml, profile, fp16)
    onnx_path = None
    if onnx:
        onnx_path = out_dir / f"{name}.onnx"
        # the TorchScript exporter: dynamic batch/height/width without onnxscript's dynamo tracing
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (example,), str(onnx_path), dynamo=False, input_names=["input"],
                              output_names=["logits"],
                              dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n", 2: "h", 3: "w"}})
    paths = [xml, xml.with_suffix(".bin")] + ([onnx_path] if onnx_path else [])
    result = ExportResult(xml, xml.with_suffix(".bin"), onnx_path, bool(fp16), channels,
                          {p.name: p.stat().st_size for p in paths}, profile=profile, rewrites=rewrites)
    if tiles is not None:
        result.parity = parity(xml, model, tiles)
        if onnx_path is not None:
            result.parity["onnx"] = parity(onnx_path, model, tiles, with_fp16=False)
    return result
