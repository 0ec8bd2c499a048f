"""What a GIS opens of a downlinked product: Cloud-Optimized GeoTIFFs and a world-filed quicklook.

On board a product stays compact (a PNG mask, a JPEG quicklook, the kept pixels as raw arrays):
bytes are what a pass can carry, and the frame's georeference travels once, as a few numbers in
the PRODUCT body, instead of inside every file. The ground station, which has GDAL (rasterio),
turns it into files a GIS and rasterio open at their right place on Earth:

    mask.tif         the class mask, a COG: uint8, one class index per pixel, nodata 255, the
                     class names in the band's tags (CLASS_0=clear, ... and CLASSES, a JSON list)
    mask-STEP.tif    a model chain's later steps (the PRODUCT's `chain.steps`): one COG per step's
                     mask, the same grid, nodata 255 where that step did not run, the step's own
                     class names and its name and model in the tags (STEP, MODEL_ID, MODEL_VERSION);
                     mask.tif is the gate's (step 1)
    tile-NNN.tif     each kept tile, a COG of the frame's own values (all bands, band names as
    frame.tif        descriptions, nodata 0: Sentinel-2's no-data DN), cropped to the frame (no
                     padding), its transform the frame's moved to the tile's first pixel; or the
                     whole frame when every tile was kept
    quicklook.jgw    a world file for quicklook.jpg (scaled to its smaller size), and
    quicklook.jpg.aux.xml  its CRS (GDAL's side-car), so the JPEG opens in place too

A product without a georeference gets none of these: what came down (mask.png, quicklook.jpg,
tiles.npy or frame.npy, beside them in any case) is all there is to it, with no place to put it
(and a soak's thousand products cost no GDAL writes in the flight's loop). `write_gis(folder,
body, arrays)` writes them and says what it wrote (`GisProducts`); `write_mask`/`write_tiles`
also write plain TIFFs when given no georef.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from rasterio.transform import Affine

from shared.scene import GeoRef

COG_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
TIFF_MEDIA_TYPE = "image/tiff"
MASK_NODATA = 255          # class indices are 0..n-1 (at most 256 classes: 255 is never a class)
TILE_NODATA = 0            # Sentinel-2 L1C: DN 0 is no data
COG_OPTIONS = {"compress": "deflate", "blocksize": 256}


@dataclass
class GisFile:
    """One file written for a GIS."""

    name: str                      # file name in the product folder
    role: str                      # "mask", "tile", "frame", "quicklook"
    georef: GeoRef | None          # of this very raster (a tile's is shifted to its corner)
    shape: tuple[int, int]         # rows, cols
    media_type: str
    box: tuple[int, int, int, int] | None = None   # a tile's row, col, height, width in the frame
    step: dict | None = None       # a chain's mask: its step ({name, model_id, version, classes, ...})


@dataclass
class GisProducts:
    georef: GeoRef | None                   # the frame's
    frame_shape: tuple[int, int] | None     # rows, cols (from the mask)
    files: list[GisFile] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def named(self, role: str) -> list[GisFile]:
        return [f for f in self.files if f.role == role]


def product_georef(body: dict) -> GeoRef | None:
    """The frame's GeoRef from a PRODUCT body (validated on the bus), None when it has none."""
    g = body.get("georef")
    return GeoRef.from_dict(g) if isinstance(g, dict) else None


def decode_image(blob: bytes) -> np.ndarray:
    """A PNG/JPEG file's pixels as (bands, rows, cols), read by GDAL."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile(blob) as mem, mem.open() as ds:
            return ds.read()


def write_cog(path: Path, data: np.ndarray, georef: GeoRef | None, nodata: float | None,
              descriptions: Sequence[str] | None = None, tags: dict | None = None) -> str:
    """`data` (bands, rows, cols) as a COG (deflate, 256-px blocks, overviews when large enough)
    with `georef`'s CRS and transform, or a plain TIFF without them. Returns the media type."""
    profile = {"driver": "COG", "width": data.shape[2], "height": data.shape[1],
               "count": data.shape[0], "dtype": data.dtype.name, "nodata": nodata, **COG_OPTIONS}
    if georef is not None:
        profile.update(crs=CRS.from_user_input(georef.crs), transform=Affine(*georef.transform))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as ds:
            ds.write(data)
            for i, name in enumerate(descriptions or (), start=1):
                ds.set_band_description(i, name)
            if tags:
                ds.update_tags(1, **tags)
    return COG_MEDIA_TYPE if georef is not None else TIFF_MEDIA_TYPE


def class_tags(classes: Sequence[str]) -> dict:
    """The mask band's tags: CLASSES (JSON list) and CLASS_<value>=<name> for each class."""
    return {"CLASSES": json.dumps(list(classes)),
            **{f"CLASS_{i}": name for i, name in enumerate(classes)}}


def write_mask(folder: Path, png: bytes, georef: GeoRef | None, classes: Sequence[str],
               step: dict | None = None, name: str = "mask.tif") -> GisFile:
    mask = decode_image(png)[:1]
    tags = class_tags(classes)
    if step is not None:
        tags.update(STEP=str(step.get("name")), MODEL_ID=str(step.get("model_id")),
                    MODEL_VERSION=str(step.get("version")))
    media = write_cog(folder / name, mask, georef, MASK_NODATA, ["class"], tags)
    return GisFile(name, "mask", georef, mask.shape[1:], media, step=step)


def chain_steps(body: dict) -> list[dict]:
    """A chain PRODUCT's steps, each with the part its mask came in (`mask`: mask_png for the
    gate, mask_<step> for a later one) and its classes; [] for a single model's product."""
    steps = (body.get("chain") or {}).get("steps")
    return [s for s in steps if isinstance(s, dict) and isinstance(s.get("name"), str)] \
        if isinstance(steps, list) else []


def step_mask_part(step: dict, index: int) -> str:
    """The PRODUCT array holding a chain step's mask."""
    return str(step.get("mask") or ("mask_png" if index == 0 else f"mask_{step['name']}"))


def step_mask_file(step: dict, index: int) -> str:
    """The COG a chain step's mask is written to: the gate's is mask.tif."""
    return "mask.tif" if index == 0 else f"mask-{step['name']}.tif"


def write_masks(folder: Path, body: dict, arrays: dict, georef: GeoRef | None) -> list[GisFile]:
    """mask.tif, and for a chain one mask-STEP.tif per later step (the module's table)."""
    steps = chain_steps(body)
    if not steps:
        return [write_mask(folder, _blob(arrays["mask_png"]), georef, body.get("classes") or [])] \
            if "mask_png" in arrays else []
    out = []
    for i, step in enumerate(steps):
        part = step_mask_part(step, i)
        if part in arrays:
            classes = step.get("classes") or (body.get("classes") if i == 0 else None) or []
            out.append(write_mask(folder, _blob(arrays[part]), georef, classes, step, step_mask_file(step, i)))
    return out


def write_tiles(folder: Path, arrays: dict, georef: GeoRef | None, bands: Sequence[str] | None
                ) -> list[GisFile]:
    """The kept pixels: `frame` as frame.tif, else each of `tiles` under its `tile_boxes` box,
    cropped to the box (an edge tile's zero padding is not part of the frame)."""
    names = list(bands) if bands else None
    if "frame" in arrays and np.ndim(arrays["frame"]) == 3:
        data = np.ascontiguousarray(arrays["frame"])
        media = write_cog(folder / "frame.tif", data, georef, TILE_NODATA, names)
        return [GisFile("frame.tif", "frame", georef, data.shape[1:], media)]
    tiles, boxes = arrays.get("tiles"), arrays.get("tile_boxes")
    if tiles is None or boxes is None or np.ndim(tiles) != 4:
        return []
    out = []
    for n, (r, c, h, w) in enumerate(np.asarray(boxes).reshape(-1, 4).tolist()):
        tile_georef = georef.shifted(r, c) if georef is not None else None
        name = f"tile-{n:03d}.tif"
        data = np.ascontiguousarray(tiles[n, :, :h, :w])
        media = write_cog(folder / name, data, tile_georef, TILE_NODATA, names)
        out.append(GisFile(name, "tile", tile_georef, (h, w), media, (r, c, h, w)))
    return out


def world_file_lines(georef: GeoRef, frame_shape: tuple[int, int], image_shape: tuple[int, int]
                     ) -> list[float]:
    """The six lines of an ESRI world file (A, D, B, E, C, F) for an image of `image_shape` that
    shows the whole frame (a quicklook: each of its pixels covers frame/image pixels). C and F
    are the centre of the top-left pixel."""
    a, b, c, d, e, f = georef.transform
    fy, fx = frame_shape[0] / image_shape[0], frame_shape[1] / image_shape[1]
    a, d, b, e = a * fx, d * fx, b * fy, e * fy
    return [a, d, b, e, c + (a + b) / 2, f + (d + e) / 2]


def write_quicklook_georef(folder: Path, jpg: bytes, georef: GeoRef, frame_shape: tuple[int, int]
                           ) -> GisFile:
    """quicklook.jgw and quicklook.jpg.aux.xml beside quicklook.jpg (written by the station)."""
    image_shape = decode_image(jpg).shape[1:]
    lines = world_file_lines(georef, frame_shape, image_shape)
    (folder / "quicklook.jgw").write_text("".join(f"{v!r}\n" for v in lines))
    wkt = CRS.from_user_input(georef.crs).to_wkt()
    (folder / "quicklook.jpg.aux.xml").write_text(f"<PAMDataset>\n  <SRS>{escape(wkt)}</SRS>\n</PAMDataset>\n")
    a, d, b, e, cx, cy = lines
    ql = GeoRef(georef.crs, (a, b, cx - (a + b) / 2, d, e, cy - (d + e) / 2))
    return GisFile("quicklook.jpg", "quicklook", ql, image_shape, "image/jpeg")


def write_gis(folder: Path, body: dict, arrays: dict) -> GisProducts:
    """Everything above for one product (arrays as they came down: mask_png, quicklook_jpg,
    tiles + tile_boxes or frame). A part that cannot be written is named in `problems` and the
    rest is still written: the raw downlinked files stay beside these in any case."""
    try:
        georef = product_georef(body)
        if georef is not None:
            CRS.from_user_input(georef.crs)      # a CRS the bus let through but PROJ cannot read
    except (ValueError, rasterio.errors.RasterioError) as exc:
        georef, problems = None, [f"georef: {exc}"]
    else:
        problems = []
    out = GisProducts(georef, None, problems=problems)
    if georef is None:
        return out
    steps = [("mask", lambda: write_masks(folder, body, arrays, georef)),
             ("tiles", lambda: write_tiles(folder, arrays, georef, body.get("bands")))]
    for what, step in steps:
        try:
            out.files += step()
        except (rasterio.errors.RasterioError, ValueError, IndexError) as exc:
            out.problems.append(f"{what}: {type(exc).__name__}: {exc}")
    masks = out.named("mask")
    out.frame_shape = masks[0].shape if masks else None
    if out.frame_shape and "quicklook_jpg" in arrays:
        try:
            out.files.append(write_quicklook_georef(folder, _blob(arrays["quicklook_jpg"]), georef,
                                                    out.frame_shape))
        except (rasterio.errors.RasterioError, ValueError) as exc:
            out.problems.append(f"quicklook: {type(exc).__name__}: {exc}")
    return out


def _blob(arr) -> bytes:
    return np.ascontiguousarray(arr).tobytes()
