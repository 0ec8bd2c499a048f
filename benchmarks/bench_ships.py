"""The seeds' comparison on real labels: sen2ships harbours (Sentinel-2 L2A, hand-drawn vessels).

    nice .venv/bin/python benchmarks/bench_ships.py --held-out genoa          # CPU reduced budget, 1 fold
    .venv/bin/python benchmarks/bench_ships.py --device cuda --threads 8 --folds 6 --teacher-steps 3000 \
        --teacher-batch 16 --steps 3000 --batch 32 --crop 128

Per fold one harbour is held out (never trained on, never used to choose anything); of the other
five the smallest is the validation harbour (it picks each model's threshold) and four are trained
on. The Edge SpAIce teacher (smp FPN + EfficientNet-B4, no pretrained weights) learns the masks, then
a ~100k TinyUNet is trained three ways with the same budget: from scratch (labels), output-distilled
(KL on the teacher's probabilities; neither the loss nor the crop choice sees a label) and
feature-distilled (the same + FitNets adapters on two decoder levels).

Rare positives (ships cover 0.1-0.9 % of the pixels): most crops are centred on a ship pixel (the
labels' for the teacher and the scratch student, the teacher's argmax for the distilled ones), the
label loss is class-weighted CE + soft Dice (a loss that predicting no ship cannot lower), the
teacher's head starts at the ship prior (RetinaNet's bias initialisation), BatchNorm statistics are
recomputed on the final weights (a short run's running averages lag), and each model's ship
threshold is the one that maximises object F2 on the validation harbour.

Each model is scored on the held-out harbour: the Airbus/ISPRS 2020 object-level F2 averaged over
IoU 0.5..0.95 (vessels = connected components of the ship mask) and the ship class's pixel IoU.
Prints a markdown table (or --json) with the machine, the load and the budget; writes bench.json to
--out. One torch thread per process by default: on a loaded machine two threads spin against each
other (under load 10 a teacher step took 13-40 s with two threads, 1.7 s with one).
"""
from __future__ import annotations

import argparse
import json
import math
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
from ground.training.batchnorm import recalibrate_batchnorm          # noqa: E402
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


THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 2)


def ship_probability(model, norm, sample, tile: int) -> np.ndarray:
    return model_proba(model, sample.image, norm, tile=tile, overlap=tile // 4)[1]


def score_mask(ship: np.ndarray, instances: np.ndarray) -> dict:
    """Object-level F2 (IoU 0.5..0.95) and ship pixel IoU of one ship mask against the instances."""
    pred, _ = ndimage.label(ship)
    truth = instances > 0
    union = np.count_nonzero(ship | truth)
    return {"f2": round(airbus_f2(instances, pred), 4),
            "ship_iou": round(np.count_nonzero(ship & truth) / union, 4) if union else 1.0,
            "predicted_objects": int(pred.max()), "true_objects": int(len(np.unique(instances)) - 1)}


def choose_threshold(prob: np.ndarray, instances: np.ndarray) -> tuple[float, dict]:
    """The ship threshold with the best object F2 on the validation harbour (then pixel IoU, then
    the higher threshold): (threshold, its scores there)."""
    best = max(((t, score_mask(prob > t, instances)) for t in THRESHOLDS),
               key=lambda ts: (ts[1]["f2"], ts[1]["ship_iou"], ts[0]))
    return float(best[0]), best[1]


def evaluate(model, norm, val, test, tile: int) -> dict:
    """Threshold chosen on the validation harbour, scores on the held-out one."""
    t, on_val = choose_threshold(ship_probability(model, norm, val[0], tile), val[1])
    return {**score_mask(ship_probability(model, norm, test[0], tile) > t, test[1]), "threshold": t,
            "val_f2": on_val["f2"]}


def prior_bias(model, prior: float) -> None:
    """Start the ship logit at the ship prior (Lin et al. 2017, RetinaNet): the first steps then
    learn where ships are instead of how rare they are."""
    head = model.segmentation_head[0]
    with torch.no_grad():
        head.bias.zero_()
        head.bias[1] = math.log(prior / (1 - prior))


def fold(held: str, ports: dict, args, out: Path) -> dict:
    others = [c for c in SHIP_PORTS if c != held]
    val_city = min(others, key=lambda c: ports[c][0].image[0].size)
    train = [ports[c][0] for c in others if c != val_city]
    val, test = ports[val_city], ports[held]
    norm = Normalization.fit(train, SHIP_BANDS)
    weights = class_weights(train, len(SHIP_CLASSES), "log").tolist()
    label_loss = build_objective("ce-dice", class_weights=weights)
    rows = {"_fold": {"held_out": held, "validation": val_city, "trained_on": [s.name for s in train]}}
    print(f"[{held}] validation {val_city}, trained on {rows['_fold']['trained_on']}", file=sys.stderr)

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    arch = {"name": TEACHER, "in_channels": len(SHIP_BANDS), "num_classes": 2, "options": {}}
    teacher_model = build_student(TEACHER, len(SHIP_BANDS), 2)
    prior_bias(teacher_model, 0.05)
    tcfg = TrainConfig(steps=args.teacher_steps, batch=args.teacher_batch, crop=args.crop, lr=args.teacher_lr,
                       augment=["flip", "rot90", "crop"], seed=args.seed, balance=args.balance,
                       checkpoint_every=max(1, args.teacher_steps // 4), log_every=max(1, args.teacher_steps // 10),
                       device=args.device)
    tsampler = BatchSampler(train, tcfg)
    fit(teacher_model, tsampler, label_loss, norm, tcfg, checkpoint=out / f"{held}-teacher.pt", arch=arch,
        resume=True, progress=args.progress, desc=f"teacher (held out {held})")
    recalibrate_batchnorm(teacher_model, tsampler, norm, args.bn_batches)
    teacher_model.to("cpu").eval()
    rows["teacher"] = {**evaluate(teacher_model, norm, val, test, args.tile),
                       "train_s": round(time.perf_counter() - t0),
                       "params": sum(p.numel() for p in teacher_model.parameters())}
    print(f"[{held}] teacher: {rows['teacher']}", file=sys.stderr)
    teacher = TorchTeacher(teacher_model, norm, TEACHER, tile=args.tile, overlap=args.tile // 4)
    cache = TeacherCache(out / "cache", teacher)
    unlabelled = [Sample(s.image, None, s.name, s.files) for s in train]   # what the distilled students see

    scfg = TrainConfig(steps=args.steps, batch=args.batch, crop=args.crop, lr=args.lr, seed=args.seed,
                       augment=["crop"], balance=args.balance, checkpoint_every=args.steps,
                       log_every=max(1, args.steps // 10), device=args.device)
    for name in ("scratch", "output", "feature"):
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)                 # the same initial student for all three
        student = build_student("tiny-unet", len(SHIP_BANDS), 2, params=args.student_params)
        with_teacher = name != "scratch"
        sampler = BatchSampler(unlabelled if with_teacher else train, scfg, cache if with_teacher else None)
        sampler.warm(args.progress)
        objective = build_objective("kl", temperature=1.0, distill_weights=weights) if with_teacher else label_loss
        term = None
        if name == "feature":
            term = FeatureTerm(student, teacher, [s for s, _ in FEATURE_PAIRS], [t for _, t in FEATURE_PAIRS],
                               weight=args.feature_weight, crop=args.crop)
        fit(student, sampler, objective, norm, scfg, feature=term, progress=args.progress,
            desc=f"{name} (held out {held})")
        if term:
            term.close()
        recalibrate_batchnorm(student, sampler, norm, args.bn_batches)
        student.to("cpu").eval()
        rows[name] = {**evaluate(student, norm, val, test, args.tile), "train_s": round(time.perf_counter() - t0),
                      "params": sum(p.numel() for p in student.parameters())}
        print(f"[{held}] {name}: {rows[name]}", file=sys.stderr)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folds", type=int, default=1, help="how many harbours to hold out in turn (1..6)")
    ap.add_argument("--held-out", nargs="+", choices=SHIP_PORTS, help="these harbours instead of the first --folds")
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--teacher-batch", type=int, default=8)
    ap.add_argument("--teacher-lr", type=float, default=2e-3)
    ap.add_argument("--steps", type=int, default=300, help="every student's steps (the same budget)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--student-params", default="100k")
    ap.add_argument("--feature-weight", type=float, default=0.1)
    ap.add_argument("--balance", type=float, default=0.7, help="share of crops centred on a ship pixel")
    ap.add_argument("--bn-batches", type=int, default=16, help="batches that recompute BatchNorm statistics")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no spinning on a shared machine)")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench-ships"))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="every harbour cut to 192x192 (a quick check of the code)")
    args = ap.parse_args(argv)
    args.progress = not args.json
    torch.set_num_threads(args.threads)
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
    budget = {k: getattr(args, k) for k in ("teacher_steps", "teacher_batch", "teacher_lr", "steps", "batch", "lr",
                                            "crop", "balance", "device", "threads")}
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
