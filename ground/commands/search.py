"""`eoedge ground search | build`: the architecture search over a run, and the one command from a
config to the smallest bundle within a latency budget and an accuracy tolerance."""
from __future__ import annotations

from shared.cliutil import CommandError, emit
from ground.config import load_config
from ground.search.front import front_markdown
from ground.stages.build import build
from ground.stages.run import Run
from ground.stages.search import SearchSettings, pick_point, search


def _settings(args, default_name: str, max_bytes) -> SearchSettings:
    return SearchSettings(name=args.study or default_name, trials=args.trials, workers=args.workers,
                          device=args.device, precision=args.precision, sampler=args.sampler,
                          population=args.population, steps=args.steps, storage=args.storage, max_bytes=max_bytes)


def _search_text(r: dict) -> str:
    lines = [front_markdown(r), f"written: {r['folder']}/front.{{json,md,png}} ({r['seconds']} s; "
                                f"{r['failed']} failed or surplus trial(s))"]
    if "picked" in r:
        p = r["picked"]
        lines.append(f"picked: {p['picked']} (trial {p['number']}, {p['arch']}): mIoU {p['miou']:.4f}, "
                     f"{p['ms_per_tile']:.2f} ms per tile" if p else "picked: none within the tolerance")
    return "\n".join(lines)


def cmd_search(args) -> int:
    run = Run.open(args.run, progress=not args.json)
    res = search(run, _settings(args, "search", args.max_bytes))
    if args.pick is not None:
        res["picked"] = pick_point(run, res, args.pick)
    emit(res, args.json, _search_text)
    return 0 if args.pick is None or res["picked"] else 1


def _build_text(r: dict) -> str:
    f = lambda v: "-" if v is None else f"{v:.4f}"
    return (f"{r['bundle']}: {r['bytes']:,} bytes, {r['model_id']} v{r['version']} ({r['precision']}, on-board "
            f"self-test passed)\n  held-out mIoU {f(r['miou_heldout'])} (teacher {f(r['teacher_miou_heldout'])}) "
            f"on {r['eval']}\n  {r['ms_per_tile']:.2f} ms per tile on {r['device']} (budget {r['latency_budget_ms']}); "
            f"{r['params']:,} params; via {r['via']}: {r['chosen']}; {r['seconds']} s")


def cmd_build(args) -> int:
    if args.accuracy_tolerance < 0:
        raise CommandError(f"--accuracy-tolerance must be >= 0, got {args.accuracy_tolerance}")
    cfg = load_config(args.config, {k: v for k, v in (("run.out", args.out), ("run.name", args.name)) if v})
    res = build(cfg, args.latency_budget_ms, args.key, args.model_id, args.version, args.accuracy_tolerance,
                via=args.via, settings=_settings(args, "build", args.max_bytes), fp16_steps=args.fp16_steps,
                max_bytes=args.max_bytes, progress=not args.json)
    emit(res, args.json, _build_text)
    return 0
