"""The label-free ukis student on every real chip that has its six bands, plus generated scenes.

    nice .venv/bin/python benchmarks/bench_label_free.py [--steps 200] [--generated 4] [--json]

The ukis-csmask teacher (6 bands, L1C; OpenVINO) labels: rows 0..255 of the ukis chip, the
sen1floods11 chip, the five eolearn dates, and `--generated` scenes of flight_sim's generator
(13 bands, clouds and shadows; written as .npz). The sen2ships harbours are not used: they have
five bands (no B12). One TinyUNet (120k) is distilled with no human label (configs/ukis_distill.toml
otherwise) and scored:
- on the ukis held-out rows 256..511 against the human labels, beside the teacher (0.776 there);
- on each other real chip's labels that share its classes: none of them is human-labelled with
  clear/cloud/shadow (sen1floods11: water; sen2ships: vessels; eolearn: land cover; eolearn's
  s2cloudless masks are model-made and for dates its five scenes are not matched to), so the
  report says so instead of a score.
Writes bench.json into the run folder and prints where the student trails the teacher.
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

import numpy as np                                          # noqa: E402

from flight_sim.generator import generate_scene             # noqa: E402
from ground.config import load_config                       # noqa: E402
from ground.stages.distill import distill                   # noqa: E402


def write_generated(folder: Path, n: int, size: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        scene, _truth = generate_scene(size, size, seed=100 + i, cloud_cover=0.2 + 0.5 * (i % 3) / 2)
        np.savez(folder / f"generated_{i}.npz", data=scene.data.astype(np.float32), bands=np.array(scene.bands))
    return str(folder / "generated_*.npz")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--generated", type=int, default=4, help="generated scenes added to the real chips")
    ap.add_argument("--size", type=int, default=384, help="generated scene side in pixels")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(REPO / "runs"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    pattern = write_generated(out / "generated-scenes", args.generated, args.size)
    unlabelled = [{"source": "ukis", "rows": [0, 256]}, {"source": "sen1floods11"}, {"source": "eolearn"}]
    if args.generated:
        unlabelled.append({"source": "scene", "path": pattern})
    cfg = load_config(REPO / "configs" / "ukis_distill.toml",
                      {"run.out": str(out), "run.name": "bench-label-free", "run.deliver": "output-distilled",
                       "train.steps": args.steps, "train.batch": args.batch, "train.device": args.device,
                       "data.unlabelled": unlabelled})
    t0 = time.perf_counter()
    report = distill(cfg, progress=not args.json, only=["output-distilled"])
    rows = {r["name"]: r for r in report["rows"]}
    run_dir = Path(report["run_dir"])

    # the other real chips: none carries human clear/cloud/shadow labels; eolearn's s2cloudless masks
    # (model-made) cover 68 dates, its five reference scenes are not said to be which of them
    other = {"eolearn_vs_s2cloudless": "not scored: CLM has 68 dates, REFERENCE_SCENES 5, no index pairs them"}
    other["no_shared_human_labels"] = ["sen1floods11 (water)", "sen2ships_ports (vessels, 5 bands: no B12)",
                                       "eolearn (land cover)"]
    t, s = rows.get("teacher", {}), rows.get("output-distilled", {})
    trails = {k: round((t.get("iou", {}).get(k) or 0) - (s.get("iou", {}).get(k) or 0), 4) for k in cfg.classes}
    bench = {"steps": args.steps, "batch": args.batch, "generated": args.generated, "size": args.size,
             "unlabelled": unlabelled, "teacher": {k: t.get(k) for k in ("miou", "accuracy", "iou")},
             "student": {k: s.get(k) for k in ("params", "miou", "accuracy", "iou", "agreement")},
             "student_trails_teacher_iou_by": trails, "other_chips": other,
             "seconds": round(time.perf_counter() - t0), "load": [round(v, 2) for v in os.getloadavg()],
             "cpus": os.cpu_count(), "run_dir": str(run_dir)}
    (run_dir / "bench.json").write_text(json.dumps(bench, indent=2, default=str))
    print(json.dumps(bench, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
