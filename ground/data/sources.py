"""Data sources, one registry by name: a config table such as `{source = "ukis", rows = [0, 256]}`,
`{source = "patches", layout = "marida", path = "...", split = "train"}` or
`{source = "scene", path = "scenes/*.tif"}` becomes a list of `Sample`. Relative paths are
resolved against the config file's folder (ground.config does that before they get here).

`{source = "scenes", layout = "geotiff", path = "archive/*.tif", windows = 16, window = 512}` is
imagery at archive scale (ground.data.lazy): training reads random crops from the scene files by
window (ground.stages.distill); what this registry returns for it is only `windows` sampled windows
of `window` px (never a whole scene), from which the run computes its normalisation, class weights
and operating point.

`{source = "learning", path = "downlink/samples"}` is what the satellite sent down to learn from
(ground.data.learning): unlabelled model tiles with their georeference and the model version that
chose them; the config's `data.held_out` regions drop the samples that fall in them."""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Callable

import numpy as np

from shared.datasets import UKIS_HELD_OUT_ROWS, load_eolearn, load_sen1floods11, load_ukis_chip
from shared.scene import Scene, read_scene
from ground.data.learning import load_learning
from ground.data.layouts import LAYOUT_DEFAULTS, PATCH_LAYOUTS, map_labels
from ground.data.lazy import Readers, SceneOnDisk, find_scenes, sample_windows
from ground.data.sample import Sample
from ground.data.ships import SHIP_BANDS, SHIP_PORTS, load_port
from ground.errors import DataError


def _select(data: np.ndarray, have: tuple[str, ...], want: tuple[str, ...], where: str) -> np.ndarray:
    """Reorder bands by name through shared.scene (MissingBandsError names every missing band)."""
    try:
        return np.ascontiguousarray(Scene(data=data, bands=tuple(have), name=where).select(tuple(want)).data,
                                    dtype=np.float32)
    except Exception as exc:
        raise DataError(f"{where}: {exc}") from exc


def _rows(spec: dict, height: int) -> slice:
    rows = spec.get("rows")
    if rows is None:
        return slice(0, height)
    if (not isinstance(rows, (list, tuple)) or len(rows) != 2
            or not all(isinstance(v, int) for v in rows) or not 0 <= rows[0] < rows[1] <= height):
        raise DataError(f"data source {spec.get('source')!r}: rows must be [start, stop] within 0..{height}, got {rows!r}")
    return slice(*rows)


def _check_held_out(spec: dict, rows: slice, role: str) -> None:
    if role != "eval" and rows.start < UKIS_HELD_OUT_ROWS.stop and rows.stop > UKIS_HELD_OUT_ROWS.start:
        raise DataError(f"data source ukis: rows {[rows.start, rows.stop]} overlap the held-out evaluation rows "
                         f"{[UKIS_HELD_OUT_ROWS.start, UKIS_HELD_OUT_ROWS.stop]}; they may only be used with role 'eval'")


def _ukis(spec: dict, bands, role: str) -> list[Sample]:
    scene, labels = load_ukis_chip()
    rows = _rows(spec, scene.data.shape[1])
    _check_held_out(spec, rows, role)
    image = _select(scene.data[:, rows], scene.bands, bands, "ukis chip")
    return [Sample(image, np.asarray(labels[rows], np.uint8), f"ukis[{rows.start}:{rows.stop}]", ["ukis_csmask_s2"])]


def _sen1floods11(spec: dict, bands, role: str) -> list[Sample]:
    scene, _water = load_sen1floods11()   # its labels are water, not our classes
    rows = _rows(spec, scene.data.shape[1])
    return [Sample(_select(scene.data[:, rows], scene.bands, bands, "sen1floods11 chip"), None,
                   "sen1floods11", ["sen1floods11_sample"])]


def _eolearn(spec: dict, bands, role: str) -> list[Sample]:
    scenes, _lulc = load_eolearn()
    return [Sample(_select(s.data, s.bands, bands, f"eolearn scene {i}"), None, f"eolearn[{i}]",
                   ["eolearn_testeopatch"]) for i, s in enumerate(scenes)]


def _scene(spec: dict, bands, role: str) -> list[Sample]:
    if "path" not in spec:
        raise DataError("data source 'scene' needs a path")
    scale = float(spec.get("scale", 1.0))
    pattern = str(spec["path"])
    # glob.glob takes absolute and relative patterns alike (Path.glob refuses absolute ones)
    paths = sorted(Path(p) for p in glob.glob(pattern)) if any(ch in pattern for ch in "*?[") else [Path(pattern)]
    if not paths:
        raise FileNotFoundError(f"data source 'scene': nothing matches {spec['path']!r}")
    out = []
    for p in paths:
        s = read_scene(p)
        out.append(Sample(_select(s.data.astype(np.float32) * scale, s.bands, bands, str(p)), None, p.name, [str(p)]))
    return out


def _patches(spec: dict, bands, role: str, num_classes: int | None = None) -> list[Sample]:
    layout = spec.get("layout", "pairs")
    if layout not in PATCH_LAYOUTS:
        raise DataError(f"data source 'patches': unknown layout {layout!r}; known: {sorted(PATCH_LAYOUTS)}")
    if "path" not in spec:
        raise DataError("data source 'patches' needs a path")
    root = Path(spec["path"])
    if not root.is_dir():
        raise FileNotFoundError(f"patch dataset folder {root} not found")
    defaults = LAYOUT_DEFAULTS[layout]
    scale = float(spec.get("scale", 1.0))
    out = []
    for data, names, raw, files in PATCH_LAYOUTS[layout](root, spec):
        image = _select(np.nan_to_num(data.astype(np.float32) * scale, nan=0.0), names, bands, files[0])
        labels = map_labels(raw.squeeze(), spec.get("label_map"), int(spec.get("label_offset", defaults["offset"])),
                            spec.get("ignore_values", defaults["ignore_values"]), files[-1], num_classes)
        if labels.shape != image.shape[1:]:
            raise DataError(f"{files[-1]}: mask {labels.shape} does not match image {image.shape[1:]}")
        out.append(Sample(image, labels, Path(files[0]).stem, files))
    if not out:
        raise FileNotFoundError(f"patch dataset {root} ({layout}): no patches found")
    return out


def _ships(spec: dict, bands, role: str) -> list[Sample]:
    """The sen2ships harbours named in `ports` (each a whole chip with its hand-drawn vessels, labels
    0 background / 1 ship; ground.data.ships). A config holds a harbour out simply by not naming it
    here: only the ports listed are read."""
    ports = spec.get("ports")
    if not isinstance(ports, list) or not ports or any(p not in SHIP_PORTS for p in ports):
        raise DataError(f"data source 'ships': ports must be a non-empty list of {list(SHIP_PORTS)}, got {ports!r}")
    out = []
    for city in ports:
        sample, _instances = load_port(city)
        sample.image = _select(sample.image, SHIP_BANDS, bands, f"sen2ships {city}")
        out.append(sample)
    return out


LAZY_KEYS = ("source", "layout", "path", "scale", "file_bands", "windows", "window", "seed")


def lazy_scenes(spec: dict, bands) -> list[SceneOnDisk]:
    """The scene files a `scenes` source names (headers only)."""
    unknown = sorted(set(spec) - set(LAZY_KEYS))
    if unknown:
        raise DataError(f"data source 'scenes': unknown key(s) {unknown}; allowed: {sorted(LAZY_KEYS)}")
    return find_scenes(spec, bands)


def _scenes(spec: dict, bands, role: str) -> list[Sample]:
    """Sampled windows of the scene files (labels where the layout has them), named SCENE@r,c."""
    scenes = lazy_scenes(spec, bands)
    readers = Readers()
    out = []
    for s, r, c, h, w, image in sample_windows(scenes, int(spec.get("windows", 16)), int(spec.get("window", 512)),
                                               int(spec.get("seed", 0)), readers):
        labels = (readers.window(s.labels, (s.height, s.width), r, c, h, w).astype(np.uint8)
                  if s.labels is not None else None)
        out.append(Sample(image, labels, f"{s.name}@{r},{c}", list(s.files)))
    return out


SOURCES: dict[str, Callable] = {"ukis": _ukis, "sen1floods11": _sen1floods11, "eolearn": _eolearn,
                                "scene": _scene, "patches": _patches, "scenes": _scenes, "ships": _ships,
                                "learning": load_learning}


def load_source(spec: dict, bands, role: str = "train", num_classes: int | None = None,
                labelled: bool = True, held_out: list | None = None) -> list[Sample]:
    """Load one data-source table. role 'eval' is the only one allowed on the held-out rows.
    labelled=False drops any labels (imagery the teacher labels). `held_out`: the config's
    data.held_out regions (ground.data.learning), applied to the georeferenced learning samples."""
    name = spec.get("source")
    if name not in SOURCES:
        raise DataError(f"data source {name!r} unknown; known: {sorted(SOURCES)}")
    fn = SOURCES[name]
    if name == "patches":
        samples = fn(spec, tuple(bands), role, num_classes)
    elif name == "learning":
        samples = fn(spec, tuple(bands), role, held_out)
    else:
        samples = fn(spec, tuple(bands), role)
    if not labelled:
        for s in samples:
            s.labels = None
    return samples
