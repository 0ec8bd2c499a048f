"""OpenVINO as the ground runs it: compile an IR on the CPU at a declared precision (f32 unless
asked: the CPU plugin would pick bf16 on CPUs with AVX512-BF16/AMX by itself), the one softmax,
parity of an IR against its torch model, and latency per tile.

Precisions are the manifest's names: fp32, fp16, bf16 (OpenVINO's inference precision hint) and
int8 (an IR with FakeQuantize nodes, which OpenVINO runs as int8 kernels, the rest at f32)."""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import openvino as ov
import torch
from tqdm import tqdm

from shared.manifest import INFERENCE_HINTS, PRECISIONS, REQUIRED_CAPABILITY
from ground.compression.fp16 import emulate_fp16
from ground.errors import GroundError




def capabilities(device: str = "CPU") -> list[str]:
    """What OpenVINO says `device` computes natively (e.g. ['BF16', 'FP32', 'FP16', 'INT8', ...])."""
    return list(ov.Core().get_property(device, "OPTIMIZATION_CAPABILITIES"))


def check_precision(precision: str, device: str = "CPU") -> None:
    """Refuse a precision that is not ours, or that this device does not compute natively (a
    hint it lacks would silently run f32, and the figures would lie)."""
    if precision not in PRECISIONS:
        raise GroundError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    have = capabilities(device)
    if REQUIRED_CAPABILITY[precision] not in have:
        raise GroundError(f"this {device} does not compute {precision} natively (OpenVINO capabilities: "
                          f"{', '.join(have)}); measure it on a device that does, or pass --precision fp32 to "
                          "measure what this one runs")


def compile_ir(model_path: str | Path, threads: int | None = None, shape: tuple | None = None,
               latency: bool = False, precision: str = "fp32"):
    """An OpenVINO CPU compiled model at `precision` (optionally reshaped to a static `shape`)."""
    core = ov.Core()
    model = core.read_model(str(model_path))
    if shape is not None:
        model.reshape({model.inputs[0]: ov.PartialShape(list(shape))})
    config = {"INFERENCE_PRECISION_HINT": INFERENCE_HINTS[precision]}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if latency:
        config["PERFORMANCE_HINT"] = "LATENCY"
    return core.compile_model(model, "CPU", config)


def softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def parity(model_path: str | Path, model: torch.nn.Module, tiles: np.ndarray, with_fp16: bool = True,
           batch: int = 4, precision: str = "fp32") -> dict:
    """How far the exported model (IR or ONNX, run by OpenVINO at `precision`) is from torch FP32 on
    `tiles` (N, C, t, t, normalised): max |difference| of the class probabilities and the share
    of pixels whose arg-max class agrees. With `with_fp16`, the same two numbers for torch's
    emulated FP16 (what a VPU would compute) against the IR."""
    tiles = np.ascontiguousarray(tiles, dtype=np.float32)
    if tiles.ndim != 4:
        raise GroundError(f"parity tiles must be (N, C, t, t), got shape {tiles.shape}")
    compiled = compile_ir(model_path, precision=precision)
    model = model.eval()
    fp16 = emulate_fp16(model) if with_fp16 else None
    ir, ref, emu = [], [], []
    with torch.no_grad():
        for i in range(0, len(tiles), batch):
            x = tiles[i:i + batch]
            ir.append(softmax(np.asarray(compiled(x)[0])))
            ref.append(torch.softmax(model(torch.from_numpy(x)), 1).numpy())
            if fp16 is not None:
                emu.append(torch.softmax(fp16(torch.from_numpy(x)), 1).numpy())
    ir, ref = np.concatenate(ir), np.concatenate(ref)
    out = {"tiles": int(len(tiles)), "tile": int(tiles.shape[-1]), "precision": precision,
           "max_abs_diff": float(np.abs(ir - ref).max()),
           "mask_agreement": float(np.mean(ir.argmax(1) == ref.argmax(1)))}
    if fp16 is not None:
        emu = np.concatenate(emu)
        out["fp16_emulated_vs_ir"] = {"max_abs_diff": float(np.abs(emu - ir).max()),
                                      "mask_agreement": float(np.mean(emu.argmax(1) == ir.argmax(1)))}
    return out


def openvino_latency(model_path: str | Path, tile: int = 256, batch: int = 1, threads: int | None = 1,
                     repeats: int = 30, warmup: int = 5, precision: str = "fp32") -> dict:
    """Milliseconds per tile of the IR on this CPU (static shape (batch, C, tile, tile), at
    `precision`, LATENCY hint, `threads` inference threads): median and 10/90th percentiles over
    `repeats` synchronous calls after `warmup`. The load average is recorded beside it: the CPU is
    shared."""
    core = ov.Core()
    channels = core.read_model(str(model_path)).inputs[0].get_partial_shape()[1].get_length()
    compiled = compile_ir(model_path, threads=threads, shape=(batch, channels, tile, tile), latency=True,
                          precision=precision)
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal((batch, channels, tile, tile)).astype(np.float32)
    load_before = os.getloadavg()[0]
    for _ in range(warmup):
        request.infer({0: x})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        request.infer({0: x})
        times.append((time.perf_counter() - t0) * 1000.0 / batch)
    times.sort()
    return {"ms_per_tile": statistics.median(times), "p10_ms": times[len(times) // 10],
            "p90_ms": times[min(len(times) - 1, (len(times) * 9) // 10)], "tile": tile, "batch": batch,
            "threads": threads, "repeats": repeats, "load_avg_1min": [load_before, os.getloadavg()[0]],
            "device": "CPU", "precision": precision,
            "inference_precision": str(compiled.get_property("INFERENCE_PRECISION_HINT")),
            "ov_version": ov.__version__}


def interleaved_latency(irs: dict[str, tuple[str | Path, str]], base: str, tile: int = 256, threads: int = 1,
                        repeats: int = 30, rounds: int = 3, progress: bool = False) -> tuple[dict[str, dict], list]:
    """Every IR (tag -> (xml, precision)) timed in turn, `rounds` times, so a shared CPU's load
    falls on all alike. Per tag: `ms_rounds` (each round's median), `ms_per_tile` (the lowest: the
    figure least disturbed by other jobs) and `speedup` over the `base` tag timed in the same round
    (median over rounds: the ratio cancels the load of the moment). Also the load averages seen."""
    medians: dict[str, list[float]] = {tag: [] for tag in irs}
    loads = []
    for _ in tqdm(range(rounds), desc="latency rounds", file=sys.stderr, disable=not progress):
        for tag, (xml, precision) in irs.items():
            lat = openvino_latency(xml, tile=tile, threads=threads, repeats=repeats, precision=precision)
            medians[tag].append(lat["ms_per_tile"])
            loads.append(lat["load_avg_1min"][0])
    timing = {tag: {"ms_per_tile": min(ms), "ms_rounds": ms,
                    "speedup": statistics.median(b / m for b, m in zip(medians[base], ms))}
              for tag, ms in medians.items()}
    return timing, loads


def conv_kernels(model_path: str | Path, precision: str = "fp32") -> dict[str, int]:
    """Which kernels OpenVINO picked for the convolutions at `precision` (e.g.
    {"brgconv_avx512_amx_I8": 13}): the ISA and the precision that really ran."""
    runtime = compile_ir(model_path, precision=precision).get_runtime_model()
    found: dict[str, int] = {}
    for op in runtime.get_ops():
        info = op.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) == "Convolution":
            kind = info["primitiveType"].astype(str) if "primitiveType" in info else "unknown"
            found[kind] = found.get(kind, 0) + 1
    return found
