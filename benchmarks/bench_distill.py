"""Label-free distillation and the comparison table, on the held-out rows of the real ukis chip.

    .venv/bin/python benchmarks/bench_distill.py                 # the table (teacher + 3 students)
    .venv/bin/python benchmarks/bench_distill.py --feature       # + a feature-distilled row (FitNets)
    .venv/bin/python benchmarks/bench_distill.py --json          # machine-readable

What it shows (configs/ukis_distill.toml):
- the ukis-csmask teacher (OpenVINO) reproduces its published mIoU on rows 256..511;
- a TinyUNet of at most 120k parameters distilled from that teacher alone, with no human label,
  on rows 0..255 of the chip, the sen1floods11 chip and the eolearn scenes (augmented), against
  the human labels of rows 256..511 (never trained or tuned on), and how long that whole run took;
- beside it, the same student with the same budget trained from the human labels of rows 0..255,
  and output-distilled mixed with those labels; with --feature, feature-distilled (FitNets) from a
  small smp teacher trained here on the teacher's labels.
Prints the figures and writes bench.json / bench.md (and the run's report, figures, lineage) into
the run folder. Timings depend on the load: the load average is printed with them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FEATURE_TEACHER = {"name": "smp:Unet/resnet18", "options": {"decoder_channels": [128, 64, 32, 16, 8]},
                   "train": {"steps": 300},
                   # smp Unet decoder blocks 2/3 are at stride 4/2, like the TinyUNet's up.0/up.1
                   "layers": ["decoder.blocks.2", "decoder.blocks.3"], "student_layers": ["up.0", "up.1"]}


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "ukis_distill.toml"))
    ap.add_argument("--out", default=str(REPO / "runs"), help="parent of the run folder (default runs/)")
    ap.add_argument("--steps", type=int, help="override train.steps (the same for every student)")
    ap.add_argument("--seed", type=int, help="override run.seed (initial weights, batches): label-free "
                                              "distillation should hold for any seed")
    ap.add_argument("--only", nargs="+", metavar="EXPERIMENT", help="run only these experiments "
                                                                     "(e.g. output-distilled)")
    ap.add_argument("--feature", action="store_true", help="add the feature-distilled row (slower: trains an smp teacher)")
    ap.add_argument("--warm-cache", action="store_true", help="keep the teacher cache of an earlier run (default: cold)")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args(argv)

    from ground.config import load_config, parse_config
    from ground.evaluation.report import markdown_table
    from ground.stages.distill import distill
    overrides = {"run.out": args.out, "run.name": "bench-distill" + ("-feature" if args.feature else "")}
    if args.steps:
        overrides["train.steps"] = args.steps
    if args.seed is not None:
        overrides["run.seed"] = args.seed
    cfg = load_config(args.config, overrides)
    if args.feature:
        raw = dict(cfg.raw)
        raw["feature_teacher"] = FEATURE_TEACHER
        raw["experiment"] = list(raw["experiment"]) + [{"name": "feature-distilled", "mode": "feature", "loss": "kl",
                                                        "temperature": 2.0, "feature_weight": 1.0}]
        cfg = parse_config(raw, cfg.source)
    if not args.warm_cache:
        shutil.rmtree(cfg.cache, ignore_errors=True)     # time the teacher labelling too
    shutil.rmtree(cfg.run_dir, ignore_errors=True)

    load_before = load_line()
    t0 = time.perf_counter()
    report = distill(cfg, progress=not args.json, only=args.only)
    wall = time.perf_counter() - t0
    rows = {r["name"]: r for r in report["rows"]}
    free = rows.get("output-distilled", {})
    free_res = report["results"].get("output-distilled", {})
    # the label-free run: data + teacher labelling (cold cache) + training + calibration + evaluation
    label_free_s = free_res.get("train", {}).get("run_seconds")
    bench = {
        "config": str(Path(args.config).relative_to(REPO)) if Path(args.config).is_relative_to(REPO) else args.config,
        "machine": {"cpus": os.cpu_count(), "load_before": load_before, "load_after": load_line()},
        "teacher": {k: rows["teacher"].get(k) for k in ("model", "miou", "accuracy", "iou")} if "teacher" in rows else None,
        "label_free": {"params": free.get("params"), "macs": free.get("macs"), "miou": free.get("miou"),
                       "accuracy": free.get("accuracy"), "iou": free.get("iou"), "agreement": free.get("agreement"),
                       "seconds": label_free_s, "human_labels_used": 0,
                       "meets": {"params<=120k": (free.get("params") or 1e9) <= 120_000,
                                 "miou>=0.74": (free.get("miou") or 0) >= 0.74,
                                 "<=20min": label_free_s is not None and label_free_s <= 1200}},
        "rows": report["rows"], "wall_seconds": round(wall, 1), "run_dir": report["run_dir"],
    }
    md = ["# bench_distill", "", f"`{' '.join(['benchmarks/bench_distill.py'] + (argv or sys.argv[1:]))}` "
          f"({bench['machine']['load_before']} before, {bench['machine']['load_after']} after)", "",
          markdown_table(report), "",
          f"Label-free student: {free.get('params')} params, mIoU {free.get('miou'):.3f} vs human labels on "
          f"rows 256..511, run {label_free_s} s (teacher labelling, training, calibration, evaluation).",
          f"Whole benchmark wall time {wall:.0f} s."]
    run_dir = Path(report["run_dir"])
    (run_dir / "bench.json").write_text(json.dumps(bench, indent=2, default=str))
    (run_dir / "bench.md").write_text("\n".join(md) + "\n")
    if args.json:
        print(json.dumps(bench, indent=2, default=str))
    else:
        print("\n".join(md))
        print(f"\nwritten: {run_dir}/bench.json, bench.md, report.md, curves.png, masks.png, lineage.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
