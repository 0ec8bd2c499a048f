"""Low-rank factorisation against channel pruning at half the MACs, on the label-free student.

    .venv/bin/python benchmarks/bench_lowrank.py                   # ~6 min on 2 loaded CPUs
    .venv/bin/python benchmarks/bench_lowrank.py --finetune-steps 150 --json

The student comes from a run folder (default runs/e-student) of `eoedge ground run
configs/ukis_distill.toml --only output-distilled --name e-student`: distilled from the
ukis-csmask teacher alone. Both compressions start from it, keep at most half its MACs (as
ground.models.size.measure counts them) and get the same fine-tuning budget, distilling from the
same teacher (no human label anywhere):

- low-rank: `ground.stages.lowrank.lowrank(macs_target=0.5)`, one retained energy for all layers,
  ranks as the energy gives them (the default) and rounded up to multiples of 4 (multiples of 8,
  pruning's rounding, leave the 8-channel full-resolution layers whole: half the MACs is then out
  of reach);
- pruning: `ground.stages.prune.prune("lamp", 0.5, by="macs", round_to=8)`.

Scored on the held-out rows 256..511 of the ukis chip (run.evaluate: thresholds calibrated on the
teacher's masks of training imagery) in torch and as OpenVINO runs each FP16 IR; the IRs are timed
on 1 thread in interleaved rounds (ground.stages.sweep.time_irs: the lowest of the per-round
medians, speed-up against the original timed in the same round). Prints a markdown table with the
CPU's ISA flags and the load average; writes bench-lowrank.{json,md} into RUN/bench-lowrank/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def cpu_line() -> str:
    """The CPU's model and which of the ISA flags that matter to OpenVINO it has."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    have = [f for f in ISA_FLAGS if f in flags]
    return f"{model}; ISA flags: {' '.join(have) or 'none of ' + ' '.join(ISA_FLAGS)}"


def log(msg: str) -> None:
    print(f"[bench_lowrank {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def compressed(run, args) -> dict:
    """The two compressions of the student at the same MACs target and fine-tuning budget."""
    from ground.stages.lowrank import lowrank
    from ground.stages.prune import prune
    keep = 1.0 - args.macs_reduction
    out = {}
    for tag, round_to in (("lowrank", None), ("lowrank-r4", 4)):
        log(f"low-rank to {keep:.0%} of the MACs, round_to {round_to} ({load_line()})")
        out[tag] = lowrank(run, args.checkpoint, macs_target=keep, round_to=round_to,
                           finetune_steps=args.finetune_steps,
                           name=f"bench-macs{round(100 * keep)}" + (f"-r{round_to}" if round_to else ""))
    log(f"lamp pruning to -{args.macs_reduction:.0%} MACs ({load_line()})")
    pr = prune(run, "lamp", args.macs_reduction, by="macs", round_to=8, checkpoint=args.checkpoint,
               finetune_steps=args.finetune_steps, name=f"bench-lamp-macs{round(100 * args.macs_reduction)}")
    return {**out, "pruned": pr}


def rows_for(run, args, res: dict) -> tuple[list[dict], dict]:
    """One row per model (original, pruned, low-rank): size, torch scores, the FP16 IR's scores."""
    from ground.models.size import measure
    from ground.openvino.export import export_openvino
    low, r4, pr = res["lowrank"], res["lowrank-r4"], res["pruned"]
    models = {"base": ("original", args.checkpoint), "pruned": ("lamp pruning, round_to 8", pr["checkpoint"]),
              "lowrank": (f"low-rank SVD (energy {low['energy']:.3f})", low["checkpoint"]),
              "lowrank-r4": (f"low-rank SVD, ranks x4 (energy {r4['energy']:.3f})", r4["checkpoint"])}
    torch_scores = {"base": (low["metrics"]["original"], None),
                    "pruned": (pr["metrics"]["pruned"], pr["metrics"]["fine_tuned"]),
                    **{t: (res[t]["metrics"]["factorised"], res[t]["metrics"]["fine_tuned"])
                       for t in ("lowrank", "lowrank-r4")}}
    rows, irs = [], {}
    for tag, (label, ckpt) in models.items():
        model, norm, _ = run.load(ckpt)
        size = measure(model, run.example(norm))
        tiles, _ = run.tiles(2, norm)
        ex = export_openvino(model, run.run_dir / "bench-lowrank" / "ir" / tag, tiles=tiles, tile=run.cfg.tile)
        irs[tag] = ex.xml
        log(f"scoring the {tag} FP16 IR in OpenVINO")
        ir = run.evaluate(run.ir_predict(ex.xml, norm))
        before, after = torch_scores[tag]
        rows.append({"tag": tag, "model": label, "checkpoint": ckpt, "params": size.params, "macs": size.macs,
                     "miou_compressed": before["miou"] if after else None,
                     "miou_fine_tuned": (after or before)["miou"], "miou_openvino": ir["miou"],
                     "agreement_openvino": ir.get("agreement"), "parity_max_abs_diff": ex.parity["max_abs_diff"],
                     "bin_bytes": ex.sizes["model.bin"]})
    return rows, irs


def markdown(b: dict) -> str:
    base = next(r for r in b["rows"] if r["tag"] == "base")
    out = [f"`{b['command']}` on {b['cpu']}; OpenVINO {b['ov_version']}, 1 thread, f32 hint; "
           f"{b['load_before']} before, {b['load_after']} after. Fine-tuning: {b['finetune_steps']} steps "
           f"distilling from the run's teacher for both. Held-out rows 256..511 of the ukis chip.", "",
           "| model | params | MACs (vs original) | mIoU before fine-tuning | mIoU fine-tuned (torch) "
           "| mIoU FP16 IR (OpenVINO) | agreement with teacher | ms/tile (min of rounds) | speed-up |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in b["rows"]:
        before = "" if r["miou_compressed"] is None else f"{r['miou_compressed']:.4f}"
        out.append(f"| {r['model']} | {r['params']:,} | {r['macs'] / 1e6:.1f}M ({r['macs'] / base['macs']:.3f}) | "
                   f"{before} | {r['miou_fine_tuned']:.4f} | {r['miou_openvino']:.4f} | "
                   f"{r['agreement_openvino']:.4f} | {r['ms_per_tile']:.2f} | {r['speedup']:.2f}x |")
    out += ["", "Ranks: " + "; ".join(f"{t} {v['ranks']}" for t, v in b["lowrank"].items()),
            "", f"Wall time {b['wall_seconds']:.0f} s."]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(REPO / "runs" / "e-student"), help="run folder of the student")
    ap.add_argument("--checkpoint", default="student.pt")
    ap.add_argument("--macs-reduction", type=float, default=0.5, help="share of the MACs both remove")
    ap.add_argument("--finetune-steps", type=int, default=150, help="fine-tuning steps, the same for both")
    ap.add_argument("--latency-rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--latency-repeats", type=int, default=20, help="timed calls per IR per round")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import openvino as ov
    import torch
    torch.set_num_threads(args.torch_threads)
    from ground.stages.run import Run
    from ground.stages.sweep import time_irs
    t0 = time.perf_counter()
    bench = {"command": " ".join(["benchmarks/bench_lowrank.py"] + (argv if argv is not None else sys.argv[1:])),
             "cpu": cpu_line(), "ov_version": ov.__version__, "load_before": load_line(),
             "finetune_steps": args.finetune_steps, "macs_reduction": args.macs_reduction}
    run = Run.open(args.run, progress=not args.json)
    if not run.label_free:
        raise SystemExit(f"{args.run}: the delivered student used human labels; this benchmark needs a label-free one")
    res = compressed(run, args)
    rows, irs = rows_for(run, args, res)
    log(f"timing {len(irs)} IRs, {args.latency_rounds} rounds ({load_line()})")
    bench["latency_loads"] = time_irs(irs, rows, run.cfg.tile, 1, args.latency_repeats, args.latency_rounds,
                                      not args.json)
    bench["rows"] = rows
    bench["lowrank"] = {t: {k: res[t][k] for k in ("energy", "round_to", "ranks", "skipped", "before", "after")}
                        for t in ("lowrank", "lowrank-r4")}
    bench["load_after"] = load_line()
    bench["wall_seconds"] = round(time.perf_counter() - t0, 1)
    out_dir = Path(args.run) / "bench-lowrank"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-lowrank.json").write_text(json.dumps(bench, indent=2, default=str))
    md = markdown(bench)
    (out_dir / "bench-lowrank.md").write_text(md)
    print(json.dumps(bench, indent=2, default=str) if args.json else md)
    if not args.json:
        print(f"written: {out_dir}/bench-lowrank.json, bench-lowrank.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
