"""`eoedge ground export | bundle`: what flies, from a run folder. (Verifying and inspecting a
bundle is `eoedge shared bundle verify|inspect`: one implementation, in the contracts.)"""
from __future__ import annotations

from shared.cliutil import CommandError, emit
from ground.stages.bundle import bundle
from ground.stages.export import export
from ground.stages.gap import deployment_gap, gap_table
from ground.stages.run import Run


def _export_text(r: dict) -> str:
    p = r["parity"]
    lines = [f"{r['out_dir']} ({r['precision']}, for {r['profile']}): "
             + ", ".join(f"{k} {v:,} B" for k, v in r["files"].items()),
             f"parity on {p['tiles']} tiles of the run's imagery: max |p_IR - p_torch| {p['max_abs_diff']:.2e}, "
             f"mask agreement {p['mask_agreement']:.5f}"]
    if "metrics" in r:
        lines.append(f"held-out mIoU: {r['metrics']['openvino']['miou']:.4f} (OpenVINO), "
                     f"{r['metrics']['fp16_emulated']['miou']:.4f} (emulated FP16)")
    lat = r["latency"]
    lines.append(f"OpenVINO CPU: {lat['ms_per_tile']:.1f} ms per {r['tile']}x{r['tile']} tile "
                 f"({lat['threads']} thread(s), load {lat['load_avg_1min'][0]:.1f})")
    return "\n".join(lines)


def cmd_export(args) -> int:
    run = Run.open(args.run, progress=not args.json)
    res = export(run, args.checkpoint, args.name, fp16=not args.fp32, onnx=args.onnx, evaluate=not args.no_eval,
                 threads=args.threads, precision=args.precision, max_drop=args.max_drop, qat_steps=args.qat_steps,
                 profile=args.profile)
    emit(res, args.json, _export_text)
    return 0


def parse_parent(text: str | None) -> dict | None:
    if not text:
        return None
    pid, _, pv = text.partition(":")
    if not pid or not pv.isdigit():
        raise CommandError(f"--parent must be MODEL_ID:VERSION, got {text!r}")
    return {"model_id": pid, "version": int(pv)}


def _bundle_text(r: dict) -> str:
    files = ", ".join(f"{k} {v:,} B" for k, v in r["files"].items())
    return (f"{r['bundle']}: {r['bytes']:,} bytes (budget {r['max_bytes']:,}), for {r['profile']}, "
            f"signed by key {r['key_id']}, "
            f"verified\n  {files}\n  tile {r['tile_size']} overlap {r['overlap']}; self-test tolerance "
            f"{r['reference']['max_abs_diff']}, agreement >= {r['reference']['min_mask_agreement']}")


def cmd_bundle(args) -> int:
    run = Run.open(args.run, progress=not args.json)
    res = bundle(run, args.export, args.key, args.model_id, args.version, out=args.out, max_bytes=args.max_bytes,
                 policy=args.policy, parent=parse_parent(args.parent), reference_tiles=args.reference_tiles,
                 reference_window=args.reference_window, tile_size=args.tile_size, overlap=args.overlap,
                 profile=args.profile)
    emit(res, args.json, _bundle_text)
    return 0


def cmd_gap(args) -> int:
    run = Run.open(args.run, progress=not args.json)
    res = deployment_gap(run, args.checkpoint, args.name, threads=args.threads, rounds=args.rounds,
                         max_drop=args.max_drop, qat_steps=args.qat_steps)
    emit(res, args.json, lambda r: gap_table(r) + f"\nwritten: {r['out_dir']}/gap.{{json,md}}")
    return 0
