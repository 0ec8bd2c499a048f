"""From per-class probabilities to a clean class mask: threshold, then morphological opening.

The same functions serve the ground (evaluation) and the daemon, so both post-process
identically. OpenCV does the morphology (about 100x faster than scikit-image on a full
Sentinel-2 tile, and bit-identical to `skimage.morphology.opening(mask, disk(r))`); it is
imported inside the functions because `shared` itself depends only on numpy.

The rules:

- `threshold`: a pixel takes the most probable class among those *eligible* for it: a class
  with a threshold is eligible only where its probability reaches the threshold, a class
  without one always is. Where no class is eligible (every class thresholded, none reached) the
  pixel gets class 0, the background. Ties go to the lower class index, as with `argmax`.
- `open_classes`: a binary opening with `disk(radius)` of each class's mask but the
  background; the pixels an opening removes (specks thinner than the disk) become background.
  `RowwiseOpening` gives the same mask band by band, as rows become final (the daemon opens
  each row of tiles while later tiles still infer).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np


def disk(radius: int) -> np.ndarray:
    """A disk-shaped structuring element (2r+1, 2r+1) uint8, identical to skimage's `disk(r)`."""
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ValueError(f"radius must be an integer >= 0, got {radius!r}")
    r = np.arange(-radius, radius + 1)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius).astype(np.uint8)


def threshold_vector(classes: Sequence[str], thresholds: Mapping[str, float] | None) -> np.ndarray:
    """Per-class thresholds (K,) float32 in class order, NaN for "no threshold"
    (a manifest's `postprocess.threshold` is {class name: 0..1} for some classes)."""
    out = np.full(len(classes), np.nan, dtype=np.float32)
    for name, value in (thresholds or {}).items():
        if name not in classes:
            raise ValueError(f"threshold for unknown class {name!r} (classes: {', '.join(classes)})")
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"threshold for {name!r} must be in 0..1, got {value!r}")
        out[list(classes).index(name)] = value
    return out


def threshold(probs: np.ndarray, thresholds: Sequence[float | None] | np.ndarray | None = None,
              out: np.ndarray | None = None) -> np.ndarray:
    """Class mask (..., H, W) uint8 from probabilities (K, H, W) or (N, K, H, W).

    `thresholds`: one per class (None or NaN: not thresholded); None: plain argmax.
    `out`: an optional uint8 array to write into (e.g. a view into a frame-sized mask).
    """
    probs = np.asarray(probs)
    if probs.ndim < 3:
        raise ValueError(f"probs must be (K, H, W) or (N, K, H, W), got shape {probs.shape}")
    axis = probs.ndim - 3
    k = probs.shape[axis]
    if k == 0 or k > 256:
        raise ValueError(f"need 1..256 classes for a uint8 mask, got {k}")
    thr = np.full(k, np.nan, np.float32) if thresholds is None else np.array(
        [np.nan if t is None else t for t in thresholds], dtype=np.float32)
    if thr.shape != (k,):
        raise ValueError(f"{thr.size} thresholds for {k} classes")
    shape = probs.shape[:axis] + probs.shape[axis + 1:]
    if out is None:
        out = np.zeros(shape, dtype=np.uint8)
    elif out.shape != shape or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 {shape}, got {out.dtype} {out.shape}")
    else:
        out[...] = 0
    if np.isnan(thr).all():
        out[...] = np.argmax(probs, axis=axis)
        return out
    # Ineligible scores become -inf (one pass over all classes), then a running maximum over
    # classes: strict ">" keeps the lower index on ties, and an all -inf pixel stays class 0.
    floor = np.where(np.isnan(thr), -np.inf, thr).astype(np.float32)
    shape_k = [1] * probs.ndim
    shape_k[axis] = k
    score = np.where(probs >= floor.reshape(shape_k), probs, np.float32(-np.inf))
    best = np.take(score, 0, axis=axis)
    for c in range(1, k):
        s = np.take(score, c, axis=axis)
        out[s > best] = c
        best = np.maximum(best, s)
    return out


def opening(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary opening of `mask` (H, W) (bool or 0/1 integers) with `disk(radius)`.

    Identical to `skimage.morphology.opening(mask, disk(radius))`, borders included: OpenCV's
    default border for erosion is +inf and for dilation -inf, so the image edge neither erodes
    nor grows the mask, as in scikit-image. Returns the mask's dtype.
    """
    import cv2   # noqa: PLC0415 (kept out of `shared`'s import-time dependencies)

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if radius == 0 or mask.size == 0:
        disk(radius)      # still validates the radius
        return mask.copy()
    src = mask.view(np.uint8) if mask.dtype == np.bool_ else (mask != 0).view(np.uint8)
    opened = cv2.morphologyEx(np.ascontiguousarray(src), cv2.MORPH_OPEN, disk(radius))
    if mask.dtype == np.bool_:
        return opened.view(np.bool_)
    return opened.astype(mask.dtype, copy=False)


def open_classes(mask: np.ndarray, radius: int, classes: Iterable[int] | None = None,
                 background: int = 0) -> np.ndarray:
    """Open each class of a class mask (H, W) uint8 in place; removed pixels become `background`.

    `classes`: the class indices to open (default: every class present but the background).
    Each class is opened from the mask as it came (a pixel another class's opening removed
    becomes the background, never this class). Returns `mask`.
    """
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"mask must be a 2-D uint8 class mask, got {mask.dtype} {mask.shape}")
    if classes is None:
        present = np.flatnonzero(np.bincount(mask.ravel(), minlength=1))
        classes = [int(c) for c in present if c != background]
    RowwiseOpening(mask, radius, classes, background).advance(mask.shape[0])
    return mask


class RowwiseOpening:
    """`open_classes` on a mask whose rows become final top to bottom (tiles stitched row by
    row while later tiles still infer): `advance(final)` opens, in place, every row whose
    opening the rows < `final` already decide, and returns how many rows from the top are
    opened. The result is the whole-mask opening, bit for bit: a pixel's opening with a disk
    of radius r depends on the rows within 2r of it (erosion, then dilation), so rows up to
    `final - 2r` are decided, and each band is opened with 2r rows of margin on both sides,
    above it the rows as they were before their own opening (kept aside); the mask's top and
    bottom edges are the same edges as in the whole-mask call (OpenCV: they neither erode
    nor grow a class).
    """

    def __init__(self, mask: np.ndarray, radius: int, classes: Iterable[int], background: int = 0):
        if mask.ndim != 2 or mask.dtype != np.uint8:
            raise ValueError(f"mask must be a 2-D uint8 class mask, got {mask.dtype} {mask.shape}")
        self.kernel = disk(radius)
        self.mask, self.margin = mask, 2 * int(radius)
        self.classes, self.background = [int(c) for c in classes], np.uint8(background)
        self.done = 0                                  # rows opened so far
        self._above = mask[:0].copy()                  # rows done - margin .. done as they came

    def advance(self, final: int) -> int:
        """Rows 0 .. `final` - 1 hold their final classes; open what they decide."""
        import cv2   # noqa: PLC0415

        h = self.mask.shape[0]
        final = min(int(final), h)
        end = h if final == h else final - self.margin
        if end <= self.done:
            return self.done
        if self.margin == 0 or not self.classes:
            self.done = end
            return end
        lo = max(0, self.done - self.margin)
        if self.done == 0:          # nothing opened yet: work in place (no copy of a whole mask)
            src = self.mask[:final]
        else:                       # the margin above as it was before its own opening
            src = self.mask[lo:final].copy()
            src[:self.done - lo] = self._above
        # kept before this band changes them: the next band's margin above
        self._above = src[max(0, end - self.margin) - lo:end - lo].copy()
        band = self.mask[self.done:end]
        for c in self.classes:
            binary = (src == c).view(np.uint8)
            if not cv2.countNonZero(binary):     # absent from this band (most bands of a clear
                continue                         # frame): nothing to open
            opened = cv2.morphologyEx(binary, cv2.MORPH_OPEN, self.kernel)
            # opened is a subset of binary: the difference is what the opening removed
            removed = cv2.subtract(binary, opened)[self.done - lo:end - lo]
            np.copyto(band, self.background, where=removed.view(np.bool_))
        self.done = end
        return end


def upsample_mask(mask: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """A class mask computed at `factor` x the frame's pixel size back on the frame's grid
    (H, W) = `shape`: each pixel repeated factor x factor (nearest), the far edge cropped."""
    h, w = shape
    if mask.ndim != 2 or mask.shape != (-(-h // factor), -(-w // factor)):
        raise ValueError(f"mask {mask.shape} is not a {factor}x binning of {shape}")
    out = np.empty(shape, np.uint8)
    upsample_rows(mask, factor, out, 0, mask.shape[0])
    return out


def upsample_rows(mask: np.ndarray, factor: int, out: np.ndarray, row0: int, row1: int) -> None:
    """`upsample_mask` for rows `row0` .. `row1` - 1 of `mask` only, written into `out` (the
    frame-sized mask) at rows row0 * factor .. min(row1 * factor, H) - 1: a mask coming back
    band by band."""
    import cv2   # noqa: PLC0415

    if row1 <= row0:
        return
    band = mask[row0:row1]
    up = cv2.resize(band, (band.shape[1] * factor, band.shape[0] * factor), interpolation=cv2.INTER_NEAREST)
    rows = min(row1 * factor, out.shape[0]) - row0 * factor
    out[row0 * factor:row0 * factor + rows] = up[:rows, :out.shape[1]]
