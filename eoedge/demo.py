"""`eoedge demo`: the main job. On a fresh machine (no ../shared needed): build a bundle from the
embedded default, fly a scenario with it, print the report's headline.

The embedded default (`RECIPE`), every step a call into the package that owns it:

    1. keys       an Ed25519 pair in OUT/keys (kept between runs)              shared.keys
    2. imagery    generated 13-band L1C scenes, clear to overcast, land and sea  flight_sim.generator
    3. distil     the ukis-csmask teacher (PyPI, 6 bands, clear/cloud/shadow,   ground.stages.distill
                  run by OpenVINO) labels them; a ~100k-parameter TinyUNet
                  learns its outputs by the factory's recipe (KL at T = 1,
                  half the crops centred on a class drawn uniformly, the KL
                  weighted per class by 1/ln(1.02 + f)) mixed with cross-entropy
                  on the generated scenes' own truth (ce_weight 0.5: the
                  factory's output + labels recipe; the teacher alone leaves
                  the generator's shadows under-predicted); no human label
    4. export     FP16 OpenVINO IR, parity against torch, operating point,     ground.stages.export
                  latency
    5. bundle     manifest (bands, normalisation, thresholds, policy, metrics,  ground.stages.bundle
                  lineage), a reference tile holding 4 windows of 28x28 picked
                  for every class and decision-boundary pixels, files xz-
                  compressed, Ed25519 signature, a 250 KB budget
    6. fly        scenarios/demo.toml with that bundle: daemon as a process,    flight_sim.runner
                  every socket CURVE-authenticated with a throwaway key set
                  made for the flight, uplink, faults, passes, report            flight_sim.report

Steps 2-5 are skipped when OUT/bundle.tar exists and verifies with OUT/keys (`--rebuild` forces
them). Parity and the bundle's reference tiles come from the run's own imagery (the generated
scenes), and the bundle's lineage says so; nothing here needs ../shared/data.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

from shared.bands import S2_BANDS
from shared.bundle import BundleError, verify_bundle
from shared.cliutil import CommandError, add_json_flag, emit, run_cli
from shared.keys import generate_keypair
from flight_sim.camera import quantise
from flight_sim.generator import CLASSES as TRUTH_CLASSES, SceneGenerator
from flight_sim.report import build_report, headline, write_report
from flight_sim.runner import run_scenario
from flight_sim.scenario import load_scenario
from ground.config import parse_config
from ground.stages.bundle import bundle
from ground.stages.distill import distill
from ground.stages.export import export
from ground.stages.run import Run

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_SCENARIO = REPO_ROOT / "scenarios" / "demo.toml"
TEACHER_BANDS = ["B02", "B03", "B04", "B08", "B11", "B12"]       # ukis-csmask 6b L1C, its order
CLASSES = ["clear", "cloud", "shadow"]

# The training imagery: (seed, cloud cover or along-track profile, water fraction, ships)
TRAINING_SCENES = [(101, 0.0, 0.3, 6), (102, 0.2, 0.5, 8), (103, 0.4, 0.2, 4), (104, [0.0, 1.0], 0.4, 8),
                   (105, 0.6, 0.3, 6), (106, [1.0, 0.1], 0.3, 6), (107, 0.15, 0.6, 10), (108, 0.3, 0.1, 2)]
# Keep/discard on board: overcast frames stay up; clear ground comes down first.
POLICY = {"rules": [{"if": {"class": "cloud", "fraction_above": 0.7}, "then": "discard"},
                    {"if": {"class": "clear", "fraction_above": 0.6}, "then": "keep", "priority": 1}],
          "default": {"then": "keep", "priority": 5}}
RECIPE = {"scenes": len(TRAINING_SCENES), "scene_size": 512, "teacher": "ukis-csmask-6b-l1c",
          "student": "tiny-unet", "params": "100k", "steps": 200, "batch": 16, "crop": 128, "lr": 5e-3,
          "loss": "kl", "temperature": 1.0, "ce_weight": 0.5, "balance": 0.5, "distill_class_weights": "log",
          "tile": 256, "overlap": 64, "model_id": "cloudmask-demo", "policy": POLICY,
          # the self-test's reference: 4 windows of 28x28 in one tile (ground.stages.bundle; docs/ground.md)
          "reference_tiles": 1, "reference_window": 28, "reference_windows": 4, "max_bytes": "250KB"}


def log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[demo] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ steps
def ensure_keys(out: Path) -> tuple[Path, Path]:
    sk, pk = out / "keys" / "uplink.key", out / "keys" / "uplink.pub"
    if sk.is_file() and pk.is_file():
        return sk, pk
    return generate_keypair(out / "keys", "uplink", overwrite=True)


# The generator's truth in the model's classes (a `pairs` patch source's label_map)
TRUTH_TO_CLASSES = {str(TRUTH_CLASSES.index(t)): CLASSES.index(c) for t, c in
                    (("land", "clear"), ("water", "clear"), ("ship", "clear"), ("cloud", "cloud"),
                     ("shadow", "shadow"))}


def write_training_scenes(folder: Path, size: int) -> list[Path]:
    """The generated imagery the teacher labels, as .npz (uint16 DN, 13 bands, with truth), and
    the same scenes as GeoTIFF pairs with their truth (folder/labelled/{images,masks}/)."""
    for sub in ("images", "masks"):
        (folder / "labelled" / sub).mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, cover, water, ships in TRAINING_SCENES:
        path = folder / f"train-{seed}.npz"
        image, mask = (folder / "labelled" / sub / f"train-{seed}.tif" for sub in ("images", "masks"))
        if not (path.is_file() and image.is_file() and mask.is_file()):
            win = SceneGenerator(size, size, seed, cloud_cover=cover, water_fraction=water, ships=ships).window()
            dn = quantise(win.reflectance, "uint16")[0]
            np.savez(path, data=dn, bands=np.array(S2_BANDS),
                     truth=win.truth, ships=win.ships, classes=np.array(TRUTH_CLASSES))
            tifffile.imwrite(image, dn)
            tifffile.imwrite(mask, win.truth)
        paths.append(path)
    return paths


def ground_config(out: Path, scenes: list[Path], steps: int) -> dict:
    r = RECIPE
    return {"run": {"name": "distil", "out": str(out / "ground"), "seed": 0, "deliver": "distilled"},
            "data": {"bands": TEACHER_BANDS, "classes": CLASSES,
                     "unlabelled": [{"source": "scene", "path": str(p), "scale": 1e-4} for p in scenes],
                     # the same scenes with the generator's truth (the cross-entropy term's labels)
                     "labelled": [{"source": "patches", "layout": "pairs", "path": str(scenes[0].parent / "labelled"),
                                   "scale": 1e-4, "label_map": TRUTH_TO_CLASSES}]},
            "eval": {"tile": r["tile"], "overlap": r["overlap"], "opening_radius": 2, "calibrate": "labels"},
            "teacher": {"name": r["teacher"]},
            "student": {"name": r["student"], "params": r["params"]},
            "train": {"steps": steps, "batch": r["batch"], "crop": r["crop"], "lr": r["lr"],
                      "augment": ["flip", "rot90", "crop"], "balance": r["balance"],
                      "distill_class_weights": r["distill_class_weights"]},
            "experiment": [{"name": "distilled", "mode": "distill", "loss": r["loss"],
                            "temperature": r["temperature"], "ce_weight": r["ce_weight"]}]}


def build_bundle(out: Path, steps: int, quiet: bool) -> dict:
    """Steps 2-5: imagery -> distilled student -> FP16 IR -> signed bundle (OUT/bundle.tar)."""
    t0 = time.perf_counter()
    sk, _ = ensure_keys(out)
    scenes = write_training_scenes(out / "scenes", RECIPE["scene_size"])
    log(f"imagery: {len(scenes)} generated scenes of {RECIPE['scene_size']}^2 in {out / 'scenes'}", quiet)
    run_dir = out / "ground" / "distil"
    shutil.rmtree(run_dir, ignore_errors=True)
    log(f"distil: {RECIPE['teacher']} -> {RECIPE['student']} {RECIPE['params']}, {steps} steps", quiet)
    t = time.perf_counter()
    distilled = distill(parse_config(ground_config(out, scenes, steps)), progress=not quiet)
    distil_s = time.perf_counter() - t
    run = Run.open(run_dir, progress=not quiet)
    log("export: FP16 OpenVINO IR", quiet)
    t = time.perf_counter()
    exported = export(run, "student.pt", name="student")
    export_s = time.perf_counter() - t
    policy_path = out / "policy.json"
    policy_path.write_text(json.dumps(POLICY, indent=1))
    log("bundle: manifest, reference tiles, signature", quiet)
    t = time.perf_counter()
    r = RECIPE
    bundled = bundle(run, "export/student", sk, r["model_id"], 1, policy=policy_path, max_bytes=r["max_bytes"],
                     reference_tiles=r["reference_tiles"], reference_window=r["reference_window"],
                     reference_windows=r["reference_windows"])
    # the run folder keeps its bundle (its lineage names it); the scenarios fly a copy at OUT/
    shutil.copyfile(bundled["bundle"], out / "bundle.tar")
    bundle_s = time.perf_counter() - t
    row = (distilled.get("rows") or [{}])[-1]
    return {"bundle": str(out / "bundle.tar"), "built": bundled["bundle"], "bytes": bundled["bytes"],
            "model_id": bundled["model_id"],
            "version": bundled["version"], "params": row.get("params"), "macs_per_tile": row.get("macs"),
            "parity": exported.get("parity"), "latency": exported.get("latency"),
            "run_dir": str(run_dir),
            "seconds": {"distil": round(distil_s, 1), "export": round(export_s, 1),
                        "bundle": round(bundle_s, 1), "total": round(time.perf_counter() - t0, 1)}}


def existing_bundle(out: Path) -> dict | None:
    bundle, pk = out / "bundle.tar", out / "keys" / "uplink.pub"
    if not (bundle.is_file() and pk.is_file()):
        return None
    try:
        v = verify_bundle(bundle, pk)
    except BundleError:
        return None
    return {"bundle": str(bundle), "bytes": bundle.stat().st_size, "model_id": v.model_id,
            "version": v.version, "reused": True}


def fly(out: Path, scenario_path: Path, quiet: bool):
    scenario = load_scenario(scenario_path)
    # the scenario flies the bundle built here, whatever its file says
    scenario.sections["bundle"].update(path=str(out / "bundle.tar"), public_key=str(out / "keys" / "uplink.pub"),
                                       private_key=str(out / "keys" / "uplink.key"))
    scenario.base_dir = scenario_path.resolve().parent
    record = run_scenario(scenario, out / "flight", progress=not quiet)
    report = build_report(record)
    paths = write_report(report, record)
    return report, paths


# ------------------------------------------------------------------------------------ main
def cmd_demo(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    quiet = args.json or args.quiet
    built = None if args.rebuild else existing_bundle(out)
    if built:
        log(f"bundle: reusing {built['bundle']} ({built['model_id']} v{built['version']}; --rebuild to redo)", quiet)
    else:
        built = build_bundle(out, args.steps, quiet)
        log(f"bundle: {built['bundle']} ({built['bytes']:,} bytes) in {built['seconds']['total']} s", quiet)
    scenario = Path(args.scenario) if args.scenario else DEMO_SCENARIO
    if not scenario.is_file():
        raise CommandError(f"scenario {scenario} not found")
    log(f"fly: {scenario}", quiet)
    report, paths = fly(out, scenario, quiet)
    result = {"ok": report["ok"], "headline": headline(report), "bundle": built,
              "report": {k: str(p) for k, p in paths.items()},
              "checks": report["checks"], "seconds_total": round(time.perf_counter() - t0, 1),
              "figures": {k: report[k] for k in ("accounting", "realtime", "latency_ms", "value", "masks")},
              "data": {k: v for k, v in report["data"].items() if k != "passes"}}
    emit(result, args.json, lambda r: r["headline"] + "\n" + "\n".join(
        f"  {'pass' if c['ok'] else 'FAIL'}  {c['name']}" for c in r["checks"])
        + f"\nreport: {r['report']['markdown']}  ({r['seconds_total']} s in all)")
    return 0 if report["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eoedge demo", description="The main job: build a signed bundle from the embedded default "
        "(generated imagery, the ukis-csmask teacher, a ~100k-parameter student, FP16 IR), fly "
        "scenarios/demo.toml with it (daemon as a separate process, faults on), print the headline.")
    p.add_argument("--out", default="runs/demo", help="working folder (default runs/demo)")
    p.add_argument("--steps", type=int, default=RECIPE["steps"],
                   help=f"distillation steps (default {RECIPE['steps']})")
    p.add_argument("--rebuild", action="store_true", help="build the bundle even if OUT/bundle.tar verifies")
    p.add_argument("--scenario", help="fly this scenario instead of scenarios/demo.toml")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_json_flag(p)
    p.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)
