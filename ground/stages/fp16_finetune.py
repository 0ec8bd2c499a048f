"""FP16 stage: the deployment gap of a checkpoint (FP32, naive FP16, FP16-aware) and an FP16-aware
fine-tuned copy `fp16/NAME.pt`, with `fp16/NAME-gap.{json,md}` and a lineage record."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ground.compression.fp16 import EMULATION_MODES, emulate_fp16, fp16_overflows
from ground.errors import ConfigError
from ground.lineage import StageRecord
from ground.models.checkpoints import save_checkpoint
from ground.stages.run import Run, not_main, point_of

GAP_LABELS = {"fp32": "FP32 (as trained)", "fp16_naive": "FP16, naive conversion",
              "fp16_aware": "FP16 after FP16-aware fine-tuning", "fp32_after": "(FP32 of the fine-tuned weights)"}
ROW_KEYS = ("miou", "f1", "accuracy", "agreement", "iou", "operating_point")


def _prob_gap(models: dict, tiles: torch.Tensor, mode: str) -> dict:
    """max |p_FP16 - p_FP32| of each model's emulation against its own FP32: the precision effect alone."""
    with torch.no_grad():
        return {key: float((torch.softmax(emulate_fp16(m, mode)(tiles), 1) - torch.softmax(m.eval()(tiles), 1))
                           .abs().max()) for key, m in models.items()}


def fp16_finetune(run: Run, checkpoint: str = "student.pt", steps: int = 200, source: str = "teacher",
                  mode: str = "round", name: str | None = None, lr: float | None = None) -> dict:
    """Rows (all on the run's held-out image, post-processed as on board):
    - `fp32`: the checkpoint as trained (its operating point calibrated on training imagery);
    - `fp16_naive`: the same weights run in emulated FP16 with that same operating point;
    - `fp16_aware`: after `steps` of FP16-aware fine-tuning (FP16 forward, FP32 masters),
      in emulated FP16, recalibrated;
    - `fp32_after`: the fine-tuned weights in FP32 (separates more training from FP16-awareness).
    Under torchrun every rank fine-tunes its share of each batch; rank 0 alone scores and writes."""
    if mode not in EMULATION_MODES:
        raise ConfigError(f"FP16 emulation mode must be one of {EMULATION_MODES}, got {mode!r}")
    model, norm, meta = run.load(checkpoint)
    name = name or f"{Path(checkpoint).stem}-fp16"
    tiles, where = run.tiles(2, norm)
    tiles = torch.from_numpy(tiles)
    main = run.ctx.is_main
    rows = {"fp32": run.evaluate(run.torch_predict(model, norm))} if main else {}
    if main:
        rows["fp16_naive"] = run.evaluate(run.torch_predict(model, norm, fp16=mode), point_of(rows["fp32"]))
    tuned = copy.deepcopy(model)
    history = run.finetune(tuned, steps, source, fp16=True, lr=lr, reference_model=model, norm=norm,
                           desc="FP16-aware fine-tune")
    if not main:
        return not_main(run)
    rows["fp16_aware"] = run.evaluate(run.torch_predict(tuned, norm, fp16=mode))
    rows["fp32_after"] = run.evaluate(run.torch_predict(tuned, norm))
    report = {"checkpoint": checkpoint, "mode": mode, "steps": steps, "source": source, "eval": run.eval_name,
              "label_free": run.label_free and source != "labels",
              "rows": {k: {m: v.get(m) for m in ROW_KEYS} for k, v in rows.items()},
              "max_prob_diff_fp16_vs_fp32": _prob_gap({"fp16_naive": model, "fp16_aware": tuned}, tiles, mode),
              "overflows": {"before": fp16_overflows(model, tiles), "after": fp16_overflows(tuned, tiles)},
              "tiles_from": where, "final_loss": history[-1]["loss"] if history else None}
    out = run.run_dir / "fp16" / f"{name}.pt"
    save_checkpoint(out, tuned, meta["arch"], norm, meta={"name": name, "role": "fp16-aware",
                                                          "fp16": {k: v for k, v in report.items() if k != "rows"}})
    (out.parent / f"{name}-gap.json").write_text(json.dumps(report, indent=2))
    (out.parent / f"{name}-gap.md").write_text(gap_markdown(report))
    run.folder.add(StageRecord(f"fp16-finetune:{name}", [out, out.parent / f"{name}-gap.json"],
                               inputs={"checkpoint": checkpoint},
                               params={"mode": mode, "steps": steps, "finetune_with": source},
                               metrics={k: v["miou"] for k, v in report["rows"].items()},
                               label_free=report["label_free"]))
    report["out"] = str(out.relative_to(run.run_dir))
    return report


def gap_markdown(report: dict) -> str:
    lines = [f"Deployment gap of `{report['checkpoint']}` on `{report['eval']}` (FP16 emulated in torch, "
             f"mode {report['mode']}; {report['steps']} FP16-aware steps with {report['source']}):", "",
             "| precision | mIoU | accuracy | F1 | agreement with teacher |", "|---|---|---|---|---|"]
    f = lambda v: "-" if v is None else f"{v:.4f}"
    for key, row in report["rows"].items():
        lines.append(f"| {GAP_LABELS.get(key, key)} | {f(row['miou'])} | {f(row['accuracy'])} | {f(row['f1'])} | "
                     f"{f(row['agreement'])} |")
    d = report["max_prob_diff_fp16_vs_fp32"]
    lines += ["", f"max |p_FP16 - p_FP32| of the same weights on 2 tiles of the training imagery: before "
                  f"{d['fp16_naive']:.2e}, after FP16-aware fine-tuning {d['fp16_aware']:.2e}; layers overflowing "
                  f"FP16: {report['overflows']['before'] or 'none'}"]
    return "\n".join(lines) + "\n"
