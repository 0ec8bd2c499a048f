"""The ground station's STAC catalogue: one item per downlinked product (pystac).

    ground/catalog.json                    the catalogue (self-contained: relative links)
    ground/pass-NN/<frame_id>/item.json    one item per product, its assets beside it

An item's id is the frame id; its assets are the product's files (mask.tif, tile-NNN.tif or
frame.tif, quicklook.jpg, product.json; mask.png and tiles.npy / frame.npy for a product with no
georeference, which gets no GeoTIFFs). A georeferenced product's item has its footprint (the
frame's four corners taken to WGS 84 by GDAL, as a polygon, and its bbox) and the projection
extension's fields (proj:code or proj:wkt2, proj:transform, proj:shape, on the item and on each
raster asset, a tile with its own); the mask asset lists its classes (classification extension).
A product without a georeference keeps its item with `geometry: null` and no bbox (STAC allows
that), so every product that came down is in the catalogue.

`datetime` is the frame's acquisition time from its georef, else the time it was received.
The decision is in properties under `eoedge:` (model id and version, keep, priority, reason, scene,
the frame's class fractions); `check_catalog` is the check a test and the report run.

A model chain's product (its body's `chain.steps`) has one mask asset per step: `mask` (the gate's,
mask.tif) and `mask-STEP` (mask-STEP.tif; `mask_STEP` as the raw PNG when the product has no
georeference), each with that step's classes and, as asset fields, `eoedge:step`,
`eoedge:model_id` and `eoedge:model_version` (the step's own model); the item's `eoedge:model_id`
and `eoedge:model_version` are the chain's, and `eoedge:chain` lists each step's model, the
cells it ran on of the frame's and its milliseconds.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pystac
import rasterio
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.validation.stac_validator import JsonSchemaSTACValidator
from rasterio.warp import transform_geom

from flight_sim.products_gis import GisFile, GisProducts, chain_steps, step_mask_part
from shared.messages import parse_datetime
from shared.scene import GeoRef

CATALOG_ID = "eoedge-downlink"
ROLES = {"mask": ["data"], "tile": ["data"], "frame": ["data"], "quicklook": ["overview", "visual"]}
RAW_MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "npy": "application/x-npy"}


def footprint(georef: GeoRef, shape: tuple[int, int]) -> tuple[dict, list[float]]:
    """(GeoJSON polygon in WGS 84, bbox) of a raster of `shape` placed by `georef`."""
    ring = [list(p) for p in georef.corners(*shape)]
    polygon = {"type": "Polygon", "coordinates": [ring + [ring[0]]]}
    geometry = transform_geom(georef.crs, "EPSG:4326", polygon)
    coords = geometry["coordinates"][0]
    lons, lats = [p[0] for p in coords], [p[1] for p in coords]
    return geometry, [min(lons), min(lats), max(lons), max(lats)]


def _proj(target: Any, georef: GeoRef, shape: tuple[int, int]) -> None:
    """The projection extension's fields on an item or asset."""
    proj = ProjectionExtension.ext(target, add_if_missing=isinstance(target, pystac.Item))
    if georef.epsg is not None:
        proj.code = f"EPSG:{georef.epsg}"
    else:
        proj.code, proj.wkt2 = None, georef.crs
    proj.transform = list(georef.transform)
    proj.shape = list(shape)


def _acquired(body: dict, received: datetime) -> datetime:
    text = (body.get("georef") or {}).get("datetime")
    return parse_datetime(text) if text else received


def product_item(frame_id: str, body: dict, gis: GisProducts, raw_files: list[str],
                 received: datetime | None = None) -> pystac.Item:
    """The STAC item of one downlinked product (the module docstring says what it holds)."""
    received = received or datetime.now(timezone.utc)
    georef, shape = gis.georef, gis.frame_shape
    geometry = bbox = None
    if georef is not None and shape:
        try:
            geometry, bbox = footprint(georef, shape)
        except (ValueError, rasterio.errors.RasterioError) as exc:   # outside the CRS's domain
            gis.problems.append(f"footprint: {exc}")
    model = body.get("model") or {}
    props = {"eoedge:model_id": model.get("id"), "eoedge:model_version": model.get("version"),
             "eoedge:keep": True, "eoedge:priority": body.get("priority"),
             "eoedge:reason": body.get("reason"), "eoedge:scene": body.get("scene"),
             "eoedge:fractions": (body.get("stats") or {}).get("fractions"),
             "eoedge:tiles_kept": len(body.get("tiles") or []),
             "eoedge:chain": [{k: s.get(k) for k in STEP_FIELDS if k in s} for s in chain_steps(body)] or None}
    item = pystac.Item(frame_id, geometry, bbox, _acquired(body, received),
                       {k: v for k, v in props.items() if v is not None})
    if georef is not None and shape:
        _proj(item, georef, shape)
    for f in gis.files:
        _add_raster_asset(item, f, body.get("classes") or [])
    roles_written = {f.role for f in gis.files}
    raw_steps = {step_mask_part(s, i).removesuffix("_png"): s for i, s in enumerate(chain_steps(body))}
    for name in raw_files:
        key, _, suffix = name.rpartition(".")
        role = {"mask": "mask", "quicklook": "quicklook", "tiles": "tile", "frame": "frame"}.get(key)
        if key in raw_steps:
            role = "mask"
        if role is None or role in roles_written:      # superseded by a GeoTIFF, or not data
            continue
        asset = pystac.Asset(f"./{name}", media_type=RAW_MEDIA_TYPES.get(suffix), roles=ROLES[role])
        item.add_asset(key, asset)
        if role == "mask":
            step = raw_steps.get(key)
            _classes(asset, (step or {}).get("classes") or body.get("classes") or [])
            _step_fields(asset, step)
    item.add_asset("product", pystac.Asset("./product.json", media_type="application/json",
                                           roles=["metadata"], title="the PRODUCT body as received"))
    return item


def _add_raster_asset(item: pystac.Item, f: GisFile, classes: list[str]) -> None:
    key = f.name.rsplit(".", 1)[0]
    asset = pystac.Asset(f"./{f.name}", media_type=f.media_type, roles=ROLES[f.role])
    item.add_asset(key, asset)
    if f.georef is not None:
        _proj(asset, f.georef, f.shape)
    if f.role == "mask":
        _classes(asset, (f.step or {}).get("classes") or classes)
        _step_fields(asset, f.step)


STEP_FIELDS = ("name", "model_id", "version", "cells_run", "cells_total", "ms")


def _step_fields(asset: pystac.Asset, step: dict | None) -> None:
    """A chain step's mask asset names its step and the step's own model."""
    if step:
        asset.extra_fields.update({"eoedge:step": step.get("name"), "eoedge:model_id": step.get("model_id"),
                                   "eoedge:model_version": step.get("version")})


def _classes(asset: pystac.Asset, classes: list[str]) -> None:
    """The classification extension's classes of a mask asset (value = index in the mask)."""
    if classes:
        ClassificationExtension.ext(asset, add_if_missing=True).classes = [
            Classification.create(value=i, name=_class_name(c), description=c)
            for i, c in enumerate(classes)]


def _class_name(name: str) -> str:
    # classification:classes names are [0-9A-Za-z-_]+
    return "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "-_" else "_" for ch in name) or "class"


class Catalogue:
    """Items as they come down (each written at once beside its product); `write` links them."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.items: list[pystac.Item] = []

    def add(self, item: pystac.Item, folder: Path) -> Path:
        href = Path(folder) / "item.json"
        item.set_self_href(str(href))
        item.save_object(include_self_link=False)
        self.items.append(item)
        return href

    def write(self) -> Path:
        """catalog.json linking every item so far (rewritten whole each call)."""
        catalog = pystac.Catalog(CATALOG_ID, "Products downlinked by the eoedge flight simulator: "
                                 "one item per kept frame", title="eoedge downlink")
        for item in self.items:
            catalog.add_item(item)
            item.set_self_href(item.get_self_href())     # add_item re-roots: keep its folder
        href = self.root / "catalog.json"
        catalog.set_self_href(str(href))
        catalog.save(pystac.CatalogType.SELF_CONTAINED)
        return href


FULL_CHECKS = 100     # items checked against the schemas and opened in rasterio (~0.1 s each)


def check_catalog(path: Path, full_checks: int = FULL_CHECKS) -> dict:
    """Read the catalogue back (pystac parses every item) and check that every asset's file is
    there; the first `full_checks` items also against the STAC core JSON schemas pystac ships
    (offline, jsonschema; the projection and classification extensions' schemas are only online:
    their fields are read through pystac's extension classes) and each of their GeoTIFFs opened
    in rasterio with the CRS, shape and bounds its asset says. Returns counts and problems."""
    catalog = pystac.Catalog.from_file(str(path))
    validator = JsonSchemaSTACValidator()
    problems, items, validated, placed = [], 0, 0, 0
    for item in catalog.get_items(recursive=True):
        items += 1
        where = f"item {item.id}"
        full = validated < full_checks
        if full:
            validated += 1
            try:
                doc = item.to_dict()
                validator.validate_core(doc, pystac.STACObjectType.ITEM, doc["stac_version"],
                                        item.get_self_href())
            except pystac.STACValidationError as exc:
                problems.append(f"{where}: {str(exc)[:200]}")
        for key, asset in item.assets.items():
            file = Path(asset.get_absolute_href())
            if not file.is_file():
                problems.append(f"{where}: asset {key} missing ({file})")
            elif full and item.geometry is not None and "geotiff" in (asset.media_type or ""):
                problem = _check_placed(asset, file)
                if problem:
                    problems.append(f"{where}: asset {key}: {problem}")
                else:
                    placed += 1
    return {"catalog": str(path), "items": items, "schema_validated": validated, "rasters_checked": placed,
            "valid": not problems and items > 0, "problems": problems[:20]}


def _check_placed(asset: pystac.Asset, file: Path) -> str | None:
    proj = ProjectionExtension.ext(asset)
    if proj.transform is None or proj.shape is None:
        return "no proj:transform / proj:shape"
    georef = GeoRef(proj.code or proj.wkt2, tuple(proj.transform[:6]))
    with rasterio.open(file) as ds:
        if ds.crs is None or ds.crs != rasterio.crs.CRS.from_user_input(georef.crs):
            return f"CRS {ds.crs} is not {georef.crs}"
        if (ds.height, ds.width) != tuple(proj.shape):
            return f"shape {(ds.height, ds.width)} is not proj:shape {proj.shape}"
        want = georef.bounds(ds.height, ds.width)
        if max(abs(x - y) for x, y in zip(ds.bounds, want)) > 1e-6 * max(1.0, *map(abs, want)):
            return f"bounds {tuple(ds.bounds)} are not {want}"
    return None
