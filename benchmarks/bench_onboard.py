"""The on-board frame pipeline against bare OpenVINO, an onnxruntime pipeline and torch eager.

    .venv/bin/python benchmarks/bench_onboard.py                # 13-band 2048 x 2048 frames, every precision
    .venv/bin/python benchmarks/bench_onboard.py --frames 6 --json
    .venv/bin/python benchmarks/bench_onboard.py --precisions fp32  # one precision only

What runs (a TinyUNet, widths (8, 16, 32, 64), 13 bands in, exported to an FP16 IR and to ONNX;
random weights: speed does not depend on them; for int8, the same network quantised by NNCF,
ground.compression.quantize, calibrated on another synthetic frame):
- pipeline:  onboard.pipeline.FramePipeline.process on uint16 frames at each precision the daemon
             runs here (fp32; bf16 where the CPU has AVX512-BF16/AMX, else fp16 where it computes
             it; int8 where OpenVINO reports INT8), every stage (validate, tile + infer +
             threshold, opening, statistics, policy, products);
- bare:      the same IR compiled at the same precision (same batch, same AsyncInferQueue size),
             on the same frame's tiles cut beforehand, handed to the requests without a copy;
             twice: with runtime scaling in the graph (uint16 tiles) and as the plain IR on
             normalised float32 tiles. The floor compares with the faster of the two;
- the frame graph alone: the pipeline's own graph (scaling constants, thresholds, uint8 out) on
             the same pre-cut tiles, uint16 and float32 (what each input type costs OpenVINO;
             * marks the one the pipeline feeds at that precision);
- onnxruntime: what ukis-csmask itself runs on: the same network's ONNX in an InferenceSession
             (CPU execution provider, f32: its CPU kernels have no bf16 path on x86) with the
             same steps around it in numpy (normalise, tile, infer batch by batch, softmax,
             centre-stitch, threshold) and the same OpenCV/numpy opening, statistics, policy and
             products (`pip install ".[benchmark]"`);
- torch:     the same steps in torch eager.
Each run has fresh processes of its own (the pipeline; each bare run; the frame graph alone),
in --rounds rounds one after another, sharing --frames: a daemon's process holds its pipeline
alone, and on a shared VM a compiled model can run 10-50% slower than the same graph compiled
in another process, for its whole life (docs/onboard.md), and a process holding several compiled
models and their pre-cut tiles drew that more often. The floor's ratio is the median of the
rounds'; each is printed. CPU seconds per frame (every thread of the process) are printed beside
wall time. The OpenVINO and onnxruntime parts run in child processes without torch: their peak
RSS is what a daemon would need. Figures depend on the machine and its load (printed with them).
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
FLOOR_VS_BARE, FLOOR_VS_ORT, FLOOR_VS_TORCH = 0.95, 1.0, 2.0
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def isa_line() -> str:
    """The CPU's model name and the ISA flags that decide OpenVINO's kernels (lscpu's)."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "unknown CPU":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return f"{name}; " + " ".join(f for f in ISA_FLAGS if f in flags)


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

MEAN = [0.12 + 0.005 * i for i in range(13)]
STD = [0.08 + 0.002 * i for i in range(13)]


def bench_manifest(out: Path, precision: str = "fp32") -> dict:
    """The manifest of the bench bundle whose model.xml/.bin and reference.npz lie in `out`."""
    from shared.bands import S2_BANDS
    from shared.manifest import make_manifest

    return make_manifest(
        model_id="bench-tinyunet", version=1, bands=S2_BANDS, mean=MEAN, std=STD, classes=CLASSES,
        tile_size=TILE, overlap=OVERLAP, threshold={"cloud": 0.5}, opening_radius=2, policy=POLICY,
        precision=precision, files={n: out / n for n in ("model.xml", "model.bin", "reference.npz")})


def build_bundle_dir(out: Path, seed: int) -> tuple[dict, Path, int]:
    import openvino as ov
    import torch

    from ground.models.tiny_unet import TinyUNet
    from shared.bundle import save_reference

    torch.manual_seed(seed)
    model = TinyUNet(13, len(CLASSES), widths=WIDTHS).eval()
    params = sum(p.numel() for p in model.parameters())
    ov.save_model(ov.convert_model(model, example_input=torch.zeros(1, 13, TILE, TILE)), out / "model.xml")
    tiles = np.random.default_rng(seed).uniform(0, 0.5, (2, 13, TILE, TILE)).astype(np.float32)
    with torch.inference_mode():
        x = (torch.from_numpy(tiles) - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
        probs = torch.softmax(model(x.float()), dim=1).numpy()
    save_reference(out / "reference.npz", tiles, probs)
    manifest = bench_manifest(out)
    torch.save(model.state_dict(), out / "model.pt")
    torch.onnx.export(model, torch.zeros(1, 13, TILE, TILE), out / "model.onnx", dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    return manifest, out, params


def build_int8_dir(fp_dir: Path, manifest: dict, out: Path, seed: int) -> dict:
    """The same network as an INT8 IR (NNCF post-training quantisation, ground.compression.
    quantize, calibrated on tiles of another synthetic frame) in `out`, with its reference
    probabilities computed by OpenVINO at int8 (as the ground's bundle stage does) and a manifest
    that says int8."""
    import openvino as ov

    from ground.compression.quantize import quantize_ir
    from ground.openvino.runtime import softmax
    from shared.bundle import load_reference, save_reference
    from shared.tiling import tile

    out.mkdir(parents=True, exist_ok=True)
    mean = np.asarray(MEAN, np.float32)[:, None, None]
    std = np.asarray(STD, np.float32)[:, None, None]
    calibration, _ = tile(make_frames(1, seed + 1)[0], TILE, OVERLAP)
    calibration = ((calibration[::3].astype(np.float32) * np.float32(1e-4) - mean) / std).astype(np.float32)
    quantize_ir(fp_dir / "model.xml", calibration, out / "model.xml")
    tiles, _ = load_reference(fp_dir / "reference.npz", manifest)
    compiled = ov.Core().compile_model(str(out / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    logits = np.concatenate([compiled(((t[None] - mean) / std).astype(np.float32))[0] for t in tiles])
    save_reference(out / "reference.npz", tiles, softmax(logits))
    return bench_manifest(out, "int8")


# ------------------------------------------------------------------------------------------------
# OpenVINO side (child process: no torch)

def _bare_model(model_dir: Path, dtype: str, args):
    """A queue set up like the pipeline's; for float32, the plain IR (no scaling in the graph)."""
    import openvino as ov

    from onboard.runtime import DEFAULT_CONFIG, OpenVinoModel
    from shared.manifest import INFERENCE_HINTS
    config = {**DEFAULT_CONFIG, "INFERENCE_PRECISION_HINT": INFERENCE_HINTS[args.precision]}
    if dtype == "uint16":
        m = OpenVinoModel(model_dir / "model.xml", num_requests=args.num_requests, tile=TILE,
                          batch_size=args.batch_size, activation="softmax", precision=args.precision)
        compiled, queue, _ = m._variant("uint16")
        return compiled, queue
    core = ov.Core()
    model = core.read_model(model_dir / "model.xml")
    model.reshape({model.inputs[0]: [args.batch_size, 13, TILE, TILE]})
    compiled = core.compile_model(model, "CPU", config)
    n = args.num_requests or compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
    return compiled, ov.AsyncInferQueue(compiled, n)


def _run_bare(queue, tiles: np.ndarray, batch: int, extra: dict) -> tuple[float, float]:
    """Wall and CPU seconds (every thread of the process) to push pre-cut tiles through the
    queue, shared (not copied) into the requests."""
    n = len(tiles) - len(tiles) % batch            # whole batches only: a static-shape model
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, n, batch):
        queue.start_async({0: tiles[start:start + batch], **extra}, share_inputs=True)
    queue.wait_all()
    return ((time.perf_counter() - t0) * len(tiles) / n, (time.process_time() - c0) * len(tiles) / n)


def _run_pipeline(pipeline, frame: np.ndarray) -> tuple:
    """Wall and CPU seconds of one frame through FramePipeline.process, and its result."""
    from shared.bands import S2_BANDS

    t0, c0 = time.perf_counter(), time.process_time()
    result = pipeline.process(frame, S2_BANDS, 1e-4)
    return time.perf_counter() - t0, time.process_time() - c0, result


# What each fresh OpenVINO process measures: the pipeline alone (what a daemon's process holds),
# each bare run alone, and the frame graph on pre-cut tiles (two dtypes, informational).
PROCESS_GROUPS = (("pipeline",), ("bare16",), ("bare32",), ("graph_uint16", "graph_float32"))


def _openvino_side(manifest: dict, model_dir: Path, frames: list[np.ndarray], args) -> dict:
    """Wall and CPU seconds of the runs in `args.runs` (PROCESS_GROUPS) over `args.frames`
    frames, each after one untimed frame (two for the pipeline: first-use compiles)."""
    from tqdm import tqdm

    from onboard.pipeline import GRAPH_INPUT_DTYPE, FramePipeline
    from shared.bands import S2_BANDS
    from shared.tiling import TileGrid, tile

    names = tuple(args.runs)
    out: dict = {"runs": names, "round": args.round, "frames": args.frames, "stage_sums_ms": {},
                 "frames_kept": 0, "masks": [], "graph_input_dtype": GRAPH_INPUT_DTYPE.get(args.precision, "uint16"),
                 "torch_in_openvino_process": "torch" in sys.modules,
                 "tiles_per_frame": len(TileGrid(H, W, TILE, OVERLAP))}
    rss_start = peak_rss_mb()       # python, numpy, openvino and the frames
    pipeline = None
    if "pipeline" in names or any(n.startswith("graph_") for n in names):
        pipeline = FramePipeline(manifest, model_dir, batch_size=args.batch_size,
                                 num_requests=args.num_requests, precision=args.precision)
        out["runtime"] = pipeline.model.properties()
    if "pipeline" in names:
        test = pipeline.self_test(model_dir / "reference.npz")
        out["self_test"] = {"ok": test.ok, "message": test.message}
        for frame in frames[:2]:              # warm-up (first-use compile)
            pipeline.process(frame, S2_BANDS, 1e-4)
        out["rss_mb"] = {"start": round(rss_start, 1), "peak_after_warm_up": round(peak_rss_mb(), 1)}
    mean = np.asarray(manifest["input"]["scaling"]["mean"], np.float32)[:, None, None]
    std = np.asarray(manifest["input"]["scaling"]["std"], np.float32)[:, None, None]
    scaling = {1: (np.float32(1e-4) / std).reshape(1, 13, 1, 1), 2: (-mean / std).reshape(1, 13, 1, 1)}
    queues = {}
    if "bare16" in names:
        queues["bare16"] = _bare_model(model_dir, "uint16", args)[1]
    if "bare32" in names:
        queues["bare32"] = _bare_model(model_dir, "float32", args)[1]
    # the pipeline's own frame graph (scaling constants, thresholds, uint8 out) on pre-cut tiles:
    # what the pipeline's Python work (cutting, stitching, post-processing) adds to it; with
    # uint16 and float32 tiles in (the pipeline feeds the one GRAPH_INPUT_DTYPE names)
    for dtype in ("uint16", "float32"):
        if "graph_" + dtype in names:
            queues["graph_" + dtype] = pipeline.model._mask_variant(
                dtype, (np.float32(1e-4) / pipeline.std).astype(np.float32),
                (-pipeline.mean / pipeline.std).astype(np.float32), pipeline.thresholds, 1)[1]

    def inputs(frame: np.ndarray, name: str) -> tuple[np.ndarray, dict]:
        """The frame's tiles cut beforehand, as `name` takes them."""
        tiles = tile(frame, TILE, OVERLAP)[0]
        if name in ("bare16", "graph_uint16"):
            return tiles, scaling if name == "bare16" else {}
        tiles = tiles.astype(np.float32)
        return ((tiles * np.float32(1e-4) - mean) / std, {}) if name == "bare32" else (tiles, {})

    def run(name: str, frame: np.ndarray) -> tuple:
        if name == "pipeline":
            return _run_pipeline(pipeline, frame)
        tiles, extra = inputs(frame, name)
        return _run_bare(queues[name], tiles, args.batch_size, extra)

    for name in names:
        if name != "pipeline":
            run(name, frames[0])              # warm-up
    wall, cpu = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)   # CPU: every thread's
    for i in tqdm(range(args.frames), desc=f"openvino {args.precision} {'+'.join(names)}", unit="frame",
                  file=sys.stderr):
        frame = frames[i % len(frames)]
        for name in names[i % len(names):] + names[:i % len(names)]:
            w, c, *result = run(name, frame)
            wall[name] += w
            cpu[name] += c
            if result:
                for k, v in result[0].timings_ms.items():
                    out["stage_sums_ms"][k] = out["stage_sums_ms"].get(k, 0.0) + v
                out["frames_kept"] += result[0].keep
                if i < len(frames):
                    out["masks"].append(result[0].class_mask.copy())
    out.update(wall_s=wall, cpu_s=cpu)
    if "pipeline" in names:
        out["rss_mb"]["peak"] = round(peak_rss_mb(), 1)
    return out


def pool_processes(children: list[dict]) -> dict:
    """One precision's figures from its fresh processes (PROCESS_GROUPS, `--rounds` times over):
    throughput from the pooled seconds, and the floor's ratio as the median of the rounds' (each
    round's pipeline process against its bare ones, the same frames), so that one compiled model
    that drew a slow state (module docstring) moves one round, not the verdict."""
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    frames: dict[str, int] = {}
    rounds: dict[int, dict[str, float]] = {}
    for c in children:
        for name in c["runs"]:
            wall[name] = wall.get(name, 0.0) + c["wall_s"][name]
            cpu[name] = cpu.get(name, 0.0) + c["cpu_s"][name]
            frames[name] = frames.get(name, 0) + c["frames"]
            rounds.setdefault(c["round"], {})[name] = c["wall_s"][name] / c["frames"]
    per_round = [min(r["bare16"], r["bare32"]) / r["pipeline"] for _, r in sorted(rounds.items())]
    mpix = {name: frames[name] * H * W / 1e6 / wall[name] for name in wall}
    s_cpu = {name: round(cpu[name] / frames[name], 3) for name in cpu}
    first = next(c for c in children if c["runs"][0] == "pipeline")
    n = frames["pipeline"]
    return {
        "self_test": first["self_test"], "runtime": first["runtime"], "tiles_per_frame": first["tiles_per_frame"],
        "processes": len(children), "rounds": len(rounds),
        "pipeline_mpix_s": mpix["pipeline"],
        "bare_scaled_uint16_mpix_s": mpix["bare16"],
        "bare_plain_float32_mpix_s": mpix["bare32"],
        "frame_graph_mpix_s": {dtype: mpix["graph_" + dtype] for dtype in ("uint16", "float32")},
        "graph_input_dtype": first["graph_input_dtype"],
        "pipeline_s_per_frame": wall["pipeline"] / n,
        "cpu_s_per_frame": s_cpu,
        "ratio_vs_bare": float(np.median(per_round)),
        "ratio_vs_bare_per_round": [round(r, 4) for r in per_round],
        "ratio_vs_bare_pooled": mpix["pipeline"] / max(mpix["bare16"], mpix["bare32"]),
        "cpu_ratio_vs_bare": min(s_cpu["bare16"], s_cpu["bare32"]) / s_cpu["pipeline"],
        "stages_ms_per_frame": {k: round(sum(c["stage_sums_ms"].get(k, 0.0) for c in children) / n, 2)
                                for k in first["stage_sums_ms"]},
        "frames_kept": sum(c["frames_kept"] for c in children),
        "rss_mb": {k: max(c["rss_mb"][k] for c in children if "rss_mb" in c) for k in first["rss_mb"]},
        "torch_in_openvino_process": any(c["torch_in_openvino_process"] for c in children),
        "masks": first["masks"],
    }


# ------------------------------------------------------------------------------------------------
# the baselines' steps after the class mask: the daemon's own OpenCV/numpy code

def post_steps(frame: np.ndarray, mask: np.ndarray, lap) -> None:
    """Opening, statistics, policy and products as the pipeline runs them; `lap(name)` times each."""
    from onboard import products
    from onboard.stats import frame_and_cell_stats
    from shared.bands import S2_BANDS
    from shared.policy import classes_needing_components, evaluate
    from shared.postprocess import open_classes

    open_classes(mask, 2, classes=range(1, len(CLASSES)))
    lap("opening")
    frame_stats, cells = frame_and_cell_stats(mask, CLASSES, TILE, classes_needing_components(POLICY))
    lap("stats")
    decision = evaluate(POLICY, frame_stats)
    tile_keep = [evaluate(POLICY, c["stats"]).keep for c in cells]
    lap("policy")
    if decision.keep:
        boxes = [(c["row"], c["col"], c["height"], c["width"]) for c, k in zip(cells, tile_keep) if k]
        products.frame_products(frame, S2_BANDS, 1e-4, mask, boxes, TILE)
    lap("products")


class StageClock:
    """Milliseconds per named stage, summed over frames."""

    def __init__(self):
        self.ms: dict[str, float] = {}
        self.t = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.ms[name] = self.ms.get(name, 0.0) + (now - self.t) * 1e3
        self.t = now


# ------------------------------------------------------------------------------------------------
# onnxruntime baseline (child process: no torch)

def _ort_pipeline(manifest: dict, model_dir: Path, frames: list[np.ndarray], args) -> dict:
    """What a ukis-csmask-style pipeline does: normalise the frame in float32, cut tiles, run an
    onnxruntime session batch by batch, softmax, centre-stitch and threshold in numpy."""
    import onnxruntime as ort

    from onboard.pipeline import _owned_regions
    from shared.postprocess import threshold, threshold_vector
    from shared.tiling import tile

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count()
    session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    mean = np.asarray(manifest["input"]["scaling"]["mean"], np.float32)[:, None, None]
    std = np.asarray(manifest["input"]["scaling"]["std"], np.float32)[:, None, None]
    thr = threshold_vector(CLASSES, manifest["postprocess"]["threshold"])
    clock, total, masks = StageClock(), 0.0, []
    frames_run = max(1, args.ort_frames)
    for i in range(frames_run):
        frame = frames[i % len(frames)]
        t0 = clock.t = time.perf_counter()
        x = frame.astype(np.float32)
        x *= np.float32(1e-4)
        x -= mean
        x /= std
        tiles, grid = tile(x, TILE, OVERLAP)
        del x
        owned = _owned_regions(grid)
        clock("normalise_tile")
        mask = np.empty((H, W), np.uint8)
        for start in range(0, len(tiles), args.batch_size):
            logits = session.run(None, {"x": tiles[start:start + args.batch_size]})[0]
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs = e / e.sum(axis=1, keepdims=True)
            for j in range(len(probs)):
                r0, r1, c0, c1, tr, tc = owned[start + j]
                threshold(probs[j, :, tr:tr + r1 - r0, tc:tc + c1 - c0], thr, out=mask[r0:r1, c0:c1])
        del tiles
        clock("infer_stitch_threshold")
        post_steps(frame, mask, clock)
        total += time.perf_counter() - t0
        if i < len(frames):
            masks.append(mask)
    return {"ort_mpix_s": frames_run * H * W / 1e6 / total, "ort_s_per_frame": total / frames_run,
            "ort_version": ort.__version__, "ort_threads": options.intra_op_num_threads,
            "ort_stages_ms_per_frame": {k: round(v / frames_run, 2) for k, v in clock.ms.items()},
            "ort_peak_rss_mb": round(peak_rss_mb(), 1), "masks": masks}


# ------------------------------------------------------------------------------------------------
# torch-eager baseline (parent process)

def torch_pipeline(manifest: dict, model_dir: Path, frames: list[np.ndarray], args) -> dict:
    import torch

    from ground.models.tiny_unet import TinyUNet
    from onboard.pipeline import _owned_regions
    from shared.postprocess import threshold_vector
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
    clock, total, masks = StageClock(), 0.0, []
    for i in range(args.torch_frames):
        frame = frames[i % len(frames)]
        t0 = clock.t = time.perf_counter()
        with torch.inference_mode():
            x = (torch.from_numpy(frame.astype(np.float32)) * 1e-4 - mean) / std
            x = torch.nn.functional.pad(x[None], (0, wp - W, 0, hp - H), mode="reflect")[0]
            tiles = x.unfold(1, TILE, grid.stride).unfold(2, TILE, grid.stride)      # C, nr, nc, t, t
            tiles = tiles.permute(1, 2, 0, 3, 4).reshape(nr * nc, 13, TILE, TILE).contiguous()
            clock("normalise_tile")
            probs = torch.cat([torch.softmax(model(tiles[s:s + args.batch_size]), dim=1)
                               for s in range(0, len(tiles), args.batch_size)])
            clock("infer")
            stitched = torch.empty((len(CLASSES), H, W))
            for n, (r0, r1, c0, c1, tr, tc) in enumerate(owned):
                stitched[:, r0:r1, c0:c1] = probs[n, :, tr:tr + r1 - r0, tc:tc + c1 - c0]
            score = torch.where(stitched >= thr, stitched, torch.tensor(-float("inf")))
            mask = score.argmax(dim=0).to(torch.uint8).numpy()
            clock("stitch_threshold")
        post_steps(frame, mask, clock)
        total += time.perf_counter() - t0
        masks.append(mask)
    return {"torch_mpix_s": args.torch_frames * H * W / 1e6 / total,
            "torch_s_per_frame": total / args.torch_frames,
            "torch_threads": torch.get_num_threads(),
            "torch_stages_ms_per_frame": {k: round(v / args.torch_frames, 2) for k, v in clock.ms.items()},
            "masks": masks}


# ------------------------------------------------------------------------------------------------

def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    pairs = list(zip(a, b))
    return float(np.mean([np.mean(x == y) for x, y in pairs])) if pairs else float("nan")


def human(r: dict) -> str:
    lines = [f"on-board pipeline benchmark: 13 x {H} x {W} uint16 frames, TinyUNet{tuple(WIDTHS)} "
             f"{r['params']:,} params, FP16 IR, tile {TILE} overlap {OVERLAP} ({r['tiles_per_frame']} tiles/frame), "
             f"batch {r['args']['batch_size']}",
             f"  CPU: {r['isa']}",
             f"  {r['load_before']} before, {r['load_after']} after",
             "",
             f"  {'':44}{'MPix/s':>8}{'s/frame':>9}{'CPU s':>7}{'peak RSS MB':>13}"]
    for p, o in r["openvino"].items():
        cpu = o["cpu_s_per_frame"]
        rows = [("pipeline " + p + " (FramePipeline.process, " + str(r["frames"]) + " frames)",
                 o["pipeline_mpix_s"], cpu["pipeline"], f"{o['rss_mb']['peak']:13.0f}"),
                ("  bare OpenVINO " + p + ", scaling in graph", o["bare_scaled_uint16_mpix_s"], cpu["bare16"], ""),
                ("  bare OpenVINO " + p + ", plain IR float32", o["bare_plain_float32_mpix_s"], cpu["bare32"], "")]
        rows += [("  the frame graph alone, pre-cut " + dtype + (" *" if dtype == o["graph_input_dtype"] else ""),
                  v, cpu["graph_" + dtype], "") for dtype, v in o["frame_graph_mpix_s"].items()]
        lines += [f"  {label:44}{mpix:8.2f}{H * W / 1e6 / mpix:9.2f}{c:7.2f}{rss}" for label, mpix, c, rss in rows]
    if "ort_mpix_s" in r:
        lines.append(f"  {'onnxruntime ' + r['ort_version'] + ' pipeline f32 (' + str(r['args']['ort_frames']) + ' frames)':44}"
                     f"{r['ort_mpix_s']:8.2f}{r['ort_s_per_frame']:9.2f}{'':7}{r['ort_peak_rss_mb']:13.0f}")
    if r["args"]["torch_frames"]:
        lines.append(f"  {'torch eager pipeline f32 (' + str(r['args']['torch_frames']) + ' frames)':44}"
                     f"{r['torch_mpix_s']:8.2f}{r['torch_s_per_frame']:9.2f}")
    lines.append("")
    for p, o in r["openvino"].items():
        per_round = ", ".join(f"{x:.3f}" for x in o["ratio_vs_bare_per_round"])
        lines.append(f"  pipeline / best bare at {p} = {o['ratio_vs_bare']:.3f}, the median of {o['rounds']} "
                     f"rounds of fresh processes ({per_round})  (floor {FLOOR_VS_BARE}: "
                     f"{'met' if o['ratio_vs_bare'] >= FLOOR_VS_BARE else 'NOT met'})")
        lines.append(f"    pooled {o['ratio_vs_bare_pooled']:.3f}; in CPU seconds per frame "
                     f"{o['cpu_ratio_vs_bare']:.3f} (pipeline {o['cpu_s_per_frame']['pipeline']:.2f}, "
                     f"bare {min(o['cpu_s_per_frame']['bare16'], o['cpu_s_per_frame']['bare32']):.2f})")
    for key, label in (("ratio_vs_ort_f32", "pipeline fp32 / onnxruntime f32"),
                       ("ratio_best_vs_ort_best", f"pipeline {r.get('best_precision')} (the daemon's best) / "
                                                  "onnxruntime's best (f32)")):
        if key in r:
            floor = f"  (floor {FLOOR_VS_ORT}: {'met' if r[key] >= FLOOR_VS_ORT else 'NOT met'})" \
                if key == "ratio_vs_ort_f32" else ""
            lines.append(f"  {label} = {r[key]:.2f}x{floor}")
    if "ratio_vs_torch" in r:
        lines.append(f"  pipeline fp32 / torch eager = {r['ratio_vs_torch']:.2f}x (floor {FLOOR_VS_TORCH}x: "
                     f"{'met' if r['ratio_vs_torch'] >= FLOOR_VS_TORCH else 'NOT met'})")
    for key, label in (("agreement_ort", "onnxruntime"), ("agreement_torch", "torch")):
        if key in r:
            lines.append(f"  mask agreement {label} vs OpenVINO fp32 pipeline: {r[key]:.5f}")
    lines.append("")
    lines.append("  (* the frame graph's input the pipeline feeds: onboard.pipeline.GRAPH_INPUT_DTYPE)")
    for p, o in r["openvino"].items():
        lines += [f"  pipeline {p} stages, ms per frame (*_overlapped run inside tile_infer_threshold); "
                  f"self-test: {o['self_test']['message']}",
                  "    " + ", ".join(f"{k} {v:.1f}" for k, v in o["stages_ms_per_frame"].items())]
    for key, label in (("ort_stages_ms_per_frame", "onnxruntime"), ("torch_stages_ms_per_frame", "torch")):
        if r.get(key):
            lines += [f"  {label} stages, ms per frame:", "    " + ", ".join(f"{k} {v:.1f}" for k, v in r[key].items())]
    lines.append("  peak RSS: the pipeline's own process (no torch, no bare runs), over all its frames (the "
                 f"highest of the rounds); parent with torch {r['parent_peak_rss_mb']:.0f} MB")
    return "\n".join(lines)


def _child(measure, manifest: dict, model_dir: str, args, conn) -> None:
    try:
        conn.send(measure(manifest, Path(model_dir), make_frames(args.distinct, args.seed), args))
    except BaseException as exc:  # noqa: BLE001 (reported by the parent)
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    conn.close()


def run_child(measure, manifest: dict, model_dir: Path, args) -> dict:
    """`measure(manifest, model_dir, frames, args)` in a spawned process (no torch there); its
    result dict."""
    ctx = mp.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(measure, manifest, str(model_dir), args, child_conn))
    child.start()
    result = parent_conn.recv()
    child.join()
    if "error" in result:
        raise RuntimeError(f"{measure.__name__} failed: {result['error']}")
    return result


def process_args(args) -> list[argparse.Namespace]:
    """`args` for each fresh OpenVINO process: `--rounds` rounds of PROCESS_GROUPS, one after
    another, sharing `--frames` between the rounds (each at least one frame)."""
    n = min(args.rounds, args.frames)
    k = len(PROCESS_GROUPS)
    return [argparse.Namespace(**{**vars(args), "frames": args.frames // n + (i < args.frames % n),
                                  "runs": group, "round": i})
            for i in range(n) for group in PROCESS_GROUPS[i % k:] + PROCESS_GROUPS[:i % k]]  # each round
    # starts with the next group: load that drifts over a round falls on every run alike


def default_precisions() -> list[str]:
    """fp32, the CPU's fastest other float precision the daemon can run (bf16 with
    AVX512-BF16/AMX, fp16 where the CPU computes it natively), and int8 where it has INT8."""
    from onboard.runtime import device_capabilities

    caps = device_capabilities("CPU")
    return (["fp32"] + [p for p, c in (("bf16", "BF16"), ("fp16", "FP16")) if c in caps][:1]
            + (["int8"] if "INT8" in caps else []))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--frames", type=int, default=6, help="frames through each OpenVINO pipeline (default 6)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of fresh OpenVINO processes (the pipeline, each bare run, the frame "
                         "graph: one process each) sharing --frames; the floor's ratio is the rounds' "
                         "median (default 3)")
    ap.add_argument("--ort-frames", type=int, default=2,
                    help="frames through the onnxruntime baseline (default 2; 0 skips it)")
    ap.add_argument("--torch-frames", type=int, default=1,
                    help="frames through the torch baseline (default 1; 0 skips it)")
    ap.add_argument("--distinct", type=int, default=3, help="distinct synthetic frames, cycled (default 3)")
    ap.add_argument("--batch-size", type=int, default=2, help="tiles per inference request (default 2)")
    ap.add_argument("--num-requests", type=int, default=None,
                    help="AsyncInferQueue size (default: OpenVINO's optimal number)")
    ap.add_argument("--precisions", default=None,
                    help="comma-separated daemon precisions (fp32, bf16, fp16, int8; default: fp32, "
                         "the CPU's best other float one, int8)")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch threads (default: all CPUs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = ap.parse_args(argv)
    if args.frames < 1 or args.rounds < 1:
        ap.error(f"--frames and --rounds must be at least 1, got {args.frames} and {args.rounds}")
    precisions = args.precisions.split(",") if args.precisions else default_precisions()

    load_before = load_line()
    result: dict = {"frames": args.frames, "isa": isa_line(), "openvino": {}}
    ov_masks = {}
    with tempfile.TemporaryDirectory(prefix="bench_onboard_") as tmp:
        manifest, model_dir, params = build_bundle_dir(Path(tmp), args.seed)
        bundles = {p: (manifest, model_dir) for p in precisions}
        if "int8" in precisions:
            bundles["int8"] = build_int8_dir(model_dir, manifest, Path(tmp) / "int8", args.seed), Path(tmp) / "int8"
        for p in precisions:
            args.precision = p
            o = pool_processes([run_child(_openvino_side, *bundles[p], child_args)
                                for child_args in process_args(args)])
            ov_masks[p] = o.pop("masks")
            result["openvino"][p] = o
            result["tiles_per_frame"] = o["tiles_per_frame"]
        if args.ort_frames:
            ort = run_child(_ort_pipeline, manifest, model_dir, args)
            result["agreement_ort"] = agreement(ov_masks[precisions[0]], ort.pop("masks"))
            result.update(ort)
        if args.torch_frames:
            tr = torch_pipeline(manifest, model_dir, make_frames(args.distinct, args.seed), args)
            result["agreement_torch"] = agreement(ov_masks[precisions[0]], tr.pop("masks"))
            result.update(tr)
    first = result["openvino"][precisions[0]]
    best = max(result["openvino"], key=lambda p: result["openvino"][p]["pipeline_mpix_s"])
    result["best_precision"] = best
    if args.ort_frames:
        result["ratio_vs_ort_f32"] = first["pipeline_mpix_s"] / result["ort_mpix_s"]
        result["ratio_best_vs_ort_best"] = result["openvino"][best]["pipeline_mpix_s"] / result["ort_mpix_s"]
    if args.torch_frames:
        result["ratio_vs_torch"] = first["pipeline_mpix_s"] / result["torch_mpix_s"]
    result.update({"params": params, "load_before": load_before, "load_after": load_line(),
                   "parent_peak_rss_mb": round(peak_rss_mb(), 1), "args": vars(args)})
    result["meets_floor_vs_bare"] = all(o["ratio_vs_bare"] >= FLOOR_VS_BARE for o in result["openvino"].values())
    if args.json:
        print(json.dumps(result, indent=2, default=float))
    else:
        print(human(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
