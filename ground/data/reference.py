"""Reference tiles drawn from the run's own imagery: what parity checks, tracing examples and the
bundle's self-test run on. Never the held-out evaluation image(s): only the training imagery of
the run's config, so a run on generated scenes is checked on generated scenes, and its lineage
says so."""
from __future__ import annotations

import numpy as np

from ground.data.normalization import Normalization
from ground.data.sample import Sample
from ground.errors import DataError


def reference_tiles(samples: list[Sample], n: int, tile: int,
                    norm: Normalization | None = None) -> tuple[np.ndarray, list[dict]]:
    """`n` tiles (N, C, tile, tile) float32 cut on a grid from `samples` (the training imagery),
    one image after another so that the tiles come from as many images as there are; normalised
    with `norm` when given. Also where each came from: [{"sample", "index", "files", "row", "col"}]
    (`index`: the position in `samples`)."""
    if n < 1:
        raise DataError(f"reference tiles: n must be >= 1, got {n}")
    spots = [[(s, r * tile, c * tile) for r in range(s.image.shape[1] // tile)
              for c in range(s.image.shape[2] // tile)] for s in samples]
    # round robin: every image's first tile, then every image's second, ...
    order = [x[rank] for rank in range(max(map(len, spots), default=0)) for x in spots if rank < len(x)][:n]
    if not order:
        sizes = sorted({tuple(s.image.shape[1:]) for s in samples})
        raise DataError(f"reference tiles: no training image holds a {tile}x{tile} tile "
                        f"(image sizes {sizes or 'none'}); lower eval.tile")
    tiles = np.stack([s.image[:, r:r + tile, c:c + tile] for s, r, c in order]).astype(np.float32)
    if norm is not None:
        tiles = np.stack([norm.apply(t) for t in tiles]).astype(np.float32)
    index = {id(s): i for i, s in enumerate(samples)}
    where = [{"sample": s.name, "index": index[id(s)], "files": list(s.files), "row": r, "col": c}
             for s, r, c in order]
    return tiles, where


# ---- compact references: a few small windows that a wrong model cannot reproduce -----------------

BOUNDARY_MARGIN = 0.2    # a pixel whose two likeliest classes are closer than this is on a decision boundary
PRESENT = 0.05           # a class counts as present in a window from this share of its pixels


def window_stats(probs: np.ndarray, window: int) -> list[dict]:
    """Every `window` x `window` cell of tiles' probabilities (N, K, t, t), on a grid: where it
    is, the share of its pixels each class wins, and the share on a decision boundary."""
    n, k, t, _ = probs.shape
    top2 = np.sort(probs, axis=1)[:, -2:]
    boundary = (top2[:, 1] - top2[:, 0]) < BOUNDARY_MARGIN
    winner = probs.argmax(1)
    cells = []
    for i in range(n):
        for r in range(0, t - window + 1, window):
            for c in range(0, t - window + 1, window):
                won = np.bincount(winner[i, r:r + window, c:c + window].ravel(), minlength=k) / window ** 2
                cells.append({"tile": i, "row": r, "col": c, "shares": won,
                              "boundary": float(boundary[i, r:r + window, c:c + window].mean())})
    return cells


def pick_windows(probs: np.ndarray, window: int, count: int) -> list[dict]:
    """`count` windows of tiles' probabilities (N, K, t, t) that together show every class the
    model predicts and as many decision-boundary pixels as they can: greedily, each pick the one
    that adds the most classes not yet shown, then the one with the most boundary pixels and
    classes. A wrong model is caught where a right one is least sure: a boundary pixel changes
    its class for a small change of the weights, a saturated one does not."""
    cells = window_stats(probs, window)
    if len(cells) < count:
        raise DataError(f"reference windows: {count} windows of {window}x{window} asked, the candidate "
                        f"tiles hold {len(cells)}")
    shown = np.zeros(probs.shape[1], bool)
    left = list(range(len(cells)))
    picks = []
    for _ in range(count):
        def score(i):
            present = cells[i]["shares"] >= PRESENT
            return (int(np.sum(present & ~shown)), cells[i]["boundary"] + 0.1 * int(present.sum()))
        best = max(left, key=score)          # the first of equals: deterministic
        left.remove(best)
        shown |= cells[best]["shares"] >= PRESENT
        picks.append(cells[best])
    return picks


def mosaic(tiles: np.ndarray, picks: list[dict], window: int, per_tile: int,
           fill: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """Reference tiles (M, C, t, t) that hold the picked windows of `tiles`, `per_tile` to a tile
    on a regular grid (each window centred in its cell), `fill` (C,) everywhere else (the band
    means: a zero input after normalisation, which costs nothing compressed). Also where each
    window went: [{"tile", "row", "col"}] in the reference tiles."""
    t = tiles.shape[-1]
    side = int(np.ceil(np.sqrt(per_tile)))
    cell = t // side
    if window > cell:
        raise DataError(f"reference windows: {per_tile} windows of {window}x{window} do not fit a "
                        f"{t}x{t} tile ({side}x{side} cells of {cell})")
    m = -(-len(picks) // per_tile)
    out = np.broadcast_to(np.asarray(fill, np.float32)[None, :, None, None], (m, tiles.shape[1], t, t)).copy()
    placed = []
    for j, p in enumerate(picks):
        k, slot = divmod(j, per_tile)
        r = (slot // side) * cell + (cell - window) // 2
        c = (slot % side) * cell + (cell - window) // 2
        out[k, :, r:r + window, c:c + window] = tiles[p["tile"], :, p["row"]:p["row"] + window,
                                                      p["col"]:p["col"] + window]
        placed.append({"tile": k, "row": r, "col": c})
    return out, placed
