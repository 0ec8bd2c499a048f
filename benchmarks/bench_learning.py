"""What the learning samples' uncertainty output costs the frame pipeline (issue 17).

    .venv/bin/python benchmarks/bench_learning.py                  # 13 x 1024 x 1024, fp32 and bf16
    .venv/bin/python benchmarks/bench_learning.py --size 2048 --frames 4 --json

The same TinyUNet bundle as benchmarks/bench_onboard.py (built there, in a child process with
torch; this process never imports it). Per precision, frame by frame alternately, so that other
load falls on both alike:
- pipeline, plain policy:     FramePipeline.process with the bundle's policy (no `learning`: the
                              frame graph without the scores output, as before issue 17);
- pipeline, learning policy:  the same policy plus {"learning": {"tiles": 2}}: the graph's second
                              output, the choice and the cut of two sample tiles;
- the frame graph alone:      its two compiled variants (without / with the scores output) on the
                              same pre-cut tiles.
Wall and CPU seconds (every thread of the process) per frame; the ISA and the load are printed.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_onboard as bo  # noqa: E402  (no torch at import)

LEARNING = {"tiles": 2, "select": "uncertainty", "score": "entropy"}


def _build(out: str, seed: int, conn) -> None:
    manifest, _, params = bo.build_bundle_dir(Path(out), seed)
    conn.send((manifest, params))


def build(out: Path, seed: int) -> tuple[dict, int]:
    """The bench bundle's files in `out`, built in a spawned child (torch stays there)."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_build, args=(str(out), seed, send))
    child.start()
    manifest, params = recv.recv()
    child.join()
    return manifest, params


def measure(manifest: dict, model_dir: Path, frames: list[np.ndarray], precision: str, n: int) -> dict:
    from onboard.pipeline import GRAPH_INPUT_DTYPE, FramePipeline
    from shared.bands import S2_BANDS
    from shared.tiling import tile

    pipeline = FramePipeline(manifest, model_dir, batch_size=2, precision=precision)
    learning = {**manifest["policy"], "learning": LEARNING}
    pipeline.process(frames[0], S2_BANDS, 1e-4)                        # compile both variants
    pipeline.process(frames[0], S2_BANDS, 1e-4, policy=learning, frame_id="warm")
    gain = (np.float32(1e-4) / pipeline.std).astype(np.float32)
    offset = (-pipeline.mean / pipeline.std).astype(np.float32)
    dtype = GRAPH_INPUT_DTYPE.get(pipeline.precision.running, "uint16")
    graphs = {scores: pipeline.model._mask_variant(dtype, gain, offset, pipeline.thresholds, 1, scores)[1]
              for scores in (False, True)}
    wall = dict.fromkeys(("plain", "learning", "graph", "graph_scores"), 0.0)
    cpu = dict(wall)
    learning_ms = 0.0
    for i in range(n):
        frame = frames[i % len(frames)]
        for name, policy in (("plain", None), ("learning", learning))[:: 1 if i % 2 == 0 else -1]:
            t0, c0 = time.perf_counter(), time.process_time()
            result = pipeline.process(frame, S2_BANDS, 1e-4, policy=policy, frame_id=f"f{i}")
            wall[name] += time.perf_counter() - t0
            cpu[name] += time.process_time() - c0
            learning_ms += result.timings_ms.get("learning", 0.0)
        tiles, _ = tile(frame, bo.TILE, bo.OVERLAP)
        tiles = tiles.astype(dtype)
        for name, queue in (("graph", graphs[False]), ("graph_scores", graphs[True]))[:: 1 if i % 2 == 0 else -1]:
            w, c = bo._run_bare(queue, tiles, 2, {})
            wall[name] += w
            cpu[name] += c
    out = {"precision": precision, "running": pipeline.precision.running, "frames": n,
           "tiles_per_frame": int(len(tiles)), "learning_stage_ms": round(learning_ms / n, 2)}
    for name in wall:
        out[name] = {"s_per_frame": round(wall[name] / n, 4), "cpu_s_per_frame": round(cpu[name] / n, 4)}
    out["pipeline_ratio"] = round(wall["learning"] / wall["plain"], 4)
    out["pipeline_cpu_ratio"] = round(cpu["learning"] / cpu["plain"], 4)
    out["graph_ratio"] = round(wall["graph_scores"] / wall["graph"], 4)
    out["graph_cpu_ratio"] = round(cpu["graph_scores"] / cpu["graph"], 4)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024, help="frame side in pixels (default 1024)")
    ap.add_argument("--frames", type=int, default=6, help="frames per variant (default 6)")
    ap.add_argument("--precisions", default=None, help="comma-separated (default: fp32 and the CPU's bf16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    bo.H = bo.W = args.size
    precisions = args.precisions.split(",") if args.precisions else bo.default_precisions()
    load_before = bo.load_line()
    with tempfile.TemporaryDirectory(prefix="bench-learning-") as tmp:
        manifest, params = build(Path(tmp), args.seed)
        frames = bo.make_frames(2, args.seed)
        rows = [measure(manifest, Path(tmp), frames, p, args.frames) for p in precisions]
    report = {"isa": bo.isa_line(), "load_before": load_before, "load_after": bo.load_line(),
              "frame": [13, args.size, args.size], "params": params, "results": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['isa']}\n{load_before} (before), {report['load_after']} (after)")
    print(f"13 x {args.size} x {args.size} uint16, TinyUNet {params:,} params, tile {bo.TILE} overlap "
          f"{bo.OVERLAP}, batch 2, learning {json.dumps(LEARNING)}")
    print(f"{'':34}{'s/frame':>9}{'CPU s':>8}")
    for r in rows:
        print(f"{r['precision']} ({r['tiles_per_frame']} tiles/frame, {r['frames']} frames each)")
        for name, label in (("plain", "pipeline, plain policy"), ("learning", "pipeline, learning policy"),
                            ("graph", "frame graph alone"), ("graph_scores", "frame graph + scores")):
            print(f"  {label:32}{r[name]['s_per_frame']:9.3f}{r[name]['cpu_s_per_frame']:8.3f}")
        print(f"  learning / plain: wall {r['pipeline_ratio']:.3f}, CPU {r['pipeline_cpu_ratio']:.3f}; "
              f"graph + scores / graph: wall {r['graph_ratio']:.3f}, CPU {r['graph_cpu_ratio']:.3f}; "
              f"learning stage {r['learning_stage_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
