"""Statistics of a class mask, in the shape `shared.policy.evaluate` reads:

    {"fractions": {class: fraction of pixels}, "components": {class: [sizes, largest first]}}

for a whole frame and for each cell of a regular grid (the tiles the policy decides on).
Connected components come from OpenCV (8-connectivity), only for the classes the policy counts.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

CONNECTIVITY = 8


def component_sizes(mask: np.ndarray, class_index: int) -> list[int]:
    """Pixel counts of the connected components of one class, largest first."""
    binary = (mask == class_index).view(np.uint8)
    if not binary.any():
        return []
    n, _, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=CONNECTIVITY)
    sizes = stats[1:n, cv2.CC_STAT_AREA]        # label 0 is the background
    return sorted((int(s) for s in sizes), reverse=True)


def cell_edges(size: int, cell: int) -> np.ndarray:
    """Start offsets of the cells along one axis: 0, cell, 2*cell, ... (< size)."""
    return np.arange(0, size, cell)


def _block_sums(binary: np.ndarray, cell: int) -> np.ndarray:
    """Sums of a 0/1 uint8 image over `cell` x `cell` blocks (edge blocks smaller), (rows, cols)
    int64: reshapes of the whole blocks, a separate sum for the ragged edge."""
    def along(a: np.ndarray, axis: int) -> np.ndarray:
        n = a.shape[axis]
        whole = n // cell
        parts = []
        if whole:
            head = a[:, :whole * cell] if axis == 1 else a[:whole * cell]
            shape = list(a.shape)
            shape[axis:axis + 1] = [whole, cell]
            parts.append(head.reshape(shape).sum(axis=axis + 1, dtype=np.int64))
        if n % cell:
            tail = a[:, whole * cell:] if axis == 1 else a[whole * cell:]
            parts.append(tail.sum(axis=axis, keepdims=True, dtype=np.int64))
        return np.concatenate(parts, axis=axis) if len(parts) > 1 else parts[0]
    return along(along(binary, 0), 1)


def cell_class_counts(mask: np.ndarray, num_classes: int, cell: int) -> np.ndarray:
    """Pixels per class in each cell of a `cell` x `cell` grid over `mask` (edge cells smaller):
    (rows, cols, K) int64. Class 0 is what the other classes leave (one pass fewer)."""
    h, w = mask.shape
    rows, cols = cell_edges(h, cell), cell_edges(w, cell)
    counts = np.empty((len(rows), len(cols), num_classes), np.int64)
    sizes = np.outer(np.minimum(cell, h - rows), np.minimum(cell, w - cols))
    for k in range(1, num_classes):
        binary = (mask == k).view(np.uint8)
        counts[:, :, k] = _block_sums(binary, cell) if cv2.countNonZero(binary) else 0
    counts[:, :, 0] = sizes - counts[:, :, 1:].sum(axis=2)
    return counts


def frame_and_cell_stats(mask: np.ndarray, classes: Sequence[str], cell: int,
                         component_classes: Sequence[str] = ()) -> tuple[dict, list[dict]]:
    """Policy statistics of the whole mask and of each cell (row-major list of
    {row, col, height, width, stats}), from one count per class."""
    return CellStats(mask.shape, classes, cell, component_classes).result(mask)


class CellStats:
    """`frame_and_cell_stats` over a mask whose rows become final top to bottom: `advance(mask,
    final)` counts every row of cells that lies in rows < `final` (while later tiles still
    infer), `result(mask)` the rest, then the frame (its fractions add the cells' counts; its
    components need the whole mask)."""

    def __init__(self, shape: tuple[int, int], classes: Sequence[str], cell: int,
                 component_classes: Sequence[str] = ()):
        self.shape, self.classes, self.cell = tuple(shape), tuple(classes), int(cell)
        self.component_classes = tuple(component_classes)
        self.rows, self.cols = cell_edges(self.shape[0], cell), cell_edges(self.shape[1], cell)
        self.counts = np.zeros((len(self.rows), len(self.cols), len(self.classes)), np.int64)
        self.cells: list[dict] = []
        self.counted = 0                        # rows of cells counted so far

    def advance(self, mask: np.ndarray, final: int) -> None:
        h, w = self.shape
        stop = self.counted
        while stop < len(self.rows) and min(self.rows[stop] + self.cell, h) <= final:
            stop += 1
        if stop == self.counted:
            return
        top, bottom = self.rows[self.counted], min(self.rows[stop - 1] + self.cell, h)
        self.counts[self.counted:stop] = cell_class_counts(mask[top:bottom], len(self.classes), self.cell)
        index = {name: self.classes.index(name) for name in self.component_classes}
        for i in range(self.counted, stop):
            r = self.rows[i]
            for j, c in enumerate(self.cols):
                ch, cw = min(self.cell, h - r), min(self.cell, w - c)
                n = ch * cw
                stats = {"fractions": {name: float(self.counts[i, j, k]) / n for k, name in enumerate(self.classes)},
                         "components": {}}
                if index:
                    sub = mask[r:r + ch, c:c + cw]
                    for name, k in index.items():
                        stats["components"][name] = component_sizes(sub, k)
                self.cells.append({"row": int(r), "col": int(c), "height": int(ch), "width": int(cw),
                                   "stats": stats})
        self.counted = stop

    def result(self, mask: np.ndarray) -> tuple[dict, list[dict]]:
        """(frame stats, cells) once every row of `mask` is final."""
        self.advance(mask, self.shape[0])
        total = self.counts.sum(axis=(0, 1))
        frame = {"fractions": {name: float(total[k]) / mask.size for k, name in enumerate(self.classes)},
                 "components": {name: component_sizes(mask, self.classes.index(name))
                                for name in self.component_classes}}
        return frame, self.cells


def summarise_components(stats: dict, keep: int = 32) -> dict:
    """Stats for a message: the `keep` largest components per class and the total count
    (a noisy mask can have thousands; the policy saw them all)."""
    comps = stats.get("components", {})
    out = dict(stats)
    out["components"] = {name: sizes[:keep] for name, sizes in comps.items()}
    if comps:
        out["component_counts"] = {name: len(sizes) for name, sizes in comps.items()}
    return out
