"""Pruning, FP16 and bundles on the label-free distilled student, scored on the held-out rows
256..511 of the real ukis chip (never trained, fine-tuned or calibrated on).

    .venv/bin/python benchmarks/bench_prune.py                     # everything (~25 min on 2 loaded CPUs)
    .venv/bin/python benchmarks/bench_prune.py --phases sweep      # one part
    .venv/bin/python benchmarks/bench_prune.py --json

The student comes from a run folder (default runs/e-student) of `eoedge ground run
configs/ukis_distill.toml --only output-distilled --name e-student` (made if missing): distilled from the ukis-csmask teacher alone, no human
label in any training or fine-tuning step here either (fine-tuning distils from that teacher,
thresholds are calibrated on the teacher's masks of the training imagery). Phases:

- `roundto`: the student's widths x 0.8 as odd channel counts and as multiples of 4, 8, 16:
  OpenVINO time and time per MAC against the unpruned widths (which multiple the CPU rewards);
- `sweep`: the six criteria x three ratios: mIoU before/after fine-tuning, size, latency;
- `target`: at least 40% of the parameters pruned (`--criterion`, lamp: fixed beforehand, never
  chosen from the sweep, whose scores come from the held-out rows), fine-tuned, scored as
  OpenVINO runs it: the mIoU lost against the unpruned student;
- `smallest`: growing ratios (round_to 8, two pruning steps, then FP16-aware fine-tuning) until
  the FP16 IR, run by OpenVINO, falls below the teacher's mIoU: the smallest that does not, and
  its compression against the teacher;
- `gap`: the deployment-gap table (FP32, naive FP16, FP16-aware fine-tuned) of that student;
- `bundle`: a signed FP16 bundle of a ~100k-parameter student under 300 KB, and a tampered copy
  refused by verify.
Writes bench-prune.json / bench-prune.md into the run folder and prints them. Timings depend on
the machine's load (printed with them): the CPU is shared with other developers.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PHASES = ("roundto", "sweep", "target", "smallest", "gap", "bundle")
TEACHER_MIOU = 0.776          # ukis-csmask on rows 256..511 (DESIGN.md), re-measured by the run


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def log(msg: str) -> None:
    print(f"[bench_prune {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ensure_run(run_dir: Path, config: Path, steps: int | None) -> Path:
    """The label-free student's run folder; trained with the ground pipeline when missing."""
    if (run_dir / "student.pt").exists():
        return run_dir
    from ground.config import load_config
    from ground.stages.distill import distill
    overrides = {"run.out": str(run_dir.parent), "run.name": run_dir.name}
    if steps:
        overrides["train.steps"] = steps
    log(f"no student in {run_dir}: distilling one (label-free) with {config.name}")
    distill(load_config(config, overrides), progress=True, only=["output-distilled"])
    return run_dir


def teacher_row(run) -> dict:
    rep = run.run_dir / "report.json"
    rows = json.loads(rep.read_text())["rows"] if rep.exists() else []
    return next((r for r in rows if r.get("mode") == "teacher"), {})


# ---- phases -------------------------------------------------------------------------------------------

def _nearest(x: float, step: int, odd: bool = False) -> int:
    if odd:
        return max(1, int(round((x - 1) / 2)) * 2 + 1)
    return max(step, int(round(x / step)) * step)


def phase_roundto(run, args) -> dict:
    """Which channel multiple OpenVINO rewards on this CPU. The student's widths scaled by 0.8
    (what a 36% parameter pruning leaves) and rounded four ways: to odd counts (no rounding can
    give those), and to multiples of 4, 8, 16. Latency does not depend on the weight values, so
    the TinyUNets are built at those widths directly. All IRs are timed in turn over rounds; each
    keeps the lowest of its per-round medians (the least disturbed by other jobs)."""
    from ground.models.size import measure
    from ground.models.tiny_unet import TinyUNet
    from ground.openvino.export import export_openvino
    from ground.openvino.runtime import interleaved_latency
    base, norm, _ = run.load(args.checkpoint)
    cfg = base.config
    example = torch_zeros(cfg["in_channels"], run.cfg.tile)
    out = run.run_dir / "bench-prune" / "roundto"
    scaled = [0.8 * w for w in cfg["widths"]]
    widths = {"unpruned": list(cfg["widths"]), "odd": [_nearest(w, 1, odd=True) for w in scaled]}
    widths.update({f"round_to={k}": [_nearest(w, k) for w in scaled] for k in (4, 8, 16)})
    variants = {}
    for name, w in widths.items():
        m = TinyUNet(cfg["in_channels"], cfg["num_classes"], w, upsample=cfg["upsample"]).eval()
        variants[name] = (export_openvino(m, out / name.replace("=", "-"), tile=run.cfg.tile).xml, measure(m, example), w)
    timing, _ = interleaved_latency({k: (xml, "fp32") for k, (xml, _, _) in variants.items()}, "unpruned",
                                    run.cfg.tile, threads=1, repeats=20, rounds=args.latency_rounds)
    runs = {k: t["ms_rounds"] for k, t in timing.items()}
    rows = []
    import statistics
    base_macs = variants["unpruned"][1].macs
    for k, (_, size, w) in variants.items():
        ms = min(runs[k])
        # relative to the unpruned IR timed in the same round: cancels the load of the moment
        rel = statistics.median(m / b for m, b in zip(runs[k], runs["unpruned"]))
        rows.append({"variant": k, "macs": size.macs, "params": size.params, "widths": w, "ms_per_tile": ms,
                     "ms_rounds": runs[k], "gmacs_per_s": size.macs / ms / 1e6, "time_vs_unpruned": rel,
                     "macs_vs_unpruned": size.macs / base_macs,
                     "time_per_mac_vs_unpruned": rel / (size.macs / base_macs)})
    return {"rows": rows, "load": load_line()}


def torch_zeros(channels: int, tile: int):
    import torch
    return torch.zeros(1, channels, tile, tile)


def phase_sweep(run, args) -> dict:
    """The sweep with a light fine-tune (args.sweep_steps of args.sweep_batch crops) per point."""
    from dataclasses import replace
    from ground.stages.sweep import sweep
    cfg = run.cfg
    run.cfg = replace(cfg, train=replace(cfg.train, batch=args.sweep_batch))
    try:
        return sweep(run, args.checkpoint, None, args.ratios, by="params", round_to=8, scope="local",
                     finetune_steps=args.sweep_steps, finetune_with="teacher", threads=1, out="bench-prune/sweep",
                     latency_repeats=20, latency_rounds=args.latency_rounds)
    finally:
        run.cfg = cfg


def score_ir(run, checkpoint: str, name: str) -> dict:
    from ground.stages.export import export
    rec = export(run, checkpoint, name=name)
    return {"checkpoint": checkpoint, "export": f"export/{name}", "params": rec["params"], "macs": rec["macs"],
            "miou_openvino": rec["metrics"]["openvino"]["miou"],
            "agreement_openvino": rec["metrics"]["openvino"].get("agreement"),
            "miou_fp16_emulated": rec["metrics"]["fp16_emulated"]["miou"],
            "ms_per_tile": rec["latency"]["ms_per_tile"], "bin_bytes": rec["files"]["model.bin"],
            "parity": rec["parity"], "label_free": rec["label_free"]}


def phase_target(run, args, criterion: str) -> dict:
    from ground.stages.prune import prune
    base = score_ir(run, args.checkpoint, "bench-unpruned")
    res = prune(run, criterion, args.target, checkpoint=args.checkpoint, finetune_steps=args.finetune_steps,
                name=f"bench-{criterion}-{round(100 * args.target)}")
    pruned = score_ir(run, res["checkpoint"], f"bench-{criterion}-{round(100 * args.target)}")
    loss = base["miou_openvino"] - pruned["miou_openvino"]
    return {"criterion": criterion, "target": args.target, "params_reduction": res["params_reduction"],
            "macs_reduction": res["macs_reduction"], "unpruned": base, "pruned": pruned,
            "torch_metrics": {k: v["miou"] for k, v in res["metrics"].items()},
            "miou_loss": loss, "meets": {"params_reduction>=0.40": res["params_reduction"] >= 0.40,
                                         "miou_loss<=0.02": loss <= 0.02}}


def phase_smallest(run, args, criterion: str, teacher_params: int | None) -> dict:
    """Grow the ratio; each candidate pruned from the student, fine-tuned FP16-aware with the
    teacher, exported (FP16 IR) and scored as OpenVINO runs it. Stop at the first miss."""
    from ground.stages.fp16_finetune import fp16_finetune
    from ground.stages.prune import prune
    tried, best = [], None
    for ratio in args.smallest_ratios:
        tag = f"bench-smallest-{round(100 * ratio)}"
        res = prune(run, criterion, ratio, checkpoint=args.checkpoint, steps=args.smallest_prune_steps,
                    round_to=args.smallest_round_to, finetune_steps=args.finetune_steps, name=tag, evaluate=False)
        fp = fp16_finetune(run, res["checkpoint"], steps=args.fp16_steps, name=f"{tag}-fp16")
        row = {"ratio": ratio, "params_reduction": res["params_reduction"], **score_ir(run, fp["out"], tag),
               "fp16_gap_rows": {k: v["miou"] for k, v in fp["rows"].items()}}
        tried.append(row)
        log(f"ratio {ratio}: {row['params']} params, OpenVINO mIoU {row['miou_openvino']:.4f}")
        if row["miou_openvino"] >= args.teacher_miou:
            best = row
        else:
            break
    out = {"criterion": criterion, "teacher_miou": args.teacher_miou, "tried": tried, "smallest": best}
    if best and teacher_params:
        out["compression_vs_teacher"] = teacher_params / best["params"]
        out["teacher_params"] = teacher_params
    return out


def phase_gap(run, args, checkpoint: str) -> dict:
    from ground.stages.fp16_finetune import fp16_finetune
    return fp16_finetune(run, checkpoint, steps=args.fp16_steps, name="bench-gap")


def phase_bundle(run, args, checkpoint: str | None) -> dict:
    """A ~100k-parameter student (the student pruned by `--bundle-target` of its parameters,
    fine-tuned with the teacher, then FP16-aware), as a signed FP16 bundle within 300 KB; then a
    copy with one weight byte flipped is verified."""
    from shared.bundle import BundleError, verify_bundle
    from shared.keys import generate_keypair
    from ground.stages.bundle import bundle
    from ground.stages.export import export
    from ground.stages.fp16_finetune import fp16_finetune
    from ground.stages.prune import prune
    if checkpoint is None:
        res = prune(run, args.criterion, args.bundle_target, checkpoint=args.checkpoint, round_to=4,
                    finetune_steps=args.finetune_steps, name="bench-bundle", evaluate=False)
        checkpoint = fp16_finetune(run, res["checkpoint"], steps=args.fp16_steps, name="bench-bundle-fp16")["out"]
    keys = run.run_dir / "bench-prune" / "keys"
    shutil.rmtree(keys, ignore_errors=True)
    sk, pk = generate_keypair(keys)
    rec = export(run, checkpoint, name="bench-bundle")
    version = int(time.time())            # monotonic across re-runs
    res = bundle(run, "export/bench-bundle", sk, "cloudmask-ukis", version, max_bytes="300KB",
                 reference_tiles=args.reference_tiles, reference_window=args.reference_window)
    ok = verify_bundle(res["bundle"], pk)
    bad = Path(res["bundle"]).with_name("tampered.tar")
    with tarfile.open(res["bundle"]) as src, tarfile.open(bad, "w", format=tarfile.PAX_FORMAT) as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name == "model.bin":
                data = data[:100] + bytes([data[100] ^ 0x40]) + data[101:]
            dst.addfile(member, io.BytesIO(data))
    try:
        verify_bundle(bad, pk)
        rejected = None
    except BundleError as exc:
        rejected = {"reason": exc.reason, "message": str(exc)}
    return {"checkpoint": checkpoint, "params": rec["params"], "bundle": res["bundle"], "bytes": res["bytes"],
            "files": res["files"], "key_id": ok.key_id, "verified": True, "tampered_rejected": rejected,
            "miou_openvino": res["metrics"].get("openvino", {}).get("miou"),
            "meets": {"bytes<300KB": res["bytes"] < 300_000, "tampered copy rejected": rejected is not None}}


# ---- report ------------------------------------------------------------------------------------------

def markdown(b: dict) -> str:
    from ground.stages.sweep import sweep_markdown
    out = ["# bench_prune", "", f"`{b['command']}` on {b['machine']} ({b['load_before']} before, "
           f"{b['load_after']} after); run folder `{b['run_dir']}`.", ""]
    if "roundto" in b:
        out += ["## round_to and OpenVINO latency (the student's widths x 0.8, rounded four ways)", "",
                "Time and MACs relative to the unpruned IR timed in the same round (median over rounds); "
                "time per MAC below 1 means the channel counts use the CPU better than the unpruned widths.", "",
                "| variant | widths | MACs | params | ms/tile (min of rounds) | time vs unpruned | MACs vs unpruned "
                "| time per MAC vs unpruned |", "|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['variant']} | {r['widths']} | {r['macs']:,} | {r['params']:,} | {r['ms_per_tile']:.2f} | "
                f"{r['time_vs_unpruned']:.2f} | {r['macs_vs_unpruned']:.2f} | {r['time_per_mac_vs_unpruned']:.2f} |"
                for r in b["roundto"]["rows"]] + [""]
    if "sweep" in b:
        out += ["## Criteria x ratios", "", sweep_markdown(b["sweep"])]
    if "target" in b:
        t = b["target"]
        out += ["## At least 40% of the parameters pruned", "",
                f"{t['criterion']}: -{t['params_reduction']:.1%} params (-{t['macs_reduction']:.1%} MACs), "
                f"OpenVINO FP16 IR mIoU {t['unpruned']['miou_openvino']:.4f} -> {t['pruned']['miou_openvino']:.4f} "
                f"(loss {t['miou_loss']:+.4f}); {t['unpruned']['ms_per_tile']:.1f} -> {t['pruned']['ms_per_tile']:.1f} "
                f"ms/tile. Meets: {t['meets']}", ""]
    if "smallest" in b:
        s = b["smallest"]
        out += ["## Smallest label-free student at the teacher's mIoU (FP16 IR, run by OpenVINO)", "",
                "| target | params | mIoU (OpenVINO) | mIoU (emulated FP16) | agreement with teacher | ms/tile | .bin bytes |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['ratio']:.0%} | {r['params']:,} | {r['miou_openvino']:.4f} | {r['miou_fp16_emulated']:.4f} | "
                f"{r['agreement_openvino']:.4f} | {r['ms_per_tile']:.1f} | {r['bin_bytes']:,} |" for r in s["tried"]]
        if s.get("smallest"):
            out += ["", f"Smallest at >= {s['teacher_miou']:.4f} (the teacher's mIoU here): "
                        f"{s['smallest']['params']:,} params"
                        + (f", {s['compression_vs_teacher']:.0f}x fewer than the teacher's {s['teacher_params']:,}"
                           if s.get("compression_vs_teacher") else "")]
        else:
            out += ["", f"No pruned student reached {s['teacher_miou']:.4f}."]
        out += [""]
    if "gap" in b:
        from ground.stages.fp16_finetune import gap_markdown
        out += ["## Deployment gap", "", gap_markdown(b["gap"])]
    if "bundle" in b:
        u = b["bundle"]
        out += ["## Bundle", "", f"{u['params']:,}-parameter student: `{u['bundle']}` {u['bytes']:,} bytes "
                f"({', '.join(f'{k} {v:,}' for k, v in u['files'].items())}), signed (key {u['key_id']}), verified; "
                f"tampered copy: {'rejected (' + u['tampered_rejected']['reason'] + ')' if u['tampered_rejected'] else 'ACCEPTED'}."
                f" Meets: {u['meets']}", ""]
    out += [f"Wall time {b['wall_seconds']:.0f} s."]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(REPO / "runs" / "e-student"), help="run folder of the student")
    ap.add_argument("--config", default=str(REPO / "configs" / "ukis_distill.toml"))
    ap.add_argument("--distill-steps", type=int, help="train.steps when the student must be made")
    ap.add_argument("--checkpoint", default="student.pt")
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7], help="sweep ratios")
    ap.add_argument("--sweep-steps", type=int, default=30, help="fine-tuning steps per sweep point")
    ap.add_argument("--sweep-batch", type=int, default=8, help="crops per fine-tuning step in the sweep")
    ap.add_argument("--criterion", default="lamp",
                    help="criterion for target/smallest: fixed beforehand (the CLI's default), never picked "
                         "from the sweep, whose scores are on the held-out rows")
    ap.add_argument("--target", type=float, default=0.4)
    ap.add_argument("--finetune-steps", type=int, default=150, help="fine-tuning after pruning (target, smallest, bundle)")
    ap.add_argument("--smallest-ratios", nargs="+", type=float, default=[0.7, 0.8, 0.85, 0.9],
                    help="ascending; with round_to 8 the floor (8 channels everywhere) is ~91%% of this student")
    ap.add_argument("--smallest-round-to", type=int, default=8,
                    help="round_to of the smallest students (4 lets the full-resolution layers fall to 4 "
                         "channels, which ruined a 70%% student here: mIoU 0.48)")
    ap.add_argument("--smallest-prune-steps", type=int, default=2, help="iterative pruning steps")
    ap.add_argument("--fp16-steps", type=int, default=60, help="FP16-aware fine-tuning steps")
    ap.add_argument("--teacher-miou", type=float, default=TEACHER_MIOU)
    ap.add_argument("--bundle-checkpoint", help="the student to bundle (default: the student pruned by --bundle-target)")
    ap.add_argument("--bundle-target", type=float, default=0.13,
                    help="pruning (round_to 4) that makes the ~100k student: 116k -> 97.7k")
    ap.add_argument("--reference-tiles", type=int, default=2, help="reference tiles in the bundle")
    ap.add_argument("--reference-window", type=int, default=16, help="real patch of each reference tile")
    ap.add_argument("--latency-rounds", type=int, default=5, help="timing rounds (min of medians)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads (1: on a shared 2-core machine two mostly spin)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.torch_threads)
    from ground.stages.run import Run
    t0 = time.perf_counter()
    bench = {"command": " ".join(["benchmarks/bench_prune.py"] + (argv if argv is not None else sys.argv[1:])),
             "machine": f"{os.cpu_count()} CPUs, torch {args.torch_threads} thread(s), OpenVINO 1 thread",
             "load_before": load_line()}
    run_dir = ensure_run(Path(args.run), Path(args.config), args.distill_steps)
    run = Run.open(run_dir, progress=not args.json)
    if not run.label_free:
        raise SystemExit(f"{run_dir}: the delivered student used human labels; bench_prune needs a label-free one")
    bench["run_dir"] = str(run_dir)
    out_dir = run_dir / "bench-prune"
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = json.loads((out_dir / "bench-prune.json").read_text()) if (out_dir / "bench-prune.json").exists() else {}
    trow = teacher_row(run)
    if not trow.get("params"):
        trow["params"] = getattr(run.teacher, "params", None)     # counted from the teacher's graph
    bench["teacher"] = {k: trow.get(k) for k in ("model", "params", "miou", "accuracy")}
    if trow.get("miou"):
        args.teacher_miou = max(args.teacher_miou, float(trow["miou"]))
    for phase in PHASES:
        if phase not in args.phases:
            if phase in previous:
                bench[phase] = previous[phase]       # keep earlier results of phases not re-run
            continue
        log(f"phase {phase} ({load_line()})")
        t = time.perf_counter()
        if phase == "roundto":
            bench[phase] = phase_roundto(run, args)
        elif phase == "sweep":
            bench[phase] = phase_sweep(run, args)
        elif phase == "target":
            bench[phase] = phase_target(run, args, args.criterion)
        elif phase == "smallest":
            bench[phase] = phase_smallest(run, args, args.criterion, trow.get("params"))
        elif phase == "gap":
            s = (bench.get("smallest") or {}).get("smallest")
            src = s["checkpoint"].replace("-fp16.pt", ".pt").replace("fp16/", "pruned/") if s else args.checkpoint
            bench[phase] = phase_gap(run, args, src)
        elif phase == "bundle":
            bench[phase] = phase_bundle(run, args, args.bundle_checkpoint)
        bench[phase]["seconds"] = round(time.perf_counter() - t, 1)
        (out_dir / "bench-prune.json").write_text(json.dumps(bench, indent=2, default=str))
    bench["load_after"] = load_line()
    bench["wall_seconds"] = round(time.perf_counter() - t0, 1)
    (out_dir / "bench-prune.json").write_text(json.dumps(bench, indent=2, default=str))
    md = markdown(bench)
    (out_dir / "bench-prune.md").write_text(md)
    print(json.dumps(bench, indent=2, default=str) if args.json else md)
    if not args.json:
        print(f"written: {out_dir}/bench-prune.json, bench-prune.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
