"""The on-board frame pipeline against bare OpenVINO inference and a torch-eager pipeline.

    .venv/bin/python benchmarks/bench_onboard.py                # 13-band 2048 x 2048 frames
    .venv/bin/python benchmarks/bench_onboard.py --frames 6 --json
    .venv/bin/python benchmarks/bench_onboard.py --precision bf16   # OpenVINO's CPU default here

What runs (a TinyUNet, widths (8, 16, 32, 64), 13 bands in, exported to an FP16 IR; random
weights: speed does not depend on them):
- pipeline:  onboard.pipeline.FramePipeline.process on uint16 frames, every stage (validate,
             tile + infer + threshold, opening, statistics, policy, products);
- bare:      the same IR, compiled the same way (same batch, same AsyncInferQueue size), on the
             same frame's tiles cut beforehand, handed to the requests without a copy; twice:
             with the scaling in the graph (uint16 tiles, as the pipeline runs it) and as the
             plain IR on normalised float32 tiles. The floor compares with the faster of the two;
- torch:     the same steps in torch eager (normalise, unfold into tiles, forward, softmax,
             centre-stitch, threshold) and the same OpenCV/numpy code for opening, statistics,
             policy and products.
Pipeline and bare runs alternate frame by frame so that load from other processes falls on both
alike. The OpenVINO part runs in a child process without torch: its peak RSS is what the
daemon would need. Figures depend on the machine and its load (printed with them).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

H = W = 2048
TILE, OVERLAP = 256, 32
CLASSES = ("clear", "cloud", "shadow")
WIDTHS = (8, 16, 32, 64)
POLICY = {"rules": [{"if": {"class": "cloud", "fraction_above": 0.6}, "then": "discard"},
                    {"if": {"class": "shadow", "fraction_above": 0.05}, "then": "keep", "priority": 1}],
          "default": {"then": "keep", "priority": 5}}
FLOOR_VS_BARE, FLOOR_VS_TORCH = 0.85, 2.0


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM; ru_maxrss would carry over the RSS of the
    parent that forked a spawned child, torch included)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


def make_frames(n: int, seed: int) -> list[np.ndarray]:
    """13-band uint16 frames (reflectance x 10000) with smooth cloud-like structure and noise,
    built band by band (no 13-band float temporaries to inflate the peak RSS)."""
    import cv2

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        field = cv2.resize(rng.random((16, 16), dtype=np.float32), (W, H), interpolation=cv2.INTER_CUBIC)
        base = 0.05 + 0.5 * np.clip(field, 0, 1)                         # 0.05 .. 0.55 reflectance
        frame = np.empty((13, H, W), np.uint16)
        for b in range(13):
            band = base * np.float32(rng.uniform(0.8, 1.2)) + rng.normal(0, 0.01, (H, W)).astype(np.float32)
            frame[b] = np.clip(band * 1e4, 0, 65535)
        frames.append(frame)
    return frames


# ------------------------------------------------------------------------------------------------
# building the model (parent process, torch)

def build_bundle_dir(out: Path, seed: int) -> tuple[dict, Path, int]:
    import openvino as ov
    import torch

    from ground.models.tiny_unet import TinyUNet
    from shared.bands import S2_BANDS
    from shared.bundle import save_reference
    from shared.manifest import make_manifest

    torch.manual_seed(seed)
    model = TinyUNet(13, len(CLASSES), widths=WIDTHS).eval()
    params = sum(p.numel() for p in model.parameters())
    ov.save_model(ov.convert_model(model, example_input=torch.zeros(1, 13, TILE, TILE)), out / "model.xml")
    mean = [0.12 + 0.005 * i for i in range(13)]
    std = [0.08 + 0.002 * i for i in range(13)]
    tiles = np.random.default_rng(seed).uniform(0, 0.5, (2, 13, TILE, TILE)).astype(np.float32)
    with torch.inference_mode():
        x = (torch.from_numpy(tiles) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        probs = torch.softmax(model(x.float()), dim=1).numpy()
    save_reference(out / "reference.npz", tiles, probs)
    manifest = make_manifest(
        model_id="bench-tinyunet", version=1, bands=S2_BANDS, mean=mean, std=std, classes=CLASSES,
        tile_size=TILE, overlap=OVERLAP, threshold={"cloud": 0.5}, opening_radius=2, policy=POLICY,
        files={n: out / n for n in ("model.xml", "model.bin", "reference.npz")})
    torch.save(model.state_dict(), out / "model.pt")
    return manifest, out, params


# ------------------------------------------------------------------------------------------------
# OpenVINO side (child process: no torch)

def _bare_model(model_dir: Path, dtype: str, args):
    """A queue set up like the pipeline's; for float32, the plain IR (no scaling in the graph)."""
    import openvino as ov

    from onboard.runtime import DEFAULT_CONFIG, OpenVinoModel
    config = {**DEFAULT_CONFIG, "INFERENCE_PRECISION_HINT": args.precision}
    if dtype == "uint16":
        m = OpenVinoModel(model_dir / "model.xml", num_requests=args.num_requests, tile=TILE,
                          batch_size=args.batch_size, activation="softmax", config=config)
        compiled, queue, _ = m._variant("uint16")
        return compiled, queue
    core = ov.Core()
    model = core.read_model(model_dir / "model.xml")
    model.reshape({model.inputs[0]: [args.batch_size, 13, TILE, TILE]})
    compiled = core.compile_model(model, "CPU", config)
    n = args.num_requests or compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
    return compiled, ov.AsyncInferQueue(compiled, n)


def _run_bare(queue, tiles: np.ndarray, batch: int, extra: dict) -> float:
    """Seconds to push pre-cut tiles through the queue, shared (not copied) into the requests."""
    n = len(tiles) - len(tiles) % batch            # whole batches only: a static-shape model
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        queue.start_async({0: tiles[start:start + batch], **extra}, share_inputs=True)
    queue.wait_all()
    return (time.perf_counter() - t0) * len(tiles) / n


def openvino_side(manifest: dict, model_dir: str, args, conn) -> None:
    try:
        conn.send(_openvino_side(manifest, Path(model_dir), make_frames(args.distinct, args.seed), args))
    except BaseException as exc:  # noqa: BLE001 (reported by the parent)
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    conn.close()


def _openvino_side(manifest: dict, model_dir: Path, frames: list[np.ndarray], args) -> dict:
    from tqdm import tqdm

    from onboard.pipeline import FramePipeline
    from onboard.runtime import DEFAULT_CONFIG
    from shared.bands import S2_BANDS
    from shared.tiling import tile

    config = {**DEFAULT_CONFIG, "INFERENCE_PRECISION_HINT": args.precision}
    rss_start = peak_rss_mb()       # python, numpy, openvino and the frames
    pipeline = FramePipeline(manifest, model_dir, batch_size=args.batch_size,
                             num_requests=args.num_requests, config=config)
    self_test = pipeline.self_test(model_dir / "reference.npz")
    pipeline.process(frames[0], S2_BANDS, 1e-4)                      # warm-up: first-use compile
    rss_pipeline = peak_rss_mb()
    bare16, bare32 = _bare_model(model_dir, "uint16", args), _bare_model(model_dir, "float32", args)
    mean = np.asarray(manifest["input"]["scaling"]["mean"], np.float32)[:, None, None]
    std = np.asarray(manifest["input"]["scaling"]["std"], np.float32)[:, None, None]
    scaling = {1: (np.float32(1e-4) / std).reshape(1, 13, 1, 1), 2: (-mean / std).reshape(1, 13, 1, 1)}
    stage_sums: dict[str, float] = {}
    t_pipe = t_bare16 = t_bare32 = 0.0
    kept, masks = 0, []
    n_tiles = 0
    for i in tqdm(range(args.frames), desc="openvino frames", unit="frame", file=sys.stderr):
        frame = frames[i % len(frames)]
        t0 = time.perf_counter()
        result = pipeline.process(frame, S2_BANDS, 1e-4)
        t_pipe += time.perf_counter() - t0
        for k, v in result.timings_ms.items():
            stage_sums[k] = stage_sums.get(k, 0.0) + v
        kept += result.keep
        if i < len(frames):
            masks.append(result.class_mask.copy())
        tiles16, _ = tile(frame, TILE, OVERLAP)
        n_tiles = len(tiles16)
        t_bare16 += _run_bare(bare16[1], tiles16, args.batch_size, scaling)
        tiles32 = (tiles16.astype(np.float32) * np.float32(1e-4) - mean) / std
        del tiles16
        t_bare32 += _run_bare(bare32[1], tiles32, args.batch_size, {})
        del tiles32
    mpix = args.frames * H * W / 1e6
    return {
        "self_test": {"ok": self_test.ok, "message": self_test.message},
        "runtime": pipeline.model.properties(),
        "tiles_per_frame": n_tiles,
        "pipeline_mpix_s": mpix / t_pipe,
        "bare_scaled_uint16_mpix_s": mpix / t_bare16,
        "bare_plain_float32_mpix_s": mpix / t_bare32,
        "pipeline_s_per_frame": t_pipe / args.frames,
        "stages_ms_per_frame": {k: round(v / args.frames, 2) for k, v in stage_sums.items()},
        "frames_kept": kept,
        "rss_mb": {"start": round(rss_start, 1), "peak_after_pipeline": round(rss_pipeline, 1),
                   "peak_with_bare_tiles": round(peak_rss_mb(), 1)},
        "torch_in_openvino_process": "torch" in sys.modules,
        "masks": masks,
    }


# ------------------------------------------------------------------------------------------------
# torch-eager baseline (parent process)

def torch_pipeline(manifest: dict, model_dir: Path, frames: list[np.ndarray], args) -> dict:
    import torch
    from tqdm import tqdm

    from ground.models.tiny_unet import TinyUNet
    from onboard import products
    from onboard.pipeline import _owned_regions
    from onboard.stats import frame_and_cell_stats
    from shared.bands import S2_BANDS
    from shared.policy import classes_needing_components, evaluate
    from shared.postprocess import open_classes, threshold_vector
    from shared.tiling import TileGrid

    torch.set_num_threads(args.torch_threads or os.cpu_count())
    model = TinyUNet(13, len(CLASSES), widths=WIDTHS).eval()
    model.load_state_dict(torch.load(model_dir / "model.pt"))
    mean = torch.tensor(manifest["input"]["scaling"]["mean"])[:, None, None]
    std = torch.tensor(manifest["input"]["scaling"]["std"])[:, None, None]
    thr = torch.from_numpy(np.nan_to_num(threshold_vector(CLASSES, manifest["postprocess"]["threshold"]),
                                         nan=-np.inf))[:, None, None]
    grid = TileGrid(H, W, TILE, OVERLAP)
    owned = _owned_regions(grid)
    nr, nc = grid.grid_shape
    hp, wp = grid.padded_shape
    stages: dict[str, float] = {}
    masks = []

    def lap(name, t):
        now = time.perf_counter()
        stages[name] = stages.get(name, 0.0) + (now - t) * 1e3
        return now

    total = 0.0
    for i in tqdm(range(args.torch_frames), desc="torch frames", unit="frame", file=sys.stderr):
        frame = frames[i % len(frames)]
        t0 = t = time.perf_counter()
        with torch.inference_mode():
            x = (torch.from_numpy(frame.astype(np.float32)) * 1e-4 - mean) / std
            x = torch.nn.functional.pad(x[None], (0, wp - W, 0, hp - H), mode="reflect")[0]
            tiles = x.unfold(1, TILE, grid.stride).unfold(2, TILE, grid.stride)      # C, nr, nc, t, t
            tiles = tiles.permute(1, 2, 0, 3, 4).reshape(nr * nc, 13, TILE, TILE).contiguous()
            t = lap("normalise_tile", t)
            probs = torch.cat([torch.softmax(model(tiles[s:s + args.batch_size]), dim=1)
                               for s in range(0, len(tiles), args.batch_size)])
            t = lap("infer", t)
            stitched = torch.empty((len(CLASSES), H, W))
            for n, (r0, r1, c0, c1, tr, tc) in enumerate(owned):
                stitched[:, r0:r1, c0:c1] = probs[n, :, tr:tr + r1 - r0, tc:tc + c1 - c0]
            score = torch.where(stitched >= thr, stitched, torch.tensor(-float("inf")))
            mask = score.argmax(dim=0).to(torch.uint8).numpy()
            t = lap("stitch_threshold", t)
        open_classes(mask, 2, classes=range(1, len(CLASSES)))
        t = lap("opening", t)
        counted = classes_needing_components(POLICY)
        frame_stats, cells = frame_and_cell_stats(mask, CLASSES, TILE, counted)
        t = lap("stats", t)
        decision = evaluate(POLICY, frame_stats)
        tile_keep = [evaluate(POLICY, c["stats"]).keep for c in cells]
        t = lap("policy", t)
        if decision.keep:
            boxes = [(c["row"], c["col"], c["height"], c["width"]) for c, k in zip(cells, tile_keep) if k]
            products.frame_products(frame, S2_BANDS, 1e-4, mask, boxes, TILE)
        lap("products", t)
        total += time.perf_counter() - t0
        masks.append(mask)
    return {"torch_mpix_s": args.torch_frames * H * W / 1e6 / total,
            "torch_s_per_frame": total / args.torch_frames,
            "torch_threads": torch.get_num_threads(),
            "torch_stages_ms_per_frame": {k: round(v / args.torch_frames, 2) for k, v in stages.items()},
            "masks": masks}


# ------------------------------------------------------------------------------------------------

def human(r: dict) -> str:
    lines = [f"on-board pipeline benchmark: {r['frames']} frames of 13 x {H} x {W} uint16, "
             f"TinyUNet{tuple(WIDTHS)} {r['params']:,} params, FP16 IR, tile {TILE} overlap {OVERLAP} "
             f"({r['tiles_per_frame']} tiles/frame)",
             f"  {r['load']}; OpenVINO {r['runtime']}",
             f"  self-test on the bundle reference: {r['self_test']['message']}",
             "",
             f"  {'':34}{'MPix/s':>9}{'s/frame':>9}",
             f"  {'pipeline (FramePipeline.process)':34}{r['pipeline_mpix_s']:9.2f}{r['pipeline_s_per_frame']:9.2f}",
             f"  {'bare OpenVINO, scaling in graph':34}{r['bare_scaled_uint16_mpix_s']:9.2f}"
             f"{H * W / 1e6 / r['bare_scaled_uint16_mpix_s']:9.2f}",
             f"  {'bare OpenVINO, plain IR float32':34}{r['bare_plain_float32_mpix_s']:9.2f}"
             f"{H * W / 1e6 / r['bare_plain_float32_mpix_s']:9.2f}",
             f"  {'torch eager pipeline':34}{r['torch_mpix_s']:9.2f}{r['torch_s_per_frame']:9.2f}",
             "",
             f"  pipeline / best bare  = {r['ratio_vs_bare']:.3f}  (floor {FLOOR_VS_BARE}: "
             f"{'met' if r['meets_floor_vs_bare'] else 'NOT met'})",
             f"  pipeline / torch eager = {r['ratio_vs_torch']:.2f}x (floor {FLOOR_VS_TORCH}x: "
             f"{'met' if r['meets_floor_vs_torch'] else 'NOT met'})",
             f"  mask agreement torch vs OpenVINO pipeline: {r['mask_agreement_torch_vs_openvino']:.5f}",
             f"  frames kept by the policy: {r['frames_kept']}/{r['frames']}",
             "",
             "  pipeline stages, ms per frame (the *_overlapped parts run inside tile_infer_threshold):",
             "    " + ", ".join(f"{k} {v:.1f}" for k, v in r["stages_ms_per_frame"].items()),
             "  torch stages, ms per frame:",
             "    " + ", ".join(f"{k} {v:.1f}" for k, v in r["torch_stages_ms_per_frame"].items()),
             f"  peak RSS of the OpenVINO process (no torch): {r['rss_mb']['peak_after_pipeline']:.0f} MB after "
             f"the pipeline ran, {r['rss_mb']['peak_with_bare_tiles']:.0f} MB with the bare run's pre-cut tiles; "
             f"parent with torch: {r['parent_peak_rss_mb']:.0f} MB"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--frames", type=int, default=6, help="frames through the OpenVINO pipeline (default 6)")
    ap.add_argument("--torch-frames", type=int, default=2,
                    help="frames through the torch baseline (default 2; 0 skips it)")
    ap.add_argument("--distinct", type=int, default=3, help="distinct synthetic frames, cycled (default 3)")
    ap.add_argument("--batch-size", type=int, default=2, help="tiles per inference request (default 2)")
    ap.add_argument("--num-requests", type=int, default=None,
                    help="AsyncInferQueue size (default: OpenVINO's optimal number)")
    ap.add_argument("--precision", default="f32", choices=["f32", "bf16", "f16"],
                    help="OpenVINO INFERENCE_PRECISION_HINT (default f32, what the self-test expects)")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch threads (default: all CPUs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_onboard_") as tmp:
        manifest, model_dir, params = build_bundle_dir(Path(tmp), args.seed)
        ctx = mp.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe(duplex=False)
        child = ctx.Process(target=openvino_side, args=(manifest, str(model_dir), args, child_conn))
        child.start()
        ov_result = parent_conn.recv()
        child.join()
        if "error" in ov_result:
            print(f"error: OpenVINO side failed: {ov_result['error']}", file=sys.stderr)
            return 1
        torch_result = (torch_pipeline(manifest, model_dir, make_frames(args.distinct, args.seed), args)
                        if args.torch_frames else {"torch_mpix_s": float("nan"), "torch_s_per_frame": float("nan"),
                                                   "torch_stages_ms_per_frame": {}, "masks": []})
    ov_masks, torch_masks = ov_result.pop("masks"), torch_result.pop("masks")
    pairs = list(zip(ov_masks, torch_masks))
    agreement = float(np.mean([np.mean(a == b) for a, b in pairs])) if pairs else float("nan")
    best_bare = max(ov_result["bare_scaled_uint16_mpix_s"], ov_result["bare_plain_float32_mpix_s"])
    result = {"frames": args.frames, "params": params, "load": load_line(), **ov_result, **torch_result,
              "ratio_vs_bare": ov_result["pipeline_mpix_s"] / best_bare,
              "ratio_vs_torch": ov_result["pipeline_mpix_s"] / torch_result["torch_mpix_s"],
              "mask_agreement_torch_vs_openvino": agreement,
              "parent_peak_rss_mb": round(peak_rss_mb(), 1),
              "args": vars(args)}
    result["meets_floor_vs_bare"] = result["ratio_vs_bare"] >= FLOOR_VS_BARE
    result["meets_floor_vs_torch"] = result["ratio_vs_torch"] >= FLOOR_VS_TORCH
    if args.json:
        print(json.dumps(result, indent=2, default=float))
    else:
        print(human(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
