"""The sen2ships harbours (`../shared/data/sen2ships_ports/`, see its SOURCE.md): real Sentinel-2
L2A chips (B02 B03 B04 B08 B11, uint16 = reflectance x 65535) with hand-drawn vessel instances as
COCO uncompressed RLE. One port -> a `Sample` (labels: 0 water/land, 1 ship) and its instance map
(0 background, 1..N vessels) for the Airbus object-level F2 (shared.metrics.airbus_f2)."""
from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import tifffile

from shared.datasets import data_root
from ground.data.sample import Sample
from ground.errors import DataError

SHIP_PORTS = ("casablanca", "honolulu", "busan", "algiers", "cartagena", "genoa")
SHIP_BANDS = ("B02", "B03", "B04", "B08", "B11")
SHIP_CLASSES = ("background", "ship")


def ships_root(root: str | Path | None = None) -> Path:
    return Path(root) if root is not None else data_root() / "sen2ships_ports"


def rle_decode(rle: dict) -> np.ndarray:
    """COCO uncompressed RLE (column-major counts) -> (H, W) uint8 mask."""
    h, w = rle["size"]
    m = np.zeros(h * w, np.uint8)
    pos, v = 0, 0
    for c in rle["counts"]:
        m[pos:pos + c] = v
        pos += c
        v ^= 1
    return m.reshape(w, h).T


def load_port(city: str, root: str | Path | None = None) -> tuple[Sample, np.ndarray]:
    """(Sample with ship labels, instance map int32) of one harbour."""
    folder = ships_root(root) / city
    files = sorted(glob.glob(str(folder / "*_(Raw).tiff")))
    if len(files) != len(SHIP_BANDS):
        raise DataError(f"{folder}: expected {len(SHIP_BANDS)} band files *_(Raw).tiff, found {len(files)}")
    image = np.stack([tifffile.imread(f) for f in files]).astype(np.float32) / 65535.0
    coco_path = folder / f"{city}_coco.json"
    try:
        anns = json.loads(coco_path.read_text())["annotations"]
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{coco_path}: {exc}") from None
    instances = np.zeros(image.shape[1:], np.int32)
    for i, a in enumerate(anns, 1):
        m = rle_decode(a["segmentation"])
        if m.shape != instances.shape:
            raise DataError(f"{coco_path}: instance {i} has size {m.shape}, the bands {instances.shape}")
        instances[(m > 0) & (instances == 0)] = i      # touching instances: the first keeps the pixel
    return Sample(image, (instances > 0).astype(np.uint8), city, files + [str(coco_path)]), instances
