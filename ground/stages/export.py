"""Export stage: a checkpoint of a run in; `export/NAME/model.{xml,bin}` (FP16 weights unless
fp16=False) out, checked against torch on tiles of the run's own imagery, scored *as OpenVINO
executes it* on the held-out image (and in emulated FP16, as a VPU would, at the same operating
point), timed, and recorded in `export/NAME/export.json` and the lineage. `bundle` packs it."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ground.lineage import RunFolder, StageRecord
from ground.models.size import measure
from ground.openvino.export import export_openvino
from ground.openvino.runtime import openvino_latency
from ground.stages.run import Run, point_of


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


def _scores(run: Run, xml: Path, model, norm) -> dict:
    """Held-out scores as OpenVINO runs the IR, and in emulated FP16 at the same operating point."""
    if not run.evals:
        return {"operating_point": run.calibrate(run.ir_predict(xml, norm)).as_dict(run.classes)}
    ir = run.evaluate(run.ir_predict(xml, norm))
    vpu = run.evaluate(run.torch_predict(model, norm, fp16="round"), point_of(ir))
    run.log(f"held-out {run.eval_name}: mIoU {ir['miou']:.4f} as OpenVINO runs it, "
            f"{vpu['miou']:.4f} in emulated FP16")
    return {"operating_point": ir["operating_point"],
            "metrics": {"openvino": ir, "fp16_emulated": vpu, "eval": run.eval_name}}


def export(run: Run, checkpoint: str = "student.pt", name: str | None = None, fp16: bool = True,
           onnx: bool = False, evaluate: bool = True, threads: int = 1, parity_n: int = 4) -> dict:
    model, norm, meta = run.load(checkpoint)
    name = name or Path(checkpoint).stem
    out_dir = run.run_dir / "export" / name
    tiles, where = run.tiles(parity_n, norm)
    res = export_openvino(model, out_dir, tiles=tiles, fp16=fp16, onnx=onnx, tile=run.cfg.tile)
    run.log(f"parity on {res.parity['tiles']} tiles of the run's imagery: max |p_IR - p_torch| "
            f"{res.parity['max_abs_diff']:.2e}, mask agreement {res.parity['mask_agreement']:.5f}")
    size = measure(model, torch.zeros(1, len(run.cfg.bands), run.cfg.tile, run.cfg.tile))
    record = {"checkpoint": checkpoint, "name": name, "fp16": bool(fp16), "files": res.sizes,
              "parity": {**res.parity, "tiles_from": where}, "params": size.params, "macs": size.macs,
              "tile": run.cfg.tile, "overlap": run.cfg.overlap, "bands": list(run.cfg.bands),
              "classes": run.classes, "normalization": norm.as_dict(),
              "model_meta": {k: v for k, v in meta.items() if k in ("name", "role", "arch")},
              "label_free": label_free_lineage(run.folder, checkpoint, run.label_free)}
    if evaluate:
        record.update(_scores(run, res.xml, model, norm))
    else:
        record["operating_point"] = None
    record["latency"] = openvino_latency(res.xml, tile=run.cfg.tile, threads=threads)
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
                               params={"fp16": bool(fp16), "onnx": bool(onnx)}, metrics=metrics,
                               label_free=record["label_free"]))
    record["out_dir"] = str(out_dir)
    return record
