"""Export stage: a checkpoint of a run in; `export/NAME/model.{xml,bin}` out at a declared
precision, checked against torch on tiles of the run's own imagery, scored *as OpenVINO executes
it at that precision* on the held-out image (and in emulated FP16, as a VPU would, at the same
operating point), timed at that precision, and recorded in `export/NAME/export.json` and the
lineage. `bundle` packs it and declares the precision in the manifest.

Precisions: fp32 (FP16 weights unless fp16=False, computed in f32, as before), fp16 and bf16 (the
IR run with that inference precision: the device must compute it natively), int8 (NNCF: post-
training quantisation under accuracy control on tiles of the run's imagery, or quantisation-aware
fine-tuning with `qat_steps`, distilling as the run does; the IR keeps its FakeQuantize nodes).

`profile` (shared.profiles: cpu-x86, rpi4, rpi5, myriadx) is the device the IR is for: op versions
its runtime cannot read are rewritten to older equal ones, the IR is checked against it (an op it
cannot run stops the export, named), and the precision must be one it runs."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

from shared.profiles import DEFAULT_PROFILE, get_profile
from ground.compression.quantize import int8_layers, quantize_ir_controlled, quantize_torch
from ground.errors import GroundError
from ground.lineage import RunFolder, StageRecord
from ground.models.size import measure
from ground.openvino.compat import require_compatible
from ground.openvino.export import ExportResult, export_openvino
from ground.openvino.runtime import capabilities, check_precision, openvino_latency, parity
from ground.stages.run import Run, point_of
from ground.teachers.cache import TeacherCache

CALIBRATION_TILE = 128      # INT8 statistics on 128x128 tiles: more of them from the same imagery
CALIBRATION_TILES = 300


def label_free_lineage(folder: RunFolder, checkpoint: str, run_label_free: bool) -> bool:
    """True when no stage behind this checkpoint used a human label (distillation, pruning, FP16)."""
    if not run_label_free:
        return False
    seen = set()
    while checkpoint not in seen:      # walk back: fp16 <- pruned <- student
        seen.add(checkpoint)
        stage = folder.producer(checkpoint)
        if stage is None:
            break
        if stage.get("label_free") is False:
            return False
        checkpoint = (stage.get("inputs") or {}).get("checkpoint")
        if checkpoint is None:
            break
    return True


def teacher_windows(run: Run, where: list[dict], tile: int) -> list[np.ndarray]:
    """The teacher's masks of the windows `where` (ground.data.reference) of the training imagery."""
    samples = run.data.distill_samples(with_labels=False)
    cache = TeacherCache(run.cfg.cache, run.teacher)
    masks = {}
    for w in where:
        if w["index"] not in masks:
            masks[w["index"]] = cache.probs(samples[w["index"]], 0).astype(np.float32).argmax(0)
    return [masks[w["index"]][w["row"]:w["row"] + tile, w["col"]:w["col"] + tile] for w in where]


def _int8(run: Run, model, norm, out_dir: Path, max_drop: float, qat_steps: int, qat_with: str,
          profile: str) -> tuple[Path, dict]:
    """The INT8 IR of `model` in out_dir, and how it was made."""
    tiles, where = run.tiles(CALIBRATION_TILES, norm, CALIBRATION_TILE)
    if qat_steps > 0:
        qat = quantize_torch(copy.deepcopy(model), tiles)
        history = run.finetune(qat, qat_steps, qat_with, reference_model=model, norm=norm,
                               desc="quantisation-aware fine-tune")
        xml = export_openvino(qat, out_dir, fp16=False, tile=run.cfg.tile, profile=profile).xml
        how = {"method": "qat", "steps": qat_steps, "with": qat_with,
               "final_loss": history[-1]["loss"] if history else None}
    else:
        float_xml = export_openvino(model, out_dir / "float", fp16=False, tile=run.cfg.tile, profile=profile).xml
        xml = quantize_ir_controlled(float_xml, tiles, teacher_windows(run, where, CALIBRATION_TILE),
                                     out_dir / "model.xml", max_drop)
        how = {"method": "ptq-accuracy-control", "max_drop": max_drop,
               "metric": "pixel agreement with the teacher's masks on training tiles"}
    require_compatible(xml, profile)            # what NNCF wrote, too
    how.update(calibration_tiles=len(tiles), calibration_tile=CALIBRATION_TILE, fake_quantize=int8_layers(xml))
    return xml, how


def _ir(run: Run, model, norm, out_dir: Path, precision: str, fp16: bool, onnx: bool, int8: dict,
        profile: str) -> tuple:
    """(ExportResult of the IR that flies at `precision` on `profile`, how an INT8 IR was made or None)."""
    if precision != "int8":
        return export_openvino(model, out_dir, fp16=fp16, onnx=onnx, tile=run.cfg.tile, profile=profile), None
    xml, how = _int8(run, model, norm, out_dir, **int8, profile=profile)
    sizes = {p.name: p.stat().st_size for p in (xml, xml.with_suffix(".bin"))}
    return ExportResult(xml, xml.with_suffix(".bin"), None, False, len(run.cfg.bands), sizes,
                        profile=profile), how


def _scores(run: Run, xml: Path, model, norm, precision: str = "fp32") -> dict:
    """Held-out scores as OpenVINO runs the IR at `precision`, and in emulated FP16 at the same
    operating point."""
    if not run.evals:
        return {"operating_point": run.calibrate(run.ir_predict(xml, norm, precision)).as_dict(run.classes)}
    ir = run.evaluate(run.ir_predict(xml, norm, precision))
    vpu = run.evaluate(run.torch_predict(model, norm, fp16="round"), point_of(ir))
    run.log(f"held-out {run.eval_name}: mIoU {ir['miou']:.4f} as OpenVINO runs it at {precision}, "
            f"{vpu['miou']:.4f} in emulated FP16")
    return {"operating_point": ir["operating_point"],
            "metrics": {"openvino": ir, "fp16_emulated": vpu, "eval": run.eval_name}}


def export(run: Run, checkpoint: str = "student.pt", name: str | None = None, fp16: bool = True,
           onnx: bool = False, evaluate: bool = True, threads: int = 1, parity_n: int = 4,
           precision: str = "fp32", max_drop: float = 0.01, qat_steps: int = 0, qat_with: str = "teacher",
           profile: str = DEFAULT_PROFILE) -> dict:
    target = get_profile(profile)
    if precision not in target.precisions:
        raise GroundError(f"profile {profile} does not run {precision} (it runs {', '.join(target.precisions)})")
    if precision == "fp16" and "FP16" not in capabilities():
        # The target computes fp16, this host does not (an AVX2 CPU): OpenVINO runs the FP16 IR
        # at f32 here, so parity and scores are f32's, and the FP16 numerics come from the torch
        # emulation (parity's `fp16`, the bundle's self-test tolerance). Search and gap still
        # refuse to time fp16 here: their figures would be f32's.
        run.log("this CPU does not compute fp16: the FP16 IR is checked at f32 here, its FP16 "
                "numerics by torch emulation")
    else:
        check_precision(precision)
    model, norm, meta = run.load(checkpoint)
    name = name or Path(checkpoint).stem
    out_dir = run.run_dir / "export" / name
    tiles, where = run.tiles(parity_n, norm)
    res, int8 = _ir(run, model, norm, out_dir, precision, fp16, onnx,
                    {"max_drop": max_drop, "qat_steps": qat_steps, "qat_with": qat_with}, profile)
    res.parity = parity(res.xml, model, tiles, with_fp16=precision != "int8", precision=precision)
    if res.onnx is not None:
        res.parity["onnx"] = parity(res.onnx, model, tiles, with_fp16=False)
    run.log(f"parity at {precision} on {res.parity['tiles']} tiles of the run's imagery: max |p_IR - p_torch| "
            f"{res.parity['max_abs_diff']:.2e}, mask agreement {res.parity['mask_agreement']:.5f}")
    size = measure(model, torch.zeros(1, len(run.cfg.bands), run.cfg.tile, run.cfg.tile))
    record = {"checkpoint": checkpoint, "name": name, "precision": precision, "profile": profile,
              "rewrites": res.rewrites, "fp16": bool(fp16) and precision != "int8",
              "int8": int8, "files": res.sizes,
              "parity": {**res.parity, "tiles_from": where}, "params": size.params, "macs": size.macs,
              "tile": run.cfg.tile, "overlap": run.cfg.overlap, "bands": list(run.cfg.bands),
              "classes": run.classes, "normalization": norm.as_dict(),
              "model_meta": {k: v for k, v in meta.items() if k in ("name", "role", "arch")},
              "label_free": label_free_lineage(run.folder, checkpoint, run.label_free)
              and (int8 is None or int8["method"] != "qat" or qat_with != "labels")}
    record.update(_scores(run, res.xml, model, norm, precision) if evaluate else {"operating_point": None})
    record["latency"] = openvino_latency(res.xml, tile=run.cfg.tile, threads=threads, precision=precision)
    (out_dir / "export.json").write_text(json.dumps(record, indent=2))
    metrics = {"parity_max_abs_diff": res.parity["max_abs_diff"],
               "parity_mask_agreement": res.parity["mask_agreement"],
               "ms_per_tile": record["latency"]["ms_per_tile"]}
    if "metrics" in record:
        metrics.update(miou_openvino=record["metrics"]["openvino"]["miou"],
                       miou_fp16_emulated=record["metrics"]["fp16_emulated"]["miou"])
    run.folder.add(StageRecord(f"export:{name}", [res.xml, res.bin, out_dir / "export.json"]
                               + ([res.onnx] if res.onnx else []),
                               inputs={"checkpoint": checkpoint, "parity_tiles": where},
                               params={"precision": precision, "profile": profile, "fp16": record["fp16"],
                                       "onnx": bool(onnx),
                                       "int8": int8}, metrics=metrics, label_free=record["label_free"]))
    record["out_dir"] = str(out_dir)
    return record
