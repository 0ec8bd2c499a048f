"""The seeds' comparison on real labels: sen2ships harbours (Sentinel-2 L2A, hand-drawn vessels).

    nice .venv/bin/python benchmarks/bench_ships.py                       # CPU reduced budget, 1 fold
    .venv/bin/python benchmarks/bench_ships.py --device cuda --folds 6 --teacher-steps 3000 --steps 3000

Per fold one harbour is held out; on the other five it trains the Edge SpAIce teacher (smp FPN +
EfficientNet-B4, no pretrained weights) from the masks, then a ~100k TinyUNet three ways with the
same budget: from scratch (labels), output-distilled (KL on the teacher's probabilities, no label in
the loss) and feature-distilled (the same + FitNets adapters on two decoder levels). Each is scored
on the held-out harbour: the Airbus/ISPRS 2020 object-level F2 averaged over IoU 0.5..0.95 (vessels
= connected components of the predicted ship mask) and the pixel IoU of the ship class. Prints a
markdown table (or --json) with the machine, the load and the budget; writes bench.json to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np                                                    # noqa: E402
import torch                                                          # noqa: E402
from scipy import ndimage                                             # noqa: E402

from shared.metrics import airbus_f2                                  # noqa: E402
from ground.data.normalization import Normalization, class_weights   # noqa: E402
from ground.data.sample import Sample                                 # noqa: E402
from ground.data.ships import SHIP_BANDS, SHIP_CLASSES, SHIP_PORTS, load_port   # noqa: E402
from ground.evaluation.predict import model_proba                     # noqa: E402
from ground.models.registry import build_student                      # noqa: E402
from ground.teachers.cache import TeacherCache                        # noqa: E402
from ground.teachers.torch_teacher import TorchTeacher                # noqa: E402
from ground.training.batches import BatchSampler                      # noqa: E402
from ground.training.config import TrainConfig                        # noqa: E402
from ground.training.features import FeatureTerm                      # noqa: E402
from ground.training.loop import fit                                  # noqa: E402
from ground.training.losses import build_objective                    # noqa: E402

TEACHER = "smp:FPN/efficientnet-b4"
# FPN's p2 (stride 4) and p3 (stride 8) against the TinyUNet's first up level (stride 4) and bottom
FEATURE_PAIRS = (("up.0", "decoder.p2"), ("down.2", "decoder.p3"))


def machine() -> dict:
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                 platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "avx2") if f" {f}" in flags]
    return {"cpu": model, "cpus": os.cpu_count(), "isa": isa,
            "load": [round(v, 2) for v in os.getloadavg()],
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def score(model, norm, sample, instances, tile: int) -> dict:
    """Object-level F2 (IoU 0.5..0.95) and ship pixel IoU of one model on one harbour."""
    probs = model_proba(model, sample.image, norm, tile=tile, overlap=tile // 4)
    ship = probs.argmax(0) == 1
    pred, _ = ndimage.label(ship)
    truth = instances > 0
    union = np.count_nonzero(ship | truth)
    return {"f2": round(airbus_f2(instances, pred), 4),
            "ship_iou": round(np.count_nonzero(ship & truth) / union, 4) if union else 1.0,
            "predicted_objects": int(pred.max()), "true_objects": int(len(np.unique(instances)) - 1)}


def fold(held: str, ports: dict, args, out: Path) -> dict:
    train = [ports[c][0] for c in SHIP_PORTS if c != held]
    test, inst = ports[held]
    norm = Normalization.fit(train, SHIP_BANDS)
    weights = class_weights(train, len(SHIP_CLASSES), "log").tolist()
    rows = {}

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    arch = {"name": TEACHER, "in_channels": len(SHIP_BANDS), "num_classes": 2, "options": {}}
    teacher_model = build_student(TEACHER, len(SHIP_BANDS), 2)
    tcfg = TrainConfig(steps=args.teacher_steps, batch=args.teacher_batch, crop=args.crop, lr=args.teacher_lr,
                       augment=["flip", "rot90", "crop"], seed=args.seed, balance=0.5,
                       checkpoint_every=max(1, args.teacher_steps // 4), log_every=max(1, args.teacher_steps // 10))
    fit(teacher_model, BatchSampler(train, tcfg), build_objective("ce", class_weights=weights), norm, tcfg,
        checkpoint=out / f"{held}-teacher.pt", arch=arch, resume=True, progress=args.progress,
        desc=f"teacher (held out {held})", device=args.device)
    teacher_model.to("cpu").eval()
    rows["teacher"] = {**score(teacher_model, norm, test, inst, args.tile), "train_s": round(time.perf_counter() - t0),
                       "params": sum(p.numel() for p in teacher_model.parameters())}
    teacher = TorchTeacher(teacher_model, norm, TEACHER, tile=args.tile, overlap=args.tile // 4)
    cache = TeacherCache(out / "cache", teacher)

    scfg = TrainConfig(steps=args.steps, batch=args.batch, crop=args.crop, lr=args.lr, seed=args.seed,
                       augment=["crop"], balance=0.5, checkpoint_every=args.steps, log_every=max(1, args.steps // 10))
    for name in ("scratch", "output", "feature"):
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)                 # the same initial student for all three
        student = build_student("tiny-unet", len(SHIP_BANDS), 2, params=args.student_params)
        with_teacher = name != "scratch"
        sampler = BatchSampler(train, scfg, cache if with_teacher else None)
        sampler.warm(args.progress)
        objective = (build_objective("kl", temperature=1.0, distill_weights=weights) if with_teacher
                     else build_objective("ce", class_weights=weights))
        term = None
        if name == "feature":
            term = FeatureTerm(student, teacher, [s for s, _ in FEATURE_PAIRS], [t for _, t in FEATURE_PAIRS],
                               weight=args.feature_weight, crop=args.crop)
        fit(student, sampler, objective, norm, scfg, feature=term, progress=args.progress,
            desc=f"{name} (held out {held})", device=args.device)
        if term:
            term.close()
        student.to("cpu").eval()
        rows[name] = {**score(student, norm, test, inst, args.tile), "train_s": round(time.perf_counter() - t0),
                      "params": sum(p.numel() for p in student.parameters())}
        print(f"[{held}] {name}: {rows[name]}", file=sys.stderr)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folds", type=int, default=1, help="how many harbours to hold out in turn (1..6)")
    ap.add_argument("--held-out", nargs="+", choices=SHIP_PORTS, help="these harbours instead of the first --folds")
    ap.add_argument("--teacher-steps", type=int, default=80)
    ap.add_argument("--teacher-batch", type=int, default=4)
    ap.add_argument("--teacher-lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=200, help="every student's steps (the same budget)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--student-params", default="100k")
    ap.add_argument("--feature-weight", type=float, default=0.1)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench-ships"))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="every harbour cut to 192x192 (a quick check of the code)")
    args = ap.parse_args(argv)
    args.progress = not args.json
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    held = args.held_out or list(("genoa", "busan", "casablanca", "honolulu", "algiers", "cartagena")[:args.folds])
    ports = {c: load_port(c) for c in SHIP_PORTS}
    if args.smoke:
        ports = {c: (Sample(s.image[:, :192, :192], s.labels[:192, :192], s.name), inst[:192, :192])
                 for c, (s, inst) in ports.items()}
    t0 = time.perf_counter()
    results = {}
    for h in held:
        results[h] = fold(h, ports, args, out)
        (out / "bench.json").write_text(json.dumps({"folds": results}, indent=1))
    budget = {k: getattr(args, k) for k in ("teacher_steps", "teacher_batch", "steps", "batch", "crop", "device")}
    doc = {"folds": results, "budget": budget, "machine": machine(), "seconds": round(time.perf_counter() - t0)}
    names = ("teacher", "scratch", "output", "feature")
    doc["mean"] = {n: {k: round(float(np.mean([results[h][n][k] for h in held])), 4) for k in ("f2", "ship_iou")}
                   for n in names}
    (out / "bench.json").write_text(json.dumps(doc, indent=1))
    if args.json:
        print(json.dumps(doc))
        return 0
    print("| model | params | " + " | ".join(f"{h} F2 | {h} ship IoU" for h in held) + " | mean F2 | mean IoU |")
    print("|---" * (2 + 2 * len(held) + 2) + "|")
    for n in names:
        r = results[held[0]][n]
        print(f"| {n} | {r['params']:,} | " + " | ".join(f"{results[h][n]['f2']:.3f} | {results[h][n]['ship_iou']:.3f}"
                                                    for h in held)
              + f" | {doc['mean'][n]['f2']:.3f} | {doc['mean'][n]['ship_iou']:.3f} |")
    print(f"budget {budget}; machine {doc['machine']}; {doc['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
