"""The architecture search against hand-sized students, on the ukis config, same training budget
for every model, scored on the held-out rows 256..511 of the ukis chip (never trained, searched,
calibrated or picked on).

    nice .venv/bin/python benchmarks/bench_search.py [--trials 32] [--steps 100] [--batch 8] [--crop 128] [--precision fp16]

1. A run folder of configs/ukis_distill.toml (the teacher scored on the held-out rows; its own
   student is not used here).
2. `search` (ground.stages.search): NSGA-II over the search-unet family, every candidate
   distilled `--steps` from the teacher on the training split, scored on the validation split of
   the training imagery, timed by OpenVINO at `--precision`.
3. Hand-sized TinyUNets of 100k, 50k, 20k and 10k parameters (`TinyUNet.for_budget`, bilinear,
   plain), trained by the very same function and budget (ground.stages.search.Candidates).
4. Every front point and hand-sized student: held-out mIoU in emulated FP16 after the on-board
   post-processing (operating point calibrated on the teacher's masks of the training imagery), and
   OpenVINO ms per tile at `--precision`, all IRs timed in interleaved rounds
   (ground.openvino.runtime.interleaved_latency).

Floor (issue 11): a front point within 0.01 held-out mIoU of the 100k student at no more than
half its latency. Writes bench-search.{json,md} and bench-search.png in the run's search folder.
Run again with more `--trials`, it resumes the study (the journal) and reuses the hand-sized
students and the latency cache.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ground.config import load_config  # noqa: E402
from ground.models.checkpoints import build_arch, save_checkpoint  # noqa: E402
from ground.models.size import count_params, count_macs  # noqa: E402
from ground.models.tiny_unet import TinyUNet  # noqa: E402
from ground.openvino.export import export_openvino  # noqa: E402
from ground.openvino.runtime import interleaved_latency  # noqa: E402
from ground.search.front import plot_front  # noqa: E402
from ground.search.objectives import accuracy, latency  # noqa: E402
from ground.stages.distill import distill  # noqa: E402
from ground.stages.run import Run  # noqa: E402
from ground.stages.search import Candidates, SearchSettings, search  # noqa: E402

HAND = ("100k", "50k", "20k", "10k")


def log(msg: str) -> None:
    print(f"[bench_search {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict:
    model = next((l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True)
                  .stdout.splitlines() if l.startswith("Model name")), platform.processor())
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "amx_fp16")
           if f in flags]
    return {"cpu": model, "isa": isa, "cpus": os.cpu_count()}


def ensure_run(out: Path, name: str, batch: int, crop: int) -> Path:
    """The run folder (data, teacher, its held-out row); the config's own student trained 1 step."""
    run_dir = out / name
    if (run_dir / "lineage.json").exists():
        return run_dir
    cfg = load_config(REPO / "configs" / "ukis_distill.toml",
                      {"run.out": str(out), "run.name": name, "train.steps": 1, "train.batch": batch,
                                                                   "train.crop": crop})
    distill(cfg, progress=True, only=["output-distilled"])
    return run_dir


def hand_sized(c: Candidates, run: Run, params: str, steps: int, folder: Path) -> str:
    """A TinyUNet for `params`, trained exactly as a search candidate is; its checkpoint."""
    widths = TinyUNet.for_budget(len(run.cfg.bands), len(run.classes), params).config["widths"]   # `--params`
    arch = {"name": "tiny-unet", "in_channels": len(run.cfg.bands), "num_classes": len(run.classes),
            "options": {"widths": widths}}
    out = folder / "hand" / f"tiny-unet-{params}.pt"
    if out.exists():
        return str(out.relative_to(run.run_dir))
    torch.manual_seed(c.s.seed)
    model = build_arch(arch)
    accuracy(model, lambda m, n, phase: c.train(m, n, phase, -1), lambda m: {}, steps,
             max(1, int(steps * c.s.probe)), lambda loss: None)
    save_checkpoint(out, model, arch, run.data.norm, meta={"name": f"tiny-unet-{params}", "role": "hand-sized"})
    return str(out.relative_to(run.run_dir))


def heldout(run: Run, checkpoint: str) -> dict:
    model, norm, _ = run.load(checkpoint)
    row = run.evaluate(run.torch_predict(model, norm, fp16="round"))
    return {"miou": row["miou"], "iou": row.get("iou"), "params": count_params(model),
            "macs": count_macs(model, len(run.cfg.bands), run.cfg.tile)}


def markdown(r: dict) -> str:
    f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"
    m = r["machine"]
    lines = [f"Search vs hand-sized students: `{r['command']}`; {r['trials']} trials ({r['pruned']} stopped early), "
             f"every model distilled {r['steps']} steps (batch {r['batch']}, crops {r['crop']}) from the ukis-csmask "
             f"teacher on the training split; held-out rows 256..511 in emulated FP16 after the on-board "
             f"post-processing; OpenVINO {r['precision']} on {m['cpu']} ({' '.join(m['isa'])}), 1 thread, "
             f"{r['tile']}x{r['tile']} tile, lowest of {r['rounds']} interleaved rounds' medians; load average "
             f"{r['load'][0]:.1f} -> {r['load'][1]:.1f} on {m['cpus']} CPUs; {r['seconds'] / 60:.0f} min in all.", "",
             "| model | architecture | params | MACs/tile | ms/tile | speed-up vs 100k | validation mIoU | held-out mIoU | "
             "vs 100k |", "|---|---|---|---|---|---|---|---|---|"]
    base = r["rows"][0]
    for x in r["rows"]:
        lines.append(f"| {x['label']} | {x['arch']} | {x['params']:,} | {x['macs'] / 1e6:.0f}M | {f(x['ms_per_tile'], 2)} | "
                     f"{x['speedup']:.2f}x | {f(x.get('miou_validation'))} | {f(x['miou'])} | "
                     f"{x['miou'] - base['miou']:+.3f} |")
    fl = r["floor"]
    lines += ["", f"Teacher on the held-out rows: mIoU {f(r['teacher_miou'])}. Floor (a front point within 0.01 held-out "
                  f"mIoU of the 100k student at <= half its latency): "
                  + (f"**met** by {fl['label']} ({fl['miou']:.3f} vs {base['miou']:.3f}, {fl['speedup']:.2f}x faster)"
                     if fl else "**not met**")]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "runs"))
    ap.add_argument("--name", default="search-bench")
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="crops per step (train.batch) for every model")
    ap.add_argument("--crop", type=int, default=128, help="crop side (train.crop) for every model")
    ap.add_argument("--max-ms-share", type=float, default=0.75,
                    help="candidates slower than this share of the 100k student's latency are not trained")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (on a shared 2-core machine two spin)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    run = Run.open(ensure_run(Path(args.out), args.name, args.batch, args.crop), progress=True)
    settings = SearchSettings(name="bench", trials=args.trials, steps=args.steps, population=args.population,
                              precision=args.precision)
    folder = run.run_dir / "search" / settings.name
    c = Candidates(run, settings, folder)
    # candidates slower than the 100k hand-sized student are not trained: this comparison is about faster ones
    base = TinyUNet.for_budget(len(run.cfg.bands), len(run.classes), HAND[0])
    base_ms = latency(base, f"tiny-unet-{HAND[0]}", c.latency, settings.device, args.precision, run.cfg.tile)["ms_per_tile"]
    settings = replace(settings, max_ms=round(base_ms * args.max_ms_share, 3))
    log(f"search: {args.trials} trials of {args.steps} steps at {args.precision}; hand {HAND[0]} {base_ms:.2f} ms "
        f"per tile, candidates over {settings.max_ms} ms not trained")
    report = search(run, settings)
    points = [{"label": f"hand {p}", "checkpoint": hand_sized(c, run, p, args.steps, folder)} for p in HAND]
    for p in points:
        w = run.load(p["checkpoint"])[2]["arch"]["options"]["widths"]
        p["arch"] = f"TinyUNet {'-'.join(map(str, w))} plain k3 bilinear/concat/relu"
    points += [{"label": f"front #{x['number']}", "checkpoint": x["checkpoint"], "arch": x["arch"],
                "miou_validation": x["miou"]} for x in report["front"]]
    irs = {}
    for p in points:
        log(f"held-out: {p['label']}")
        p.update(heldout(run, p["checkpoint"]))
        model, _, _ = run.load(p["checkpoint"])
        irs[p["label"]] = (export_openvino(model, folder / "ir" / p["label"].replace(" ", "-").replace("#", ""),
                                           tile=run.cfg.tile).xml, args.precision)
    timing, _ = interleaved_latency(irs, points[0]["label"], run.cfg.tile, 1, rounds=args.rounds, progress=True)
    for p in points:
        p.update(ms_per_tile=timing[p["label"]]["ms_per_tile"], speedup=timing[p["label"]]["speedup"])
    base = points[0]
    ok = [p for p in points[len(HAND):] if p["miou"] >= base["miou"] - 0.01 and p["speedup"] >= 2.0]
    report_json = run.run_dir / "report.json"
    teacher = next((r.get("miou") for r in json.loads(report_json.read_text())["rows"] if r["name"] == "teacher"),
                   None) if report_json.exists() else None
    result = {"command": "nice .venv/bin/python benchmarks/bench_search.py " + " ".join(sys.argv[1:]),
              "machine": machine(), "trials": report["finished"], "pruned": report["pruned"], "steps": args.steps,
              "batch": run.cfg.train.batch, "crop": run.cfg.train.crop, "precision": args.precision,
              "tile": run.cfg.tile, "rounds": args.rounds, "teacher_miou": teacher, "rows": points,
              "floor": max(ok, key=lambda p: p["speedup"]) if ok else None,
              "load": [load0, os.getloadavg()[0]], "seconds": round(time.perf_counter() - t0, 1)}
    (folder / "bench-search.json").write_text(json.dumps(result, indent=2, default=str))
    (folder / "bench-search.md").write_text(markdown(result))
    hand = [dict(p, label=p["label"]) for p in points[:len(HAND)]]
    plot_front(points[len(HAND):], points[len(HAND):], folder / "bench-search.png",
               f"held-out mIoU vs OpenVINO {args.precision} ms/tile (front points, hand-sized squares)",
               teacher, extra=hand)
    print(json.dumps(result, indent=2, default=str) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
