"""`eoedge ground list | size | run | train-teacher | eval-teacher`: the registries, student sizing,
distillation, and the teacher."""
from __future__ import annotations

from shared.cliutil import CommandError, emit
from ground.config import load_config
from ground.data.dataset import load_data
from ground.data.layouts import PATCH_LAYOUTS
from ground.data.sources import SOURCES
from ground.evaluation.operating_point import OperatingPoint
from ground.evaluation.report import markdown
from ground.evaluation.scores import evaluate_probs, summary
from ground.lineage import RunFolder, StageRecord
from ground.models.registry import STUDENTS
from ground.models.size import describe, human
from ground.models.tiny_unet import TinyUNet
from ground.stages.distill import distill
from ground.teachers.registry import DEFAULT_TEACHER, TEACHERS, build_teacher
from ground.training.device import Placement
from ground.training.distributed import Distributed
from ground.training.loop import loss_fell
from ground.training.losses import LOSSES
from ground.training.teacher import train_smp_teacher


def _overrides(args) -> dict:
    out = {}
    for key, attr in (("train.steps", "steps"), ("student.params", "params"), ("run.out", "out"),
                      ("run.name", "name"), ("train.device", "device"), ("train.precision", "precision")):
        value = getattr(args, attr, None)
        if value is not None:
            out[key] = value
    return out


def load(args):
    return load_config(args.config, _overrides(args))


def cmd_list(args) -> int:
    result = {"teachers": sorted(TEACHERS) + ["smp:Arch/encoder (trained here, default " + DEFAULT_TEACHER + ")",
                                              "openvino:PATH", "checkpoint:PATH"],
              "students": sorted(STUDENTS) + ["smp:Arch/encoder"], "losses": sorted(LOSSES),
              "data_sources": sorted(SOURCES), "patch_layouts": sorted(PATCH_LAYOUTS)}
    emit(result, args.json, lambda r: "\n".join(f"{k}: {', '.join(v)}" for k, v in r.items()))
    return 0


def cmd_size(args) -> int:
    model = TinyUNet.for_budget(args.in_channels, args.classes, args.params, depth=args.depth,
                                separable=args.separable, multiple_of=args.multiple_of)
    result = {**model.config, **describe(model, args.in_channels, args.tile)}
    emit(result, args.json, lambda r: f"TinyUNet widths {r['widths']}{' separable' if r['separable'] else ''}: "
                                      f"{r['params']:,} params, {human(r['macs'])} MACs per {r['tile']}x{r['tile']} tile")
    return 0


def cmd_run(args) -> int:
    report = distill(load(args), progress=not args.json, only=args.only)
    if report.get("rank"):          # a torchrun rank other than 0: rank 0 reports
        return 0
    result = {k: report[k] for k in ("run", "run_dir", "deliver", "rows", "normalization", "seconds_total")}
    emit(result, args.json, lambda r: markdown(report) + f"\nrun folder: {r['run_dir']}")
    return 0


def cmd_train_teacher(args) -> int:
    cfg = load(args)
    name = cfg.teacher["name"]
    if not name.startswith("smp:"):
        raise CommandError(f"teacher.name {name!r} is not trained here; train-teacher takes an smp:Arch/encoder teacher")
    path = cfg.run_dir / "teacher.pt"
    if path.exists() and not args.resume:
        raise CommandError(f"{path} exists: pass --resume to continue it, or choose another run name")
    ctx = Distributed.from_env(Placement.of(cfg.train.device, cfg.train.precision))   # torchrun, or one process
    data = load_data(cfg)
    if ctx.is_main:                  # rank 0 alone writes the run folder and reports
        folder = RunFolder(cfg.run_dir)
        folder.set_config(cfg.raw)
        folder.add_inputs(data.inputs)
    _model, history = train_smp_teacher(cfg, data, path, name, cfg.teacher["train"], cfg.teacher["options"],
                                        resume=args.resume, progress=not args.json)
    if not ctx.is_main:
        return 0
    folder.add(StageRecord("train-teacher", [path], params={"teacher": name},
                           metrics={"final_loss": history[-1]["loss"] if history else None}, label_free=False))
    result = {"checkpoint": str(path), "steps": history[-1]["step"] if history else 0,
              "first_loss": history[0]["loss"] if history else None,
              "final_loss": history[-1]["loss"] if history else None, "loss_fell": loss_fell(history)}
    emit(result, args.json, lambda r: f"teacher {name}: {r['steps']} steps, loss {r['first_loss']:.4f} -> "
                                      f"{r['final_loss']:.4f}; checkpoint {r['checkpoint']}")
    return 0


def cmd_eval_teacher(args) -> int:
    cfg = load(args)
    if cfg.eval_data is None:
        raise CommandError("eval.data: no evaluation image configured")
    data = load_data(cfg)
    teacher = build_teacher(args.teacher or cfg.teacher["name"], **cfg.teacher["options"])
    probs = [teacher.predict_proba(s.image) for s in data.evals]
    res = evaluate_probs(probs, OperatingPoint([None] * len(cfg.classes), 0), len(cfg.classes), cfg.classes,
                         [s.labels for s in data.evals])
    if "vs_labels" not in res:
        raise CommandError(f"eval.data {data.eval.name}: no labels to score the teacher against")
    result = {"teacher": teacher.name, "eval": data.eval.name, "images": len(data.evals), **summary(res),
              "scores": res["vs_labels"]}
    emit(result, args.json, lambda r: f"{r['teacher']} on {r['eval']}: mIoU {r['miou']:.3f}, accuracy "
                                      f"{r['accuracy']:.3f}, IoU " + ", ".join(f"{k} {v:.3f}" for k, v in r["iou"].items()))
    return 0
