"""A model chain on board (issue 16): a gate model on the whole frame, later models only on the
cells the earlier ones pass. One frame in, one decision out, read top to bottom in `process`:

    bands       the frame carries the union of the steps' bands
    gate        step 1 (e.g. the cloud model) runs on the whole frame as a single model does
                (FramePipeline.process: tiles, inference, stitching, opening); its cells
                (gate.cell frame pixels, one gate tile) are the chain's cells
    run_if      for each later step, per cell, its `run_if` (one shared.policy `if` block) on the
                statistics of the steps already run on that cell
    target      the step runs on each horizontal run of contiguous passing cells, stacked with the
                runs of the same columns below it into a box (`passing_boxes`: fewer, larger
                calls), cut as a view of the frame (no copy): its own tiles from the box's corner,
                reflect-padded at the box's edges as at a frame's, opened per box (an object cut
                by a box's edge is opened as at a frame's edge); every cell passing, the box is
                the whole frame. Its mask is 255 (nodata) where it did not run
    statistics  per cell and per frame, the union of the steps' fractions (a class of a step that
                did not run on a cell: 0.0) and the components the policy counts
    policy      shared.policy.evaluate per cell and per frame, over the classes of every step
    products    for a kept frame, as a single model's (the gate's mask as `mask_png`), plus one
                mask per later step (`mask_<step>`, PNG, 255 = not run)

The chain's accounting (`chain`: per step model, cells run of total, ms) goes into the DECISION,
the PRODUCT and the telemetry. The store (onboard.store) verifies and self-tests each step as a
bundle of its own, and installs, activates and rolls the chain back as one unit.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from onboard import products as products_mod
from onboard.errors import MISSING_BANDS, FrameError
from onboard.pipeline import FramePipeline, FrameResult, tile_decision
from onboard.stats import cell_edges, frame_and_cell_stats, summarise_components
from onboard.telemetry import StepCounters
from shared.bands import UnknownBandError, canonical_band
from shared.chain import NOT_RUN, ChainStep, chain_bands, chain_classes
from shared.manifest import run_if_policy
from shared.policy import classes_needing_components, evaluate, validate_policy

# A later step's FramePipeline runs batches of one tile: it runs on boxes of a few tiles, where
# a batch of two pads a lone tile to two and leaves a core idle (benchmarks/bench_chain.py:
# a 1024 x 1024 frame at 30% cloud, ship model on 48 of 64 cells, 388 ms at batch 2, 196 ms at 1).
LATER_STEP_BATCH = 1
# What a step's own FramePipeline decides is not used (the chain's policy decides): the
# cheapest policy it can evaluate, no products.
MASK_ONLY_POLICY = {"rules": [], "default": {"then": "keep"}}


@dataclass
class ChainResult(FrameResult):
    """A FrameResult (`class_mask` is the gate's) with each later step's mask and the chain's
    accounting: [{name, model_id, version, cells_run, cells_total, ms}]."""

    step_masks: dict[str, np.ndarray] = field(default_factory=dict)
    chain: list[dict] = field(default_factory=list)
    step_classes: dict[str, tuple[str, ...]] = field(default_factory=dict)   # gate first

    @property
    def class_mask_classes(self) -> tuple[str, ...]:
        """What `class_mask` (the gate's mask, `mask_png`) holds: the gate's classes."""
        return next(iter(self.step_classes.values()))

    def summary(self) -> dict:
        return {**super().summary(), "chain": {"steps": self.chain}}


@dataclass(frozen=True)
class ChainPrecision:
    """Each step's onboard.precision.Precision; as_dict() for status and telemetry."""

    steps: dict

    @property
    def running(self) -> dict[str, str]:
        return {name: p.running for name, p in self.steps.items()}

    def as_dict(self) -> dict:
        return {name: p.as_dict() for name, p in self.steps.items()}


def passing_runs(passing: np.ndarray) -> list[tuple[int, int, int]]:
    """(row, first col, end col) of each horizontal run of True cells, row by row."""
    runs = []
    for i, row in enumerate(passing):
        edges = np.flatnonzero(np.diff(np.concatenate(([0], row.astype(np.int8), [0]))))
        runs += [(i, int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]
    return runs


def passing_boxes(passing: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(first row, end row, first col, end col) in cells: the horizontal runs of True cells,
    each stacked with the runs of the same columns in the rows below it. One model call per
    box: a lone cell is one tile whose inference no other tile overlaps, so fewer, larger
    views run faster (the same cells, the same mask but at the boxes' edges)."""
    open_boxes: dict[tuple[int, int], int] = {}      # (first col, end col) -> first row
    boxes = []
    for i in range(passing.shape[0] + 1):
        row = {(a, b) for r, a, b in passing_runs(passing[i:i + 1])} if i < passing.shape[0] else set()
        for span in [s for s in open_boxes if s not in row]:
            boxes.append((open_boxes.pop(span), i, *span))
        for span in row:
            open_boxes.setdefault(span, i)
    return sorted(boxes)


def step_stats(mask: np.ndarray, classes: Sequence[str], cell: int, counted: Sequence[str],
               partial: bool) -> tuple[dict, list[dict]]:
    """shared.policy statistics of one step's mask for the frame and each cell. `partial`: the
    mask holds NOT_RUN where the step did not run, which counts as none of its classes (so a
    class fraction there is 0.0, and a frame fraction is of all the frame's pixels)."""
    if not partial:
        return frame_and_cell_stats(mask, classes, cell, counted)
    shifted = mask + np.uint8(1)            # NOT_RUN wraps to 0, class k becomes k + 1
    frame, cells = frame_and_cell_stats(shifted, ("", *classes), cell, counted)
    for stats in [frame, *(c["stats"] for c in cells)]:
        stats["fractions"].pop("")
    return frame, cells


def class_mask(pipeline: FramePipeline, data: np.ndarray, bands: Sequence[str],
               scale: float) -> tuple[np.ndarray, dict]:
    """One step's class mask of `data` (a frame, or a view of one) and its stages' timings."""
    result = pipeline.process(data, bands, scale, policy=MASK_ONLY_POLICY, make_products=False)
    return result.class_mask, result.timings_ms


def _merge(into: dict, stats: dict) -> None:
    into["fractions"].update(stats["fractions"])
    into["components"].update(stats["components"])


class ChainPipeline:
    """The steps' FramePipelines (gate first) and the chain's policy, ready to process frames.

    `steps`: [(shared.chain.ChainStep, its loaded and self-tested FramePipeline)]. Offers what
    the daemon uses of a FramePipeline: process, set_policy, info, bands, classes, precision."""

    def __init__(self, manifest: dict, steps: Sequence[tuple[ChainStep, FramePipeline]]):
        self.manifest = manifest
        self.model_id, self.version = manifest["model_id"], manifest["version"]
        self.steps = [(step.name, pipeline, None if step.run_if is None else run_if_policy(step.run_if))
                      for step, pipeline in steps]
        self.step_classes = {step.name: tuple(pipeline.classes) for step, pipeline in steps}
        self.gate = steps[0][1]
        self.cell = self.gate.cell
        self.classes = tuple(chain_classes([s.manifest for s, _ in steps]))
        self.bands = tuple(chain_bands([s.manifest for s, _ in steps]))
        self.precision = ChainPrecision({name: p.precision for name, p, _ in self.steps})
        self.policy = validate_policy(manifest["policy"], classes=self.classes)
        self.counters = StepCounters([name for name, _, _ in self.steps])
        self._lock = threading.Lock()

    def info(self) -> dict:
        return {"model_id": self.model_id, "version": self.version, "bands": list(self.bands),
                "classes": list(self.classes), "cell": self.cell,
                "steps": [{"name": name, "run_if": self.manifest["chain"]["steps"][i].get("run_if"),
                           **pipeline.info()} for i, (name, pipeline, _) in enumerate(self.steps)]}

    def everywhere(self) -> "ChainPipeline":
        """The same steps with every run_if dropped: each model on the whole frame (what a chain
        saves is measured against this: benchmarks/bench_chain.py)."""
        other = object.__new__(ChainPipeline)
        other.__dict__.update(self.__dict__)
        other.steps = [(name, pipeline, None) for name, pipeline, _ in self.steps]
        other.counters = StepCounters([name for name, _, _ in self.steps])
        other._lock = threading.Lock()
        return other

    def set_policy(self, policy: dict) -> None:
        """Replace the chain's policy (PolicyError naming the field): classes of every step."""
        self.policy = validate_policy(policy, classes=self.classes)

    # ---------------------------------------------------------------------------------------
    def process(self, data: np.ndarray, bands: Sequence[str], scale: float = 1.0, *,
                policy: dict | None = None, make_products: bool = True,
                frame_id: str = "") -> ChainResult:
        """Decide on one frame (bands, H, W) with the chain (module docstring). A chain sends no
        learning samples: a `learning` block in its policy is validated and not used, and its
        steps run without the tile scores output (`frame_id` is taken as a FramePipeline's is)."""
        with self._lock:
            policy = self.policy if policy is None else validate_policy(policy, classes=self.classes)
            started = time.perf_counter()
            self._check_bands(bands)
            counted = set(classes_needing_components(policy))
            for _, _, run_if in self.steps[1:]:
                counted.update(classes_needing_components(run_if) if run_if else ())
            timings: dict[str, float] = {}
            masks: dict[str, np.ndarray] = {}
            frame_stats = {"fractions": {}, "components": {}}
            cells: list[dict] = []
            chain: list[dict] = []
            steps_run: list[list[str]] = []
            for i, (name, pipeline, run_if) in enumerate(self.steps):
                t0 = time.perf_counter()
                classes = self.step_classes[name]
                mine = [c for c in classes if c in counted]
                if i == 0:                            # the gate: the whole frame
                    mask, sub = class_mask(pipeline, data, bands, scale)
                    timings.update({f"{name}.{k}": v for k, v in sub.items()
                                    if k in ("validate", "tile_infer_threshold", "opening")})
                    ran = np.ones((len(cell_edges(mask.shape[0], self.cell)),
                                   len(cell_edges(mask.shape[1], self.cell))), bool)
                    stats, step_cells = step_stats(mask, classes, self.cell, mine, partial=False)
                    cells = [{**c, "stats": {"fractions": {}, "components": {}}} for c in step_cells]
                    steps_run = [[] for _ in cells]
                else:
                    ran = self._passing(run_if, cells, ran.shape) if run_if else np.ones_like(ran)
                    mask = self._run_where(pipeline, data, bands, scale, ran)
                    stats, step_cells = step_stats(mask, classes, self.cell, mine, partial=True)
                masks[name] = mask
                _merge(frame_stats, stats)
                for k, (c, s) in enumerate(zip(cells, step_cells)):
                    _merge(c["stats"], s["stats"])
                    if ran.flat[k]:
                        steps_run[k].append(name)
                ms = round((time.perf_counter() - t0) * 1e3, 3)
                timings[f"step_{name}"] = ms
                chain.append({"name": name, "model_id": pipeline.model_id, "version": pipeline.version,
                              "cells_run": int(ran.sum()), "cells_total": int(ran.size), "ms": ms})
            t0 = time.perf_counter()
            decision = evaluate(policy, frame_stats)
            tile_decisions = [{**tile_decision(policy, c), "steps_run": names}
                              for c, names in zip(cells, steps_run)]
            timings["policy"] = round((time.perf_counter() - t0) * 1e3, 3)
            t0 = time.perf_counter()
            gate_name = self.steps[0][0]
            kept = [(t["row"], t["col"], t["height"], t["width"]) for t in tile_decisions if t["keep"]]
            products: dict[str, Any] = {}
            if decision.keep and make_products:
                products = products_mod.frame_products(data, bands, scale, masks[gate_name], kept,
                                                       self.cell, all_kept=len(kept) == len(cells))
                for name, _, _ in self.steps[1:]:
                    products[f"mask_{name}"] = products_mod.mask_png(masks[name])
            timings["products"] = round((time.perf_counter() - t0) * 1e3, 3)
            timings["total"] = round((time.perf_counter() - started) * 1e3, 3)
            self.counters.add(chain)
            runs = ", ".join(f"{s['name']} on {s['cells_run']}/{s['cells_total']} cells" for s in chain[1:])
            reason = f"{decision.reason}; {len(kept)}/{len(cells)} tiles kept; {runs}"
            return ChainResult(decision.keep, decision.priority, reason, summarise_components(frame_stats),
                               masks[gate_name], tile_decisions, timings, products,
                               step_masks={n: masks[n] for n, _, _ in self.steps[1:]}, chain=chain,
                               step_classes=dict(self.step_classes))

    # -- stages ------------------------------------------------------------------------------
    def _check_bands(self, bands: Sequence[str]) -> None:
        """Every step's bands in the frame (each step checks the rest of the frame itself)."""
        have = set()
        for name in bands if isinstance(bands, (list, tuple)) else ():
            try:
                have.add(canonical_band(name))
            except (UnknownBandError, TypeError, AttributeError):
                pass                         # the gate names it (FramePipeline's own check)
        missing = [b for b in self.bands if b not in have]
        if missing and have:
            raise FrameError(MISSING_BANDS, f"chain {self.model_id} needs {', '.join(missing)}; "
                                            f"frame has {', '.join(map(str, bands))}")

    @staticmethod
    def _passing(run_if: dict, cells: list[dict], shape: tuple[int, int]) -> np.ndarray:
        """Per cell (rows, cols): whether `run_if` holds on the statistics of the steps run so far."""
        return np.array([evaluate(run_if, c["stats"]).keep for c in cells], bool).reshape(shape)

    def _run_where(self, pipeline: FramePipeline, data: np.ndarray, bands: Sequence[str],
                   scale: float, passing: np.ndarray) -> np.ndarray:
        """The step's mask over the frame: run on each horizontal run of passing cells (a view of
        the frame, no copy), NOT_RUN elsewhere."""
        h, w = data.shape[1:]
        mask = np.full((h, w), NOT_RUN, np.uint8)
        cell = self.cell
        for i0, i1, j0, j1 in passing_boxes(passing):
            r0, r1, c0, c1 = i0 * cell, min(i1 * cell, h), j0 * cell, min(j1 * cell, w)
            mask[r0:r1, c0:c1], _ = class_mask(pipeline, data[:, r0:r1, c0:c1], bands, scale)
        return mask
