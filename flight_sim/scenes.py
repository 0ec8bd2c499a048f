"""Where the simulator's scenes come from, read strip by strip as a push-broom camera sees them.

A scene source has `rows`, `cols`, `bands` and `read(r0, r1) -> Strip` (top-of-atmosphere
reflectance float32 (bands, r1-r0, cols), plus the truth of those rows when it is known), so a
full 10980 x 10980 product never has to sit in memory at once. Sources:

- `GeneratedSource`: a procedural scene (flight_sim.generator) with its truth;
- `ArraySource`: a scene in memory: anything `shared.scene.read_scene` reads (multi-band GeoTIFF,
  a folder of band GeoTIFFs, .npz, .npy) and the chips in ../shared/data (shared.datasets);
- `RasterBandsSource`: one file per band read through rasterio/GDAL: a Sentinel-2 SAFE product
  (its JPEG 2000 band files under GRANULE/*/IMG_DATA, also inside a .zip), or a folder of .jp2
  files. 20 m and 60 m bands are resampled onto the 10 m grid by GDAL as each strip is read;
  digital numbers become reflectance with the product's QUANTIFICATION_VALUE and, from
  processing baseline 04.00 on, its RADIO_ADD_OFFSET (both read from MTD_MSIL1C.xml).

`open_source(spec, base_dir)` builds one from a scenario's `[[scenes]]` table.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from flight_sim.errors import SceneSpecError
from flight_sim.generator import CLASSES, SceneGenerator
from flight_sim.harbour import SKY_KEYS, cloudy_harbour
from flight_sim.truth import IGNORE
from shared import datasets
from shared.bands import RESOLUTION_M, S2_BANDS, band_from_filename
from shared.messages import parse_datetime
from shared.scene import (GeoRef, MissingBandsError, Scene, SceneReadError, normalise_band_name,
                          read_scene)

DEFAULT_QUANTIFICATION = 10000.0  # L1C digital number per unit reflectance


@dataclass
class Strip:
    """Rows r0:r1 of a scene."""

    reflectance: np.ndarray            # (bands, rows, cols) float32
    truth: np.ndarray | None = None    # (rows, cols) uint8 indexing the source's truth_classes
    objects: np.ndarray | None = None  # (rows, cols) instance ids of target objects (0 = none)


class SceneSource:
    """The interface every source offers (see the module docstring)."""

    name: str
    rows: int
    cols: int
    bands: tuple[str, ...]
    truth_classes: tuple[str, ...] | None = None   # None: no truth for this scene
    object_class: str | None = None                # what `Strip.objects` counts ("ship")
    georef: GeoRef | None = None                   # where row 0, col 0 lies (None: unknown)
    sensing_time: datetime | None = None           # UTC of row 0 (a SAFE's PRODUCT_START_TIME)

    def read(self, r0: int, r1: int) -> Strip:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "rows": self.rows, "cols": self.cols, "bands": list(self.bands),
                "truth_classes": list(self.truth_classes) if self.truth_classes else None,
                "object_class": self.object_class}

    def _check_rows(self, r0: int, r1: int) -> None:
        if not 0 <= r0 < r1 <= self.rows:
            raise ValueError(f"{self.name}: rows {r0}:{r1} outside 0:{self.rows}")


# ------------------------------------------------------------------------------- generated

class GeneratedSource(SceneSource):
    def __init__(self, generator: SceneGenerator):
        self.generator = generator
        self.name = generator.name
        self.rows, self.cols = generator.rows, generator.cols
        self.bands = S2_BANDS
        self.truth_classes = CLASSES
        self.object_class = "ship"
        # a placed scene (`place = true`) knows where and when it was seen
        self.georef, self.sensing_time = generator.georef, generator.sensing_time

    def read(self, r0: int, r1: int) -> Strip:
        self._check_rows(r0, r1)
        win = self.generator.window(r0, r1)
        return Strip(win.reflectance, win.truth, win.ships)

    def describe(self) -> dict:
        return {**super().describe(), **self.generator.describe()}


# ------------------------------------------------------------------------------- in memory

class ArraySource(SceneSource):
    """A scene already in memory. `scale` turns its values into reflectance."""

    def __init__(self, scene: Scene, truth: np.ndarray | None = None,
                 truth_classes: Sequence[str] | None = None, scale: float = 1.0, name: str = "",
                 objects: np.ndarray | None = None, object_class: str | None = None):
        self.scene = scene
        self.name = name or scene.name or "scene"
        self.rows, self.cols = scene.rows, scene.cols
        self.bands = scene.bands
        self.georef = scene.georef
        self.scale = float(scale)
        if truth is not None:
            truth = np.asarray(truth)
            if truth.shape != (scene.rows, scene.cols):
                raise SceneSpecError(f"{self.name}: truth shape {truth.shape} does not match the "
                                     f"scene's {(scene.rows, scene.cols)}")
            if truth_classes is None:
                raise SceneSpecError(f"{self.name}: truth given without truth_classes")
        self.truth = truth
        self.truth_classes = tuple(truth_classes) if truth is not None else None
        self.objects = objects
        self.object_class = object_class if objects is not None else None

    def read(self, r0: int, r1: int) -> Strip:
        self._check_rows(r0, r1)
        data = self.scene.data[:, r0:r1].astype(np.float32)
        if self.scale != 1.0:
            data *= np.float32(self.scale)
        return Strip(data, None if self.truth is None else self.truth[r0:r1],
                     None if self.objects is None else self.objects[r0:r1])


# ------------------------------------------------------------------------------- rasterio

def _mtd_radiometry(text: str) -> tuple[float, dict[str, float]]:
    """(QUANTIFICATION_VALUE, {band: RADIO_ADD_OFFSET}) from an MTD_MSIL1C.xml (offsets: empty
    before processing baseline 04.00)."""
    root = ET.fromstring(text)
    quant = DEFAULT_QUANTIFICATION
    offsets: dict[str, float] = {}
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag == "QUANTIFICATION_VALUE" and el.text:
            quant = float(el.text)
        elif tag == "RADIO_ADD_OFFSET" and el.text is not None:
            band_id = int(el.get("band_id", "-1"))
            if 0 <= band_id < len(S2_BANDS):
                offsets[S2_BANDS[band_id]] = float(el.text)
    return quant, offsets


def find_safe_band_files(path: str | Path) -> tuple[dict[str, str], str | None]:
    """Band files of a SAFE product (folder or .zip) as GDAL paths, finest resolution per band,
    and the text of its MTD_MSIL1C.xml (None if absent). Also takes a plain folder of .jp2."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".zip":
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            mtd = next((n for n in names if re.search(r"MTD_MSIL1C\.xml$", n)), None)
            mtd_text = zf.read(mtd).decode("utf-8") if mtd else None
        candidates = [(n, f"/vsizip/{path}/{n}") for n in names
                      if re.search(r"GRANULE/[^/]+/IMG_DATA/.*\.jp2$", n, re.IGNORECASE)]
    elif path.is_dir():
        mtd_path = path / "MTD_MSIL1C.xml"
        mtd_text = mtd_path.read_text() if mtd_path.is_file() else None
        files = sorted(path.glob("GRANULE/*/IMG_DATA/**/*.jp2")) or sorted(path.glob("*.jp2"))
        candidates = [(str(p.relative_to(path)), str(p)) for p in files]
    else:
        raise SceneReadError(f"{path}: not a SAFE folder, a SAFE .zip or a folder of .jp2 files")
    found: dict[str, tuple[int, str]] = {}
    for rel, gdal_path in candidates:
        stem = Path(rel).stem
        band = band_from_filename(stem)
        if band is None:                       # TCI, AOT, WVP, SCL...
            continue
        m = re.search(r"_(10|20|60)m$", stem)
        res = int(m.group(1)) if m else RESOLUTION_M[band]
        if band not in found or res < found[band][0]:
            found[band] = (res, gdal_path)
    if not found:
        raise SceneReadError(f"{path}: no band files (*.jp2 named like T33UVP_..._B04.jp2 under "
                             f"GRANULE/*/IMG_DATA)")
    return {b: found[b][1] for b in S2_BANDS if b in found}, mtd_text


class RasterBandsSource(SceneSource):
    """One raster file per band, read through rasterio in strips on the finest band's grid.

    `resampling`: "nearest" (default: keeps each 20/60 m value, as the shared readers do) or
    "bilinear", any rasterio Resampling name."""

    def __init__(self, files: dict[str, str], bands: Sequence[str] | None = None, name: str = "",
                 quantification: float = DEFAULT_QUANTIFICATION,
                 offsets: dict[str, float] | None = None, resampling: str = "nearest"):
        import rasterio
        from rasterio.enums import Resampling
        available = tuple(files)
        wanted = tuple(normalise_band_name(b) for b in bands) if bands else available
        missing = [b for b in wanted if b not in files]
        if missing:
            raise MissingBandsError(missing, available, name)
        try:
            self.resampling = Resampling[resampling]
        except KeyError:
            raise SceneSpecError(f"resampling: unknown {resampling!r}; one of "
                                 f"{', '.join(r.name for r in Resampling)}") from None
        self.files = {b: files[b] for b in wanted}
        self.bands = wanted
        self.quantification = float(quantification)
        self.offsets = dict(offsets or {})
        self._datasets = {}
        shapes = {}
        for b, p in files.items():     # the grid is the finest of all files, not only those read
            try:
                with rasterio.open(p) as ds:
                    shapes[b] = (ds.height, ds.width, ds.transform, ds.crs)
            except rasterio.errors.RasterioIOError as exc:
                raise SceneReadError(f"{p}: cannot open ({exc})") from None
        finest = min(shapes, key=lambda b: abs(shapes[b][2].a))
        self.rows, self.cols, transform, crs = shapes[finest]
        self.transform = tuple(transform)[:6]
        self.crs = crs.to_string() if crs else None
        self.georef = GeoRef(self.crs, self.transform) if self.crs else None
        self.factors = {b: self.rows / shapes[b][0] for b in wanted}
        self.name = name or Path(next(iter(files.values()))).parent.name

    def _open(self, band: str):
        import rasterio
        if band not in self._datasets:
            self._datasets[band] = rasterio.open(self.files[band])
        return self._datasets[band]

    def close(self) -> None:
        for ds in self._datasets.values():
            ds.close()
        self._datasets.clear()

    def read(self, r0: int, r1: int) -> Strip:
        from rasterio.windows import Window
        self._check_rows(r0, r1)
        out = np.empty((len(self.bands), r1 - r0, self.cols), np.float32)
        for i, b in enumerate(self.bands):
            f = self.factors[b]
            ds = self._open(b)
            # a (possibly fractional) window in the band's own pixels, resampled by GDAL
            window = Window(0, r0 / f, ds.width, (r1 - r0) / f)
            try:
                plane = ds.read(1, window=window, out_shape=(r1 - r0, self.cols),
                                resampling=self.resampling)
            except Exception as exc:
                raise SceneReadError(f"{self.files[b]}: cannot read rows {r0}:{r1} ({exc})") from exc
            out[i] = plane
            # DN -> reflectance: (DN + RADIO_ADD_OFFSET) / QUANTIFICATION_VALUE; 0 is no data
            offset = self.offsets.get(b, 0.0)
            if offset:
                nodata = plane == 0
                out[i] += np.float32(offset)
                out[i][nodata] = 0
        out /= np.float32(self.quantification)
        np.clip(out, 0, None, out=out)
        return Strip(out)

    def describe(self) -> dict:
        return {**super().describe(), "crs": self.crs, "files": dict(self.files),
                "quantification": self.quantification, "offsets": self.offsets,
                "resampling": self.resampling.name}


def mtd_sensing_time(text: str) -> datetime | None:
    """PRODUCT_START_TIME of an MTD_MSIL1C.xml (UTC), None when absent or unreadable."""
    for el in ET.fromstring(text).iter():
        if el.tag.rsplit("}", 1)[-1] == "PRODUCT_START_TIME" and el.text:
            try:
                value = parse_datetime(el.text.strip())
            except ValueError:
                return None
            return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return None


def open_safe(path: str | Path, bands: Sequence[str] | None = None,
              resampling: str = "nearest") -> RasterBandsSource:
    """A SAFE product (folder or .zip) or a folder of .jp2 band files."""
    files, mtd = find_safe_band_files(path)
    quant, offsets = _mtd_radiometry(mtd) if mtd else (DEFAULT_QUANTIFICATION, {})
    source = RasterBandsSource(files, bands, name=Path(path).name, quantification=quant,
                               offsets=offsets, resampling=resampling)
    source.sensing_time = mtd_sensing_time(mtd) if mtd else None
    return source


def is_raster_bands_path(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() == ".zip"
    return path.is_dir() and (path.suffix.upper() == ".SAFE" or any(path.glob("GRANULE"))
                              or any(path.glob("*.jp2")))


# ------------------------------------------------------------------------------- datasets

DATASETS = ("ukis", "sen1floods11", "eolearn")


def dataset_source(name: str, root: Path | None = None) -> ArraySource:
    """A chip of ../shared/data: `ukis` (truth clear/cloud/shadow), `sen1floods11` (truth water),
    `eolearn:N` (date N of 5, no cloud truth: the patch's cloud masks are model output)."""
    base, _, arg = name.partition(":")
    if base == "ukis":
        scene, labels = datasets.load_ukis_chip(root)
        return ArraySource(scene, labels, datasets.UKIS_CLASSES, name="ukis_csmask_s2")
    if base == "sen1floods11":
        scene, labels = datasets.load_sen1floods11(root)
        truth = np.full(labels.shape, IGNORE, np.uint8)
        truth[labels == 0] = 0
        truth[labels == 1] = 1
        return ArraySource(scene, truth, ("land", "water"), name=scene.name)
    if base == "eolearn":
        scenes, _ = datasets.load_eolearn(root)
        index = int(arg or 0)
        if not 0 <= index < len(scenes):
            raise SceneSpecError(f"dataset: eolearn has dates 0..{len(scenes) - 1}, got {index}")
        return ArraySource(scenes[index], name=scenes[index].name)
    raise SceneSpecError(f"dataset: unknown {name!r}; known: ukis, sen1floods11, eolearn:N")


# ------------------------------------------------------------------------------- from a spec

GENERATOR_KEYS = {"rows", "cols", "seed", "cloud_cover", "water_fraction", "ships", "urban_fraction",
                  "cloud_height_m", "sun_elevation_deg", "sun_azimuth_deg", "noise_sigma",
                  "feature_scale", "name", "place", "surface", "haze"}
COMMON_KEYS = {"kind", "crop_rows", "repeat", "georef"}
FILE_KEYS = {"path", "bands", "scale", "truth", "truth_classes", "resampling", "name"}
SCENE_KEYS = {"generated": GENERATOR_KEYS, "file": FILE_KEYS, "dataset": {"name"},   # by kind
              "harbour": {"port", *SKY_KEYS}}


def _crop(source: SceneSource, rows: Any, where: str) -> SceneSource:
    if rows is None:
        return source
    if (not isinstance(rows, list) or len(rows) != 2 or not all(isinstance(v, int) for v in rows)
            or not 0 <= rows[0] < rows[1] <= source.rows):
        raise SceneSpecError(f"{where}.crop_rows: [first, end) rows within 0..{source.rows} "
                             f"expected, got {rows!r}")
    return CroppedSource(source, rows[0], rows[1])


class CroppedSource(SceneSource):
    """Rows r0:r1 of another source (e.g. the held-out half of the ukis chip)."""

    def __init__(self, inner: SceneSource, r0: int, r1: int):
        self.inner, self.r0 = inner, r0
        self.name = f"{inner.name}[{r0}:{r1}]"
        self.rows, self.cols, self.bands = r1 - r0, inner.cols, inner.bands
        self.truth_classes, self.object_class = inner.truth_classes, inner.object_class
        self.georef = inner.georef.shifted(r0, 0) if inner.georef else None
        self.sensing_time = inner.sensing_time        # (row 0 of the inner scene: close enough)

    def read(self, r0: int, r1: int) -> Strip:
        self._check_rows(r0, r1)
        return self.inner.read(self.r0 + r0, self.r0 + r1)


def check_scene_spec(spec: Any, where: str = "scenes[0]") -> None:
    """The keys of one `[[scenes]]` table (see `open_source`), checked without opening anything,
    so that a scenario names a typo when it is loaded. Values are checked when the scene opens."""
    if not isinstance(spec, dict):
        raise SceneSpecError(f"{where}: expected a table, got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind not in SCENE_KEYS:
        raise SceneSpecError(f"{where}.kind: one of generated, file, dataset, harbour expected, got {kind!r}")
    unknown = set(spec) - SCENE_KEYS[kind] - COMMON_KEYS
    if unknown:
        raise SceneSpecError(f"{where}.{sorted(unknown)[0]}: unknown key for a {kind} scene "
                             f"(known: {', '.join(sorted(SCENE_KEYS[kind]))})")
    if kind == "generated":
        for key in ("rows", "cols"):
            if key not in spec:
                raise SceneSpecError(f"{where}.{key}: missing (a generated scene needs rows and cols)")
    elif kind == "dataset" and not isinstance(spec.get("name"), str):
        raise SceneSpecError(f"{where}.name: a dataset name expected (ukis, sen1floods11, eolearn:N)")
    elif kind == "file" and not isinstance(spec.get("path"), str):
        raise SceneSpecError(f"{where}.path: a file or folder path expected")
    elif kind == "harbour" and not isinstance(spec.get("port"), str):
        raise SceneSpecError(f"{where}.port: a sen2ships harbour expected ({', '.join(datasets.SHIP_PORTS)})")


def open_source(spec: dict, base_dir: Path | None = None, where: str = "scenes[0]") -> SceneSource:
    """A source from one `[[scenes]]` table:

        {kind = "generated", rows, cols, seed, cloud_cover, ships, ...}   (SceneGenerator's args;
                                                                           surface = "arid": desert)
        {kind = "file", path, bands?, scale?, truth?, truth_classes?}     (tif, band folder, npz,
                                                                           npy, SAFE, .zip, .jp2s)
        {kind = "dataset", name = "ukis" | "sen1floods11" | "eolearn:N"}
        {kind = "harbour", port = "genoa", seed, cloud_cover, ...}        (flight_sim.harbour: a
                                                                           real harbour, generated sky)
    any of them with crop_rows = [first, end), and georef = {crs = "EPSG:32633", transform =
    [10, 0, 500000, 0, -10, 5200000]} to place it on Earth (a generated scene; or a file's own
    georeference replaced).
    """
    check_scene_spec(spec, where)
    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    if spec["kind"] == "generated":
        source = _generated_source(spec, where)
    elif spec["kind"] == "dataset":
        source = dataset_source(spec["name"])
    elif spec["kind"] == "harbour":
        source = harbour_source(spec, where)
    else:
        source = _file_source(spec, base_dir, where)
    if "georef" in spec:
        source.georef = _spec_georef(spec["georef"], f"{where}.georef")
    return _crop(source, spec.get("crop_rows"), where)


def _spec_georef(value: Any, where: str) -> GeoRef:
    """A scene's `georef = {crs, transform}` table as a GeoRef."""
    if not isinstance(value, dict) or set(value) != {"crs", "transform"}:
        raise SceneSpecError(f"{where}: a table {{crs = \"EPSG:<code>\", transform = [a, b, c, d, e, f]}} "
                             f"expected, got {value!r}")
    try:
        return GeoRef(value["crs"], tuple(value["transform"]))
    except (TypeError, ValueError) as exc:
        raise SceneSpecError(f"{where}: {exc}") from None


def harbour_source(spec: dict, where: str = "scenes[0]") -> ArraySource:
    """A sen2ships harbour under a generated sky (flight_sim.harbour): its real georeference, truth
    in the generator's CLASSES, the visible vessels as the objects."""
    args = {k: v for k, v in spec.items() if k in SKY_KEYS}
    try:
        h = cloudy_harbour(spec["port"], **args)
    except (TypeError, ValueError) as exc:
        raise SceneSpecError(f"{where}: {exc}") from None
    return ArraySource(h.scene, h.truth, CLASSES, name=h.scene.name, objects=h.ships, object_class="ship")


def _generated_source(spec: dict, where: str) -> GeneratedSource:
    args = {k: v for k, v in spec.items() if k in GENERATOR_KEYS}
    try:
        return GeneratedSource(SceneGenerator(**args))
    except (TypeError, ValueError) as exc:
        raise SceneSpecError(f"{where}: {exc}") from None


def _file_source(spec: dict, base_dir: Path, where: str) -> SceneSource:
    path = (base_dir / spec["path"]).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{where}.path: {path} not found")
    bands = spec.get("bands")
    if is_raster_bands_path(path):
        return open_safe(path, bands, spec.get("resampling", "nearest"))
    scene = read_scene(path, bands)
    scale = spec.get("scale")
    if scale is None:                # integers are L1C digital numbers, floats reflectance
        scale = 1.0 / DEFAULT_QUANTIFICATION if np.issubdtype(scene.data.dtype, np.integer) else 1.0
    truth, classes, objects = None, spec.get("truth_classes"), None
    if path.suffix.lower() == ".npz" and spec.get("truth") is None:
        # `eoedge sim generate` writes its truth beside the data: truth, classes, ships
        with np.load(path, allow_pickle=False) as z:
            if "truth" in z and "classes" in z:
                truth, classes = z["truth"].astype(np.uint8), [str(c) for c in z["classes"]]
                objects = z["ships"] if "ships" in z else None
    if spec.get("truth") is not None:
        tpath = base_dir / spec["truth"]
        truth = read_scene(tpath, ["truth"]).data[0] if tpath.suffix.lower() not in (".npy",) \
            else np.load(tpath, allow_pickle=False)
        if not isinstance(spec.get("truth_classes"), list):
            raise SceneSpecError(f"{where}.truth_classes: the class names of the truth values "
                                 f"(0, 1, ...) expected with truth")
        truth = truth.astype(np.uint8)
    return ArraySource(scene, truth, classes, scale=float(scale), name=spec.get("name") or path.stem,
                       objects=objects, object_class="ship" if objects is not None else None)
