"""Cut a frame into fixed-size overlapping tiles and stitch per-pixel outputs back.

Models take a fixed t x t input, frames come in any size. `tile` pads the far (bottom/right)
edges so that a regular grid with stride t - overlap covers the frame, and `stitch` undoes it:
`stitch(*tile(x))` gives back `x` exactly, for any frame size, in both stitch modes.

- "blend": a weighted average with a ramp window that falls off inside the overlaps, so tile
  seams do not show in probability maps. The weights are small integers and the sum runs in
  float64, so identical inputs average back to themselves bit for bit.
- "center": each pixel comes from the tile in which it lies most centrally (no averaging);
  right for class maps, where the mean of two labels means nothing.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

PAD_MODES = ("reflect", "constant", "edge", "symmetric")
STITCH_MODES = ("blend", "center")


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _steps(size: int, tile: int, stride: int) -> int:
    """Tiles needed along one axis: one if the frame fits, else enough to reach its far edge."""
    return 1 if size <= tile else -(-(size - tile) // stride) + 1


@dataclass(frozen=True)
class TileGrid:
    """The geometry of a tiling: frame (height, width), tile size and overlap.

    Tiles start every `stride = tile - overlap` pixels from the top-left corner; the grid
    extends past the bottom/right edges (the padding) just far enough to cover the frame."""

    height: int
    width: int
    tile: int
    overlap: int = 0

    def __post_init__(self):
        _check_int("height", self.height, 1)
        _check_int("width", self.width, 1)
        _check_int("tile", self.tile, 1)
        _check_int("overlap", self.overlap, 0)
        if self.overlap >= self.tile:
            raise ValueError(f"overlap must be smaller than tile, got overlap={self.overlap} "
                             f"with tile={self.tile}")

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(tile rows, tile columns)."""
        return (_steps(self.height, self.tile, self.stride),
                _steps(self.width, self.tile, self.stride))

    @property
    def padded_shape(self) -> tuple[int, int]:
        nr, nc = self.grid_shape
        return ((nr - 1) * self.stride + self.tile, (nc - 1) * self.stride + self.tile)

    @property
    def positions(self) -> list[tuple[int, int]]:
        """Top-left (row, col) of every tile, row-major: the order of `tile`'s output."""
        nr, nc = self.grid_shape
        return [(r * self.stride, c * self.stride) for r in range(nr) for c in range(nc)]

    def __len__(self) -> int:
        nr, nc = self.grid_shape
        return nr * nc


def tile(x: np.ndarray, tile: int, overlap: int = 0, pad_mode: str = "reflect",
         constant_value: float = 0) -> tuple[np.ndarray, TileGrid]:
    """Cut `x` (C, H, W) into tiles (N, C, tile, tile), N = len(grid), in `grid.positions`
    order. The far edges are padded with `pad_mode` ("reflect" default, "constant" with
    `constant_value`, or numpy's "edge"/"symmetric"); reflect works for any frame size,
    including frames smaller than a tile and 1x1."""
    if not isinstance(x, np.ndarray) or x.ndim != 3:
        raise ValueError(f"x must be a 3-D array (channels, height, width), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if x.shape[0] == 0:
        raise ValueError("x has no channels (shape[0] == 0)")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {', '.join(PAD_MODES)}, got {pad_mode!r}")
    grid = TileGrid(x.shape[1], x.shape[2], tile, overlap)
    hp, wp = grid.padded_shape
    pad = ((0, 0), (0, hp - grid.height), (0, wp - grid.width))
    if hp == grid.height and wp == grid.width:
        padded = x
    elif pad_mode == "constant":
        padded = np.pad(x, pad, mode="constant", constant_values=constant_value)
    else:
        padded = np.pad(x, pad, mode=pad_mode)
    # A strided view of every t x t window, sub-sampled at the stride: no Python loop per tile,
    # and one copy (the reshape) into the contiguous (N, C, t, t) batch a runtime wants.
    windows = np.lib.stride_tricks.sliding_window_view(padded, (tile, tile), axis=(1, 2))
    windows = windows[:, ::grid.stride, ::grid.stride]            # (C, nr, nc, t, t)
    tiles = np.ascontiguousarray(windows.transpose(1, 2, 0, 3, 4))  # (nr, nc, C, t, t)
    return tiles.reshape(len(grid), x.shape[0], tile, tile), grid


def ramp_window(tile: int, overlap: int) -> np.ndarray:
    """Integer weights (tile, tile) for blending: 1, 2, .., overlap+1 across each overlap band,
    flat in the middle; never zero, so every pixel of the frame has weight."""
    i = np.arange(tile)
    w = np.minimum(np.minimum(i + 1, tile - i), overlap + 1).astype(np.float64)
    return np.outer(w, w)


def _cast_back(acc: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float64 accumulator -> the tiles' dtype: integers round to nearest (a blended 199.99999
    must give 200, not 199) and clip to the type's range."""
    if dtype == np.bool_:
        return acc >= 0.5
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(acc), info.min, info.max).astype(dtype)
    return acc.astype(dtype)


def stitch(tiles: np.ndarray, grid: TileGrid, mode: str = "blend") -> np.ndarray:
    """Put per-pixel outputs `tiles` (N, K, t, t) back together as (K, H, W) on `grid`.

    mode="blend": ramp-weighted average over the tiles covering each pixel (float64 sum, cast
    back to the tiles' dtype). mode="center": each pixel from the tile where it is most central
    (the overlap is split in half between neighbours); exact for any dtype, right for labels."""
    if not isinstance(grid, TileGrid):
        raise ValueError(f"grid must be a TileGrid, got {type(grid).__name__}")
    if mode not in STITCH_MODES:
        raise ValueError(f"mode must be one of {', '.join(STITCH_MODES)}, got {mode!r}")
    t = grid.tile
    if not isinstance(tiles, np.ndarray) or tiles.ndim != 4 or tiles.shape[2:] != (t, t):
        raise ValueError(f"tiles must be an array (N, K, {t}, {t}) for this grid, got "
                         f"{getattr(tiles, 'shape', type(tiles).__name__)}")
    if tiles.shape[0] != len(grid):
        raise ValueError(f"tiles holds {tiles.shape[0]} tiles but the grid has {len(grid)}")
    hp, wp = grid.padded_shape
    k = tiles.shape[1]
    positions = grid.positions
    if mode == "center":
        out = np.empty((k, hp, wp), dtype=tiles.dtype)
        nr, nc = grid.grid_shape
        lead, trail = grid.overlap // 2, grid.overlap - grid.overlap // 2
        for n, (r, c) in enumerate(positions):
            # keep the tile's inner part; the first/last tile of a row/column keeps its outer edge
            r0 = 0 if r == 0 else lead
            c0 = 0 if c == 0 else lead
            r1 = t if r == (nr - 1) * grid.stride else t - trail
            c1 = t if c == (nc - 1) * grid.stride else t - trail
            out[:, r + r0:r + r1, c + c0:c + c1] = tiles[n, :, r0:r1, c0:c1]
    else:
        window = ramp_window(t, grid.overlap)
        acc = np.zeros((k, hp, wp), dtype=np.float64)
        weight = np.zeros((hp, wp), dtype=np.float64)
        for n, (r, c) in enumerate(positions):
            acc[:, r:r + t, c:c + t] += tiles[n] * window
            weight[r:r + t, c:c + t] += window
        acc /= weight
        out = _cast_back(acc, tiles.dtype)
    return np.ascontiguousarray(out[:, :grid.height, :grid.width])
