"""`eoedge demo`: the main job. On a fresh machine (no ../shared needed): build a model chain from
the embedded default, fly a scenario with it, print the report's headline and the chain's figures.

The embedded default (`RECIPE`, `SHIP_RECIPE`, the chain), every step a call into the package
that owns it:

    1. keys       an Ed25519 pair in OUT/keys (kept between runs)              shared.keys
    2. imagery    generated 13-band L1C scenes, clear to overcast, land and sea  flight_sim.generator
                  with ships, and four harbour scenes crowded with ships
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
                  compressed, Ed25519 signature, a 250 KB budget (OUT/bundle.tar)
    6. ships      a ~24k-parameter TinyUNet (4 bands at 10 m) trained on the    ground.stages.distill
                  generated truth's ship class alone (labels, ce-dice, 80 %       .train_student,
                  balanced crops, no opening), exported and bundled the same    export, bundle
                  way (OUT/ships.tar)
    7. chain      one signed chain bundle (OUT/chain.tar): the cloud student    shared.chain
                  gates every cell, the ship student runs only where the cell
                  is under half cloud (SHIP_RUN_IF), CHAIN_POLICY keeps cells
                  with ships under clear sky first and discards overcast ones
    8. fly        scenarios/demo.toml with the chain: its two scenes placed     flight_sim.runner
                  off two ports (a UTM georeference and a time from the seed),
                  daemon as a process, every socket CURVE-authenticated with a
                  throwaway key set made for the flight, uplink, faults, passes;
                  the ground station writes COGs per step and a STAC catalogue
    9. report     the headline and checks, each step's cells run and ms, the    flight_sim.report,
                  cells by policy rule, the gate's mask against the generated   ship_scores here
                  truth (shadow IoU), the ship step's against it (pixels and
                  objects), the STAC catalogue's path

Steps 2-5 and 6 are each skipped when their bundle exists and verifies with OUT/keys, and step 7
when both were (`--rebuild` forces them). Parity and the bundles' reference tiles come from the
runs' own imagery (the generated scenes), and their lineage says so; nothing here needs
../shared/data.
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
from scipy import ndimage

from shared.bands import S2_BANDS
from shared.bundle import BundleError, verify_bundle
from shared.chain import build_chain_bundle
from shared.cliutil import CommandError, add_json_flag, emit, run_cli
from shared.keys import generate_keypair
from shared.metrics import airbus_f2
from flight_sim.camera import quantise
from flight_sim.generator import CLASSES as TRUTH_CLASSES, SceneGenerator
from flight_sim.report import build_report, decode_png, headline, write_report
from flight_sim.runner import run_scenario
from flight_sim.scenario import load_scenario
from ground.config import parse_config
from ground.lineage import StageRecord
from ground.stages.bundle import bundle
from ground.stages.distill import distill, train_student
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
# The ship student (the chain's target): supervised on the generated truth's `ship` class, over the
# cloud student's training scenes and four harbour scenes crowded with ships (seed, cover, water, ships)
SHIP_SCENES = [(201, 0.1, 0.6, 40), (202, 0.0, 0.5, 40), (203, 0.2, 0.7, 40), (204, 0.05, 0.55, 40)]
SHIP_BANDS = ["B02", "B03", "B04", "B08"]                          # the 10 m bands
SHIP_CLASSES = ["background", "ship"]         # "background": the simulator's truth maps land and water onto it
SHIP_POLICY = {"rules": [{"if": {"class": "ship", "components_at_least": {"count": 1, "min_size": 4}},
                          "then": "keep", "priority": 1}], "default": {"then": "discard"}}
SHIP_RECIPE = {"student": "tiny-unet", "params": "25k", "depth": 3, "steps": 200, "batch": 16, "crop": 64,
               "lr": 5e-3, "loss": "ce-dice", "class_weights": "log", "balance": 0.8,
               "threads": 1,          # a 24k model on 64 px crops: a second thread only waits
               # no opening: a disk(2) opening erases hulls under 5 px wide
               "tile": 128, "overlap": 32, "opening_radius": 0, "model_id": "ships-demo",
               "reference_tiles": 1, "reference_window": 28, "reference_windows": 4, "max_bytes": "150KB"}
# The chain flown: the cloud student gates every cell (256 px); the ship student runs only on cells
# under half cloud; the policy keeps cells with ships under clear sky first, discards overcast ones
CHAIN_ID = "harbour-chain-demo"
SHIP_RUN_IF = {"class": "cloud", "fraction_below": 0.5}
CHAIN_POLICY = {"rules": [{"if": {"class": "cloud", "fraction_above": 0.7}, "then": "discard"},
                          {"if": {"class": "ship", "components_at_least": {"count": 1, "min_size": 4}},
                           "then": "keep", "priority": 1},
                          {"if": {"class": "clear", "fraction_above": 0.6}, "then": "keep", "priority": 2}],
                "default": {"then": "keep", "priority": 5}}
CHAIN_RULES = ("overcast", "ships under clear sky", "clear ground")      # CHAIN_POLICY's rules, in order
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


# ... and in the ship student's: a ship is a ship, everything else is not
TRUTH_TO_SHIPS = {str(i): SHIP_CLASSES.index("ship" if t == "ship" else "background")
                  for i, t in enumerate(TRUTH_CLASSES)}


def write_training_scenes(folder: Path, size: int, scenes: list = TRAINING_SCENES) -> list[Path]:
    """The generated imagery the teacher labels, as .npz (uint16 DN, 13 bands, with truth), and
    the same scenes as GeoTIFF pairs with their truth (folder/labelled/{images,masks}/)."""
    for sub in ("images", "masks"):
        (folder / "labelled" / sub).mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, cover, water, ships in scenes:
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


# One torch thread for the cloud student, whatever the host's load: the same command trains the
# same student everywhere (two threads sum in another order), and it was not slower: 7 min 36 s
# with one thread at load 6.6 against 7 min 57 s with two at load 1.9 (2 vCPUs).
CLOUD_TRAIN_THREADS = 1


def ground_config(out: Path, scenes: list[Path], steps: int, label_free: bool = False) -> dict:
    """The cloud student's run; `label_free`: the teacher's outputs alone (no cross-entropy on
    the generated truth, thresholds calibrated on the teacher's labels), as a ground without
    labels of its imagery distils."""
    cfg = _ground_config(out, scenes, steps)
    if label_free:
        del cfg["data"]["labelled"]
        cfg["eval"]["calibrate"] = "teacher"
        del cfg["experiment"][0]["ce_weight"]
    return cfg


def _ground_config(out: Path, scenes: list[Path], steps: int) -> dict:
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
                      "distill_class_weights": r["distill_class_weights"], "threads": CLOUD_TRAIN_THREADS},
            "experiment": [{"name": "distilled", "mode": "distill", "loss": r["loss"],
                            "temperature": r["temperature"], "ce_weight": r["ce_weight"]}]}


def ship_config(out: Path, folders: list[Path], steps: int) -> dict:
    """The ship student's run: supervised (mode "labels") on the generated truth of `folders`
    (GeoTIFF pairs), no teacher: its name is never resolved (ground.stages.distill.distill wants
    one for every run, hence `train_ship_student`)."""
    r = SHIP_RECIPE
    return {"run": {"name": "ships", "out": str(out / "ground"), "seed": 0},
            "data": {"bands": SHIP_BANDS, "classes": SHIP_CLASSES, "class_weights": r["class_weights"],
                     "labelled": [{"source": "patches", "layout": "pairs", "path": str(f / "labelled"),
                                   "scale": 1e-4, "label_map": TRUTH_TO_SHIPS} for f in folders]},
            "eval": {"tile": r["tile"], "overlap": r["overlap"], "opening_radius": r["opening_radius"],
                     "calibrate": "labels"},
            "teacher": {"name": "none (labels only)"},
            "student": {"name": r["student"], "params": r["params"], "depth": r["depth"]},
            "train": {"steps": steps, "batch": r["batch"], "crop": r["crop"], "lr": r["lr"],
                      "augment": ["flip", "rot90", "crop"], "balance": r["balance"], "threads": r["threads"]},
            "experiment": [{"name": "ships", "mode": "labels", "loss": r["loss"]}]}


def train_ship_student(out: Path, steps: int, quiet: bool) -> Run:
    """The factory's training of one experiment (ground.stages.distill.train_student) on the
    generated truth, its checkpoint delivered as the run's student.pt with its lineage."""
    folders = [out / "scenes", out / "scenes-ships"]
    write_training_scenes(folders[0], RECIPE["scene_size"])
    write_training_scenes(folders[1], RECIPE["scene_size"], SHIP_SCENES)
    cfg = parse_config(ship_config(out, folders, steps))
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    run = Run.create(cfg, progress=not quiet)
    run.folder.add_inputs(run.data.inputs)
    [exp] = cfg.experiments
    _, _, path, info = train_student(run, exp)
    shutil.copyfile(path, run.run_dir / "student.pt")
    (run.run_dir / "normalization.json").write_text(json.dumps(run.data.norm.as_dict(), indent=2))
    run.folder.add(StageRecord("train:ships", ["student.pt", "normalization.json"],
                               params={"deliver": exp.name, "train_seconds": info["train_seconds"]},
                               label_free=False))
    return run


def build_ship_bundle(out: Path, steps: int, quiet: bool) -> dict:
    """The chain's target: ship student -> FP16 IR -> signed bundle (OUT/ships.tar)."""
    t0 = time.perf_counter()
    sk, _ = ensure_keys(out)
    r = SHIP_RECIPE
    log(f"ships: {r['student']} {r['params']} on the generated truth, {steps} steps", quiet)
    run = train_ship_student(out, steps, quiet)
    exported = export(run, "student.pt", name="student")
    policy_path = out / "ship-policy.json"
    policy_path.write_text(json.dumps(SHIP_POLICY, indent=1))
    bundled = bundle_student(run, sk, policy_path, out / "ships.tar", r)
    return {"bundle": str(out / "ships.tar"), "bytes": bundled["bytes"], "model_id": bundled["model_id"],
            "version": bundled["version"], "params": exported.get("params"),
            "operating_point": exported.get("operating_point"), "run_dir": str(run.run_dir),
            "seconds": round(time.perf_counter() - t0, 1)}


def build_bundle(out: Path, steps: int, quiet: bool, policy: dict = POLICY, name: str = "bundle.tar",
                 label_free: bool = False) -> dict:
    """Steps 2-5: imagery -> distilled student -> FP16 IR -> signed bundle (OUT/NAME) with `policy`
    (`label_free`: ground_config's)."""
    t0 = time.perf_counter()
    sk, _ = ensure_keys(out)
    scenes = write_training_scenes(out / "scenes", RECIPE["scene_size"])
    log(f"imagery: {len(scenes)} generated scenes of {RECIPE['scene_size']}^2 in {out / 'scenes'}", quiet)
    run_dir = out / "ground" / "distil"
    shutil.rmtree(run_dir, ignore_errors=True)
    log(f"distil: {RECIPE['teacher']} -> {RECIPE['student']} {RECIPE['params']}, {steps} steps", quiet)
    t = time.perf_counter()
    distilled = distill(parse_config(ground_config(out, scenes, steps, label_free)), progress=not quiet)
    distil_s = time.perf_counter() - t
    run = Run.open(run_dir, progress=not quiet)
    log("export: FP16 OpenVINO IR", quiet)
    t = time.perf_counter()
    exported = export(run, "student.pt", name="student")
    export_s = time.perf_counter() - t
    policy_path = out / "policy.json"
    policy_path.write_text(json.dumps(policy, indent=1))
    log("bundle: manifest, reference tiles, signature", quiet)
    t = time.perf_counter()
    bundled = bundle_student(run, sk, policy_path, out / name)
    bundle_s = time.perf_counter() - t
    row = (distilled.get("rows") or [{}])[-1]
    return {"bundle": str(out / name), "built": bundled["bundle"], "bytes": bundled["bytes"],
            "model_id": bundled["model_id"],
            "version": bundled["version"], "params": row.get("params"), "macs_per_tile": row.get("macs"),
            "parity": exported.get("parity"), "latency": exported.get("latency"),
            "run_dir": str(run_dir),
            "seconds": {"distil": round(distil_s, 1), "export": round(export_s, 1),
                        "bundle": round(bundle_s, 1), "total": round(time.perf_counter() - t0, 1)}}


def bundle_student(run: Run, key: Path, policy_path: Path, dest: Path, r: dict = RECIPE) -> dict:
    """The run's exported student as a signed v1 bundle with recipe `r`'s id, size limit and
    reference settings and `policy_path`'s policy; the run folder keeps it (its lineage names
    it), the scenarios fly a copy at `dest`."""
    bundled = bundle(run, "export/student", key, r["model_id"], 1, policy=policy_path, max_bytes=r["max_bytes"],
                     reference_tiles=r["reference_tiles"], reference_window=r["reference_window"],
                     reference_windows=r["reference_windows"])
    shutil.copyfile(bundled["bundle"], dest)
    return bundled


def existing_bundle(out: Path, name: str = "bundle.tar") -> dict | None:
    """OUT/NAME when it verifies with OUT/keys (reused: `--rebuild` to redo), else None."""
    bundle, pk = out / name, out / "keys" / "uplink.pub"
    if not (bundle.is_file() and pk.is_file()):
        return None
    try:
        v = verify_bundle(bundle, pk)
    except BundleError:
        return None
    return {"bundle": str(bundle), "bytes": bundle.stat().st_size, "model_id": v.model_id,
            "version": v.version, "reused": True}


def build_chain(out: Path, steps: int, ship_steps: int, rebuild: bool, quiet: bool) -> dict:
    """Step 5b: the cloud bundle (OUT/bundle.tar) and the ship bundle (OUT/ships.tar), each built
    unless one verifies, packed as one signed chain (OUT/chain.tar): the cloud student gates, the
    ship student runs where SHIP_RUN_IF holds, CHAIN_POLICY decides over both."""
    built = {}
    for key, name, make in (("cloud", "bundle.tar", lambda: build_bundle(out, steps, quiet)),
                            ("ship", "ships.tar", lambda: build_ship_bundle(out, ship_steps, quiet))):
        built[key] = None if rebuild else existing_bundle(out, name)
        if built[key]:
            log(f"{key}: reusing {built[key]['bundle']} ({built[key]['model_id']} v{built[key]['version']}; "
                "--rebuild to redo)", quiet)
        else:
            built[key] = make()
            log(f"{key}: {built[key]['bundle']} ({built[key]['bytes']:,} bytes)", quiet)
    chain = None if rebuild or not all(b.get("reused") for b in built.values()) else existing_bundle(out, "chain.tar")
    if chain is None:
        sk, _ = ensure_keys(out)
        path = build_chain_bundle(out / "chain.tar", [("cloud", out / "bundle.tar", None),
                                                      ("ship", out / "ships.tar", SHIP_RUN_IF)],
                                  CHAIN_POLICY, sk, CHAIN_ID, 1)
        chain = {"bundle": str(path), "bytes": path.stat().st_size, "model_id": CHAIN_ID, "version": 1}
        log(f"chain: {path} (cloud -> ship where {json.dumps(SHIP_RUN_IF)}; {chain['bytes']:,} bytes)", quiet)
    return {**chain, "steps": built, "run_if": {"ship": SHIP_RUN_IF}, "policy": CHAIN_POLICY}


def fly(out: Path, scenario_path: Path, quiet: bool, flown: Path | None = None, folder: str = "flight",
        uplink: Path | None = None):
    """One flight of `scenario_path` into OUT/`folder` with the bundle built here (`flown`,
    default OUT/chain.tar), whatever the scenario's file says, and OUT/keys; `uplink` replaces
    the bundle of the scenario's first scheduled uplink. (report, its paths, the flight record)."""
    scenario = load_scenario(scenario_path)
    keys = {"public_key": str(out / "keys" / "uplink.pub"), "private_key": str(out / "keys" / "uplink.key")}
    scenario.sections["bundle"].update(path=str(flown or out / "chain.tar"), **keys)
    if uplink is not None:
        uplinks = scenario.sections.get("uplinks") or []
        if not uplinks:
            raise CommandError(f"{scenario_path}: no [[uplinks]] entry to fly {uplink.name} with")
        uplinks[0].update(path=str(uplink), public_key=keys["public_key"])
    scenario.base_dir = scenario_path.resolve().parent
    record = run_scenario(scenario, out / folder, progress=not quiet)
    report = build_report(record)
    paths = write_report(report, record)
    return report, paths, record


def decided_frames(record) -> list:
    """The payload's states of the flight's real frames (malformed ones left out) that got a DECISION."""
    states = record.payload.states.values() if record.payload else []
    return [s for s in states if s.frame.kind == "frame" and s.outcome == "decision"]


def cell_decisions(record) -> dict:
    """The chain's policy over the flight: frames kept and discarded, and cells by what decided
    them (CHAIN_POLICY's rule, the default, or discarded), with the steps that ran on them. (What
    each step cost, cells run and ms, is the report's `chain`.)"""
    cells: dict[str, int] = {}
    frames = {"kept": 0, "discarded": 0}
    for s in decided_frames(record):
        frames["kept" if s.body.get("keep") else "discarded"] += 1
        for cell in s.body.get("tile_decisions", []):
            rule = cell.get("rule")
            name = CHAIN_RULES[rule] if isinstance(rule, int) and 0 <= rule < len(CHAIN_RULES) else None
            how = "kept by default" if rule is None else f"{'kept' if cell.get('keep') else 'discarded'}: {name}"
            key = f"{how} ({'+'.join(cell.get('steps_run') or []) or 'no step'})"
            cells[key] = cells.get(key, 0) + 1
    return {"frames": frames, "cells": dict(sorted(cells.items()))}


def ship_scores(record, step: str = "ship") -> dict:
    """The ship step's downlinked masks (`mask_<step>.png`, 255 where it did not run) against the
    generated truth of their frames: pixel IoU, precision and recall of the ship class, and the
    Airbus object F2 (IoU 0.5..0.95) averaged over the frames that hold a ship or a detection."""
    states = {s.frame.frame_id: s for s in decided_frames(record)}
    station = record.downlink.station if record.downlink else None
    tp = fp = fn = 0
    f2, found, visible = [], 0, 0
    for got in (station.received if station else []):
        state = states.get(got["frame_id"])
        path = Path(got["folder"]) / f"mask_{step}.png"
        if state is None or state.frame.truth is None or not path.is_file():
            continue
        frame = state.frame
        pred = decode_png(path.read_bytes()) == SHIP_CLASSES.index("ship")
        truth = np.asarray(frame.truth) == list(frame.truth_classes).index("ship")
        tp, fp, fn = tp + int((pred & truth).sum()), fp + int((pred & ~truth).sum()), fn + int((~pred & truth).sum())
        objects = np.asarray(frame.objects, np.int64)
        detections, n = ndimage.label(pred, structure=np.ones((3, 3), bool))
        ids = np.unique(objects[objects > 0])
        visible += len(ids)
        found += sum(1 for i in ids if pred[objects == i].mean() >= 0.5)
        if len(ids) or n:
            f2.append(airbus_f2(objects, detections))
    return {"frames_scored": len(f2), "iou": round(tp / (tp + fp + fn), 3) if tp + fp + fn else None,
            "precision": round(tp / (tp + fp), 3) if tp + fp else None,
            "recall": round(tp / (tp + fn), 3) if tp + fn else None,
            "ships_visible": visible, "ships_found": found,
            "object_f2": round(float(np.mean(f2)), 3) if f2 else None}


# ------------------------------------------------------------------------------------ main
def cmd_demo(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    quiet = args.json or args.quiet
    built = build_chain(out, args.steps, args.ship_steps, args.rebuild, quiet)
    scenario = Path(args.scenario) if args.scenario else DEMO_SCENARIO
    if not scenario.is_file():
        raise CommandError(f"scenario {scenario} not found")
    log(f"fly: {scenario}", quiet)
    report, paths, record = fly(out, scenario, quiet)
    shadow = ((report.get("masks") or {}).get("per_class") or {}).get("shadow") or {}
    result = {"ok": report["ok"], "headline": headline(report), "bundle": built,
              "report": {k: str(p) for k, p in paths.items()},
              "checks": report["checks"], "seconds_total": round(time.perf_counter() - t0, 1),
              "chain": report.get("chain"), "decisions": cell_decisions(record), "ships": ship_scores(record),
              "shadow_iou": shadow.get("iou"), "stac": (report.get("stac") or {}).get("catalog"),
              "figures": {k: report[k] for k in ("accounting", "realtime", "latency_ms", "value", "masks")},
              "data": {k: v for k, v in report["data"].items() if k != "passes"}}
    emit(result, args.json, human)
    return 0 if report["ok"] else 1


def human(r: dict) -> str:
    """The demo's closing text: the report's headline (each step's cells and ms among it) and
    checks, the cells by policy rule, the shadow and ship scores against the generated truth,
    where the report and STAC are."""
    d, sh = r["decisions"], r["ships"]
    cells = ", ".join(f"{k} {v}" for k, v in d["cells"].items())
    shadow = "n/a" if r["shadow_iou"] is None else f"{r['shadow_iou']:.3f}"
    ship = (f"ship IoU {sh['iou']}, precision {sh['precision']}, recall {sh['recall']}; "
            f"{sh['ships_found']}/{sh['ships_visible']} visible ships found; object F2 {sh['object_f2']} "
            f"over {sh['frames_scored']} frames") if sh["iou"] is not None else "no ship mask came down"
    return "\n".join([r["headline"],
                      *(f"  {'pass' if x['ok'] else 'FAIL'}  {x['name']}" for x in r["checks"]),
                      f"frames kept {d['frames']['kept']}, discarded {d['frames']['discarded']}; cells: {cells}",
                      f"against the generated truth: shadow IoU {shadow}; {ship}",
                      f"STAC catalogue: {r['stac'] or 'none'}",
                      f"report: {r['report']['markdown']}  ({r['seconds_total']} s in all)"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eoedge demo", description="The main job, on the embedded default: generated scenes placed "
        "on Earth; a ~100k-parameter cloud student distilled from the ukis-csmask teacher and a "
        "small ship student trained on the scenes' truth, each a signed bundle, packed as one "
        "chain (the cloud model gates the ship model); scenarios/demo.toml flown with it (daemon "
        "as a separate process, faults on); COGs, a STAC catalogue and the headline.")
    p.add_argument("--out", default="runs/demo", help="working folder (default runs/demo)")
    p.add_argument("--steps", type=int, default=RECIPE["steps"],
                   help=f"distillation steps (default {RECIPE['steps']})")
    p.add_argument("--ship-steps", type=int, default=SHIP_RECIPE["steps"],
                   help=f"the ship student's training steps (default {SHIP_RECIPE['steps']})")
    p.add_argument("--rebuild", action="store_true",
                   help="build the bundles even if OUT/bundle.tar, OUT/ships.tar and OUT/chain.tar verify")
    p.add_argument("--scenario", help="fly this scenario instead of scenarios/demo.toml")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_json_flag(p)
    p.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)
