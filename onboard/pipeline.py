"""One frame in, one decision out: the daemon's stages, read top to bottom in `process`.

    validate        dtype, dimensions, band names vs data, bands the model needs, NaN/Inf, scale,
                    and every value still finite in float32 after scaling and normalisation
    tile + infer    tiles with overlap (shared.tiling's grid and reflect padding) are cut straight
                    from the frame into idle requests' input tensors, in the model's band order,
                    as float32 or in the frame's dtype (GRAPH_INPUT_DTYPE); the graph
                    (onboard.runtime's frame graph) bins them to the manifest's processing GSD
                    (`input.gsd_m`, mean of f x f blocks, f = gsd_m / 10), scales ((value * scale
                    - mean) / std; at fp32 and int8 folded into the first layers), runs the
                    network, its activation and the per-class thresholds
                    (shared.postprocess.threshold's rule): uint8 out
    stitch          as each batch comes back (while the other requests still infer): every tile's
                    central part (shared.tiling's "center" stitching) is copied into the class
                    mask at the processing GSD
    --- band by band, as each row of tiles is stitched (while later tiles still infer) ---
    opening         each class but the background opened with disk(radius) (OpenCV), at the
                    processing GSD (shared.postprocess.RowwiseOpening: the whole-mask opening)
    upsample        (f > 1) the mask back to the frame's 10 m grid, nearest
    statistics      class counts per cell (one model tile: f * tile_size frame pixels) and, for
                    the classes the policy counts, each cell's connected components
    products        (when products are wanted) the mask's PNG rows; the quicklook JPEG once
    --- after the last row of tiles ---
    statistics      the frame's fractions (the cells' counts) and components (the whole mask)
    policy          shared.policy.evaluate for the frame and for every cell
    products        for a kept frame: mask PNG, quicklook JPEG, the kept cells' raw tiles (or the
                    frame itself when every cell is kept: no copy)
    learning        (a policy with a `learning` block) the graph's per-tile scores (onboard.runtime
                    `_tile_scores`: mean normalised entropy, ambiguous share) summarised for the
                    DECISION; shared.policy.choose_samples picks tiles, whatever the decision,
                    and their raw values are cut as the tiles were (model bands, the frame's
                    dtype, reflect-padded past the far edges): FrameResult.learning

Cutting tiles, stitching and post-processing overlap with inference; no float copy of the frame
is made, and OpenVINO writes straight into preallocated input/output buffers (onboard.runtime).
"""
from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from onboard import products as products_mod
from onboard.errors import FRAME_ERROR_CODES, FrameError  # noqa: F401  (importable from here, as before)
from onboard.errors import (BAD_SCALE, BAND_MISMATCH, DUPLICATE_BAND, EMPTY_FRAME, MISSING_BANDS,
                            NOT_FINITE, UNKNOWN_BAND, WRONG_DTYPE, WRONG_SHAPE, ModelLoadError)
from onboard.precision import AUTO, choose_precision
from onboard.runtime import INPUT_DTYPES, OpenVinoModel, device_capabilities
from onboard.stats import CellStats, summarise_components
from shared.bands import UnknownBandError, canonical_band
from shared.bundle import load_reference
from shared.manifest import MODEL_XML, gsd_factor, manifest_precision, validate_manifest
from shared.policy import (choose_samples, classes_needing_components, evaluate, learning_block,
                           validate_policy)
from shared.postprocess import RowwiseOpening, threshold, threshold_vector, upsample_rows
from shared.tiling import TileGrid

# The frame graph's input per precision the model runs at, where that leaves every mask as it
# was with the frame's own dtype (else the frame's dtype: uint16, int16 or float32).
# float32 at fp32: numpy converts uint16/int16 frames while it cuts their tiles into the input
# buffers (on the Python thread, while the requests infer) for ~0.2 ms more per batch of two
# 13 x 256 x 256 tiles than the plain copy, where OpenVINO's CPU plugin converts u16 with a
# reference kernel on the inference threads (PERF_COUNT: Convert "ref_u16", i32 alike), about
# 5 ms of a 160 ms f32 batch; the masks are identical. int8 alike (its graph computes in f32 up
# to the first FakeQuantize; on an AVX2 AMD EPYC the int8 graph ran 2.03 s per 13 x 2048^2
# frame on float32 tiles against 2.10 on uint16, bench_onboard). Not at bf16: OpenVINO then fuses the
# scaling differently (a bf16 snippet after the u16 Convert, f32 on float32 tiles), which moved
# 0.03% of a 20 m student's pixels at 10 m and 0.1% with the 2x2 binning in the graph.
# bench_onboard times the frame graph alone on pre-cut uint16 and float32 tiles.
GRAPH_INPUT_DTYPE = {"fp32": "float32", "int8": "float32"}


def tile_decision(policy: dict, cell: dict) -> dict:
    """A cell's entry of a DECISION's `tile_decisions`: where it is, what the policy decided on
    its statistics, its class fractions."""
    d = evaluate(policy, cell["stats"])
    return {"row": cell["row"], "col": cell["col"], "height": cell["height"], "width": cell["width"],
            "keep": d.keep, "priority": d.priority, "rule": d.rule, "reason": d.reason,
            "fractions": cell["stats"]["fractions"]}


def uncertainty_summary(tile_scores: np.ndarray, n_samples: int) -> dict:
    """A DECISION's `uncertainty`: mean, p50, p90, max of the frame's tile entropy and ambiguous
    share, the tiles scored and the samples chosen."""
    out: dict[str, Any] = {"tiles": int(len(tile_scores)), "samples": int(n_samples)}
    for i, name in enumerate(("entropy", "ambiguous")):
        v = tile_scores[:, i].astype(np.float64)
        p50, p90 = np.percentile(v, [50, 90])
        out[name] = {"mean": round(float(v.mean()), 6), "p50": round(float(p50), 6),
                     "p90": round(float(p90), 6), "max": round(float(v.max()), 6)}
    return out


@dataclass
class Learning:
    """A frame's learning samples and scores (a policy with a `learning` block)."""

    selection: str                      # shared.samples.SELECTIONS
    priority: int                       # the SAMPLE message's
    samples: list[dict]                 # SAMPLE entries: row, col, size, entropy, ambiguous
    tiles: np.ndarray                   # (N, C, size, size) raw values, model bands, frame dtype
    tile_scores: np.ndarray             # (tiles in the grid, 2) [entropy, ambiguous]
    summary: dict                       # the DECISION's `uncertainty`


@dataclass
class FrameResult:
    keep: bool
    priority: int
    reason: str
    stats: dict                         # {"fractions", "components" (largest 32), "component_counts"}
    class_mask: np.ndarray              # (H, W) uint8, class indices in manifest order
    tile_decisions: list[dict]          # per cell: row, col, height, width, keep, priority, rule, reason, fractions
    timings_ms: dict[str, float]
    products: dict[str, Any] = field(default_factory=dict)   # only for a kept frame
    learning: Learning | None = None    # only with a `learning` policy

    def summary(self) -> dict:
        """Everything but the mask and the products: the body of a DECISION."""
        out = {"keep": self.keep, "priority": self.priority, "reason": self.reason,
               "stats": self.stats, "tile_decisions": self.tile_decisions,
               "timings_ms": self.timings_ms}
        if self.learning is not None:
            out["uncertainty"] = self.learning.summary
        return out


@dataclass
class SelfTestResult:
    ok: bool
    max_abs_diff: float
    mask_agreement: float
    message: str


def _owned_regions(grid: TileGrid) -> list[tuple[int, int, int, int, int, int]]:
    """Per tile: the part of the frame it alone provides (shared.tiling's "center" stitch: the
    overlap is split in half between neighbours) as (row0, row1, col0, col1) in the frame and
    the (row, col) of that part inside the tile; clipped to the frame."""
    t, nr_nc = grid.tile, grid.grid_shape
    lead, trail = grid.overlap // 2, grid.overlap - grid.overlap // 2
    last_r, last_c = (nr_nc[0] - 1) * grid.stride, (nr_nc[1] - 1) * grid.stride
    out = []
    for r, c in grid.positions:
        r0, c0 = (0 if r == 0 else lead), (0 if c == 0 else lead)
        r1 = t if r == last_r else t - trail
        c1 = t if c == last_c else t - trail
        out.append((r + r0, min(r + r1, grid.height), c + c0, min(c + c1, grid.width), r0, c0))
    return out


class _Timer:
    def __init__(self):
        self.ms: dict[str, float] = {}
        self._t = time.perf_counter()
        self._start = self._t

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.ms[name] = round((now - self._t) * 1e3, 3)
        self._t = now

    def total(self) -> dict[str, float]:
        self.ms["total"] = round((time.perf_counter() - self._start) * 1e3, 3)
        return self.ms


class _MaskRows:
    """The frame's class mask, post-processed band by band as tile rows complete, while later
    tiles still infer: each band is opened (shared.postprocess.RowwiseOpening: the whole-mask
    opening, bit for bit), brought back to 10 m (f > 1), counted per policy cell
    (onboard.stats.CellStats) and, with `products`, added to the mask's PNG; the quicklook
    (the frame's alone) is made first. All of it on one worker thread, in order (OpenCV, numpy
    and zlib let go of the GIL), so that the thread feeding the requests never waits on it: on
    small tiles (64 x 64 at 20 m) a request is done in ~2 ms, under a 10980-wide quicklook's
    20 ms. `wait()` once the last band is submitted. For a frame then discarded the PNG and the
    quicklook are wasted: ~20 ms of CPU on a 13 x 2048 x 2048 frame, off the critical path."""

    def __init__(self, pipeline: "FramePipeline", frame_shape: tuple[int, int], counted: Sequence[str],
                 quicklook: Callable[[], bytes] | None = None):
        f = pipeline.factor
        self.factor, self.frame_shape = f, tuple(frame_shape)
        self.mask = np.empty((-(-frame_shape[0] // f), -(-frame_shape[1] // f)), np.uint8)
        self.full = self.mask if f == 1 else np.empty(frame_shape, np.uint8)   # at 10 m
        self.opening = RowwiseOpening(self.mask, pipeline.opening_radius, range(1, len(pipeline.classes)))
        self.stats = CellStats(frame_shape, pipeline.classes, pipeline.cell, counted)
        self.png = products_mod.MaskPng(*frame_shape) if quicklook is not None else None
        self._quicklook, self.quicklook = quicklook, None
        self.upsampled = 0              # rows of `mask` brought back to 10 m
        self.busy = {"opening_overlapped": 0.0, "stats_overlapped": 0.0, "products_overlapped": 0.0}
        self._pool: ThreadPoolExecutor | None = None
        self._jobs: list[Future] = []

    def __enter__(self) -> "_MaskRows":
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eoedge-post")
        self._jobs.append(self._pool.submit(self.make_quicklook))
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True)

    def submit(self, final: int) -> None:
        """`advance(final)` on the worker, after what was submitted before."""
        self._jobs.append(self._pool.submit(self.advance, final))

    def wait(self) -> None:
        """Until the worker has done every job (a job's exception is raised here)."""
        for job in self._jobs:
            job.result()

    def advance(self, final: int) -> None:
        """Rows 0 .. `final` - 1 of `mask` are stitched."""
        t0 = time.perf_counter()
        opened = self.opening.advance(final)
        self.upsample_rows(opened)
        t1 = time.perf_counter()
        self.stats.advance(self.full, min(opened * self.factor, self.frame_shape[0]))
        t2 = time.perf_counter()
        self.encode(min(opened * self.factor, self.frame_shape[0]))
        self.busy["opening_overlapped"] += (t1 - t0) * 1e3
        self.busy["stats_overlapped"] += (t2 - t1) * 1e3
        self.busy["products_overlapped"] += (time.perf_counter() - t2) * 1e3

    def upsample_rows(self, opened: int) -> None:
        if self.factor > 1 and opened > self.upsampled:
            upsample_rows(self.mask, self.factor, self.full, self.upsampled, opened)
            self.upsampled = opened

    def encode(self, final: int) -> None:
        """Rows of the 10 m mask up to `final` into the PNG."""
        if self.png is not None:
            self.png.add(self.full[self.png.rows:final])

    def make_quicklook(self) -> None:
        """The quicklook, once (a batch came back: the requests are busy again)."""
        if self._quicklook is not None and self.quicklook is None:
            t0 = time.perf_counter()
            self.quicklook = self._quicklook()
            self.busy["products_overlapped"] += (time.perf_counter() - t0) * 1e3

    def open_rest(self) -> None:
        self.opening.advance(self.mask.shape[0])

    def upsample_rest(self) -> None:
        self.upsample_rows(self.mask.shape[0])


class FramePipeline:
    """A bundle's model and rules, ready to process frames (one at a time).

    The model is compiled at the manifest's precision, or at `precision` unless it is "auto"
    (onboard.precision); `capabilities` are the device's (None: ask OpenVINO). A precision the
    device cannot run raises PrecisionUnsupported before anything is compiled.
    """

    def __init__(self, manifest: dict, model_dir: str | Path, device: str = "CPU", *,
                 batch_size: int = 2, num_requests: int | None = None, config: dict | None = None,
                 precision: str = AUTO, capabilities: Sequence[str] | None = None):
        self.manifest = validate_manifest(manifest)
        caps = device_capabilities(device) if capabilities is None else tuple(capabilities)
        self.precision = choose_precision(manifest_precision(manifest), precision, caps, device)
        inp, out, post = manifest["input"], manifest["output"], manifest["postprocess"]
        self.model_id, self.version = manifest["model_id"], manifest["version"]
        self.bands = tuple(inp["bands"])
        self.mean = np.asarray(inp["scaling"]["mean"], np.float32)
        self.std = np.asarray(inp["scaling"]["std"], np.float32)
        self.tile, self.overlap = int(inp["tile_size"]), int(inp["overlap"])
        self.factor = gsd_factor(inp)              # frame pixels per model pixel, per axis
        self.cell = self.tile * self.factor        # a model tile's side in frame pixels
        self.classes = tuple(out["classes"])
        self.thresholds = threshold_vector(self.classes, post["threshold"])
        self.opening_radius = int(post["opening_radius"])
        self.policy = manifest["policy"]
        self.model_dir = Path(model_dir)
        self.model = OpenVinoModel(self.model_dir / MODEL_XML, device, num_requests, tile=self.tile,
                                   batch_size=batch_size, activation=out["activation"], config=config,
                                   precision=self.precision.running)
        if self.model.channels != len(self.bands):
            raise ModelLoadError(f"{self.model.xml_path}: model takes {self.model.channels} bands, "
                                 f"manifest lists {len(self.bands)}")
        if self.model.num_classes != len(self.classes):
            raise ModelLoadError(f"{self.model.xml_path}: model outputs {self.model.num_classes} "
                                 f"classes, manifest lists {len(self.classes)}")
        self._lock = threading.Lock()
        # The opening, statistics and products run beside OpenVINO's inference threads (one per
        # core): a second OpenCV thread there only doubles their CPU (opening a 2048 x 2048 mask
        # took 8-10 ms of CPU on one thread, 19-21 ms on two, load 10 on 2 cores).
        cv2.setNumThreads(1)

    def info(self) -> dict:
        return {"model_id": self.model_id, "version": self.version, "bands": list(self.bands),
                "classes": list(self.classes), "tile_size": self.tile, "overlap": self.overlap,
                "gsd_factor": self.factor,
                "precision": self.precision.as_dict(), "runtime": self.model.properties()}

    def set_policy(self, policy: dict) -> None:
        """Replace the keep/discard policy (raises shared.policy.PolicyError naming the field)."""
        self.policy = validate_policy(policy, classes=self.classes)

    # ---------------------------------------------------------------------------------------
    def process(self, data: np.ndarray, bands: Sequence[str], scale: float = 1.0, *,
                policy: dict | None = None, make_products: bool = True,
                frame_id: str = "") -> FrameResult:
        """Decide on one frame (bands, H, W) of uint16, int16 or float32, reflectance = value * scale.
        `frame_id` seeds a `learning` block's random selection."""
        with self._lock:
            policy = self.policy if policy is None else validate_policy(policy, classes=self.classes)
            timer = _Timer()
            select = self._validate(data, bands, scale)
            timer.lap("validate")
            counted = classes_needing_components(policy)
            learning = learning_block(policy)
            grid = self._grid(data.shape[1:]) if learning else None
            tile_scores = np.zeros((len(grid), 2), np.float32) if learning else None
            quicklook = (lambda: products_mod.quicklook_jpg(data, bands, scale)) if make_products else None
            with _MaskRows(self, data.shape[1:], counted, quicklook) as rows:
                sub = self._tile_infer_stitch(data, select, scale, rows, tile_scores)
            timer.lap("tile_infer_threshold")
            timer.ms.update(sub)
            rows.open_rest()
            timer.lap("opening")
            if self.factor > 1:
                rows.upsample_rest()
                timer.lap("upsample")
            mask = rows.full
            frame_stats, cells = rows.stats.result(mask)
            timer.lap("stats")
            decision = evaluate(policy, frame_stats)
            tile_decisions = [tile_decision(policy, cell) for cell in cells]
            timer.lap("policy")
            kept = [(t["row"], t["col"], t["height"], t["width"]) for t in tile_decisions if t["keep"]]
            products = {}
            if decision.keep and make_products:
                rows.make_quicklook()
                rows.encode(mask.shape[0])
                products = products_mod.frame_products(data, bands, scale, mask, kept, self.cell,
                                                       all_kept=len(kept) == len(cells),
                                                       png=rows.png.finish(), quicklook=rows.quicklook)
            timer.lap("products")
            samples = None
            if learning:
                samples = self._learning(data, select, grid, tile_scores, learning, frame_id)
                timer.lap("learning")
            reason = f"{decision.reason}; {len(kept)}/{len(cells)} tiles kept"
            return FrameResult(decision.keep, decision.priority, reason, summarise_components(frame_stats),
                               mask, tile_decisions, timer.total(), products, samples)

    # -- stages ------------------------------------------------------------------------------
    def _validate(self, data: Any, bands: Sequence[str], scale: float) -> list[int]:
        """Check the frame; return the index in `data` of each band the model takes, in order."""
        if not isinstance(data, np.ndarray):
            raise FrameError(WRONG_DTYPE, f"data must be a numpy array, got {type(data).__name__}")
        if data.ndim != 3:
            raise FrameError(WRONG_SHAPE, f"data must be 3-D (bands, rows, cols), got shape {data.shape}")
        if data.dtype.name not in INPUT_DTYPES or not data.dtype.isnative:
            raise FrameError(WRONG_DTYPE, f"data dtype {data.dtype.str} not accepted "
                                            f"(native-order {', '.join(INPUT_DTYPES)})")
        if isinstance(bands, (str, bytes)) or not isinstance(bands, Sequence):
            raise FrameError(BAND_MISMATCH, f"bands must be a list of band names, got {type(bands).__name__}")
        if len(bands) != data.shape[0]:
            raise FrameError(BAND_MISMATCH, f"{len(bands)} band names for {data.shape[0]} bands in data")
        if 0 in data.shape:
            raise FrameError(EMPTY_FRAME, f"data has shape {data.shape}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)) \
                or not math.isfinite(scale) or scale <= 0:
            raise FrameError(BAD_SCALE, f"scale must be a finite number > 0, got {scale!r}")
        index: dict[str, int] = {}
        for i, name in enumerate(bands):
            try:
                canon = canonical_band(name)
            except (UnknownBandError, TypeError, AttributeError):
                raise FrameError(UNKNOWN_BAND, f"bands[{i}] = {name!r} is not a Sentinel-2 band") from None
            if canon in index:
                raise FrameError(DUPLICATE_BAND, f"bands[{i}] = {name!r} repeats bands[{index[canon]}]")
            index[canon] = i
        missing = [b for b in self.bands if b not in index]
        if missing:
            raise FrameError(MISSING_BANDS, f"model {self.model_id} needs {', '.join(missing)}; "
                                              f"frame has {', '.join(bands)}")
        select = [index[b] for b in self.bands]
        if data.dtype.kind == "f":
            with np.errstate(over="ignore", invalid="ignore"):
                self._check_finite(data, bands, select)
        self._check_scaled(data, bands, select, scale)
        return select

    def _check_scaled(self, data: np.ndarray, bands: Sequence[str], select: list[int],
                      scale: float) -> None:
        """Values finite on the wire can overflow float32 once scaled (uint16 x 1e38, float32
        3e38 x 10): the model computes value * scale / std - mean / std in float32, so the
        largest |value| of each band must keep reflectance and normalised input finite there.
        In float64 (exact bounds, no overflow of our own). Integer frames are checked against
        their dtype's extreme (no pass over the data unless that could overflow); float frames
        cost two reductions per band."""
        f32_max = float(np.finfo(np.float32).max)
        info = np.iinfo(data.dtype) if data.dtype.kind in "iu" else None
        for i, b in enumerate(select):
            band = data[b]
            extreme = max(abs(info.min), info.max) if info is not None else f32_max
            if self._scaled_bound(extreme, scale, i) <= f32_max:
                continue                        # no value of this dtype can overflow here
            largest = max(abs(float(band.max())), abs(float(band.min())))
            if not self._scaled_bound(largest, scale, i) <= f32_max:
                raise FrameError(NOT_FINITE, f"band {bands[b]}: values up to {largest:g} x scale "
                                             f"{float(scale):g} overflow float32 after scaling "
                                             f"and normalisation (limit {f32_max:.4g})")

    @staticmethod
    def _check_finite(data: np.ndarray, bands: Sequence[str], select: list[int]) -> None:
        for b in select:
            # one cheap reduction per band; a NaN/Inf poisons the sum (a huge finite frame
            # can overflow it to inf, hence the exact check before accusing it)
            if not math.isfinite(float(data[b].sum(dtype=np.float32))) and not np.isfinite(data[b]).all():
                raise FrameError(NOT_FINITE, f"band {bands[b]} holds NaN or Inf values")

    def _scaled_bound(self, value: float, scale: float, band: int) -> float:
        """The largest magnitude `value` reaches in the model's float32 arithmetic: as
        reflectance, and normalised with band `band`'s (index in the model) mean and std."""
        reflectance = value * float(scale)
        mean, std = abs(float(self.mean[band])), float(self.std[band])
        return max(reflectance, reflectance / std + mean / std)

    def _grid(self, frame_shape: tuple[int, int]) -> TileGrid:
        """The inference grid of a frame, at the processing GSD."""
        f = self.factor
        return TileGrid(-(-frame_shape[0] // f), -(-frame_shape[1] // f), self.tile, self.overlap)

    def _padded_lookup(self, grid: TileGrid, frame_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Frame row and column of each row/column of the padded grid at 10 m: shared.tiling pads
        the far edges with numpy's reflect, the same lookup."""
        (h, w), (hp, wp), f = frame_shape, grid.padded_shape, self.factor
        return (np.pad(np.arange(h), (0, hp * f - h), mode="reflect"),
                np.pad(np.arange(w), (0, wp * f - w), mode="reflect"))

    def _learning(self, data: np.ndarray, select: list[int], grid: TileGrid, tile_scores: np.ndarray,
                  block: dict, frame_id: str) -> Learning:
        """The policy's learning samples of this frame: shared.policy.choose_samples on the tile
        scores, each chosen tile's raw values cut as it was for inference (model bands, the
        frame's dtype, reflect-padded where it reaches past the frame's far edges)."""
        np.nan_to_num(tile_scores, copy=False, nan=0.0)
        chosen = choose_samples(tile_scores, block, frame_id)
        side, f = self.tile * self.factor, self.factor
        rows, cols = self._padded_lookup(grid, data.shape[1:])
        tiles = np.empty((len(chosen), len(select), side, side), data.dtype)
        samples = []
        h, w = data.shape[1:]
        for n, i in enumerate(chosen):
            r, c = (v * f for v in grid.positions[i])
            if r + side <= h and c + side <= w:     # band by band: 20x faster than fancy indexing
                for k, band in enumerate(select):
                    tiles[n, k] = data[band, r:r + side, c:c + side]
            else:                                   # reaching into the reflect padding
                tiles[n] = data[np.ix_(np.asarray(select), rows[r:r + side], cols[c:c + side])]
            samples.append({"row": int(r), "col": int(c), "size": int(side),
                            "entropy": float(tile_scores[i, 0]), "ambiguous": float(tile_scores[i, 1])})
        return Learning(block["select"], int(block["priority"]), samples, tiles, tile_scores.copy(),
                        uncertainty_summary(tile_scores, len(chosen)))

    def _tile_infer_stitch(self, data: np.ndarray, select: list[int], scale: float,
                           post: _MaskRows, tile_scores: np.ndarray | None = None) -> dict[str, float]:
        """Stitch the frame's class mask at the processing GSD (factor = gsd_m / 10: the tiles
        are cut factor x larger and binned in the graph) into `post.mask` from the graph's uint8
        tile masks, and hand `post` each band of rows as its tile row completes; the times
        spent inside inference (ms). `tile_scores` ((tiles, 2) or None): filled with the graph's
        per-tile scores (the variant with that output is run only then)."""
        h, w = data.shape[1:]
        t, f = self.tile, self.factor
        grid = self._grid((h, w))                                       # at the processing GSD
        positions, owned = grid.positions, _owned_regions(grid)
        side = t * f
        rows, cols = self._padded_lookup(grid, (h, w))
        identity = select == list(range(data.shape[0]))
        sel = np.asarray(select)
        mask = post.mask
        busy = {"tiling_overlapped": 0.0, "stitch_overlapped": 0.0}
        # tiles still out per tile row; a band of mask rows is final once every tile row down
        # to the one that owns its last row is stitched (requests finish in any order)
        per_row = grid.grid_shape[1]
        pending = [per_row] * grid.grid_shape[0]
        complete = [0]                  # tile rows complete from the top

        def fill(start: int, buf: np.ndarray) -> None:
            t0 = time.perf_counter()
            for j in range(len(buf)):
                r, c = positions[start + j]
                r, c = r * f, c * f
                if r + side <= h and c + side <= w:
                    window = data[:, r:r + side, c:c + side]
                    if identity:
                        buf[j] = window
                    else:       # band by band: 3x less CPU than np.take over the strided window
                        for k, band in enumerate(select):
                            buf[j, k] = window[band]
                else:        # an edge tile reaching into the padding
                    buf[j] = data[np.ix_(sel, rows[r:r + side], cols[c:c + side])]
            busy["tiling_overlapped"] += (time.perf_counter() - t0) * 1e3

        def on_output(start: int, masks: np.ndarray, scores: np.ndarray | None = None) -> None:
            t0 = time.perf_counter()
            if scores is not None:
                tile_scores[start:start + len(scores)] = scores
            for j in range(len(masks)):
                r0, r1, c0, c1, tr, tc = owned[start + j]
                mask[r0:r1, c0:c1] = masks[j, tr:tr + r1 - r0, tc:tc + c1 - c0]
                pending[(start + j) // per_row] -= 1
            busy["stitch_overlapped"] += (time.perf_counter() - t0) * 1e3
            done = complete[0]
            while done < len(pending) and pending[done] == 0:
                done += 1
            if done > complete[0]:
                complete[0] = done
                post.submit(owned[(done - 1) * per_row][1])

        gain = (np.float32(scale) / self.std).astype(np.float32)
        offset = (-self.mean / self.std).astype(np.float32)
        dtype = GRAPH_INPUT_DTYPE.get(self.precision.running, data.dtype.name)
        self.model.run_masks(len(grid), dtype, fill, on_output, gain, offset, self.thresholds, f,
                             scores=tile_scores is not None)
        post.wait()
        busy.update(post.busy)
        return {k: round(v, 3) for k, v in busy.items()}

    # ---------------------------------------------------------------------------------------
    def self_test(self, reference_npz_path: str | Path) -> SelfTestResult:
        """Run the bundle's reference tiles and compare with the ground's outputs, within the
        manifest's tolerances (max |difference| of the probabilities, agreement of the masks:
        the lower of the thresholded probabilities' and the frame graph's)."""
        ref = self.manifest["reference"]
        tol, min_agree = float(ref["max_abs_diff"]), float(ref["min_mask_agreement"])
        try:
            tiles, expected = load_reference(reference_npz_path, self.manifest)
        except (ValueError, OSError) as exc:
            return SelfTestResult(False, math.inf, 0.0, f"reference unusable: {exc}")
        if len(tiles) == 0:
            return SelfTestResult(False, math.inf, 0.0, f"{reference_npz_path}: no reference tiles")
        gain, offset = 1.0 / self.std, -self.mean / self.std
        with self._lock:
            got = self.model.infer(tiles, gain=gain, offset=offset)
            # the masks through the graph frames run through too (thresholds in it)
            masks = self.model.infer_masks(tiles, gain, offset, self.thresholds)
        diff = float(np.abs(got - expected).max())
        if not math.isfinite(diff):
            diff = math.inf
        want = threshold(expected, self.thresholds)
        agreement = min(float(np.mean(threshold(got, self.thresholds) == want)), float(np.mean(masks == want)))
        ok = diff <= tol and agreement >= min_agree
        message = (f"{len(tiles)} reference tiles: max |diff| {diff:.3g} "
                   f"({'<=' if diff <= tol else '>'} {tol:g}), mask agreement {agreement:.4f} "
                   f"({'>=' if agreement >= min_agree else '<'} {min_agree:g})")
        return SelfTestResult(ok, diff, agreement, message)
