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
