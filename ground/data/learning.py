"""The `learning` data source: tiles the satellite sent down because its model was unsure of them.

    {source = "learning", path = "downlink/samples", min_entropy = 0.3, selection = "uncertainty"}

reads every sample file under `path` (a folder, searched recursively, or one `.npz`; a list of
them too) with shared.samples.read_samples: reflectance = raw value * scale, the sample's bands
mapped to the run's by name (a band the run needs and the sample lacks is a ConfigError naming
it). The samples are unlabelled imagery: the run's teacher labels them, as it labels `scene`
sources. Each Sample keeps its record (`Sample.origin`): the frame, the window, the tile's own
georeference, the model id and version that chose it, its scores, its file and that file's
sha256, so a report and a bundle's lineage can say where its data came from.

Held-out regions: `[data] held_out = [{crs = "EPSG:32633", bounds = [xmin, ymin, xmax, ymax]}]`
(bounds in that CRS's units) drops every sample whose georeferenced window intersects one, so an
evaluation region stays unseen by orbit data too. A sample without a georeference cannot be
shown to lie outside them: while any region is configured it is dropped as well. Both are
counted (`LearningRead.dropped`) and logged. Filters: `min_entropy` drops samples scored below it;
`selection` keeps only samples chosen that way ("uncertainty", "random", or a list of them).
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.hashing import sha256_file
from shared.samples import SELECTIONS, SampleError, read_samples
from shared.errors import MissingBandsError, SceneError
from shared.scene import Scene
from ground.data.sample import Sample
from ground.errors import ConfigError, DataError

log = logging.getLogger("ground.data.learning")

KEYS = ("source", "path", "min_entropy", "selection")


@dataclass(frozen=True)
class HeldOutRegion:
    crs: str
    bounds: tuple[float, float, float, float]      # xmin, ymin, xmax, ymax in `crs` units

    def as_dict(self) -> dict:
        return {"crs": self.crs, "bounds": list(self.bounds)}


@dataclass
class LearningRead:
    """What one read of learning samples kept and dropped (for logs, lineage and reports)."""
    samples: list[Sample] = field(default_factory=list)
    read: int = 0
    dropped: dict = field(default_factory=lambda: {"held_out": 0, "no_georef": 0, "min_entropy": 0,
                                                   "selection": 0})
    held_out_files: list[str] = field(default_factory=list)
    regions: list = field(default_factory=list)          # the held-out regions applied, as dicts

    def summary(self) -> dict:
        """Counts, the models (id vN) and selections of the kept samples, the drops."""
        origins = [s.origin for s in self.samples]
        return {"read": self.read, "kept": len(self.samples), "dropped": dict(self.dropped),
                "models": dict(sorted(Counter(f"{o['model_id']} v{o['model_version']}" for o in origins).items())),
                "selections": dict(sorted(Counter(o["selection"] for o in origins).items()))}


def parse_held_out(value, where: str = "data.held_out") -> list[HeldOutRegion]:
    """`[{crs, bounds = [xmin, ymin, xmax, ymax]}]` -> regions; errors name the entry and field."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where}: a list of {{crs, bounds = [xmin, ymin, xmax, ymax]}} tables, got "
                          f"{type(value).__name__}")
    out = []
    for i, region in enumerate(value):
        at = f"{where}[{i}]"
        if isinstance(region, HeldOutRegion):
            out.append(region)
            continue
        if not isinstance(region, dict) or set(region) != {"crs", "bounds"}:
            raise ConfigError(f"{at}: a table with exactly 'crs' and 'bounds', got {region!r}")
        if not isinstance(region["crs"], str) or not region["crs"].strip():
            raise ConfigError(f"{at}.crs: a CRS name such as 'EPSG:32633', got {region['crs']!r}")
        b = region["bounds"]
        if (not isinstance(b, list) or len(b) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b)
                or not (b[0] < b[2] and b[1] < b[3])):
            raise ConfigError(f"{at}.bounds: [xmin, ymin, xmax, ymax] with xmin < xmax and ymin < ymax, got {b!r}")
        out.append(HeldOutRegion(region["crs"].strip(), tuple(float(v) for v in b)))
    return out


def window_bounds(georef: dict, size: int) -> tuple[float, float, float, float]:
    """(xmin, ymin, xmax, ymax) of a `size` x `size` window whose top-left pixel `georef` places."""
    a, b, c, d, e, f = (float(v) for v in georef["transform"])
    xs = [a * col + b * row + c for row in (0, size) for col in (0, size)]
    ys = [d * col + e * row + f for row in (0, size) for col in (0, size)]
    return min(xs), min(ys), max(xs), max(ys)


def _same_crs(a: str, b: str) -> bool:
    return a.strip().upper() == b.strip().upper()


def _region_in(region: HeldOutRegion, crs: str) -> tuple[float, float, float, float]:
    """The region's bounds in `crs` (a box around the reprojected one: it only grows)."""
    if _same_crs(region.crs, crs):
        return region.bounds
    try:
        from rasterio.warp import transform_bounds       # GDAL/PROJ: in the ground extra
    except ImportError:
        raise ConfigError(f"held-out region in {region.crs} and a sample in {crs}: comparing them needs "
                          "rasterio (pip install 'eoedge[ground]')") from None
    try:
        return tuple(transform_bounds(region.crs, crs, *region.bounds, densify_pts=21))
    except Exception as exc:          # rasterio's CRSError and PROJ errors alike name the CRS
        raise ConfigError(f"held-out region {region.as_dict()}: cannot reproject to {crs}: {exc}") from None


def inside_held_out(georef: dict | None, size: int, regions: list[HeldOutRegion]) -> bool | None:
    """True when the window intersects a region, False when it clears them all, None when it has no
    georeference to tell."""
    if georef is None or "crs" not in georef or "transform" not in georef:
        return None
    x0, y0, x1, y1 = window_bounds(georef, size)
    for region in regions:
        rx0, ry0, rx1, ry1 = _region_in(region, str(georef["crs"]))
        if x0 < rx1 and rx0 < x1 and y0 < ry1 and ry0 < y1:
            return True
    return False


def _selections(spec: dict) -> tuple[str, ...] | None:
    sel = spec.get("selection")
    if sel is None:
        return None
    sel = [sel] if isinstance(sel, str) else sel
    if not isinstance(sel, list) or not sel or any(s not in SELECTIONS for s in sel):
        raise ConfigError(f"data source 'learning': selection must be one of {list(SELECTIONS)} or a list of "
                          f"them, got {spec.get('selection')!r}")
    return tuple(sel)


def _paths(spec: dict) -> list[Path]:
    path = spec.get("path")
    paths = path if isinstance(path, list) else [path]
    if not paths or not all(isinstance(p, (str, Path)) and str(p) for p in paths):
        raise ConfigError(f"data source 'learning' needs a path (a folder of samples, a sample file, or a "
                          f"list of them), got {path!r}")
    out = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"learning samples: {p}: no such folder or file")
        out.append(p)
    return out


def read_learning(spec: dict, bands, held_out: list[HeldOutRegion] | None = None) -> LearningRead:
    """The samples a `learning` source names, in the run's `bands`, filtered; with what was dropped."""
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise ConfigError(f"data source 'learning': unknown key(s) {unknown}; allowed: {list(KEYS)}")
    min_entropy = spec.get("min_entropy")
    if min_entropy is not None and (isinstance(min_entropy, bool) or not isinstance(min_entropy, (int, float))):
        raise ConfigError(f"data source 'learning': min_entropy must be a number, got {min_entropy!r}")
    selections = _selections(spec)
    regions = parse_held_out(held_out or [])
    out = LearningRead(regions=[r.as_dict() for r in regions])
    for root in _paths(spec):
        files = (sorted(p for p in root.rglob("*.npz") if not p.name.endswith(".tmp.npz"))
                 if root.is_dir() else [root])
        for path in files:
            try:
                s = read_samples([path])[0]
            except SampleError as exc:
                raise DataError(str(exc)) from None
            out.read += 1
            if min_entropy is not None and s.entropy < float(min_entropy):
                out.dropped["min_entropy"] += 1
                continue
            if selections is not None and s.selection not in selections:
                out.dropped["selection"] += 1
                continue
            if regions:
                inside = inside_held_out(s.georef, s.size, regions)
                if inside is not False:
                    out.dropped["held_out" if inside else "no_georef"] += 1
                    out.held_out_files.append(str(path))
                    continue
            try:
                image = Scene(data=s.reflectance, bands=tuple(s.bands), name=str(path)).select(tuple(bands)).data
            except MissingBandsError as exc:
                raise ConfigError(f"{path}: the run needs bands {list(bands)}: {exc}") from None
            except SceneError as exc:
                raise DataError(f"{path}: {exc}") from None
            origin = {k: v for k, v in s.meta().items() if k not in ("format", "bands")}
            origin.update(file=str(path), sha256=sha256_file(path))
            out.samples.append(Sample(np.ascontiguousarray(image, dtype=np.float32), None,
                                      f"{s.frame_id}@{s.row},{s.col}", [str(path)], origin))
    if out.dropped["held_out"] or out.dropped["no_georef"]:
        log.warning("learning samples: dropped %d inside held-out regions and %d without a georeference "
                    "(of %d read)", out.dropped["held_out"], out.dropped["no_georef"], out.read)
    return out


def load_learning(spec: dict, bands, role: str = "train", held_out=None) -> list[Sample]:
    """The registry's entry (ground.data.sources): the kept samples; an empty result is an error."""
    got = read_learning(spec, bands, held_out)
    if not got.samples:
        raise DataError(f"data source 'learning' {spec.get('path')!s}: no samples left "
                        f"({got.read} read, dropped {got.dropped})")
    return got.samples
