"""INT8 with NNCF (why NNCF: it is OpenVINO's own quantiser, so the FakeQuantize nodes it places
are the ones OpenVINO's CPU, GPU and ARM plugins run as int8 kernels).

- `quantize_ir`: post-training quantisation of an IR on calibration tiles of the run's imagery.
- `quantize_ir_controlled`: the same under accuracy control: layers go back to float, most
  harmful first, until the validation metric (agreement with the teacher's masks on training
  tiles, never the held-out rows) is within `max_drop` of the float IR's.
- `quantize_torch`: a torch model with NNCF's quantisers inserted, for quantisation-aware
  fine-tuning with the ordinary training loop; `ov.convert_model` turns it into an INT8 IR.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import types
from pathlib import Path

import nncf
import numpy as np
import openvino as ov
import torch
from nncf.torch.quantization import extensions as nncf_kernels
from nncf.torch.quantization.reference import ReferenceBackendType, ReferenceQuantize

from ground.errors import StageError

SUBSET = 300          # calibration tiles NNCF reads at most


for _handler in logging.getLogger("nncf").handlers:     # NNCF logs to stdout by default
    if isinstance(_handler, logging.StreamHandler):
        _handler.setStream(sys.stderr)


def _quietly():
    """NNCF's log lines and progress bars go to stdout: send them to stderr, beside our own
    progress, so that `--json` output stays one JSON document."""
    return contextlib.redirect_stdout(sys.stderr)


def _dataset(tiles: np.ndarray) -> nncf.Dataset:
    return nncf.Dataset([np.ascontiguousarray(tiles[i:i + 1], np.float32) for i in range(len(tiles))])


def _save(model, out_xml: str | Path) -> Path:
    out_xml = Path(out_xml)
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    # the int8 weights are int8 already; the rest stays f32 so the IR computes what was validated
    ov.save_model(model, str(out_xml), compress_to_fp16=False)
    return out_xml


def int8_layers(xml: str | Path) -> int:
    """FakeQuantize nodes of an IR: how much of it runs in int8 (0: a float IR)."""
    return sum(op.get_type_name() == "FakeQuantize" for op in ov.Core().read_model(str(xml)).get_ops())


def quantize_ir(xml: str | Path, tiles: np.ndarray, out_xml: str | Path) -> Path:
    """INT8 IR of a float IR, calibrated on `tiles` (N, C, t, t), normalised model inputs."""
    if len(tiles) == 0:
        raise StageError("INT8 calibration needs at least one tile of the run's imagery")
    model = ov.Core().read_model(str(xml))
    with _quietly():
        quantised = nncf.quantize(model, _dataset(tiles), subset_size=min(SUBSET, len(tiles)))
    return _save(quantised, out_xml)


def agreement_fn(masks: list[np.ndarray]):
    """NNCF validation function: mean pixel agreement of the model's argmax with `masks` (one per
    validation tile, in order), and the per-tile values NNCF ranks layers by."""
    def validate(compiled, items) -> tuple[float, list[float]]:
        values = []
        for i, x in enumerate(items):
            pred = np.asarray(compiled(x)[0]).argmax(1)[0]
            values.append(float(np.mean(pred == masks[i])))
        return float(np.mean(values)), values
    return validate


def quantize_ir_controlled(xml: str | Path, tiles: np.ndarray, masks: list[np.ndarray], out_xml: str | Path,
                           max_drop: float = 0.01) -> Path:
    """INT8 IR whose agreement with `masks` (the teacher's, on training tiles) drops at most
    `max_drop` (absolute) from the float IR's; NNCF reverts the layers that cost the most."""
    if not 0.0 < float(max_drop) < 1.0:
        raise StageError(f"max_drop must be within (0, 1), got {max_drop}")
    if len(masks) != len(tiles):
        raise StageError(f"{len(tiles)} validation tiles but {len(masks)} masks")
    model = ov.Core().read_model(str(xml))
    data = _dataset(tiles)
    with _quietly():
        q = nncf.quantize_with_accuracy_control(model, data, data, agreement_fn(masks), max_drop=float(max_drop),
                                                subset_size=min(SUBSET, len(tiles)))
    return _save(q, out_xml)


def use_eager_cpu_kernels() -> None:
    """NNCF's fake quantisers on the CPU use its reference torch functions, eagerly.

    By default NNCF JIT-compiles C++ kernels with g++ on first use, behind a lock file that a killed
    build leaves in ~/.cache/torch_extensions for good: every later QAT then waits 60 s and fails
    (this ended a CI run). Its other fallback wraps the reference in torch.compile, another
    compiler run of a minute. The reference functions are what NNCF tests its kernels against; for
    ~100k-parameter students eager torch costs little. CUDA keeps NNCF's compiled kernels."""
    reference = ReferenceQuantize(backend_type=ReferenceBackendType.TORCH)
    nncf_kernels.QuantizedFunctionsCPU._loaded_namespace = types.SimpleNamespace(
        Quantize_forward=reference.forward, Quantize_backward=reference.backward)


def quantize_torch(model: torch.nn.Module, tiles: np.ndarray) -> torch.nn.Module:
    """`model` with NNCF's fake quantisers (initialised on `tiles`), trainable by ground.training's
    loop: quantisation-aware fine-tuning. The caller's model is modified in place and returned."""
    if len(tiles) == 0:
        raise StageError("quantisation-aware training needs at least one tile of the run's imagery")
    use_eager_cpu_kernels()
    data = nncf.Dataset([torch.from_numpy(np.ascontiguousarray(tiles[i:i + 1], np.float32))
                         for i in range(len(tiles))])
    with _quietly():
        return nncf.quantize(model.eval(), data, subset_size=min(SUBSET, len(tiles)))
