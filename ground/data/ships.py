"""The sen2ships harbours (`../shared/data/sen2ships_ports/`, see its SOURCE.md): real Sentinel-2
L2A chips (B02 B03 B04 B08 B11, uint16 = reflectance x 65535) with hand-drawn vessel instances as
COCO uncompressed RLE, read by `shared.datasets.load_ships_port`. One port -> a `Sample` (labels:
0 water/land, 1 ship) and its instance map (0 background, 1..N vessels) for the Airbus object-level
F2 (shared.metrics.airbus_f2)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.datasets import SHIP_BANDS, SHIP_PORTS, SHIPS_DIR, data_root, load_ships_port, rle_decode
from ground.data.sample import Sample
from ground.errors import DataError

__all__ = ["SHIP_PORTS", "SHIP_BANDS", "SHIP_CLASSES", "ships_root", "rle_decode", "load_port"]
SHIP_CLASSES = ("background", "ship")


def ships_root(root: str | Path | None = None) -> Path:
    return Path(root) if root is not None else data_root() / SHIPS_DIR


def load_port(city: str, root: str | Path | None = None) -> tuple[Sample, np.ndarray]:
    """(Sample with ship labels, instance map int32) of one harbour."""
    try:
        scene, instances, files = load_ships_port(city, None if root is None else Path(root).parent)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    return Sample(scene.data, (instances > 0).astype(np.uint8), city, files), instances
