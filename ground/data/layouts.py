"""Labelled patch datasets on disk: image + class-mask GeoTIFF pairs in the layouts of MARIDA,
MADOS and a plain images/ + masks/ folder. A layout is one function in `PATCH_LAYOUTS`."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np
import tifffile

from shared.bands import S2_BANDS
from ground.data.sample import IGNORE
from ground.errors import DataError


# MARIDA (Kikaki et al. 2022) and MADOS (Kikaki et al. 2024) ship 11 Sentinel-2 bands.
MARIDA_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")


MARIDA_CLASSES = ("Marine Debris", "Dense Sargassum", "Sparse Sargassum", "Natural Organic Material", "Ship",
                  "Clouds", "Marine Water", "Sediment-Laden Water", "Foam", "Turbid Water", "Shallow Water",
                  "Waves", "Cloud Shadows", "Wakes", "Mixed Water")


MADOS_CLASSES = ("Marine Debris", "Dense Sargassum", "Sparse Floating Algae", "Natural Organic Material", "Ship",
                 "Oil Spill", "Marine Water", "Sediment-Laden Water", "Foam", "Turbid Water", "Shallow Water",
                 "Waves & Wakes", "Oil Platform", "Jellyfish", "Sea snot")


# MADOS names its band files by central wavelength (S2A and S2B differ by a few nm).
_MADOS_WAVELENGTHS = {"B01": 443, "B02": 492, "B03": 560, "B04": 665, "B05": 704, "B06": 740, "B07": 781,
                      "B08": 833, "B8A": 865, "B11": 1612, "B12": 2194}


def mados_band(wavelength_nm: int) -> str:
    band, wl = min(_MADOS_WAVELENGTHS.items(), key=lambda kv: abs(kv[1] - wavelength_nm))
    if abs(wl - wavelength_nm) > 15:
        raise DataError(f"MADOS: no Sentinel-2 band near {wavelength_nm} nm")
    return band


def _read_tif(path: Path) -> np.ndarray:
    try:
        return tifffile.imread(path)
    except Exception as exc:
        raise DataError(f"cannot read GeoTIFF {path}: {exc}") from exc


def _chw(a: np.ndarray, path: Path, nbands: int | None = None) -> np.ndarray:
    """GeoTIFFs come band-first (GDAL writes) or band-last (some tools): return (bands, H, W)."""
    if a.ndim == 2:
        return a[None]
    if a.ndim != 3:
        raise DataError(f"{path}: expected a (bands, H, W) image, got shape {a.shape}")
    if nbands is not None and a.shape[0] != nbands and a.shape[-1] == nbands:
        return np.moveaxis(a, -1, 0)
    return a if a.shape[0] <= a.shape[-1] else np.moveaxis(a, -1, 0)


def map_labels(raw: np.ndarray, label_map: dict | None, offset: int, ignore_values, where: str,
               num_classes: int | None) -> np.ndarray:
    """Raw mask values -> class ids 0..K-1 (uint8) with IGNORE for ignore values / unmapped values."""
    raw = np.asarray(raw).astype(np.int64)
    out = np.full(raw.shape, IGNORE, np.uint8)
    if label_map:
        for value, cls in label_map.items():
            out[raw == int(value)] = IGNORE if cls is None or int(cls) < 0 else int(cls)
    else:
        mapped = raw - offset
        ok = mapped >= 0 if num_classes is None else (mapped >= 0) & (mapped < num_classes)
        out[ok] = mapped[ok]
    for v in ignore_values or ():
        out[raw == int(v)] = IGNORE
    if num_classes is not None and np.any((out != IGNORE) & (out >= num_classes)):
        raise DataError(f"{where}: label values map beyond num_classes={num_classes}")
    return out


def _split_names(root: Path, split: str | None) -> set[str] | None:
    if split is None:
        return None
    f = root / "splits" / f"{split}_X.txt"
    if not f.exists():
        raise FileNotFoundError(f"patch dataset {root}: split file {f} not found")
    return set(f.read_text().split())


def _marida(root: Path, spec: dict) -> list[tuple[np.ndarray, tuple, np.ndarray, list[str]]]:
    """patches/S2_DATE_TILE/S2_DATE_TILE_CROP.tif + _cl.tif (+ _conf.tif); splits/{split}_X.txt lists DATE_TILE_CROP."""
    keep = _split_names(root, spec.get("split"))
    items = []
    for img in sorted((root / "patches").glob("S2_*/S2_*.tif")):
        if img.stem.endswith(("_cl", "_conf")):
            continue
        if keep is not None and img.stem[3:] not in keep:
            continue
        cl = img.with_name(img.stem + "_cl.tif")
        if not cl.exists():
            raise FileNotFoundError(f"MARIDA patch {img} has no class mask {cl.name}")
        items.append((_chw(_read_tif(img), img, len(MARIDA_BANDS)), MARIDA_BANDS, _read_tif(cl), [str(img), str(cl)]))
    return items


def _mados(root: Path, spec: dict) -> list[tuple[np.ndarray, tuple, np.ndarray, list[str]]]:
    """Scene_N/{10,20,60}/Scene_N_L2R_rhorc_<nm>_<crop>.tif (one file per band at its resolution) and
    Scene_N/10/Scene_N_L2R_cl_<crop>.tif; splits/{split}_X.txt lists Scene_N_<crop>. Coarse bands are
    upsampled to 10 m by pixel repetition (nearest), as the MADOS loader does."""
    keep = _split_names(root, spec.get("split"))
    items = []
    for cl in sorted(root.glob("Scene_*/10/*_L2R_cl_*.tif")):
        scene = cl.parents[1].name
        crop = cl.stem.split("_cl_")[-1]
        if keep is not None and f"{scene}_{crop}" not in keep:
            continue
        label = _read_tif(cl)
        bands, names, files = [], [], [str(cl)]
        for f in cl.parents[1].glob(f"*/{scene}_L2R_rhorc_*_{crop}.tif"):
            m = re.search(r"_rhorc_(\d+)_", f.name)
            factor = int(f.parent.name) // 10
            a = _read_tif(f).astype(np.float32)
            bands.append(np.kron(a, np.ones((factor, factor), np.float32)) if factor > 1 else a)
            names.append(mados_band(int(m.group(1))))
            files.append(str(f))
        if not bands:
            raise FileNotFoundError(f"MADOS {scene} crop {crop}: no *_L2R_rhorc_* band files")
        order = np.argsort([MARIDA_BANDS.index(n) for n in names])
        items.append((np.stack([bands[i] for i in order]), tuple(names[i] for i in order), label, files))
    return items


def _pairs(root: Path, spec: dict) -> list[tuple[np.ndarray, tuple, np.ndarray, list[str]]]:
    """images/NAME.tif + masks/NAME.tif (or labels/NAME.tif); `band_names` gives the file's band order."""
    mask_dir = next((root / d for d in ("masks", "labels") if (root / d).is_dir()), None)
    if not (root / "images").is_dir() or mask_dir is None:
        raise FileNotFoundError(f"patch dataset {root}: expected images/ and masks/ (or labels/) folders")
    items = []
    for img in sorted((root / "images").glob("*.tif*")):
        mask = mask_dir / img.name
        if not mask.exists():
            raise FileNotFoundError(f"patch dataset {root}: image {img.name} has no mask {mask}")
        data = _chw(_read_tif(img), img, len(spec["band_names"]) if "band_names" in spec else None)
        names = tuple(spec.get("band_names") or (S2_BANDS if data.shape[0] == 13 else ()))
        if len(names) != data.shape[0]:
            raise DataError(f"{img}: {data.shape[0]} bands but band_names has {len(names)}; set band_names")
        items.append((data, names, _read_tif(mask), [str(img), str(mask)]))
    return items


PATCH_LAYOUTS: dict[str, Callable] = {"pairs": _pairs, "marida": _marida, "mados": _mados}


# raw mask value 0 is "unlabelled" in MARIDA/MADOS, classes are 1..15
LAYOUT_DEFAULTS = {"marida": {"offset": 1, "ignore_values": [0]}, "mados": {"offset": 1, "ignore_values": [0]},
                    "pairs": {"offset": 0, "ignore_values": []}}
