"""`eoedge loop`: the closed loop. The satellite sends down what its model is unsure of, the
ground's teacher labels it and re-distils the flying student, and the next uplink is better.

    1. v          the demo's cloud student (eoedge.demo.build_bundle), label-free: distilled
                  from the ukis-csmask teacher alone on generated temperate scenes only;
                  bundled twice, the policies differing only in `learning.select` (LEARNING):
                  the model's most uncertain tiles, or as many tiles drawn at random (control)
    2. flight 1   FLIGHT_1 with each: temperate scenes and arid scenes under a dust haze
                  (KINDS; v never saw them); the daemon scores every tile (entropy in the
                  frame graph) and sends LEARNING["tiles"] samples per frame beside the science
                  products; samples go down within their own byte budget per pass, the science
                  products within theirs; the ground station writes them (shared.samples)
    3. re-distil  ground.stages.redistil: v's checkpoint, the teacher's labels on the samples,
                  half of every batch replayed from v's own training imagery; bundle v+1,
                  parent v (one per selection)
    4. flight 2   FLIGHT_2 (other scenes): v flies, v+1 is uplinked after a pass, the later
                  frames run on it; the report scores the downlinked masks by model version
    5. evaluate   EVAL_SCENES (never flown, never trained on): v and each v+1 through the
                  on-board pipeline (OpenVINO, the bundle as the daemon runs it), mIoU against
                  the generated truth and agreement with the teacher, per kind of scene
    6. report     OUT/loop-report.{json,md}, with its checks

Every step is a call into the package that owns it; `eoedge loop --help` for the knobs.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from shared.bands import S2_BANDS
from shared.bundle import extract_bundle
from shared.cliutil import add_json_flag, emit, run_cli
from shared.metrics import SegmentationScores, confusion_matrix
from shared.samples import SELECTIONS, read_samples
from flight_sim.camera import quantise
from flight_sim.generator import SceneGenerator
from ground.stages.redistil import redistil
from ground.stages.run import Run
from ground.teachers.registry import build_teacher
from onboard.pipeline import FramePipeline
from eoedge import demo

REPO_ROOT = Path(__file__).resolve().parents[1]
FLIGHT_1 = REPO_ROOT / "scenarios" / "loop_flight1.toml"
FLIGHT_2 = REPO_ROOT / "scenarios" / "loop_flight2.toml"
# Learning samples: three model tiles a frame, by the mean entropy of the class probabilities
LEARNING = {"tiles": 3, "score": "entropy", "min_score": 0.0, "priority": 9, "seed": 0}
# v+1's bundle may be a little larger than v's: its reference windows are drawn again and
# compress differently (one came to 262,656 bytes against v's 250 KB budget)
REDISTIL = {"steps": 150, "replay": 0.5, "max_bytes": "300KB"}
# The two kinds of scene: what v was trained on (temperate land under clear air), and what it never
# saw (arid land under a heavy dust haze, flight_sim.generator's surface and haze)
KINDS = {"temperate": {"surface": "temperate"}, "dust": {"surface": "arid", "haze": 1.0}}
# (seed, kind, cloud cover): scenes no flight and no training saw, scored before and after
EVAL_SCENES = [(401, "dust", 0.3), (402, "dust", [0.1, 0.6]), (403, "dust", 0.15),
               (404, "temperate", 0.3), (405, "temperate", [0.5, 0.1])]
EVAL_SIZE = 768


def log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[loop] {msg}", file=sys.stderr, flush=True)


def learning_policy(select: str) -> dict:
    """The demo's keep/discard policy plus the learning block for `select`."""
    return {**demo.POLICY, "learning": {**LEARNING, "select": select}}


# ------------------------------------------------------------------------------------ steps
def build_v(out: Path, steps: int, rebuild: bool, quiet: bool) -> dict:
    """v: the demo's cloud student (temperate imagery only), bundled once per selection
    (OUT/v1-<selection>.tar: same model, same version, the policies' `learning.select` apart)."""
    names = {s: f"v1-{s}.tar" for s in SELECTIONS}
    if not rebuild and all(demo.existing_bundle(out, n) and (out / "ground" / f"distil-{s}").is_dir()
                           for s, n in names.items()):
        log("v: reusing OUT/v1-*.tar (--rebuild to redo)", quiet)
        return {s: str(out / n) for s, n in names.items()}
    if rebuild or not demo.existing_bundle(out, "v1.tar"):
        demo.build_bundle(out, steps, quiet, name="v1.tar", label_free=True)   # the teacher's outputs alone
    sk, _ = demo.ensure_keys(out)
    for select, name in names.items():
        # a copy of v's run per selection: its lineage records its own bundle and, later, v+1
        run_dir = out / "ground" / f"distil-{select}"
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(out / "ground" / "distil", run_dir)
        run = Run.open(run_dir, progress=not quiet)
        policy_path = out / f"policy-{select}.json"
        policy_path.write_text(json.dumps(learning_policy(select), indent=1))
        demo.bundle_student(run, sk, policy_path, out / name)
    return {s: str(out / n) for s, n in names.items()}


def fly(out: Path, scenario_path: Path, flown: Path, folder: str, quiet: bool,
        uplink: Path | None = None) -> dict:
    """One flight of `scenario_path` with `flown` (and `uplink`, the scenario's scheduled
    uplink, replaced by this bundle); the report and where the ground station put things."""
    report, _, record = demo.fly(out, scenario_path, quiet, flown=flown, folder=folder, uplink=uplink)
    station = Path(record.downlink.station.out_dir)
    return {"report": report, "station": str(station), "learning": str(station / "learning"),
            "folder": str(out / folder)}


def redistil_v(out: Path, v: Path, samples: Path, select: str, steps: int, quiet: bool) -> dict:
    """v+1 from v's checkpoint, the teacher's labels on `samples` and v's imagery replayed, in
    the run folder v was bundled from (OUT/ground/distil-<selection>)."""
    sk, _ = demo.ensure_keys(out)
    return redistil(v, [samples], sk, steps=steps, replay=REDISTIL["replay"],
                    run_dir=out / "ground" / f"distil-{select}",
                    out=out / f"v2-{select}.tar", max_bytes=REDISTIL["max_bytes"], threads=1,
                    progress=not quiet)


def eval_scenes() -> list[dict]:
    """EVAL_SCENES rendered: DN frame, truth in the model's classes, kind."""
    lut = np.zeros(256, np.uint8)
    for t, c in demo.TRUTH_TO_CLASSES.items():
        lut[int(t)] = c
    out = []
    for seed, kind, cover in EVAL_SCENES:
        win = SceneGenerator(EVAL_SIZE, EVAL_SIZE, seed, cloud_cover=cover, **KINDS[kind]).window()
        dn, scale = quantise(win.reflectance, "uint16")
        out.append({"seed": seed, "kind": kind, "dn": dn, "scale": scale, "truth": lut[win.truth],
                    "reflectance": win.reflectance})
    return out


def teacher_masks(scenes: list[dict]) -> list[np.ndarray]:
    teacher = build_teacher(demo.RECIPE["teacher"])
    idx = [S2_BANDS.index(b) for b in teacher.bands]
    return [np.argmax(teacher.predict_proba(s["reflectance"][idx]), axis=0).astype(np.uint8) for s in scenes]


def bundle_masks(path: Path, public_key: Path, scenes: list[dict]) -> list[np.ndarray]:
    """The class masks the on-board pipeline makes of each scene with the bundle at `path`
    (verified, run by OpenVINO as the daemon runs it)."""
    with tempfile.TemporaryDirectory() as tmp:
        v = extract_bundle(path, Path(tmp) / "b", public_key)
        policy = {k: x for k, x in v.manifest["policy"].items() if k != "learning"}
        pipe = FramePipeline(v.manifest, v.root)
        return [pipe.process(s["dn"], S2_BANDS, s["scale"], policy=policy, make_products=False).class_mask
                for s in scenes]


def scores(masks: list[np.ndarray], scenes: list[dict], teacher: list[np.ndarray]) -> dict:
    """Per kind of scene: mIoU against the truth, per-class IoU, pixel agreement with the teacher."""
    k = len(demo.CLASSES)
    out = {}
    for kind in sorted({s["kind"] for s in scenes}):
        cm, agree, n = np.zeros((k, k), np.int64), 0, 0
        for m, s, t in zip(masks, scenes, teacher):
            if s["kind"] == kind:
                cm += confusion_matrix(s["truth"], m, k)
                agree, n = agree + int((m == t).sum()), n + m.size
        sc = SegmentationScores.from_confusion(cm, demo.CLASSES)
        out[kind] = {"miou": round(float(sc.miou), 4),
                        "iou": {c: round(float(x), 4) for c, x in zip(demo.CLASSES, sc.iou)},
                        "teacher_agreement": round(agree / n, 4)}
    return out


def evaluate(bundles: dict[str, Path], public_key: Path, quiet: bool) -> dict:
    log(f"evaluate: {len(EVAL_SCENES)} unseen scenes of {EVAL_SIZE}^2, {', '.join(bundles)}", quiet)
    scenes = eval_scenes()
    teacher = teacher_masks(scenes)
    result = {"teacher": scores(teacher, scenes, teacher)}
    for name, path in bundles.items():
        result[name] = scores(bundle_masks(path, public_key, scenes), scenes, teacher)
    return result


def learning_figures(flight: dict) -> dict:
    """What came down as learning samples in a flight, read from the ground station's folder."""
    folder = Path(flight["learning"])
    samples = read_samples(folder) if folder.is_dir() else []
    return {"samples": len(samples), "bytes": sum(s.data.nbytes for s in samples),
            "mean_entropy": round(float(np.mean([s.entropy for s in samples])), 4) if samples else None,
            "scenes": sorted({s.scene or "?" for s in samples}),
            "model_versions": sorted({s.model_version for s in samples}),
            "report": flight["report"].get("learning")}


# ------------------------------------------------------------------------------------ main
def checks(result: dict) -> list[dict]:
    ev = result["evaluation"]
    v, unc, rnd = ev["v1"].get("dust", {}), ev["v2-uncertainty"].get("dust", {}), ev["v2-random"].get("dust", {})
    temp_v, temp_unc = ev["v1"].get("temperate", {}), ev["v2-uncertainty"].get("temperate", {})
    flights = [f for sel in result["flights"].values() for f in sel.values()]
    same_bytes = len({result["flights"][s]["flight1"]["learning"]["bytes"] for s in SELECTIONS}) == 1
    out = [
        ("dust-haze mIoU rises after v+1 (uncertainty samples)", unc.get("miou", 0) > v.get("miou", 1)),
        ("uncertainty samples beat random ones at the same byte budget", unc.get("miou", 0) > rnd.get("miou", 1)),
        ("both selections downlinked the same learning bytes", same_bytes),
        ("temperate mIoU kept (within 0.02 of v)", temp_unc.get("miou", 0) >= temp_v.get("miou", 1) - 0.02),
        ("science products within their budget in every pass of every flight",
         all((f["report"].get("learning") or {}).get("science_within_budget", False) for f in flights)),
    ]
    return [{"name": n, "ok": bool(ok)} for n, ok in out]


def cmd_loop(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    quiet = args.json or args.quiet
    t0 = time.perf_counter()
    _, pk = demo.ensure_keys(out)
    v1 = build_v(out, args.steps, args.rebuild, quiet)
    flights, v2 = {}, {}
    for select in SELECTIONS:
        log(f"flight 1 ({select} samples): {FLIGHT_1.name}", quiet)
        f1 = fly(out, FLIGHT_1, Path(v1[select]), f"flight1-{select}", quiet)
        log(f"re-distil from {f1['learning']}", quiet)
        v2[select] = redistil_v(out, Path(v1[select]), Path(f1["learning"]), select, args.redistil_steps, quiet)
        log(f"flight 2: v flies, v+1 ({select}) uplinked after a pass: {FLIGHT_2.name}", quiet)
        f2 = fly(out, FLIGHT_2, Path(v1[select]), f"flight2-{select}", quiet, uplink=Path(v2[select]["bundle"]))
        flights[select] = {"flight1": {**f1, "learning": learning_figures(f1)}, "flight2": f2}
    evaluation = evaluate({"v1": Path(v1["uncertainty"]),
                           **{f"v2-{s}": Path(v2[s]["bundle"]) for s in SELECTIONS}}, pk, quiet)
    result = {"evaluation": evaluation, "v1": v1, "v2": v2, "learning": LEARNING, "redistil": REDISTIL,
              "flights": {s: {k: {"folder": f["folder"], "learning": f.get("learning"),
                                  "report": {x: f["report"].get(x) for x in
                                             ("ok", "learning", "masks_by_version", "uplinks", "data")}}
                                  for k, f in fl.items()} for s, fl in flights.items()},
              "seconds": round(time.perf_counter() - t0, 1)}
    result["checks"] = checks(result)
    result["ok"] = all(c["ok"] for c in result["checks"])
    (out / "loop-report.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "loop-report.md").write_text(human(result) + "\n")
    emit(result, args.json, human)
    return 0 if result["ok"] else 1


def human(r: dict) -> str:
    ev = r["evaluation"]
    lines = [f"closed loop: {'OK' if r['ok'] else 'CHECKS FAILED'} ({r['seconds']} s)",
             "unseen scenes, on-board pipeline (OpenVINO): mIoU vs generated truth / agreement with the teacher"]
    for name, per in ev.items():
        lines.append(f"  {name:<16} " + "  ".join(f"{s}: {x['miou']:.3f} / {x['teacher_agreement']:.3f}"
                                                  for s, x in per.items()))
    for s, fl in r["flights"].items():
        lr = fl["flight1"]["learning"]
        lines.append(f"  flight 1 ({s}): {lr['samples']} samples, {lr['bytes']:,} bytes down, "
                     f"mean entropy {lr['mean_entropy']}")
    lines += [f"  {'pass' if c['ok'] else 'FAIL'}  {c['name']}" for c in r["checks"]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eoedge loop", description=__doc__.splitlines()[0] + " "
                                "Builds v, flies, re-distils, uplinks v+1, flies again, and scores both "
                                "on unseen scenes of both kinds.")
    p.add_argument("--out", default="runs/loop", help="working folder (default runs/loop)")
    p.add_argument("--steps", type=int, default=demo.RECIPE["steps"], help="v's distillation steps")
    p.add_argument("--redistil-steps", type=int, default=REDISTIL["steps"], help="v+1's re-distillation steps")
    p.add_argument("--rebuild", action="store_true", help="build v even if OUT/v1-*.tar verify")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_json_flag(p)
    p.set_defaults(func=cmd_loop)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)
