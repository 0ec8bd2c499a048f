"""The uplink bundle, built from an exported model and its run folder, signed, and sized against
the uplink budget.

    eoedge ground bundle runs/x --export export/student --key keys/uplink.key --model-id cloudmask --version 3

What goes in (shared.manifest / shared.bundle contracts):
- `model.xml` + `model.bin`: the IR that `ground export` wrote (FP16 weights);
- `reference.npz`: a few real tiles (reflectance, the manifest's band order, never the held-out
  rows) and the probabilities the IR gives for them, for the daemon's self-test before it
  activates the model (shared.bundle.save_reference layout);
- the manifest: bands and normalisation, tile size and overlap, classes, the operating point
  (per-class thresholds, opening radius) calibrated on the ground, the decision policy, the
  ground metrics (as OpenVINO executes the model, and in emulated FP16), and the lineage (run
  folder, checkpoint, hashes), all signed with Ed25519.

Budget: a bundle over `max_bytes` (default 5 MB, the CloudScout uplink figure) is refused, naming
the sizes. The reference is the part that can be made small without losing anything: its
tiles are stored at float16 precision (exactly representable values in the float32 arrays the
layout prescribes; the expectations are computed *from* the rounded tiles), its probabilities on
a 2^-10 grid (error at most 2^-11, well inside the self-test tolerance), in an LZMA-compressed
.npz, which `numpy.load` reads as any other. For a tight budget,
`reference_window` keeps a real patch of each tile and fills the rest with the band means.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

DEFAULT_MAX_BYTES = 5_000_000          # CloudScout's uplink budget for a model update
MIN_TOLERANCE = 1e-2                   # self-test: max |p_onboard - p_ground| at least this
PROB_STEP = 2.0 ** -10                 # expected probabilities are stored on this grid (exact in fp16/fp32)


def parse_bytes(value: int | str) -> int:
    """5000000, '5MB', '300KB', '1.5MiB' -> bytes (KB/MB are 1000-based, KiB/MiB 1024-based)."""
    if isinstance(value, int):
        return value
    text = str(value).strip().lower().replace(" ", "")
    units = {"kib": 1024, "mib": 1024 ** 2, "kb": 1000, "mb": 1000 ** 2, "k": 1000, "m": 1000 ** 2, "b": 1}
    for unit, scale in units.items():
        if text.endswith(unit):
            try:
                return int(float(text[:-len(unit)]) * scale)
            except ValueError:
                break
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"not a size: {value!r} (use e.g. 5000000, 5MB, 300KB, 1.5MiB)") from None


def write_reference(path: str | os.PathLike, tiles: np.ndarray, probabilities: np.ndarray) -> Path:
    """reference.npz in shared.bundle's layout (`tiles`, `probabilities`, 4-D float32), compressed
    with LZMA. The values should already be float16-representable (see `compact`)."""
    from shared.bundle import REFERENCE_KEYS
    arrays = dict(zip(REFERENCE_KEYS, (np.ascontiguousarray(tiles, np.float32),
                                       np.ascontiguousarray(probabilities, np.float32))))
    path = Path(path)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_LZMA) as z:
        for key, a in arrays.items():
            buf = io.BytesIO()
            np.save(buf, a, allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))   # reproducible bytes
            info.compress_type = zipfile.ZIP_LZMA
            z.writestr(info, buf.getvalue())
    return path


def compact(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to float16 precision (the low mantissa bits zero: they compress)."""
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


def reference_for(xml: Path, bands, mean, std, n: int, tile: int, window: int | None = None) -> dict:
    """`n` real tiles (training rows) at float16 precision and the IR's probabilities for them,
    with how far emulated FP16 (a VPU) strays from them.

    `window` < tile keeps only a real `window` x `window` patch in each tile and fills the rest
    with the normalisation mean (a zero input after normalisation): every weight is still
    exercised, and the constant part costs almost nothing compressed. It is how a reference fits
    a tight uplink budget (a real 256x256 6-band tile is ~0.5 MB however it is compressed)."""
    from ground.export import _softmax, compile_ir, parity_tiles
    if n < 1:
        raise ValueError(f"reference_tiles must be >= 1, got {n}")
    tiles = parity_tiles(bands, None, n=n, tile=tile)
    m = np.asarray(mean, np.float32)[None, :, None, None]
    s = np.asarray(std, np.float32)[None, :, None, None]
    if window is not None:
        if not 8 <= window <= tile:
            raise ValueError(f"reference window must be within 8..{tile} (the tile), got {window}")
        filled = np.broadcast_to(m, tiles.shape).copy()
        filled[:, :, :window, :window] = tiles[:, :, :window, :window]
        tiles = filled
    tiles = compact(tiles)
    probs = _softmax(np.asarray(compile_ir(xml)(((tiles - m) / s).astype(np.float32))[0]))
    # on a 2^-10 grid (error <= 2^-11, a twentieth of the least tolerance): a third of the bytes
    return {"tiles": tiles, "probabilities": (np.round(probs / PROB_STEP) * PROB_STEP).astype(np.float32)}


def _fp16_spread(model, tiles_norm: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """max |p| difference and mask agreement of emulated FP16 against the reference expectations."""
    import torch
    from ground.fp16 import emulate_fp16
    with torch.no_grad():
        p = torch.softmax(emulate_fp16(model)(torch.from_numpy(tiles_norm)), 1).numpy()
    return float(np.abs(p - expected).max()), float(np.mean(p.argmax(1) == expected.argmax(1)))


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


def _metrics(record: dict) -> dict:
    """Ground metrics for the manifest: held-out scores as OpenVINO runs the model and in emulated
    FP16, parity, size and latency."""
    keep = ("miou", "f1", "accuracy", "agreement", "argmax_miou", "iou")
    m = record.get("metrics") or {}
    return _numbers({
        "openvino": {k: m.get("openvino", {}).get(k) for k in keep},
        "fp16_emulated": {k: m.get("fp16_emulated", {}).get(k) for k in keep},
        "parity": {"max_abs_diff": record["parity"].get("max_abs_diff"),
                   "mask_agreement": record["parity"].get("mask_agreement")},
        "params": record.get("params"), "macs_per_tile": record.get("macs"),
        "ms_per_tile_ground_cpu": (record.get("latency") or {}).get("ms_per_tile"),
    })


def bundle_stage(run_dir, export: str, key, model_id: str, version: int, out: str | None = None,
                 max_bytes: int | str = DEFAULT_MAX_BYTES, policy: dict | str | Path | None = None,
                 parent: dict | None = None, reference_tiles: int = 2, reference_window: int | None = None,
                 tile_size: int | None = None, overlap: int | None = None, progress: bool = True) -> dict:
    """Build, sign and verify the bundle of `export` (a folder `ground export` wrote in `run_dir`).

    `tile_size`/`overlap` default to the tiling the model was scored with; another tiling is
    scored again on the held-out image so the manifest's metrics are the ones the daemon's tiling
    gives. Raises shared.bundle.TooLarge (sizes named) when over `max_bytes`."""
    from shared.bundle import TooLarge, build_bundle, load_reference, verify_bundle
    from shared.keys import load_private_key
    from shared.manifest import MODEL_BIN, MODEL_XML, REFERENCE_NAME, make_manifest
    from shared.policy import DEFAULT_POLICY
    from ground.lineage import file_sha256
    from ground.sweep import RunContext
    ctx = RunContext.open(run_dir, progress)
    export_dir = ctx.path(export)
    record_path = export_dir / "export.json"
    if not record_path.is_file():
        raise FileNotFoundError(f"{record_path} not found: run `eoedge ground export` first")
    record = json.loads(record_path.read_text())
    xml, binf = export_dir / "model.xml", export_dir / "model.bin"
    for f in (xml, binf):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found (the export in {export_dir} is incomplete)")
    budget = parse_bytes(max_bytes)
    sk = load_private_key(key)
    if isinstance(policy, (str, Path)):
        ppath = Path(policy)
        if not ppath.is_file():
            raise FileNotFoundError(f"policy file {ppath} not found")
        try:
            policy = json.loads(ppath.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{ppath}: not valid JSON ({exc})") from None
    norm = record["normalization"]
    tile = int(tile_size or record["tile"])
    ov = int(overlap if overlap is not None else min(record["overlap"], tile // 2))
    point = record.get("operating_point") or {"thresholds": [None] * len(record["classes"]),
                                               "opening_radius": ctx.cfg.opening_radius}
    metrics = _metrics(record)
    if (tile, ov) != (record["tile"], record["overlap"]) and ctx.evals:
        # the daemon will tile differently from the evaluation: score that tiling
        from ground.data import Normalization
        from ground.evaluate import OperatingPoint
        from dataclasses import replace
        ctx.cfg = replace(ctx.cfg, tile=tile, overlap=ov)
        op = OperatingPoint(list(point["thresholds"]), int(point["opening_radius"]))
        row = ctx.evaluate(ctx.ir_predict(xml, Normalization.from_dict(norm)), op)
        metrics["openvino"] = _numbers({k: row.get(k) for k in ("miou", "f1", "accuracy", "agreement", "iou")})
        metrics.pop("fp16_emulated", None)
        metrics["tiling"] = {"tile": tile, "overlap": ov}

    staging = ctx.run_dir / "bundles" / f".{model_id}-v{version}"
    staging.mkdir(parents=True, exist_ok=True)
    ref = reference_for(xml, record["bands"], norm["mean"], norm["std"], reference_tiles, tile, reference_window)
    ref_path = write_reference(staging / REFERENCE_NAME, ref["tiles"], ref["probabilities"])
    model, _, _ = ctx.load(record["checkpoint"])
    m = np.asarray(norm["mean"], np.float32)[None, :, None, None]
    s = np.asarray(norm["std"], np.float32)[None, :, None, None]
    spread, agree = _fp16_spread(model, ((ref["tiles"] - m) / s).astype(np.float32), ref["probabilities"])
    # tolerances that an FP16 device (emulated here) passes with margin, and a wrong model fails
    reference = {"file": REFERENCE_NAME, "max_abs_diff": round(max(MIN_TOLERANCE, 2 * spread + PROB_STEP / 2), 4),
                 "min_mask_agreement": round(min(0.99, agree - 0.005), 4)}
    classes = record["classes"]
    thresholds = {c: t for c, t in zip(classes, point["thresholds"]) if t is not None}
    files = {MODEL_XML: xml, MODEL_BIN: binf, REFERENCE_NAME: ref_path}
    lineage = {"run": ctx.run_dir.name, "checkpoint": record["checkpoint"], "export": str(export),
               "label_free": bool(record.get("label_free")), "lineage_sha256": file_sha256(ctx.folder.lineage_path),
               "git_commit": ctx.folder.record.get("git_commit"), "inputs": ctx.folder.record.get("inputs", {}),
               "fp16_weights": bool(record.get("fp16")),
               "reference_tiles": {"count": int(reference_tiles), "window": reference_window,
                                   "from": "training rows of the real imagery (never the held-out rows)",
                                   "fp16_emulated": {"max_abs_diff": spread, "mask_agreement": agree}}}
    manifest = make_manifest(model_id=model_id, version=int(version), bands=record["bands"], mean=norm["mean"],
                             std=norm["std"], classes=classes, tile_size=tile, overlap=ov, activation="softmax",
                             threshold=thresholds, opening_radius=int(point["opening_radius"]),
                             policy=policy or json.loads(json.dumps(DEFAULT_POLICY)), metrics=metrics,
                             reference=reference, lineage=lineage, parent=parent, files=files)
    load_reference(ref_path, manifest)          # the daemon will read it this way
    out_path = Path(out) if out else ctx.run_dir / "bundles" / f"{model_id}-v{version}.tar"
    try:
        build_bundle(out_path, files, manifest, sk, max_bytes=budget)
    except TooLarge as exc:
        hint = "" if reference_window else (" (the reference can shrink: --reference-tiles 1 "
                                            "--reference-window 48)")
        raise TooLarge(f"{exc}{hint}") from None
    verified = verify_bundle(out_path, sk.public_key())
    size = out_path.stat().st_size
    ctx.folder.add_stage(f"bundle:{model_id}-v{version}", [out_path], {"bytes": size},
                         export=str(export), key_id=verified.key_id, max_bytes=budget, files=verified.files)
    return {"bundle": str(out_path), "bytes": size, "max_bytes": budget, "files": verified.files,
            "key_id": verified.key_id, "model_id": model_id, "version": int(version), "tile_size": tile,
            "overlap": ov, "reference": reference, "metrics": metrics, "label_free": lineage["label_free"]}


def cmd_bundle(args) -> int:
    from shared.bundle import BundleError
    from shared.cliutil import CommandError, emit
    parent = None
    if args.parent:
        pid, _, pv = args.parent.partition(":")
        if not pv.isdigit():
            raise CommandError(f"--parent must be MODEL_ID:VERSION, got {args.parent!r}")
        parent = {"model_id": pid, "version": int(pv)}
    try:
        res = bundle_stage(args.run, args.export, args.key, args.model_id, args.version, out=args.out,
                           max_bytes=args.max_bytes, policy=args.policy, parent=parent,
                           reference_tiles=args.reference_tiles, reference_window=args.reference_window,
                           tile_size=args.tile_size, overlap=args.overlap,
                           progress=not args.json)
    except BundleError as exc:
        raise CommandError(f"bundle refused ({exc.reason}): {exc}") from None

    def human(r: dict) -> str:
        files = ", ".join(f"{k} {v:,} B" for k, v in r["files"].items())
        return (f"{r['bundle']}: {r['bytes']:,} bytes (budget {r['max_bytes']:,}), signed by key {r['key_id']}, "
                f"verified\n  {files}\n  tile {r['tile_size']} overlap {r['overlap']}; self-test tolerance "
                f"{r['reference']['max_abs_diff']}, agreement >= {r['reference']['min_mask_agreement']}")
    emit(res, args.json, human)
    return 0


def cmd_inspect(args) -> int:
    from shared.bundle import BundleError, inspect_bundle
    from shared.cliutil import CommandError, emit
    try:
        res = inspect_bundle(args.bundle)
    except BundleError as exc:
        raise CommandError(f"not readable ({exc.reason}): {exc}") from None
    m = res["manifest"]
    emit(res, args.json, lambda r: (
        f"{r['note']}\n{r['path']}: {r['archive_bytes']:,} bytes; model {m.get('model_id')} v{m.get('version')}; "
        f"claimed key {r['claimed_key_id']}\n  members: " + ", ".join(f"{k} {v:,} B" for k, v in r["members"].items())
        + f"\n  metrics: {json.dumps(m.get('metrics', {}).get('openvino', {}))}"
        + (f"\n  manifest error: {r['manifest_error']}" if r["manifest_error"] else "")))
    return 0


def cmd_verify(args) -> int:
    from shared.bundle import BundleError, verify_bundle
    from shared.cliutil import emit
    try:
        res = verify_bundle(args.bundle, args.key, min_version=args.min_version).as_dict()
    except BundleError as exc:
        if args.json:
            emit({"verified": False, "reason": exc.reason, "error": str(exc)}, True)
        import sys
        print(f"rejected ({exc.reason}): {exc}", file=sys.stderr)
        return 1
    emit(res, args.json, lambda r: f"verified: {r['model_id']} v{r['version']}, key {r['key_id']}, "
                                   + ", ".join(f"{k} {v:,} B" for k, v in r["files"].items()))
    return 0


def add_bundle_args(p) -> None:
    p.add_argument("run", help="run folder")
    p.add_argument("--export", required=True, help="the export folder in the run (e.g. export/student)")
    p.add_argument("--key", required=True, help="Ed25519 private key (eoedge shared keygen)")
    p.add_argument("--model-id", required=True, help="model id ([a-z0-9._-])")
    p.add_argument("--version", type=int, required=True, help="bundle version (grows with every bundle)")
    p.add_argument("--parent", help="MODEL_ID:VERSION of the bundle this one replaces")
    p.add_argument("--out", help="bundle path (default: RUN/bundles/MODEL_ID-vVERSION.tar)")
    p.add_argument("--max-bytes", default=str(DEFAULT_MAX_BYTES), help="uplink budget (e.g. 5MB, 300KB)")
    p.add_argument("--policy", help="decision policy JSON file (default: keep everything)")
    p.add_argument("--reference-tiles", type=int, default=2, help="real tiles for the daemon's self-test")
    p.add_argument("--reference-window", type=int,
                   help="keep only a real WxW patch of each reference tile (the rest the mean): a smaller bundle")
    p.add_argument("--tile-size", type=int, help="the daemon's tile (default: the evaluation tile)")
    p.add_argument("--overlap", type=int, help="the daemon's tile overlap")


def add_inspect_args(p) -> None:
    p.add_argument("bundle", help="bundle file (.tar)")


def add_verify_args(p) -> None:
    p.add_argument("bundle", help="bundle file (.tar)")
    p.add_argument("--key", required=True, help="the trusted Ed25519 public key")
    p.add_argument("--min-version", type=int, help="refuse versions below this")
