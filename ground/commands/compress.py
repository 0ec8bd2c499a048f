"""`eoedge ground prune | sweep | fp16-finetune`: the compression stages on a run folder."""
from __future__ import annotations

from dataclasses import replace

from shared.cliutil import emit
from ground.stages.fp16_finetune import fp16_finetune, gap_markdown
from ground.stages.lowrank import lowrank
from ground.stages.prune import prune
from ground.stages.run import Run
from ground.stages.sweep import sweep, sweep_markdown


def _scores_and_checkpoint(r: dict) -> list[str]:
    """The lines every compression stage ends with: held-out mIoU at each step, where it wrote."""
    return [f"  mIoU {k}: {v['miou']:.4f}" for k, v in r["metrics"].items()] + \
        [f"checkpoint: {r['run_dir']}/{r['checkpoint']}"]


def open_run(args) -> Run:
    """The run folder, on --device/--precision when given (else the run's own [train] choice)."""
    run = Run.open(args.run, progress=not args.json)
    over = {k: getattr(args, k) for k in ("device", "precision") if getattr(args, k, None)}
    if over:
        run.cfg = replace(run.cfg, train=replace(run.cfg.train, **over))
    return run


def _prune_text(r: dict) -> str:
    lines = [f"{r['criterion']} ({r['scope']}, round_to={r['round_to']}): {r['before']['params']:,} -> "
             f"{r['after']['params']:,} params (-{r['params_reduction']:.1%}), MACs -{r['macs_reduction']:.1%}"]
    return "\n".join(lines + _scores_and_checkpoint(r))


def cmd_prune(args) -> int:
    run = open_run(args)
    res = prune(run, args.criterion, args.target, by=args.by, round_to=args.round_to or None, steps=args.steps,
                scope=args.scope, checkpoint=args.checkpoint, finetune_steps=args.finetune_steps,
                finetune_with=args.finetune_with, name=args.name)
    if not res.get("rank"):          # under torchrun rank 0 alone reports
        emit(res, args.json, _prune_text)
    return 0


def cmd_sweep(args) -> int:
    run = Run.open(args.run, progress=not args.json)
    res = sweep(run, args.checkpoint, args.criteria, args.ratios, by=args.by, round_to=args.round_to or None,
                scope=args.scope, finetune_steps=args.finetune_steps, finetune_with=args.finetune_with,
                threads=args.threads, out=args.out, lowrank=args.lowrank)
    emit(res, args.json, lambda r: sweep_markdown(r) + f"\nwritten: {r['out_dir']}/sweep.{{json,md,png}}")
    return 0


def cmd_fp16_finetune(args) -> int:
    run = open_run(args)
    res = fp16_finetune(run, args.checkpoint, args.steps, args.finetune_with, args.mode, args.name, args.lr)
    if not res.get("rank"):
        emit(res, args.json, lambda r: gap_markdown(r) + f"\ncheckpoint: {r['out']}")
    return 0


def _lowrank_text(r: dict) -> str:
    how = f"energy {r['energy']:.3f}" + (f" (for {r['macs_target']:.0%} of the MACs)" if r["macs_target"] else "")
    how += f", ranks multiples of {r['round_to']}" if r["round_to"] else ""
    lines = [f"low-rank, {how}: {len(r['ranks'])} convs factorised, {r['before']['params']:,} -> "
             f"{r['after']['params']:,} params (-{r['params_reduction']:.1%}), MACs -{r['macs_reduction']:.1%}"]
    return "\n".join(lines + _scores_and_checkpoint(r))


def cmd_lowrank(args) -> int:
    run = open_run(args)
    res = lowrank(run, args.checkpoint, energy=args.energy, macs_target=args.macs_target,
                  round_to=args.round_to or None, finetune_steps=args.finetune_steps,
                  finetune_with=args.finetune_with, name=args.name)
    if not res.get("rank"):
        emit(res, args.json, _lowrank_text)
    return 0
