"""The ukis-csmask teacher on generated temperate and arid scenes, against the generated truth.

    .venv/bin/python benchmarks/bench_teacher_surfaces.py                  # seeds 101 102, 512 x 512
    .venv/bin/python benchmarks/bench_teacher_surfaces.py --seeds 101 102 103 --json

What runs: flight_sim.generator scenes (cloud cover 0.3, each surface's default water fraction)
of both surfaces from the same seeds (the same sky and ships over other ground), the teacher
`ukis-csmask-6b-l1c` (ground.teachers, OpenVINO, one thread) on their reflectance in its six
bands; the truth mapped onto its classes as the simulator's report maps it (flight_sim.truth:
land, water, ship -> clear). Prints per surface the pooled per-class IoU and mIoU, and each
scene's. Needs the PyPI package ukis-csmask. Quality figures: they do not depend on the load.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from flight_sim.generator import CLASSES, SURFACES, SceneGenerator
from flight_sim.truth import IGNORE, to_model_classes
from ground.teachers.registry import build_teacher
from shared.bands import S2_BANDS
from shared.metrics import SegmentationScores, confusion_matrix

TEACHER_CLASSES = ("clear", "cloud", "shadow")


def measure(seeds: list[int], size: int, cloud_cover: float) -> dict:
    teacher = build_teacher("ukis-csmask-6b-l1c", threads=1)
    idx = [S2_BANDS.index(b) for b in teacher.bands]
    out: dict = {}
    for surface in SURFACES:
        pooled = np.zeros((3, 3), np.int64)
        scenes = []
        for seed in seeds:
            win = SceneGenerator(size, size, seed, cloud_cover=cloud_cover, surface=surface).window()
            pred = teacher.predict_proba(win.reflectance[idx]).argmax(0)
            truth = to_model_classes(win.truth, CLASSES, TEACHER_CLASSES)
            valid = truth != IGNORE
            cm = confusion_matrix(truth[valid], pred[valid], 3)
            pooled += cm
            scenes.append({"seed": seed, "miou": round(SegmentationScores.from_confusion(cm).miou, 3)})
        s = SegmentationScores.from_confusion(pooled, TEACHER_CLASSES)
        out[surface] = {"iou": {c: round(float(v), 3) for c, v in zip(TEACHER_CLASSES, s.iou)},
                        "miou": round(s.miou, 3), "scenes": scenes}
    return {"teacher": teacher.name, "size": size, "cloud_cover": cloud_cover, "surfaces": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[101, 102])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--cloud-cover", type=float, default=0.3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    r = measure(a.seeds, a.size, a.cloud_cover)
    if a.json:
        print(json.dumps(r, indent=1))
        return
    print(f"{r['teacher']} on {len(a.seeds)} generated {a.size} x {a.size} scenes, cloud cover {a.cloud_cover}")
    for surface, x in r["surfaces"].items():
        print(f"  {surface:<10} IoU " + "  ".join(f"{c} {v:.3f}" for c, v in x["iou"].items())
              + f"  mIoU {x['miou']:.3f}  (per scene: " + ", ".join(f"{s['seed']}: {s['miou']:.3f}" for s in x["scenes"]) + ")")


if __name__ == "__main__":
    main()
