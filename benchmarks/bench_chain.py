"""Model chains: the time a cloud gate saves a ship model on cloudy frames.

    .venv/bin/python benchmarks/bench_chain.py                 # 4 generated 1024 x 1024 frames
    .venv/bin/python benchmarks/bench_chain.py --frames 6 --size 2048 --json

What runs:
- frames: flight_sim.generator scenes (land, water, clouds and their shadows, ships), cloud cover
  from 30% to 90% across the frames, the 6 bands B02 B03 B04 B08 B11 B12 as uint16 digital
  numbers (reflectance x 10,000);
- the gate: the test suite's brightness cloud model (tests/onboard_models.py: a 1x1 convolution,
  clear / cloud / shadow), 128 x 128 tiles, overlap 16: a cell is 128 x 128 frame pixels;
- the target: a ship model the size of a small segmentation network (four 3x3 convolutions of 16
  channels, ReLU, a 1x1 head to sea / ship: 7,840 multiply-adds per pixel, about TinyUNet
  (8, 16, 32, 64)'s 10,000; random weights: speed does not depend on them), 128 x 128 tiles,
  overlap 16, built with OpenVINO's opset API (no torch);
- both signed as bundles, chained by shared.chain.build_chain_bundle with the ship's run_if
  {"class": "cloud", "fraction_below": 0.5}, installed by onboard.store.ModelStore (each step
  verified and self-tested), then run by ChainPipeline.process (the chain) and by its
  `everywhere()` (the same steps, each model on the whole frame), alternating frame by frame so
  that load from other processes falls on both alike.
Prints ms per frame of each (the best of --rounds, the run least disturbed by other processes,
and the median), their ratio, the cells the ship model ran on and the ship tiles it inferred
(the work, whatever the load), the agreement of the two ship masks on those cells (the boxes'
edges are the only difference), the CPU and its ISA, and the load. Figures depend on the machine
and its load.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_onboard import isa_line, load_line  # noqa: E402

BANDS = ("B02", "B03", "B04", "B08", "B11", "B12")
TILE, OVERLAP = 128, 16
SHIP_WIDTH, SHIP_DEPTH = 16, 4
RUN_IF = {"class": "cloud", "fraction_below": 0.5}
POLICY = {"rules": [{"if": {"class": "cloud", "fraction_above": 0.6}, "then": "discard"},
                    {"if": {"class": "ship", "largest_component_at_least": 4}, "then": "keep",
                     "priority": 1}],
          "default": {"then": "discard"}}


def ship_ir(out: Path, seed: int = 0) -> dict[str, Path]:
    """model.xml/.bin of the ship model and reference.npz (2 tiles, its own f32 outputs)."""
    import openvino as ov
    import openvino.opset13 as ops

    from shared.bundle import PROBABILITY_STEP, REFLECTANCE_STEP, on_grid, save_reference

    rng = np.random.default_rng(seed)
    x = ops.parameter(ov.PartialShape([-1, len(BANDS), TILE, TILE]), ov.Type.f32, name="tiles")
    y, channels = x, len(BANDS)
    for _ in range(SHIP_DEPTH):
        w = rng.normal(0, np.sqrt(2 / (9 * channels)), (SHIP_WIDTH, channels, 3, 3)).astype(np.float32)
        y = ops.relu(ops.convolution(y, ops.constant(w), [1, 1], [1, 1], [1, 1], [1, 1]))
        channels = SHIP_WIDTH
    head = rng.normal(0, 0.1, (2, channels, 1, 1)).astype(np.float32)
    y = ops.add(ops.convolution(y, ops.constant(head), [1, 1], [0, 0], [0, 0], [1, 1]),
                ops.constant(np.array([2.0, -2.0], np.float32).reshape(1, 2, 1, 1)))
    out.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.Model([ops.result(y)], [x], "ship"), out / "model.xml", compress_to_fp16=True)
    tiles = on_grid(rng.uniform(0, 0.4, (2, len(BANDS), TILE, TILE)), REFLECTANCE_STEP)
    mean, std = np.float32(0.1), np.float32(0.05)
    logits = ov.Core().compile_model(out / "model.xml", "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(
        (tiles - mean) / std)[0]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    save_reference(out / "reference.npz", tiles, on_grid(e / e.sum(axis=1, keepdims=True), PROBABILITY_STEP))
    return {n: out / n for n in ("model.xml", "model.bin", "reference.npz")}


def build_chain(work: Path):
    """The two signed step bundles, the chain, and the chain installed (steps self-tested)."""
    from onboard_models import CLASSES_3, make_test_manifest, make_test_model_files
    from onboard.store import ModelStore
    from shared.bundle import build_bundle
    from shared.chain import build_chain_bundle
    from shared.keys import generate_keypair
    from shared.manifest import make_manifest

    sk, pk = generate_keypair(work / "keys")
    files = make_test_model_files(work / "cloud", bands=BANDS, classes=CLASSES_3, tile=TILE, n_reference=2)
    cloud = build_bundle(work / "cloud.tar", files, make_test_manifest(
        files, model_id="cloud-gate", tile=TILE, overlap=OVERLAP, policy={"rules": []}), sk)
    files = ship_ir(work / "ship")
    ship = build_bundle(work / "ship.tar", files, make_manifest(
        model_id="ship-bench", version=1, bands=BANDS, mean=[0.1] * 6, std=[0.05] * 6,
        classes=("sea", "ship"), tile_size=TILE, overlap=OVERLAP, threshold={}, policy={"rules": []},
        reference={"file": "reference.npz", "max_abs_diff": 1e-2, "min_mask_agreement": 0.99},
        files=files), sk)
    chain = build_chain_bundle(work / "chain.tar", [("cloud", cloud, None), ("ship", ship, RUN_IF)],
                               POLICY, sk, "bench-chain", 1)
    store = ModelStore(work / "store", pk)
    result = store.install(chain)
    if not result.ok:
        raise SystemExit(f"the chain did not install: {result.reason}")
    return result.pipeline, chain.stat().st_size


def make_frames(n: int, size: int, seed: int) -> list[tuple[float, np.ndarray]]:
    """(requested cloud cover, uint16 frame) from flight_sim.generator, cover 0.3 .. 0.9."""
    from flight_sim.generator import generate_scene

    covers = np.linspace(0.3, 0.9, n) if n > 1 else [0.6]
    frames = []
    for i, cover in enumerate(covers):
        scene, _ = generate_scene(size, size, seed + i, cloud_cover=float(cover), ships=40)
        data = scene.select(BANDS).data
        frames.append((float(cover), np.clip(np.rint(data * 1e4), 0, 65535).astype(np.uint16)))
    return frames


def ship_tiles(passing: np.ndarray, size: int) -> int:
    """Tiles the ship model infers on the boxes of passing cells (onboard.chain's calls)."""
    from onboard.chain import passing_boxes
    from shared.tiling import TileGrid

    return sum(len(TileGrid(min(i1 * TILE, size) - i0 * TILE, min(j1 * TILE, size) - j0 * TILE, TILE, OVERLAP))
               for i0, i1, j0, j1 in passing_boxes(passing))


def measure(chain, frames, rounds: int) -> dict:
    everywhere = chain.everywhere()
    chain.process(frames[0][1], BANDS, 1e-4)              # warm-up: compiled kernels, buffers
    everywhere.process(frames[0][1], BANDS, 1e-4)
    rows = []
    for k, (cover, frame) in enumerate(frames):
        ms = {"chain": [], "everywhere": []}
        for r in range(rounds):
            order = (chain, everywhere) if (k + r) % 2 == 0 else (everywhere, chain)
            for pipeline in order:
                t0 = time.perf_counter()
                result = pipeline.process(frame, BANDS, 1e-4)
                ms["chain" if pipeline is chain else "everywhere"].append((time.perf_counter() - t0) * 1e3)
                if pipeline is chain:
                    got = result
                else:
                    full = result
        ship = got.chain[1]
        ran = got.step_masks["ship"] != 255
        agree = float(np.mean(got.step_masks["ship"][ran] == full.step_masks["ship"][ran])) if ran.any() else 1.0
        passing = np.array(["ship" in t["steps_run"] for t in got.tile_decisions])
        grid = -(-frame.shape[1] // TILE), -(-frame.shape[2] // TILE)
        rows.append({"cloud_cover": cover, "cloud_fraction": got.stats["fractions"]["cloud"],
                     "cells_run": ship["cells_run"], "cells_total": ship["cells_total"],
                     "ship_tiles": ship_tiles(passing.reshape(grid), frame.shape[1]),
                     "ship_tiles_everywhere": ship_tiles(np.ones(grid, bool), frame.shape[1]),
                     "chain_ms": float(np.min(ms["chain"])),
                     "everywhere_ms": float(np.min(ms["everywhere"])),
                     "chain_ms_median": float(np.median(ms["chain"])),
                     "everywhere_ms_median": float(np.median(ms["everywhere"])),
                     "ship_ms_chain": got.chain[1]["ms"], "ship_ms_everywhere": full.chain[1]["ms"],
                     "gate_ms": got.chain[0]["ms"], "ship_agreement_on_cells_run": agree,
                     "kept": got.keep})
    chain_ms = sum(r["chain_ms"] for r in rows)
    every_ms = sum(r["everywhere_ms"] for r in rows)
    medians = sum(r["chain_ms_median"] for r in rows) / sum(r["everywhere_ms_median"] for r in rows)
    return {"frames": rows, "chain_ms_per_frame": chain_ms / len(rows),
            "everywhere_ms_per_frame": every_ms / len(rows), "ratio": chain_ms / every_ms,
            "time_saved": 1 - chain_ms / every_ms, "ratio_of_medians": medians,
            "ship_tiles": sum(r["ship_tiles"] for r in rows),
            "ship_tiles_everywhere": sum(r["ship_tiles_everywhere"] for r in rows),
            "cells_run": sum(r["cells_run"] for r in rows), "cells_total": sum(r["cells_total"] for r in rows)}


def human(r: dict) -> str:
    lines = [f"model chain benchmark: {len(r['frames'])} generated {r['size']} x {r['size']} frames, 6 bands uint16; "
             f"gate: brightness cloud model, target: ship model ({SHIP_DEPTH} x conv3x3 of {SHIP_WIDTH}), "
             f"tiles {TILE}, overlap {OVERLAP}; chain bundle {r['bundle_bytes']:,} bytes",
             f"{'cover':>6} {'cloud':>6} {'ship cells':>11} {'ship tiles':>11} {'chain ms':>9} {'both ms':>9} "
             f"{'ratio':>6} {'gate ms':>8} {'ship ms':>8} {'ship ms all':>11} {'agree':>7}"]
    for f in r["frames"]:
        lines.append(f"{f['cloud_cover']:6.2f} {f['cloud_fraction']:6.3f} {f['cells_run']:>5}/{f['cells_total']:<5} "
                     f"{f['ship_tiles']:>5}/{f['ship_tiles_everywhere']:<5} "
                     f"{f['chain_ms']:9.1f} {f['everywhere_ms']:9.1f} {f['chain_ms'] / f['everywhere_ms']:6.3f} "
                     f"{f['gate_ms']:8.1f} {f['ship_ms_chain']:8.1f} {f['ship_ms_everywhere']:11.1f} "
                     f"{f['ship_agreement_on_cells_run']:7.4f}")
    lines += [f"mean (best of {r['rounds']}): chain {r['chain_ms_per_frame']:.1f} ms per frame, both models "
              f"everywhere {r['everywhere_ms_per_frame']:.1f} ms: ratio {r['ratio']:.3f}, time saved "
              f"{100 * r['time_saved']:.1f}% (medians: ratio {r['ratio_of_medians']:.3f}); the ship model on "
              f"{r['cells_run']} of {r['cells_total']} cells, {r['ship_tiles']} of {r['ship_tiles_everywhere']} tiles",
              f"CPU: {r['cpu']}", f"load before: {r['load_before']}", f"load after:  {r['load_after']}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024, help="frame side in pixels (10 m)")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each frame per pipeline (best and median)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    load_before = load_line()
    with tempfile.TemporaryDirectory(prefix="bench-chain-") as tmp:
        chain, size = build_chain(Path(tmp))
        frames = make_frames(args.frames, args.size, args.seed)
        result = measure(chain, frames, args.rounds)
    result.update(size=args.size, rounds=args.rounds, bundle_bytes=size, cpu=isa_line(), load_before=load_before,
                  load_after=load_line())
    print(json.dumps(result, indent=2) if args.json else human(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
