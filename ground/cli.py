"""`eoedge ground COMMAND`: the factory's commands. One row of COMMANDS per command, one function each,
heavy imports inside the functions: a later stage (prune, fp16, export, bundle) adds a row."""
from __future__ import annotations

import argparse
import sys

from shared.cliutil import CommandError, add_json_flag, emit, run_command


def _overrides(args) -> dict:
    out = {}
    for key, attr in (("train.steps", "steps"), ("student.params", "params"), ("run.out", "out"),
                      ("run.name", "name")):
        value = getattr(args, attr, None)
        if value is not None:
            out[key] = value
    return out


def _load(args):
    from ground.config import ConfigError, load_config
    try:
        return load_config(args.config, _overrides(args))
    except ConfigError as exc:
        raise CommandError(str(exc)) from None


def cmd_list(args) -> int:
    from ground.losses import LOSSES
    from ground.students import STUDENTS
    from ground.teachers import DEFAULT_TEACHER, TEACHERS
    from ground.data import PATCH_LAYOUTS, SOURCES
    result = {"teachers": sorted(TEACHERS) + ["smp:Arch/encoder (trained here, default " + DEFAULT_TEACHER + ")",
                                              "openvino:PATH", "checkpoint:PATH"],
              "students": sorted(STUDENTS) + ["smp:Arch/encoder"], "losses": sorted(LOSSES),
              "data_sources": sorted(SOURCES), "patch_layouts": sorted(PATCH_LAYOUTS)}
    emit(result, args.json, lambda r: "\n".join(f"{k}: {', '.join(v)}" for k, v in r.items()))
    return 0


def cmd_size(args) -> int:
    from ground.complexity import describe, human
    from ground.students import TinyUNet
    try:
        model = TinyUNet.for_budget(args.in_channels, args.classes, args.params, depth=args.depth,
                                    separable=args.separable, multiple_of=args.multiple_of)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    result = {**model.config, **describe(model, args.in_channels, args.tile)}
    emit(result, args.json, lambda r: f"TinyUNet widths {r['widths']}{' separable' if r['separable'] else ''}: "
                                      f"{r['params']:,} params, {human(r['macs'])} MACs per {r['tile']}x{r['tile']} tile")
    return 0


def cmd_run(args) -> int:
    from ground.pipeline import run
    from ground.report import markdown
    cfg = _load(args)
    try:
        report = run(cfg, progress=not args.json, only=args.only)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    result = {k: report[k] for k in ("run", "run_dir", "deliver", "rows", "normalization", "seconds_total")}
    emit(result, args.json, lambda r: markdown(report) + f"\nrun folder: {r['run_dir']}")
    return 0


def cmd_train_teacher(args) -> int:
    from ground.lineage import RunFolder
    from ground.pipeline import load_data, train_smp_teacher
    from ground.train import loss_fell
    cfg = _load(args)
    name = cfg.teacher["name"]
    if not name.startswith("smp:"):
        raise CommandError(f"teacher.name {name!r} is not trained here; train-teacher takes an smp:Arch/encoder teacher")
    data = load_data(cfg)
    folder = RunFolder(cfg.run_dir)
    folder.set_config(cfg.raw)
    folder.add_inputs(data.inputs)
    path = cfg.run_dir / "teacher.pt"
    if path.exists() and not args.resume:
        raise CommandError(f"{path} exists: pass --resume to continue it, or choose another run name")
    _model, history = train_smp_teacher(cfg, data, path, name, cfg.teacher["train"], cfg.teacher["options"],
                                        resume=args.resume, progress=not args.json)
    folder.add_stage("train-teacher", [path], {"final_loss": history[-1]["loss"] if history else None})
    result = {"checkpoint": str(path), "steps": history[-1]["step"] if history else 0,
              "first_loss": history[0]["loss"] if history else None,
              "final_loss": history[-1]["loss"] if history else None, "loss_fell": loss_fell(history)}
    emit(result, args.json, lambda r: f"teacher {name}: {r['steps']} steps, loss {r['first_loss']:.4f} -> "
                                      f"{r['final_loss']:.4f}; checkpoint {r['checkpoint']}")
    return 0


def cmd_eval_teacher(args) -> int:
    from ground.evaluate import OperatingPoint, evaluate_probs, summary
    from ground.pipeline import load_data
    from ground.teachers import build_teacher
    cfg = _load(args)
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


def _config_arg(p):
    p.add_argument("config", help="TOML run config (see configs/)")
    p.add_argument("--out", help="parent folder of the run folder (run.out)")
    p.add_argument("--name", help="run name (run.name)")


def _stage(module: str, func: str):
    """A command or argument adder living in a stage module, imported only when used (they import torch)."""
    def call(arg):
        import importlib
        return getattr(importlib.import_module(module), func)(arg)
    return call


# name -> (function, help, argument adder)
COMMANDS = {
    "list": (cmd_list, "the registries: teachers, students, losses, data sources", lambda p: None),
    "size": (cmd_size, "the TinyUNet widths for a parameter budget (--params 100k)", lambda p: (
        p.add_argument("--params", required=True, help="budget, e.g. 120000, 100k, 1.5M"),
        p.add_argument("--in-channels", type=int, default=6),
        p.add_argument("--classes", type=int, default=3),
        p.add_argument("--depth", type=int, default=4, help="levels (poolings + 1)"),
        p.add_argument("--separable", action="store_true", help="depthwise-separable convolutions"),
        p.add_argument("--multiple-of", type=int, default=1, help="round widths to a multiple (e.g. 4)"),
        p.add_argument("--tile", type=int, default=256, help="tile size the MACs are counted on"))),
    "run": (cmd_run, "a whole config: data, teacher, students, evaluation, report, lineage", lambda p: (
        _config_arg(p),
        p.add_argument("--steps", type=int, help="override train.steps"),
        p.add_argument("--params", help="override student.params (e.g. 100k)"),
        p.add_argument("--only", nargs="+", metavar="EXPERIMENT", help="run only these experiments"))),
    "train-teacher": (cmd_train_teacher, "train the config's smp teacher from its labelled data", lambda p: (
        _config_arg(p),
        p.add_argument("--steps", type=int, help="override train.steps"),
        p.add_argument("--resume", action="store_true", help="continue from the run folder's teacher.pt"))),
    "eval-teacher": (cmd_eval_teacher, "score the teacher on the config's evaluation image", lambda p: (
        _config_arg(p),
        p.add_argument("--teacher", help="another teacher name than the config's"))),
    # the stages after distillation (ground.prune, ground.sweep, ground.fp16, ground.export, ground.package)
    "prune": (_stage("ground.prune", "cmd_prune"), "prune a run's student to a size target, then fine-tune it",
              _stage("ground.sweep", "add_prune_args")),
    "sweep": (_stage("ground.sweep", "cmd_sweep"), "criteria x ratios: metric, size and OpenVINO latency",
              _stage("ground.sweep", "add_sweep_args")),
    "fp16-finetune": (_stage("ground.fp16", "cmd_fp16_finetune"),
                      "FP16-aware fine-tuning and the deployment-gap table", _stage("ground.sweep", "add_fp16_args")),
    "export": (_stage("ground.export", "cmd_export"), "OpenVINO IR (FP16), parity on real tiles, scores, latency",
               _stage("ground.sweep", "add_export_args")),
    "bundle": (_stage("ground.package", "cmd_bundle"), "sign an uplink bundle from an export, within a budget",
               _stage("ground.package", "add_bundle_args")),
    "inspect": (_stage("ground.package", "cmd_inspect"), "what a bundle says about itself (unverified)",
                _stage("ground.package", "add_inspect_args")),
    "verify": (_stage("ground.package", "cmd_verify"), "verify a bundle's signature and checksums",
               _stage("ground.package", "add_verify_args")),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eoedge ground", description="The factory: teachers, distillation, pruning, FP16, export, bundles (one run folder per run).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (func, help_, add) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add(p)
        add_json_flag(p)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run_command(args.func, args)
    except ValueError as exc:          # bad input named by the code that found it: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
