"""Export a torch model to what flies: an OpenVINO IR with FP16 weights (optionally ONNX too),
checked against torch on real tiles, and timed in OpenVINO.

    result = export_openvino(model, "runs/x/export", norm)       # model.xml + model.bin (FP16)
    result.parity   # {"max_abs_diff": 2e-4, "mask_agreement": 1.0, ...}: IR vs torch on real tiles

The IR keeps a fixed channel count and a dynamic batch and tile size (the daemon reshapes it to
its tile and batch). `openvino.save_model` compresses weights to FP16 *by default*; here the
choice is always explicit (`fp16=True|False`). On this x86 CPU the FP16 weights are decompressed
and computed in FP32, so parity measures the weight rounding only; what FP16 *arithmetic* adds
on a VPU is measured by `ground.fp16.emulate_fp16` (reported beside it).

The CPU plugin here would pick bfloat16 on CPUs with AVX512-BF16/AMX (this one has it): parity and
latency ask for f32, as the daemon does.
"""
from __future__ import annotations

import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

F32 = {"INFERENCE_PRECISION_HINT": "f32"}


@dataclass
class ExportResult:
    xml: Path
    bin: Path
    onnx: Path | None
    fp16: bool
    in_channels: int
    sizes: dict                       # file name -> bytes
    parity: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        for k in ("xml", "bin", "onnx"):
            d[k] = None if d[k] is None else str(d[k])
        return d


def _in_channels(model: torch.nn.Module) -> int:
    first = next((m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
    if first is None:
        raise ValueError(f"{type(model).__name__}: no convolution found; cannot tell the input channels")
    return first.in_channels


def export_openvino(model: torch.nn.Module, out_dir: str | Path, tiles: np.ndarray | None = None,
                    name: str = "model", fp16: bool = True, onnx: bool = False, tile: int = 256) -> ExportResult:
    """Write `name.xml` + `name.bin` (FP16 weights unless fp16=False) and, with onnx=True,
    `name.onnx` into `out_dir`. With `tiles` (N, C, t, t) *normalised* model inputs (real imagery,
    please), the IR is checked against torch on them (`result.parity`)."""
    import openvino as ov
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
    ov.save_model(ov_model, str(xml), compress_to_fp16=bool(fp16))
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
                          {p.name: p.stat().st_size for p in paths})
    if tiles is not None:
        result.parity = parity(xml, model, tiles)
        if onnx_path is not None:
            result.parity["onnx"] = parity(onnx_path, model, tiles, with_fp16=False)
    return result


def compile_ir(model_path: str | Path, threads: int | None = None, shape: tuple | None = None,
               latency: bool = False):
    """An OpenVINO CPU compiled model in f32 (optionally reshaped to a static `shape`)."""
    import openvino as ov
    core = ov.Core()
    model = core.read_model(str(model_path))
    if shape is not None:
        model.reshape({model.inputs[0]: ov.PartialShape(list(shape))})
    config = dict(F32)
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if latency:
        config["PERFORMANCE_HINT"] = "LATENCY"
    return core.compile_model(model, "CPU", config)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def parity(model_path: str | Path, model: torch.nn.Module, tiles: np.ndarray, with_fp16: bool = True,
           batch: int = 4) -> dict:
    """How far the exported model (IR or ONNX, run by OpenVINO in f32) is from torch FP32 on
    `tiles` (N, C, t, t, normalised): max |difference| of the class probabilities and the share
    of pixels whose arg-max class agrees. With `with_fp16`, the same two numbers for torch's
    emulated FP16 (what a VPU would compute) against the IR."""
    from ground.fp16 import emulate_fp16
    tiles = np.ascontiguousarray(tiles, dtype=np.float32)
    if tiles.ndim != 4:
        raise ValueError(f"parity tiles must be (N, C, t, t), got shape {tiles.shape}")
    compiled = compile_ir(model_path)
    model = model.eval()
    fp16 = emulate_fp16(model) if with_fp16 else None
    ir, ref, emu = [], [], []
    with torch.no_grad():
        for i in range(0, len(tiles), batch):
            x = tiles[i:i + batch]
            ir.append(_softmax(np.asarray(compiled(x)[0])))
            ref.append(torch.softmax(model(torch.from_numpy(x)), 1).numpy())
            if fp16 is not None:
                emu.append(torch.softmax(fp16(torch.from_numpy(x)), 1).numpy())
    ir, ref = np.concatenate(ir), np.concatenate(ref)
    out = {"tiles": int(len(tiles)), "tile": int(tiles.shape[-1]),
           "max_abs_diff": float(np.abs(ir - ref).max()),
           "mask_agreement": float(np.mean(ir.argmax(1) == ref.argmax(1)))}
    if fp16 is not None:
        emu = np.concatenate(emu)
        out["fp16_emulated_vs_ir"] = {"max_abs_diff": float(np.abs(emu - ir).max()),
                                      "mask_agreement": float(np.mean(emu.argmax(1) == ir.argmax(1)))}
    return out


def parity_tiles(bands, norm=None, n: int = 2, tile: int = 256) -> np.ndarray:
    """`n` real tiles (N, C, tile, tile) in `bands` order, from the training rows of the ukis chip
    (or the sen1floods11 chip for bands the ukis chip lacks); normalised with `norm` if given.
    Never the held-out rows."""
    from shared.datasets import UKIS_TRAIN_ROWS, load_sen1floods11, load_ukis_chip
    from shared.scene import MissingBandsError
    bands = tuple(bands)
    try:
        scene, _ = load_ukis_chip()
        data = scene.select(bands).data[:, UKIS_TRAIN_ROWS]
    except MissingBandsError:
        scene, _ = load_sen1floods11()
        data = scene.select(bands).data
    rows, cols = data.shape[1] // tile, data.shape[2] // tile
    if rows * cols == 0:
        raise ValueError(f"real imagery {data.shape[1:]} is smaller than one {tile}x{tile} tile")
    spots = [(r * tile, c * tile) for r in range(rows) for c in range(cols)][:n]
    tiles = np.stack([data[:, r:r + tile, c:c + tile] for r, c in spots]).astype(np.float32)
    return tiles if norm is None else np.stack([norm.apply(t) for t in tiles]).astype(np.float32)


def openvino_latency(model_path: str | Path, tile: int = 256, batch: int = 1, threads: int | None = 1,
                     repeats: int = 30, warmup: int = 5) -> dict:
    """Milliseconds per tile of the IR on this CPU (static shape (batch, C, tile, tile), f32,
    LATENCY hint, `threads` inference threads): median and 10/90th percentiles over `repeats`
    synchronous calls after `warmup`. The load average is recorded beside it: the CPU is shared."""
    import openvino as ov
    core = ov.Core()
    channels = core.read_model(str(model_path)).inputs[0].get_partial_shape()[1].get_length()
    compiled = compile_ir(model_path, threads=threads, shape=(batch, channels, tile, tile), latency=True)
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
            "device": "CPU", "ov_version": ov.__version__}


def latency_of(model: torch.nn.Module, tile: int = 256, **kw) -> dict:
    """OpenVINO latency of a torch model (exported to a temporary FP16 IR)."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="eoedge-latency-") as d:
        res = export_openvino(model, d, tile=tile)
        return openvino_latency(res.xml, tile=tile, **kw)


# ---- the stage: a checkpoint of a run folder in, an IR checked, scored and timed out ----------------


def export_stage(run_dir, checkpoint: str = "student.pt", name: str | None = None, fp16: bool = True,
                 onnx: bool = False, evaluate: bool = True, threads: int = 1, parity_n: int = 4,
                 progress: bool = True) -> dict:
    """Export a checkpoint of a run folder to `export/NAME/model.{xml,bin}` (FP16 weights unless
    fp16=False), check it against torch on real tiles, score it *as OpenVINO executes it* on the
    held-out image (and in emulated FP16, as a VPU would, with the same operating point), time
    it, and record it all in `export/NAME/export.json` and the lineage. `ground bundle` packs it."""
    import json
    from ground.prune import measure
    from ground.sweep import RunContext
    ctx = RunContext.open(run_dir, progress)
    model, norm, meta = ctx.load(checkpoint)
    name = name or Path(checkpoint).stem
    out_dir = ctx.run_dir / "export" / name
    tiles = parity_tiles(ctx.cfg.bands, norm, n=parity_n, tile=ctx.cfg.tile)
    res = export_openvino(model, out_dir, tiles=tiles, fp16=fp16, onnx=onnx, tile=ctx.cfg.tile)
    ctx.log(f"parity on {res.parity['tiles']} real tiles: max |p_IR - p_torch| {res.parity['max_abs_diff']:.2e}, "
            f"mask agreement {res.parity['mask_agreement']:.5f}")
    size = measure(model, torch.zeros(1, len(ctx.cfg.bands), ctx.cfg.tile, ctx.cfg.tile))
    record = {"checkpoint": checkpoint, "name": name, "fp16": bool(fp16), "files": res.sizes,
              "parity": res.parity, "params": size.params, "macs": size.macs, "tile": ctx.cfg.tile,
              "overlap": ctx.cfg.overlap, "bands": list(ctx.cfg.bands), "classes": ctx.classes,
              "normalization": norm.as_dict(), "model_meta": {k: v for k, v in meta.items()
                                                             if k in ("name", "role", "arch")},
              "label_free": _label_free(ctx, checkpoint)}
    if evaluate and ctx.evals:
        ir = ctx.evaluate(ctx.ir_predict(res.xml, norm))
        from ground.fp16 import _point
        vpu = ctx.evaluate(ctx.torch_predict(model, norm, fp16="round"), _point(ir))
        record["operating_point"] = ir["operating_point"]
        record["metrics"] = {"openvino": ir, "fp16_emulated": vpu, "eval": ctx.eval_name}
        ctx.log(f"held-out {ctx.eval_name}: mIoU {ir['miou']:.4f} as OpenVINO runs it, "
                f"{vpu['miou']:.4f} in emulated FP16")
    else:
        point = ctx.calibrate(ctx.ir_predict(res.xml, norm)) if evaluate else None
        record["operating_point"] = point.as_dict(ctx.classes) if point else None
    record["latency"] = openvino_latency(res.xml, tile=ctx.cfg.tile, threads=threads)
    (out_dir / "export.json").write_text(json.dumps(record, indent=2))
    metrics = {"parity_max_abs_diff": res.parity["max_abs_diff"],
               "parity_mask_agreement": res.parity["mask_agreement"],
               "ms_per_tile": record["latency"]["ms_per_tile"]}
    if "metrics" in record:
        metrics.update(miou_openvino=record["metrics"]["openvino"]["miou"],
                       miou_fp16_emulated=record["metrics"]["fp16_emulated"]["miou"])
    ctx.folder.add_stage(f"export:{name}", [res.xml, res.bin, out_dir / "export.json"]
                         + ([res.onnx] if res.onnx else []), metrics, checkpoint=checkpoint, fp16=bool(fp16),
                         parity=res.parity)
    record["out_dir"] = str(out_dir)
    return record


def _label_free(ctx, checkpoint: str) -> bool:
    """True when no stage behind this checkpoint used a human label (distillation, pruning, FP16)."""
    if not ctx.label_free:
        return False
    producers = {out: s for s in ctx.folder.record.get("stages", []) for out in (s.get("outputs") or {})}
    seen = set()
    while checkpoint in producers and checkpoint not in seen:      # walk back: fp16 <- pruned <- student
        seen.add(checkpoint)
        stage = producers[checkpoint]
        if stage.get("label_free") is False:
            return False
        checkpoint = stage.get("source_checkpoint") or stage.get("source")
    return True


def cmd_export(args) -> int:
    from shared.cliutil import emit
    res = export_stage(args.run, args.checkpoint, args.name, fp16=not args.fp32, onnx=args.onnx,
                       evaluate=not args.no_eval, threads=args.threads, progress=not args.json)

    def human(r: dict) -> str:
        p = r["parity"]
        lines = [f"{r['out_dir']}: " + ", ".join(f"{k} {v:,} B" for k, v in r["files"].items()),
                 f"parity on {p['tiles']} real tiles: max |p_IR - p_torch| {p['max_abs_diff']:.2e}, "
                 f"mask agreement {p['mask_agreement']:.5f}"]
        if "metrics" in r:
            lines.append(f"held-out mIoU: {r['metrics']['openvino']['miou']:.4f} (OpenVINO), "
                         f"{r['metrics']['fp16_emulated']['miou']:.4f} (emulated FP16)")
        lines.append(f"OpenVINO CPU: {r['latency']['ms_per_tile']:.1f} ms per {r['tile']}x{r['tile']} tile "
                     f"({r['latency']['threads']} thread(s), load {r['latency']['load_avg_1min'][0]:.1f})")
        return "\n".join(lines)
    emit(res, args.json, human)
    return 0
