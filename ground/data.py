"""Training data: labelled patch datasets, unlabelled imagery, normalisation statistics, class weights.

Everything becomes a list of `Sample`: an image (bands, H, W) of reflectance 0..1 in the run's band
order, and a label map (H, W) uint8 with `IGNORE` where no label is (or None: unlabelled, the
teacher labels it). A data source is one config table: `{source = "ukis", rows = [0, 256]}`,
`{source = "patches", layout = "marida", path = "...", split = "train"}`, `{source = "scene", path = ...}`.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

IGNORE = 255


@dataclass
class Sample:
    image: np.ndarray                 # (bands, H, W) float32 reflectance
    labels: np.ndarray | None = None  # (H, W) uint8 class ids, IGNORE where unlabelled
    name: str = ""
    files: list[str] = field(default_factory=list)   # where it came from (lineage)

    def digest(self) -> str:
        """A content hash: names the sample in the teacher cache and in lineage."""
        h = hashlib.sha256(np.ascontiguousarray(self.image, dtype=np.float32).tobytes())
        h.update(str(self.image.shape).encode())
        return h.hexdigest()


def _select(data: np.ndarray, have: tuple[str, ...], want: tuple[str, ...], where: str) -> np.ndarray:
    """Reorder bands by name through shared.scene (MissingBandsError names every missing band)."""
    from shared.scene import Scene
    try:
        return np.ascontiguousarray(Scene(data=data, bands=tuple(have), name=where).select(tuple(want)).data,
                                    dtype=np.float32)
    except Exception as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _rows(spec: dict, height: int) -> slice:
    rows = spec.get("rows")
    if rows is None:
        return slice(0, height)
    if (not isinstance(rows, (list, tuple)) or len(rows) != 2
            or not all(isinstance(v, int) for v in rows) or not 0 <= rows[0] < rows[1] <= height):
        raise ValueError(f"data source {spec.get('source')!r}: rows must be [start, stop] within 0..{height}, got {rows!r}")
    return slice(*rows)


def _check_held_out(spec: dict, rows: slice, role: str) -> None:
    from shared.datasets import UKIS_HELD_OUT_ROWS
    if role != "eval" and rows.start < UKIS_HELD_OUT_ROWS.stop and rows.stop > UKIS_HELD_OUT_ROWS.start:
        raise ValueError(f"data source ukis: rows {[rows.start, rows.stop]} overlap the held-out evaluation rows "
                         f"{[UKIS_HELD_OUT_ROWS.start, UKIS_HELD_OUT_ROWS.stop]}; they may only be used with role 'eval'")


# ---- the real chips beside the repo (shared.datasets) --------------------------------------------

def _ukis(spec: dict, bands, role: str) -> list[Sample]:
    from shared.datasets import load_ukis_chip
    scene, labels = load_ukis_chip()
    rows = _rows(spec, scene.data.shape[1])
    _check_held_out(spec, rows, role)
    image = _select(scene.data[:, rows], scene.bands, bands, "ukis chip")
    return [Sample(image, np.asarray(labels[rows], np.uint8), f"ukis[{rows.start}:{rows.stop}]", ["ukis_csmask_s2"])]


def _sen1floods11(spec: dict, bands, role: str) -> list[Sample]:
    from shared.datasets import load_sen1floods11
    scene, _water = load_sen1floods11()   # its labels are water, not our classes
    rows = _rows(spec, scene.data.shape[1])
    return [Sample(_select(scene.data[:, rows], scene.bands, bands, "sen1floods11 chip"), None,
                   "sen1floods11", ["sen1floods11_sample"])]


def _eolearn(spec: dict, bands, role: str) -> list[Sample]:
    from shared.datasets import load_eolearn
    scenes, _lulc = load_eolearn()
    return [Sample(_select(s.data, s.bands, bands, f"eolearn scene {i}"), None, f"eolearn[{i}]",
                   ["eolearn_testeopatch"]) for i, s in enumerate(scenes)]


def _scene(spec: dict, bands, role: str) -> list[Sample]:
    from shared.scene import read_scene
    if "path" not in spec:
        raise ValueError("data source 'scene' needs a path")
    scale = float(spec.get("scale", 1.0))
    paths = sorted(Path().glob(spec["path"])) if any(ch in spec["path"] for ch in "*?[") else [Path(spec["path"])]
    if not paths:
        raise FileNotFoundError(f"data source 'scene': nothing matches {spec['path']!r}")
    out = []
    for p in paths:
        s = read_scene(p)
        out.append(Sample(_select(s.data.astype(np.float32) * scale, s.bands, bands, str(p)), None, p.name, [str(p)]))
    return out


# ---- labelled patch datasets: image + class-mask GeoTIFF pairs -----------------------------------

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
        raise ValueError(f"MADOS: no Sentinel-2 band near {wavelength_nm} nm")
    return band


def _read_tif(path: Path) -> np.ndarray:
    import tifffile
    try:
        return tifffile.imread(path)
    except Exception as exc:
        raise ValueError(f"cannot read GeoTIFF {path}: {exc}") from exc


def _chw(a: np.ndarray, path: Path, nbands: int | None = None) -> np.ndarray:
    """GeoTIFFs come band-first (GDAL writes) or band-last (some tools): return (bands, H, W)."""
    if a.ndim == 2:
        return a[None]
    if a.ndim != 3:
        raise ValueError(f"{path}: expected a (bands, H, W) image, got shape {a.shape}")
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
        raise ValueError(f"{where}: label values map beyond num_classes={num_classes}")
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
    from shared.bands import S2_BANDS
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
            raise ValueError(f"{img}: {data.shape[0]} bands but band_names has {len(names)}; set band_names")
        items.append((data, names, _read_tif(mask), [str(img), str(mask)]))
    return items


PATCH_LAYOUTS: dict[str, Callable] = {"pairs": _pairs, "marida": _marida, "mados": _mados}
# raw mask value 0 is "unlabelled" in MARIDA/MADOS, classes are 1..15
_LAYOUT_DEFAULTS = {"marida": {"offset": 1, "ignore_values": [0]}, "mados": {"offset": 1, "ignore_values": [0]},
                    "pairs": {"offset": 0, "ignore_values": []}}


def _patches(spec: dict, bands, role: str, num_classes: int | None = None) -> list[Sample]:
    layout = spec.get("layout", "pairs")
    if layout not in PATCH_LAYOUTS:
        raise ValueError(f"data source 'patches': unknown layout {layout!r}; known: {sorted(PATCH_LAYOUTS)}")
    if "path" not in spec:
        raise ValueError("data source 'patches' needs a path")
    root = Path(spec["path"])
    if not root.is_dir():
        raise FileNotFoundError(f"patch dataset folder {root} not found")
    defaults = _LAYOUT_DEFAULTS[layout]
    scale = float(spec.get("scale", 1.0))
    out = []
    for data, names, raw, files in PATCH_LAYOUTS[layout](root, spec):
        image = _select(np.nan_to_num(data.astype(np.float32) * scale, nan=0.0), names, bands, files[0])
        labels = map_labels(raw.squeeze(), spec.get("label_map"), int(spec.get("label_offset", defaults["offset"])),
                            spec.get("ignore_values", defaults["ignore_values"]), files[-1], num_classes)
        if labels.shape != image.shape[1:]:
            raise ValueError(f"{files[-1]}: mask {labels.shape} does not match image {image.shape[1:]}")
        out.append(Sample(image, labels, Path(files[0]).stem, files))
    if not out:
        raise FileNotFoundError(f"patch dataset {root} ({layout}): no patches found")
    return out


SOURCES: dict[str, Callable] = {"ukis": _ukis, "sen1floods11": _sen1floods11, "eolearn": _eolearn,
                                "scene": _scene, "patches": _patches}


def load_source(spec: dict, bands, role: str = "train", num_classes: int | None = None,
                labelled: bool = True) -> list[Sample]:
    """Load one data-source table. role 'eval' is the only one allowed on the held-out rows.
    labelled=False drops any labels (imagery the teacher labels)."""
    name = spec.get("source")
    if name not in SOURCES:
        raise ValueError(f"data source {name!r} unknown; known: {sorted(SOURCES)}")
    fn = SOURCES[name]
    samples = fn(spec, tuple(bands), role, num_classes) if name == "patches" else fn(spec, tuple(bands), role)
    if not labelled:
        for s in samples:
            s.labels = None
    return samples


# ---- statistics carried forward -------------------------------------------------------------------

@dataclass
class Normalization:
    """Per-band mean/std on reflectance, computed on the training imagery; goes to the bundle manifest
    (input.scaling) so the daemon normalises exactly as training did."""
    bands: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, samples: list[Sample], bands) -> "Normalization":
        if not samples:
            raise ValueError("cannot compute normalisation statistics: no training imagery")
        n = sum(s.image[0].size for s in samples)
        mean = sum(s.image.reshape(s.image.shape[0], -1).astype(np.float64).sum(1) for s in samples) / n
        var = sum(((s.image.reshape(s.image.shape[0], -1) - mean[:, None]) ** 2).sum(1) for s in samples) / n
        return cls(tuple(bands), tuple(float(v) for v in mean), tuple(float(v) for v in np.sqrt(var).clip(1e-6)))

    def apply(self, image: np.ndarray) -> np.ndarray:
        m = np.asarray(self.mean, np.float32)[:, None, None]
        s = np.asarray(self.std, np.float32)[:, None, None]
        return (image - m) / s

    def as_dict(self) -> dict:
        return {"bands": list(self.bands), "mean": list(self.mean), "std": list(self.std),
                "on": "reflectance 0..1", "formula": "(x - mean) / std"}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        try:
            return cls(tuple(d["bands"]), tuple(map(float, d["mean"])), tuple(map(float, d["std"])))
        except KeyError as exc:
            raise ValueError(f"normalisation statistics: missing field {exc.args[0]!r}") from None


def class_weights(samples: list[Sample], num_classes: int, method: str | list = "none") -> np.ndarray:
    """Per-class loss weights from label frequencies: 'none', 'inverse' (N / (K n_c)),
    'log' (1 / ln(1.02 + f_c), as MARIDA/MADOS train), or an explicit list."""
    if isinstance(method, (list, tuple)):
        if len(method) != num_classes:
            raise ValueError(f"class_weights: {len(method)} values for {num_classes} classes")
        return np.asarray(method, np.float32)
    if method == "none":
        return np.ones(num_classes, np.float32)
    counts = np.zeros(num_classes, np.float64)
    for s in samples:
        if s.labels is not None:
            lab = s.labels[s.labels != IGNORE]
            counts += np.bincount(lab.ravel(), minlength=num_classes)[:num_classes]
    if counts.sum() == 0:
        raise ValueError("class_weights: no labelled pixels to count")
    freq = counts / counts.sum()
    if method == "inverse":
        w = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    elif method == "log":
        w = 1.0 / np.log(1.02 + freq)
    else:
        raise ValueError(f"class_weights: unknown method {method!r}; known: none, inverse, log, or a list")
    return (w / w[counts > 0].mean()).astype(np.float32)
