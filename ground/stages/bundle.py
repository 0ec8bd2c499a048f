"""Bundle stage: the uplink bundle of an export, signed, verified and sized against the budget.

What goes in (shared.manifest / shared.bundle contracts):
- `model.xml` + `model.bin`: the IR that the export stage wrote (FP16 weights);
- `reference.npz`: a few tiles of the run's training imagery (reflectance, the manifest's band
  order, never the held-out rows) and the probabilities the IR gives for them, for the daemon's
  self-test before it activates the model;
- the manifest: bands and normalisation, tile size and overlap, classes, the operating point
  calibrated on the ground, the decision policy, the ground metrics, and the lineage (run folder,
  checkpoint, hashes, where the reference tiles came from), signed with Ed25519.

Device profile (shared.profiles): the bundle is for the profile its export was made for (or the
one asked); the IR is checked against it before anything is signed (IncompatibleIR names the op),
the self-test tolerance is at least the profile's (f16 devices move probabilities more), and the
manifest records it (`profile`).

Budget: a bundle over `max_bytes` (default 5 MB, the CloudScout uplink figure) is refused, naming
the sizes. Its files are stored xz-compressed where that saves bytes (`compress`, on by default:
the IR's XML shrinks ~20x, FP16 weights ~10%; the daemon's slot holds them decoded). The reference
is the part that can be made small without losing anything: its tiles are stored as uint16
Sentinel-2 digital numbers (reflectance x 10^4: lossless for L1C imagery; the expectations are
computed *from* the stored tiles), its probabilities as uint16 steps of 2^-10 (error at most
2^-11, well inside the self-test tolerance), in an LZMA-compressed .npz. For a tight budget,
`reference_window` replaces whole tiles by `reference_windows` small windows per tile, picked
from the run's training imagery (ground.data.reference.pick_windows: every class the model
predicts, then the most decision-boundary pixels, where a wrong model differs first), laid on a
grid in the tile with the band means (a zero input) elsewhere.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from shared.bundle import (PROBABILITY_STEP, REFLECTANCE_STEP, TooLarge, build_bundle, load_reference,
                           on_grid, save_reference, verify_bundle)
from shared.hashing import sha256_file
from shared.keys import load_private_key
from shared.manifest import MODEL_BIN, MODEL_XML, REFERENCE_NAME, make_manifest
from shared.policy import DEFAULT_POLICY
from shared.profiles import DEFAULT_PROFILE, DeviceProfile, get_profile
from shared.units import parse_bytes
from ground.compression.fp16 import emulate_fp16
from ground.data.normalization import Normalization
from ground.data.reference import PRESENT, mosaic, pick_windows
from ground.errors import ConfigError, RunFolderError
from ground.evaluation.operating_point import OperatingPoint
from ground.lineage import StageRecord
from ground.openvino.compat import require_compatible
from ground.openvino.runtime import compile_ir, softmax
from ground.stages.run import Run

DEFAULT_MAX_BYTES = 5_000_000          # CloudScout's uplink budget for a model update
MIN_TOLERANCE = 1e-2                   # self-test: max |p_onboard - p_ground| at least this
PROB_STEP = PROBABILITY_STEP           # expected probabilities are stored on this grid (exact in fp16/fp32)
CANDIDATE_TILES = 32                   # reference windows are picked among this many tiles of the imagery
METRIC_KEYS = ("miou", "f1", "accuracy", "agreement", "argmax_miou", "iou")


def read_export(run: Run, export: str) -> tuple[dict, Path, Path]:
    """(export.json record, model.xml, model.bin) of an export folder of the run."""
    export_dir = run.path(export)
    record_path = export_dir / "export.json"
    if not record_path.is_file():
        raise RunFolderError(f"{record_path} not found: run `eoedge ground export` first")
    xml, binf = export_dir / "model.xml", export_dir / "model.bin"
    for f in (xml, binf):
        if not f.is_file():
            raise RunFolderError(f"{f} not found (the export in {export_dir} is incomplete)")
    return json.loads(record_path.read_text()), xml, binf


def read_policy(policy: dict | str | Path | None) -> dict:
    if policy is None:
        return json.loads(json.dumps(DEFAULT_POLICY))
    if isinstance(policy, dict):
        return policy
    path = Path(policy)
    if not path.is_file():
        raise FileNotFoundError(f"policy file {path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None


def _numbers(d) -> dict:
    """The numeric part of a nested dict (the manifest's metrics take numbers only)."""
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            sub = _numbers(v)
            if sub:
                out[k] = sub
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
            out[k] = v
    return out


def ground_metrics(record: dict) -> dict:
    """Ground metrics for the manifest: held-out scores as OpenVINO runs the model and in emulated
    FP16, parity, size and latency."""
    m = record.get("metrics") or {}
    return _numbers({
        "openvino": {k: m.get("openvino", {}).get(k) for k in METRIC_KEYS},
        "fp16_emulated": {k: m.get("fp16_emulated", {}).get(k) for k in METRIC_KEYS},
        "parity": {"max_abs_diff": record["parity"].get("max_abs_diff"),
                   "mask_agreement": record["parity"].get("mask_agreement")},
        "params": record.get("params"), "macs_per_tile": record.get("macs"),
        "ms_per_tile_ground_cpu": (record.get("latency") or {}).get("ms_per_tile"),
    })


def retiled_metrics(run: Run, xml: Path, record: dict, point: dict, tile: int, overlap: int) -> dict:
    """The held-out scores with the daemon's tiling, when it differs from the evaluation's."""
    retiled = Run(replace(run.cfg, tile=tile, overlap=overlap), run.folder, run.progress)
    retiled.share_inputs(run)                 # the same data and teacher, another tiling; `run` is unchanged
    op = OperatingPoint(list(point["thresholds"]), int(point["opening_radius"]))
    row = retiled.evaluate(retiled.ir_predict(xml, Normalization.from_dict(record["normalization"])), op)
    return _numbers({k: row.get(k) for k in ("miou", "f1", "accuracy", "agreement", "iou")})


def reference_for(run: Run, xml: Path, norm: dict, n: int, tile: int, window: int | None = None,
                  precision: str = "fp32", windows: int = 1) -> dict:
    """`n` reference tiles of the run's training imagery on the stored grid and the IR's
    probabilities for them (as the daemon will compute them).

    `window` < tile: each tile instead holds `windows` real `window` x `window` patches picked
    among the first CANDIDATE_TILES tiles of the imagery (every class the IR predicts, then the
    most decision-boundary pixels), on a grid, with the normalisation mean (a zero input after
    normalisation) elsewhere: every weight is still exercised, the constant part costs almost
    nothing compressed (a real 256x256 6-band tile is ~0.5 MB however it is compressed)."""
    if n < 1:
        raise ConfigError(f"reference_tiles must be >= 1, got {n}")
    if windows < 1:
        raise ConfigError(f"reference_windows must be >= 1, got {windows}")
    m = np.asarray(norm["mean"], np.float32)[None, :, None, None]
    s = np.asarray(norm["std"], np.float32)[None, :, None, None]
    model = compile_ir(xml, precision=precision)

    def probabilities(tiles: np.ndarray) -> np.ndarray:
        return softmax(np.asarray(model(((tiles - m) / s).astype(np.float32))[0]))

    if window is None:
        tiles, where = run.tiles(n, None, tile)
    else:
        if not 8 <= window <= tile:
            raise ConfigError(f"reference window must be within 8..{tile} (the tile), got {window}")
        candidates, origin = run.tiles(CANDIDATE_TILES, None, tile)
        candidates = on_grid(candidates, REFLECTANCE_STEP)
        picks = pick_windows(np.concatenate([probabilities(c[None]) for c in candidates]), window, n * windows)
        tiles, placed = mosaic(candidates, picks, window, windows, m[0, :, 0, 0])
        where = [{**origin[p["tile"]], "window": {"row": origin[p["tile"]]["row"] + p["row"],
                                                  "col": origin[p["tile"]]["col"] + p["col"], "size": window},
                  "in_reference": at, "boundary": round(p["boundary"], 3),
                  "classes": [int(k) for k in np.flatnonzero(p["shares"] >= PRESENT)]}
                 for p, at in zip(picks, placed)]
    tiles = on_grid(tiles, REFLECTANCE_STEP)
    normalised = ((tiles - m) / s).astype(np.float32)
    probs = probabilities(tiles)
    # on a 2^-10 grid (error <= 2^-11, a twentieth of the least tolerance): stored as uint16 steps
    return {"tiles": tiles, "normalised": normalised, "where": where,
            "probabilities": on_grid(probs, PROBABILITY_STEP)}


def self_test_tolerance(model, ref: dict, precision: str = "fp32",
                        profile: DeviceProfile | None = None) -> tuple[dict, float, float]:
    """Tolerances another implementation of the precision passes with margin and a wrong model
    fails: (manifest reference section without the file, max |p| spread, mask agreement). The
    spread is measured against emulated FP16 (a VPU) for fp32/fp16 bundles, and against torch FP32
    for bf16/int8 ones (another CPU's kernels land between the two). The tolerances are at least
    `profile`'s self-test ones."""
    other = emulate_fp16(model) if precision in ("fp32", "fp16") else model.eval()
    with torch.no_grad():
        p = torch.softmax(other(torch.from_numpy(ref["normalised"])), 1).numpy()
    spread = float(np.abs(p - ref["probabilities"]).max())
    agree = float(np.mean(p.argmax(1) == ref["probabilities"].argmax(1)))
    least = profile.self_test if profile else None
    tolerance = {"max_abs_diff": round(max(MIN_TOLERANCE, least.max_abs_diff if least else 0.0,
                                           2 * spread + PROB_STEP / 2), 4),
                 "min_mask_agreement": round(min(0.99, least.min_mask_agreement if least else 1.0,
                                                 agree - 0.005), 4)}
    return tolerance, spread, agree


def manifest_lineage(run: Run, record: dict, export: str, tiles_from: list, window: int | None,
                     spread: dict, windows: int = 1) -> dict:
    """What the bundle says it came from: run, checkpoint, export, hashes, the reference tiles."""
    return {"run": run.run_dir.name, "checkpoint": record["checkpoint"], "export": str(export),
            "label_free": bool(record.get("label_free")), "lineage_sha256": sha256_file(run.folder.lineage_path),
            "git_commit": run.folder.record.get("git_commit"), "inputs": run.folder.record.get("inputs", {}),
            "fp16_weights": bool(record.get("fp16")),
            "reference_tiles": {"count": len(tiles_from), "window": window,
                                "windows_per_tile": windows if window else None, "tiles": tiles_from,
                                "from": "the run's training imagery (never the held-out evaluation data)",
                                "spread_vs_other_implementation": spread}}


def bundle(run: Run, export: str, key, model_id: str, version: int, out: str | None = None,
           max_bytes: int | str = DEFAULT_MAX_BYTES, policy: dict | str | Path | None = None,
           parent: dict | None = None, reference_tiles: int = 2, reference_window: int | None = None,
           tile_size: int | None = None, overlap: int | None = None, profile: str | None = None,
           reference_windows: int = 1, compress: bool = True, lineage_extra: dict | None = None) -> dict:
    """Build, sign and verify the bundle of `export` (a folder the export stage wrote in the run).

    `tile_size`/`overlap` default to the tiling the model was scored with; another tiling is
    scored again on the held-out image so the manifest's metrics are the ones the daemon's tiling
    gives. `profile` defaults to the export's; the IR is checked against it before anything is
    signed (IncompatibleIR names the op). Raises shared.bundle.TooLarge (sizes named) when over
    `max_bytes`. `reference_window`/`reference_windows`: see reference_for; `compress`: files
    stored xz-compressed where that is smaller (shared.bundle.build_bundle). `lineage_extra`: more
    of what the model came from, merged into the manifest's lineage (e.g. `redistil`)."""
    record, xml, binf = read_export(run, export)
    target = get_profile(profile or record.get("profile", DEFAULT_PROFILE))
    require_compatible(xml, target)
    budget = parse_bytes(max_bytes)
    sk = load_private_key(key)
    policy = read_policy(policy)
    norm = record["normalization"]
    tile = int(tile_size or record["tile"])
    ov = int(overlap if overlap is not None else min(record["overlap"], tile // 2))
    point = record.get("operating_point") or {"thresholds": [None] * len(record["classes"]),
                                               "opening_radius": run.cfg.opening_radius}
    metrics = ground_metrics(record)
    if (tile, ov) != (record["tile"], record["overlap"]) and run.evals:
        metrics["openvino"] = retiled_metrics(run, xml, record, point, tile, ov)
        metrics.pop("fp16_emulated", None)
        metrics["tiling"] = {"tile": tile, "overlap": ov}
    staging = run.run_dir / "bundles" / f".{model_id}-v{version}"
    staging.mkdir(parents=True, exist_ok=True)
    precision = record.get("precision", "fp32")
    ref = reference_for(run, xml, norm, reference_tiles, tile, reference_window, precision, reference_windows)
    ref_path = save_reference(staging / REFERENCE_NAME, ref["tiles"], ref["probabilities"])
    model, _, _ = run.load(record["checkpoint"])
    tolerance, spread, agree = self_test_tolerance(model, ref, precision, target)
    classes = record["classes"]
    files = {MODEL_XML: xml, MODEL_BIN: binf, REFERENCE_NAME: ref_path}
    lineage = manifest_lineage(run, record, export, ref["where"], reference_window,
                               {"max_abs_diff": spread, "mask_agreement": agree}, reference_windows)
    lineage.update(lineage_extra or {})
    manifest = make_manifest(model_id=model_id, version=int(version), bands=record["bands"], mean=norm["mean"],
                             std=norm["std"], classes=classes, tile_size=tile, overlap=ov, activation="softmax",
                             threshold={c: t for c, t in zip(classes, point["thresholds"]) if t is not None},
                             opening_radius=int(point["opening_radius"]), policy=policy, metrics=metrics,
                             reference={"file": REFERENCE_NAME, **tolerance}, lineage=lineage, parent=parent,
                             files=files, precision=precision, profile=target.name,
                             gsd_m=run.cfg.gsd_m)         # the daemon bins frames to it
    load_reference(ref_path, manifest)          # the daemon will read it this way
    out_path = Path(out) if out else run.run_dir / "bundles" / f"{model_id}-v{version}.tar"
    try:
        build_bundle(out_path, files, manifest, sk, max_bytes=budget, compress=compress)
    except TooLarge as exc:
        hint = "" if reference_window else " (the reference can shrink: --reference-tiles 1 --reference-window 48)"
        raise TooLarge(f"{exc}{hint}") from None
    verified = verify_bundle(out_path, sk.public_key())
    size = out_path.stat().st_size
    run.folder.add(StageRecord(f"bundle:{model_id}-v{version}", [out_path],
                               inputs={"export": str(export), "checkpoint": record["checkpoint"],
                                       "reference_tiles": ref["where"]},
                               params={"key_id": verified.key_id, "max_bytes": budget, "files": verified.files,
                                       "profile": target.name},
                               metrics={"bytes": size}, label_free=lineage["label_free"]))
    return {"bundle": str(out_path), "bytes": size, "max_bytes": budget, "files": verified.files,
            "stored": verified.stored, "precision": precision,
            "profile": target.name,
            "key_id": verified.key_id, "model_id": model_id, "version": int(version), "tile_size": tile,
            "overlap": ov, "reference": {"file": REFERENCE_NAME, **tolerance}, "metrics": metrics,
            "label_free": lineage["label_free"]}
