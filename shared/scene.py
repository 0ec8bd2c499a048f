"""A Sentinel-2 scene in memory (bands, rows, cols) and the readers/writer that bring it in and out.

`Scene` is what every stage passes around: the array, which band each plane is, and where it lies
on Earth (`GeoRef`, optional). `read_scene(path, bands)` reads a multi-band GeoTIFF, a folder of
one-file-per-band GeoTIFFs, a `.npz` or a `.npy` and gives back the bands asked for, in the order
asked for, or an error that names the file. `write_geotiff` writes a scene GDAL/rasterio can open.
"""
from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import tifffile

from shared.bands import S2_BANDS, band_from_filename, canonical_band, is_band, looks_like_band_code
from shared.errors import MissingBandsError, SceneError, SceneFormatError, SceneReadError

TIFF_SUFFIXES = (".tif", ".tiff")
FORMATS = "a GeoTIFF (.tif/.tiff), a folder of one-file-per-band GeoTIFFs, .npz or .npy"

# GeoTIFF tags (GeoTIFF 1.0 spec, section 2.6) and the GeoKeys we read / write.
TAG_PIXEL_SCALE, TAG_TIEPOINT, TAG_TRANSFORMATION, TAG_GEOKEYS = 33550, 33922, 34264, 34735
TAG_GDAL_METADATA = 42112   # GDAL's XML: per-band DESCRIPTION items carry the band names
KEY_MODEL_TYPE, KEY_RASTER_TYPE = 1024, 1025
KEY_GEOGRAPHIC_CRS, KEY_PROJECTED_CRS = 2048, 3072
MODEL_PROJECTED, MODEL_GEOGRAPHIC = 1, 2
RASTER_PIXEL_IS_AREA, RASTER_PIXEL_IS_POINT = 1, 2
USER_DEFINED = 32767


# --------------------------------------------------------------------------------------- GeoRef

@dataclass(frozen=True)
class GeoRef:
    """Where a raster lies: a CRS (`"EPSG:32633"`, or None when unknown) and the affine
    pixel-to-map transform in rasterio/`affine` order `(a, b, c, d, e, f)`:
    x = a*col + b*row + c, y = d*col + e*row + f, for (col, row) at a pixel's top-left corner.
    (`tuple(rasterio_dataset.transform)[:6]` gives exactly this; GDAL's order is `to_gdal()`.)"""

    crs: str | None
    transform: tuple[float, float, float, float, float, float]

    def __post_init__(self):
        if self.crs is not None and (not isinstance(self.crs, str) or not self.crs.strip()):
            raise ValueError(f"GeoRef.crs must be a non-empty string or None, got {self.crs!r}")
        t = tuple(float(v) for v in self.transform)
        if len(t) != 6 or not all(math.isfinite(v) for v in t):
            raise ValueError(f"GeoRef.transform must be 6 finite numbers (a, b, c, d, e, f), "
                             f"got {self.transform!r}")
        if t[0] * t[4] - t[1] * t[3] == 0:
            raise ValueError(f"GeoRef.transform {t} is singular (zero pixel size)")
        object.__setattr__(self, "transform", t)

    @classmethod
    def from_gdal(cls, geotransform: Sequence[float], crs: str | None = None) -> "GeoRef":
        """From GDAL's `(c, a, b, f, d, e)` geotransform."""
        c, a, b, f, d, e = geotransform
        return cls(crs, (a, b, c, d, e, f))

    def to_gdal(self) -> tuple[float, ...]:
        a, b, c, d, e, f = self.transform
        return (c, a, b, f, d, e)

    @property
    def epsg(self) -> int | None:
        m = re.fullmatch(r"\s*EPSG:(\d+)\s*", self.crs or "", re.IGNORECASE)
        return int(m.group(1)) if m else None

    @property
    def pixel_size(self) -> tuple[float, float]:
        """(x size, y size) of a pixel in CRS units (north-up rasters: (a, -e))."""
        a, b, _, d, e, _ = self.transform
        return (math.hypot(a, d), math.hypot(b, e))

    def xy(self, row: float, col: float) -> tuple[float, float]:
        """Map coordinates of the pixel-space point (row, col); +0.5 each for a pixel centre."""
        a, b, c, d, e, f = self.transform
        return (a * col + b * row + c, d * col + e * row + f)

    def corners(self, rows: int, cols: int) -> list[tuple[float, float]]:
        """Map coordinates of the outer corners of a rows x cols raster placed here (top-left,
        top-right, bottom-right, bottom-left: a footprint ring, unclosed)."""
        return [self.xy(r, c) for r, c in ((0, 0), (0, cols), (rows, cols), (rows, 0))]

    def bounds(self, rows: int, cols: int) -> tuple[float, float, float, float]:
        """(min x, min y, max x, max y) in CRS units of a rows x cols raster placed here
        (what rasterio's `dataset.bounds` says of it)."""
        xs, ys = zip(*self.corners(rows, cols))
        return (min(xs), min(ys), max(xs), max(ys))

    def shifted(self, row: int, col: int) -> "GeoRef":
        """The GeoRef of a window whose top-left pixel is (row, col) of this raster."""
        a, b, c, d, e, f = self.transform
        x, y = self.xy(row, col)
        return GeoRef(self.crs, (a, b, x, d, e, y))

    def scaled(self, factor: float) -> "GeoRef":
        """The GeoRef of the same extent sampled `factor` times finer (factor 2: 20 m -> 10 m)."""
        a, b, c, d, e, f = self.transform
        return GeoRef(self.crs, (a / factor, b / factor, c, d / factor, e / factor, f))

    def as_dict(self) -> dict:
        return {"crs": self.crs, "transform": list(self.transform)}

    @classmethod
    def from_dict(cls, d: dict) -> "GeoRef":
        try:
            return cls(d["crs"], tuple(d["transform"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"GeoRef dict needs 'crs' and 'transform' (6 numbers): {d!r}") from exc


# ---------------------------------------------------------------------------------------- Scene

def normalise_band_name(name: object) -> str:
    """Canonical Sentinel-2 name for band codes/aliases (`B2`, `Blue` -> `B02`); any other
    non-empty string is kept as a custom channel (`VV`, `NDVI`), but a band-shaped typo (`B13`)
    raises `UnknownBandError`."""
    if not isinstance(name, str) or not name.strip():
        raise SceneError(f"band names must be non-empty strings, got {name!r}")
    name = name.strip()
    if is_band(name) or looks_like_band_code(name):
        return canonical_band(name)       # raises UnknownBandError for B13 and friends
    return name


@dataclass(eq=False)
class Scene:
    """An image cube `data` of shape (bands, rows, cols) with one name per band.

    Band names are canonicalised (`B2`/`Blue` -> `B02`), must be unique, and their count must
    match `data.shape[0]`. `georef` is the top-left pixel's placement (None for plain arrays)."""

    data: np.ndarray
    bands: tuple[str, ...]
    georef: GeoRef | None = None
    name: str = ""

    def __post_init__(self):
        if not isinstance(self.data, np.ndarray):
            raise SceneError(f"Scene.data must be a numpy array, got {type(self.data).__name__}")
        if self.data.ndim != 3:
            raise SceneError(f"Scene.data must be 3-D (bands, rows, cols), got shape "
                             f"{self.data.shape}{self._where()}")
        if isinstance(self.bands, str):
            raise SceneError(f"Scene.bands must be a sequence of names, got the string "
                             f"{self.bands!r}")
        names = tuple(normalise_band_name(b) for b in self.bands)
        if len(names) != self.data.shape[0]:
            raise SceneError(f"Scene has {self.data.shape[0]} band plane(s) in data "
                             f"{self.data.shape} but {len(names)} band name(s) "
                             f"{list(self.bands)}{self._where()}")
        seen: dict[str, str] = {}
        for given, canon in zip(self.bands, names):
            if canon in seen:
                raise SceneError(f"duplicate band {canon!r} (given as {seen[canon]!r} and "
                                 f"{given!r}){self._where()}")
            seen[canon] = given
        if self.georef is not None and not isinstance(self.georef, GeoRef):
            raise SceneError(f"Scene.georef must be a GeoRef or None, got "
                             f"{type(self.georef).__name__}")
        self.bands = names

    def _where(self) -> str:
        return f" (scene {self.name!r})" if getattr(self, "name", "") else ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)

    @property
    def rows(self) -> int:
        return self.data.shape[1]

    @property
    def cols(self) -> int:
        return self.data.shape[2]

    def __repr__(self) -> str:
        return (f"Scene(name={self.name!r}, shape={self.shape}, dtype={self.data.dtype}, "
                f"bands={self.bands}, georef={self.georef})")

    def band(self, name: str) -> np.ndarray:
        """One band plane (rows, cols) by any accepted name."""
        return self.select([name]).data[0]

    def select(self, bands: Iterable[str]) -> "Scene":
        """The scene with exactly `bands`, in that order. Raises `MissingBandsError` naming
        every band not present. Shares memory with this scene when nothing is reordered."""
        if isinstance(bands, str):
            raise SceneError(f"select() takes a sequence of band names, got the string {bands!r}")
        wanted = [normalise_band_name(b) for b in bands]
        if not wanted:
            raise SceneError("select() needs at least one band")
        missing = [b for b in wanted if b not in self.bands]
        if missing:
            raise MissingBandsError(missing, self.bands, f"scene {self.name!r}" if self.name else "")
        index = [self.bands.index(b) for b in wanted]
        data = self.data if index == list(range(len(self.bands))) else self.data[index]
        return Scene(data, tuple(wanted), self.georef, self.name)

    def crop(self, rows: slice | tuple[int, int], cols: slice | tuple[int, int]) -> "Scene":
        """A window of the scene (a view), e.g. `crop(slice(256, 512), slice(0, 512))`; the
        GeoRef moves with it. Steps other than 1, empty and out-of-bounds windows are errors."""
        r0, r1 = _window(rows, self.rows, "rows")
        c0, c1 = _window(cols, self.cols, "cols")
        georef = self.georef.shifted(r0, c0) if self.georef is not None else None
        return Scene(self.data[:, r0:r1, c0:c1], self.bands, georef, self.name)


def _window(spec: slice | tuple[int, int], size: int, what: str) -> tuple[int, int]:
    if isinstance(spec, tuple) and len(spec) == 2:
        spec = slice(*spec)
    if not isinstance(spec, slice):
        raise ValueError(f"crop {what} must be a slice or a (start, stop) pair, got {spec!r}")
    start, stop, step = spec.indices(size)
    if step != 1:
        raise ValueError(f"crop {what} {spec} has step {step}; only 1 is supported")
    for v in (spec.start, spec.stop):
        if v is not None and not -size <= v <= size:
            raise ValueError(f"crop {what} {spec} is outside 0..{size}")
    if stop <= start:
        raise ValueError(f"crop {what} {spec} is empty for size {size}")
    return start, stop


# -------------------------------------------------------------------------------------- readers

def read_scene(path: str | Path, bands: Sequence[str] | None = None) -> Scene:
    """Read a scene and return `bands` in that order (all bands, when None).

    Formats: a multi-band GeoTIFF (band names from GDAL's per-band descriptions, georeference
    from the GeoTIFF tags), a folder of one-file-per-band GeoTIFFs (band name in each file name,
    e.g. `T33UVP_20200101_B04.tif`; coarser bands are upsampled by an integer factor, nearest
    neighbour, to the finest grid), `.npz` (array in `data` or `img`, optional `bands`; channels
    first or last) and `.npy`.

    A file that carries no band names is read as the standard 13-band order (`S2_BANDS`) when it
    has 13 bands; otherwise `bands` must name its bands in file order."""
    path = Path(path)
    if bands is not None and isinstance(bands, str):
        raise TypeError(f"bands must be a sequence of names, got the string {bands!r}")
    if not path.exists():
        raise FileNotFoundError(f"scene not found: {path}")
    if path.is_dir():
        return _read_band_folder(path, bands)
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        data, names, georef = _read_geotiff(path)
        return _named_scene(data, names, georef, bands, path)
    if suffix == ".npz":
        data, names = _read_npz(path)
        return _named_scene(_band_first(data, names, bands, path), names, None, bands, path)
    if suffix == ".npy":
        data = _guard(path, lambda: np.load(path, allow_pickle=False))
        return _named_scene(_band_first(data, None, bands, path), None, None, bands, path)
    raise SceneFormatError(f"{path}: unknown scene format {suffix or '(no suffix)'!r}; "
                           f"expected {FORMATS}")


def _guard(path: Path, read):
    """Run a library read; turn its failure into a SceneReadError that names the file."""
    try:
        return read()
    except (SceneReadError, FileNotFoundError):
        raise
    except Exception as exc:   # tifffile/numpy raise many types for corrupt files
        raise SceneReadError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc


def _named_scene(data: np.ndarray, names: Sequence[str] | None, georef: GeoRef | None,
                 bands: Sequence[str] | None, path: Path) -> Scene:
    """Attach band names (the file's, else the 13-band order, else `bands`) and select."""
    n = data.shape[0]
    if names is None:
        if n == len(S2_BANDS):
            names = S2_BANDS
        elif bands is not None and len(bands) == n:
            names, bands = tuple(bands), None
        else:
            hint = (f"bands={list(bands)} has {len(bands)} names" if bands is not None
                    else "no bands= given")
            raise SceneReadError(f"{path}: {n} band(s) and no band names in the file ({hint}); "
                                 f"pass bands=[...] naming all {n} bands in file order")
    try:
        scene = Scene(data, tuple(names), georef, path.stem)
    except (SceneError, ValueError) as exc:
        raise SceneReadError(f"{path}: {exc}") from exc
    if bands is None:
        return scene
    try:
        return scene.select(bands)
    except MissingBandsError as exc:
        raise MissingBandsError(exc.missing, exc.available, str(path)) from None


def _band_first(data: np.ndarray, names: Sequence[str] | None,
                bands: Sequence[str] | None, path: Path) -> np.ndarray:
    """Move the band axis first; which end it is comes from the band count."""
    if data.ndim != 3:
        raise SceneReadError(f"{path}: wrong dimensions: expected a 3-D array (bands, rows, cols) "
                             f"or (rows, cols, bands), got shape {data.shape}")
    if names is not None:
        counts = [len(names)]
    else:
        counts = [len(S2_BANDS)] + ([len(bands)] if bands is not None else [])
    for n in counts:
        if data.shape[0] == n:
            return data
        if data.shape[2] == n:
            return np.ascontiguousarray(np.moveaxis(data, 2, 0))
    if names is not None:
        raise SceneReadError(f"{path}: {len(names)} band names but array shape {data.shape} "
                             f"has no axis of that size first or last")
    small = [ax for ax in (0, 2) if data.shape[ax] <= len(S2_BANDS)]
    if len(small) == 1:
        return data if small[0] == 0 else np.ascontiguousarray(np.moveaxis(data, 2, 0))
    raise SceneReadError(f"{path}: cannot tell channels-first from channels-last for shape "
                         f"{data.shape}; store a 'bands' array in the file or pass bands=[...]")


def _read_npz(path: Path) -> tuple[np.ndarray, tuple[str, ...] | None]:
    def read():
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            key = next((k for k in ("data", "img") if k in keys), None)
            if key is None:
                raise SceneReadError(f"{path}: no 'data' or 'img' array in the .npz "
                                     f"(keys: {', '.join(keys) or 'none'})")
            names = tuple(str(b) for b in z["bands"].ravel()) if "bands" in keys else None
            return z[key], names
    return _guard(path, read)


# ------------------------------------------------------------------------------------- GeoTIFF

def _read_geotiff(path: Path) -> tuple[np.ndarray, tuple[str, ...] | None, GeoRef | None]:
    """(data (bands, rows, cols), band names from GDAL descriptions or None, GeoRef or None)."""

    def read():
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            data, axes = series.asarray(), series.axes
            tags = {t.code: t.value for t in tif.pages[0].tags.values()}
        return data, axes, tags

    data, axes, tags = _guard(path, read)
    if data.ndim == 2:
        data = data[np.newaxis]
    elif data.ndim == 3 and "Y" in axes and "X" in axes:
        band_axis = next(i for i, a in enumerate(axes) if a not in "YX")
        data = np.moveaxis(data, band_axis, 0)
    else:
        raise SceneReadError(f"{path}: wrong dimensions: expected a single image with bands, "
                             f"got shape {data.shape} (axes {axes})")
    names = _gdal_band_descriptions(tags.get(TAG_GDAL_METADATA), data.shape[0])
    try:
        georef = _georef_from_tags(tags)
    except (ValueError, TypeError, IndexError) as exc:
        raise SceneReadError(f"{path}: bad georeference tags: {exc}") from exc
    return data, names, georef


def _gdal_band_descriptions(xml: str | None, n: int) -> tuple[str, ...] | None:
    """Band names from GDAL_METADATA's per-sample DESCRIPTION items, when every band has one."""
    if not xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    found: dict[int, str] = {}
    for item in root.iter("Item"):
        if item.get("name") == "DESCRIPTION" and item.get("sample") is not None and item.text:
            found[int(item.get("sample"))] = item.text.strip()
    if sorted(found) != list(range(n)):
        return None
    return tuple(found[i] for i in range(n))


def _geokeys(values) -> dict[int, int]:
    """Short-valued GeoKeys from a GeoKeyDirectory (header of 4, then 4 shorts per key)."""
    v = [int(x) for x in values]
    count = v[3]
    keys = {}
    for i in range(count):
        key, location, _, value = v[4 + 4 * i: 8 + 4 * i]
        if location == 0:          # stored in place (ours are); others live in 34736/34737
            keys[key] = value
    return keys


def _georef_from_tags(tags: dict) -> GeoRef | None:
    if TAG_TRANSFORMATION in tags:
        m = [float(x) for x in tags[TAG_TRANSFORMATION]]
        transform = (m[0], m[1], m[3], m[4], m[5], m[7])
    elif TAG_PIXEL_SCALE in tags and TAG_TIEPOINT in tags:
        sx, sy = (float(x) for x in tags[TAG_PIXEL_SCALE][:2])
        tie = [float(x) for x in tags[TAG_TIEPOINT]]
        if len(tie) != 6:
            return None            # several tie points (GCPs) are no affine transform
        i, j, _, x, y, _ = tie
        transform = (sx, 0.0, x - i * sx, 0.0, -sy, y + j * sy)
    else:
        return None
    keys = _geokeys(tags[TAG_GEOKEYS]) if TAG_GEOKEYS in tags else {}
    if keys.get(KEY_RASTER_TYPE) == RASTER_PIXEL_IS_POINT:
        # the tie point is a pixel centre: move to the corner convention, as GDAL does
        a, b, c, d, e, f = transform
        transform = (a, b, c - (a + b) / 2, d, e, f - (d + e) / 2)
    code = keys.get(KEY_PROJECTED_CRS) or keys.get(KEY_GEOGRAPHIC_CRS)
    crs = f"EPSG:{code}" if code and code != USER_DEFINED else None
    return GeoRef(crs, transform)


def _read_band_folder(folder: Path, bands: Sequence[str] | None) -> Scene:
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in TIFF_SUFFIXES:
            continue
        band = band_from_filename(p.stem)
        if band is None:
            continue
        if band in files:
            raise SceneReadError(f"{folder}: band {band} appears twice: {files[band].name} "
                                 f"and {p.name}")
        files[band] = p
    if not files:
        raise SceneReadError(f"{folder}: no band files (*.tif/*.tiff with a band name such as "
                             f"B04 in the file name)")
    available = tuple(b for b in S2_BANDS if b in files)
    if bands is None:
        wanted = available
    else:
        wanted = tuple(normalise_band_name(b) for b in bands)
        missing = [b for b in wanted if b not in files]
        if missing:
            raise MissingBandsError(missing, available, str(folder))
    # The scene's grid is the finest grid in the folder, whichever bands are asked for, so
    # that a band subset lines up pixel for pixel with the full set.
    shapes = {b: _tiff_plane_shape(p) for b, p in files.items()}
    rows = max(r for r, _ in shapes.values())
    cols = max(c for _, c in shapes.values())
    factors = {}
    for b in wanted:
        r, c = shapes[b]
        if rows % r or cols % c or rows // r != cols // c:
            raise SceneReadError(f"{files[b]}: shape {(r, c)} is not an integer fraction of the "
                                 f"finest band grid ({rows}, {cols}); resample first")
        factors[b] = rows // r
    planes, georef = [], None
    for b in wanted:
        data, _, band_georef = _read_geotiff(files[b])
        if data.shape[0] != 1:
            raise SceneReadError(f"{files[b]}: expected one band per file, found {data.shape[0]}")
        planes.append(data[0])
        if georef is None and band_georef is not None:
            georef = band_georef.scaled(factors[b]) if factors[b] > 1 else band_georef
    out = np.empty((len(wanted), rows, cols), dtype=np.result_type(*planes))
    for i, (b, plane) in enumerate(zip(wanted, planes)):
        f = factors[b]
        # nearest-neighbour upsampling by broadcasting each pixel into an f x f block
        out[i].reshape(rows // f, f, cols // f, f)[...] = plane[:, None, :, None]
    return Scene(out, wanted, georef, folder.name)


def _tiff_plane_shape(path: Path) -> tuple[int, int]:
    """(rows, cols) of a single-band TIFF from its header, without decoding pixels."""

    def read():
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return dict(zip(series.axes, series.shape))
    dims = _guard(path, read)
    if "Y" not in dims or "X" not in dims:
        raise SceneReadError(f"{path}: not an image (axes {''.join(dims)})")
    return dims["Y"], dims["X"]


# -------------------------------------------------------------------------------------- writer

def _is_geographic(epsg: int) -> bool:
    # EPSG allocates geographic 2-D CRSs in 4000-4999 (4326 WGS 84, 4258 ETRS89); projected
    # ones (326xx UTM, 3035, 3857) lie outside it. No CRS database here, so this range decides.
    return 4000 <= epsg <= 4999


def _georef_tags(georef: GeoRef) -> list[tuple]:
    a, b, c, d, e, f = georef.transform
    tags: list[tuple] = []
    if b == 0 and d == 0 and a > 0 and e < 0:          # north-up: scale + one tie point
        tags.append((TAG_PIXEL_SCALE, "d", 3, (a, -e, 0.0), True))
        tags.append((TAG_TIEPOINT, "d", 6, (0.0, 0.0, 0.0, c, f, 0.0), True))
    else:                                             # rotated / flipped: full matrix
        m = (a, b, 0.0, c, d, e, 0.0, f, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
        tags.append((TAG_TRANSFORMATION, "d", 16, m, True))
    keys = [(KEY_RASTER_TYPE, 0, 1, RASTER_PIXEL_IS_AREA)]
    if georef.crs is not None:
        epsg = georef.epsg
        if epsg is None:
            raise ValueError(f"GeoRef.crs {georef.crs!r} cannot be written to a GeoTIFF: "
                             f"only 'EPSG:<code>' is supported")
        geographic = _is_geographic(epsg)
        keys.append((KEY_MODEL_TYPE, 0, 1, MODEL_GEOGRAPHIC if geographic else MODEL_PROJECTED))
        keys.append((KEY_GEOGRAPHIC_CRS if geographic else KEY_PROJECTED_CRS, 0, 1, epsg))
    keys.sort()
    directory = [1, 1, 0, len(keys)] + [v for k in keys for v in k]
    tags.append((TAG_GEOKEYS, "H", len(directory), tuple(directory), True))
    return tags


def _gdal_metadata(bands: Sequence[str]) -> str:
    items = "".join(f'  <Item name="DESCRIPTION" sample={quoteattr(str(i))} role="description">'
                    f"{escape(b)}</Item>\n" for i, b in enumerate(bands))
    return f"<GDALMetadata>\n{items}</GDALMetadata>"


def write_geotiff(path: str | Path, scene: Scene, compress: str | None = None) -> Path:
    """Write `scene` as one band-interleaved (planar) GeoTIFF with its band names (GDAL band
    descriptions) and georeference (GeoTIFF tags, EPSG code). `compress`: None, "deflate"/"zlib"
    (always available) or any codec tifffile can encode here. Returns the path."""

    if not isinstance(scene, Scene):
        raise TypeError(f"write_geotiff needs a Scene, got {type(scene).__name__}")
    path = Path(path)
    if path.suffix.lower() not in TIFF_SUFFIXES:
        raise ValueError(f"{path}: a GeoTIFF path must end in .tif or .tiff")
    extratags = _georef_tags(scene.georef) if scene.georef is not None else []
    extratags.append((TAG_GDAL_METADATA, "s", 0, _gdal_metadata(scene.bands), True))
    data = scene.data
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    try:
        # one band: a plain 2-D page (tifffile refuses "separate" with a single sample)
        planar = "separate" if data.shape[0] > 1 else None
        tifffile.imwrite(path, data if planar else data[0], photometric="minisblack",
                         planarconfig=planar,
                         compression=compress, metadata=None, extratags=extratags)
    except Exception as exc:   # unknown codec names / missing imagecodecs raise various types
        if compress is not None:
            raise ValueError(f"{path}: cannot write with compress={compress!r} "
                             f"({type(exc).__name__}: {exc})") from exc
        raise
    return path
