"""Loaders for the three real Sentinel-2 chips kept beside the repo (`../shared/data`).

Each loader returns `Scene`s in reflectance 0..1 with canonical band names, plus the labels in
the convention the rest of the code uses. The folders' `SOURCE.md` files say where the data
come from; this module encodes what they say about layout and label values.

Evaluation rule: rows 256..511 of the ukis chip (`UKIS_HELD_OUT_ROWS`) are held out. Nothing
is trained, distilled, fine-tuned, calibrated or threshold-tuned on them.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from shared.bands import S2_BANDS
from shared.errors import DataMissing
from shared.scene import GeoRef, Scene, read_scene

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data"

UKIS_DIR, SEN1FLOODS11_DIR, EOLEARN_DIR = "ukis_csmask_s2", "sen1floods11_sample", "eolearn_testeopatch"
SHIPS_DIR = "sen2ships_ports"

# ukis-csmask chip: Blue, Green, Red, NIR, SWIR16, SWIR22, i.e. B2 B3 B4 B8 B11 B12.
UKIS_BANDS = ("B02", "B03", "B04", "B08", "B11", "B12")
UKIS_CLASSES = ("clear", "cloud", "shadow")     # the order of the ukis-csmask model's output
UKIS_TRAIN_ROWS = slice(0, 256)
UKIS_HELD_OUT_ROWS = slice(256, 512)
# Reference labels -> model classes: 0 cloud shadow -> 2; 1, 2, 3 (clear surfaces) -> 0;
# 4 cloud -> 1 (the mapping of the upstream tests, per SOURCE.md).
_UKIS_LABEL_MAP = np.array([2, 0, 0, 0, 1], dtype=np.uint8)

SEN1FLOODS11_SCALE = 10000.0                    # stored as int16 reflectance x 10000
SEN1FLOODS11_LABELS = {-1: "no data", 0: "not water", 1: "water"}

EOLEARN_LULC_CLASSES = {0: "no data", 1: "cultivated land", 2: "forest", 3: "grassland",
                        4: "shrubland", 8: "artificial surface"}
# s2cloudless mean cloud probability of REFERENCE_SCENES: [0.97, 0.75, 0.03, 0.02, 0.01]
EOLEARN_CLOUDY_SCENES = (0, 1)

# sen2ships harbours: L2A, uint16 = reflectance x 65535 (Sentinel Hub's 16-bit output), EPSG:3857
SHIP_PORTS = ("casablanca", "honolulu", "busan", "algiers", "cartagena", "genoa")
SHIP_BANDS = ("B02", "B03", "B04", "B08", "B11")
SHIPS_SCALE = 65535.0


def data_root() -> Path:
    """The data folder: `$EOEDGE_DATA` if set, else `../shared/data` beside the repo root."""
    env = os.environ.get("EOEDGE_DATA")
    return Path(env) if env else DEFAULT_DATA_ROOT


def _file(root: Path | None, *parts: str) -> Path:
    path = (Path(root) if root is not None else data_root()).joinpath(*parts)
    if not path.exists():
        raise DataMissing(path, default_root=DEFAULT_DATA_ROOT)
    return path


def load_ukis_chip(root: Path | None = None) -> tuple[Scene, np.ndarray]:
    """The ukis-csmask chip: (Scene 6 bands B02 B03 B04 B08 B11 B12, 512 x 512, float32
    reflectance 0..~1.27; labels (512, 512) uint8: 0 clear, 1 cloud, 2 shadow)."""
    path = _file(root, UKIS_DIR, "sentinel2.npz")
    with np.load(path, allow_pickle=False) as z:
        if "img" not in z or "msk" not in z:
            raise ValueError(f"{path}: expected arrays 'img' and 'msk', found {list(z.keys())}")
        img, msk = z["img"], z["msk"]
    if img.ndim != 3 or img.shape[2] != len(UKIS_BANDS):
        raise ValueError(f"{path}: 'img' should be (rows, cols, 6), got {img.shape}")
    raw = msk[..., 0] if msk.ndim == 3 else msk
    if raw.shape != img.shape[:2]:
        raise ValueError(f"{path}: 'msk' shape {msk.shape} does not match 'img' {img.shape}")
    unknown = np.setdiff1d(np.unique(raw), np.arange(len(_UKIS_LABEL_MAP)))
    if unknown.size:
        raise ValueError(f"{path}: 'msk' has label values {unknown.tolist()} outside the known 0..4")
    scene = Scene(np.ascontiguousarray(np.moveaxis(img, 2, 0), dtype=np.float32), UKIS_BANDS,
                  None, UKIS_DIR)
    return scene, _UKIS_LABEL_MAP[raw]


def load_sen1floods11(root: Path | None = None) -> tuple[Scene, np.ndarray]:
    """The Sen1Floods11 chip: (Scene 13 bands B01..B12, 512 x 512, float32 reflectance
    (stored x10000), EPSG:4326 georeference; labels (512, 512) int16: -1 no data, 0 not water,
    1 water)."""
    s2 = _file(root, SEN1FLOODS11_DIR, "Spain_7370579_S2Hand.tif")
    lab = _file(root, SEN1FLOODS11_DIR, "Spain_7370579_LabelHand.tif")
    raw = read_scene(s2, bands=S2_BANDS)
    scene = Scene(raw.data.astype(np.float32) / np.float32(SEN1FLOODS11_SCALE), raw.bands,
                  raw.georef, "sen1floods11_Spain_7370579")
    labels = read_scene(lab, bands=["label"]).data[0]
    if labels.shape != (scene.rows, scene.cols):
        raise ValueError(f"{lab}: label shape {labels.shape} does not match the image "
                         f"{(scene.rows, scene.cols)}")
    return scene, labels.astype(np.int16, copy=False)


def _eolearn_georef(bbox_path: Path, rows: int, cols: int) -> GeoRef | None:
    """North-up GeoRef from the patch's bbox polygon (its CRS in the GeoJSON 'crs' member)."""
    if not bbox_path.exists():
        return None
    doc = json.loads(bbox_path.read_text())
    ring = np.asarray(doc["coordinates"][0], dtype=np.float64)
    name = doc.get("crs", {}).get("properties", {}).get("name", "")
    m = re.search(r"EPSG::?(\d+)", name)
    minx, miny = ring.min(axis=0)
    maxx, maxy = ring.max(axis=0)
    return GeoRef(f"EPSG:{m.group(1)}" if m else None,
                  ((maxx - minx) / cols, 0.0, minx, 0.0, -(maxy - miny) / rows, maxy))


def load_eolearn(root: Path | None = None) -> tuple[list[Scene], np.ndarray]:
    """The eo-learn test patch: (5 Scenes, 13 bands B01..B12, 101 x 100, float32 reflectance,
    EPSG:32633 from `bbox.geojson`; land use/land cover labels (101, 100) uint16, classes in
    `EOLEARN_LULC_CLASSES`). Scenes 0 and 1 are cloudy (`EOLEARN_CLOUDY_SCENES`)."""
    ref = _file(root, EOLEARN_DIR, "REFERENCE_SCENES.npy")
    lulc_path = _file(root, EOLEARN_DIR, "mask_timeless", "LULC.npy")
    cube = np.load(ref, allow_pickle=False)
    if cube.ndim != 4 or cube.shape[3] != len(S2_BANDS):
        raise ValueError(f"{ref}: expected (dates, rows, cols, 13), got {cube.shape}")
    georef = _eolearn_georef(ref.parent / "bbox.geojson", cube.shape[1], cube.shape[2])
    scenes = [Scene(np.ascontiguousarray(np.moveaxis(cube[i], 2, 0), dtype=np.float32),
                    S2_BANDS, georef, f"eolearn_reference_{i}") for i in range(cube.shape[0])]
    lulc = np.load(lulc_path, allow_pickle=False)
    lulc = lulc[..., 0] if lulc.ndim == 3 else lulc
    if lulc.shape != cube.shape[1:3]:
        raise ValueError(f"{lulc_path}: shape {lulc.shape} does not match the scenes "
                         f"{cube.shape[1:3]}")
    return scenes, lulc


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


def load_ships_port(city: str, root: Path | None = None) -> tuple[Scene, np.ndarray, list[str]]:
    """One sen2ships harbour: (Scene 5 bands B02 B03 B04 B08 B11, float32 L2A reflectance (DN /
    65535), EPSG:3857 georeference from its GeoTIFFs; vessel instances (H, W) int32, 0 background,
    1..N hand-drawn vessels (touching instances: the first keeps the pixel); the files read)."""
    if city not in SHIP_PORTS:
        raise ValueError(f"sen2ships: unknown port {city!r}; known: {', '.join(SHIP_PORTS)}")
    folder = _file(root, SHIPS_DIR, city)
    files = sorted(str(f) for f in folder.glob("*_(Raw).tiff"))
    if len(files) != len(SHIP_BANDS):
        raise ValueError(f"{folder}: expected {len(SHIP_BANDS)} band files *_(Raw).tiff, found {len(files)}")
    raw = read_scene(folder, bands=SHIP_BANDS)
    scene = Scene(raw.data.astype(np.float32) / np.float32(SHIPS_SCALE), raw.bands, raw.georef, city)
    coco_path = folder / f"{city}_coco.json"
    try:
        anns = json.loads(coco_path.read_text())["annotations"]
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{coco_path}: {exc}") from None
    instances = np.zeros((scene.rows, scene.cols), np.int32)
    for i, a in enumerate(anns, 1):
        m = rle_decode(a["segmentation"])
        if m.shape != instances.shape:
            raise ValueError(f"{coco_path}: instance {i} has size {m.shape}, the bands {instances.shape}")
        instances[(m > 0) & (instances == 0)] = i
    return scene, instances, files + [str(coco_path)]
