"""A model chain's products at the ground station (issue 16): a chain PRODUCT (the gate's mask as
`mask_png`, a later step's as `mask_<step>`, 255 where it did not run; `chain.steps` naming each
step's model, classes and mask part, docs/protocol.md) comes down through the real Downlink and
GroundStation: one COG per step mask at the frame's place (rasterio), nodata 255, that step's
class names; the STAC item validates and has one mask asset per step with the step's model."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
pystac = pytest.importorskip("pystac")
from PIL import Image  # noqa: E402

from flight_sim.catalog import check_catalog  # noqa: E402
from flight_sim.downlink import Downlink, GroundStation, Pass  # noqa: E402
from shared.messages import Message, encode  # noqa: E402
from shared.scene import GeoRef  # noqa: E402

# a frame of Genoa's harbour grid (EPSG:3857, ~10 m), 64 x 96 px in cells of 32
GEOREF = GeoRef("EPSG:3857", (10.0, 0.0, 974916.0, 0.0, -10.0, 5532856.0))
ROWS, COLS, CELL = 64, 96, 32
GATE = ["clear", "cloud", "shadow"]
SHIP = ["background", "ship"]


def png(mask: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    return np.frombuffer(buf.getvalue(), np.uint8)


def chain_product(frame_id: str, georef: GeoRef | None = GEOREF) -> tuple[Message, np.ndarray, np.ndarray]:
    gate = np.zeros((ROWS, COLS), np.uint8)
    gate[:, :CELL] = 1                               # the first column of cells is cloud
    ship = np.zeros((ROWS, COLS), np.uint8)
    ship[:, :CELL] = 255                             # ... so the ship step did not run there
    ship[10:14, 50:60] = 1
    steps = [{"name": "cloud", "model_id": "harbour-gate", "version": 2, "cells_run": 6, "cells_total": 6,
              "ms": 12.5, "classes": GATE, "mask": "mask_png"},
             {"name": "ship", "model_id": "harbour-ships", "version": 1, "cells_run": 4, "cells_total": 6,
              "ms": 20.25, "classes": SHIP, "mask": "mask_ship"}]
    body = {"frame_id": frame_id, "priority": 1, "reason": "ships under clear sky", "classes": GATE,
            "stats": {"fractions": {"clear": 0.67, "cloud": 0.33, "shadow": 0.0, "background": 0.66, "ship": 0.01}},
            "tiles": [], "model": {"id": "harbour-chain", "version": 3},
            "chain": {"steps": steps, "nodata": 255}}
    if georef is not None:
        body["georef"] = {**georef.as_dict(), "datetime": "2023-07-10T10:20:00Z"}
    msg = Message("product", body, {"mask_png": png(gate), "mask_ship": png(ship),
                                    "tile_boxes": np.zeros((0, 4), np.int32)})
    return msg, gate, ship


@pytest.fixture
def station(tmp_path):
    ground = GroundStation(tmp_path / "ground")
    down = Downlink([Pass(0.0, 10.0, 10_000_000)], ground, queue_dir=tmp_path / "queue")
    for frame_id, georef in (("harbour-f0", GEOREF), ("harbour-f1", GEOREF.shifted(ROWS, 0)), ("unplaced", None)):
        msg, _, _ = chain_product(frame_id, georef)
        assert down.receive(encode(msg), ready_s=0.0) == frame_id
    assert down.finish() == 3
    return ground, down


def folder_of(ground: GroundStation, frame_id: str):
    return next(r for r in ground.received if r["frame_id"] == frame_id)


def test_one_cog_per_step_at_the_frame_place(station):
    ground, _ = station
    _, gate, ship = chain_product("x")
    for frame_id, georef in (("harbour-f0", GEOREF), ("harbour-f1", GEOREF.shifted(ROWS, 0))):
        rec = folder_of(ground, frame_id)
        assert {"mask.tif", "mask-ship.tif"} <= set(rec["gis"])
        assert {"mask.png", "mask_ship.png"} <= set(rec["files"])          # as they came down
        for name, want, classes, step in (("mask.tif", gate, GATE, "cloud"), ("mask-ship.tif", ship, SHIP, "ship")):
            with rasterio.open(f"{rec['folder']}/{name}") as ds:
                assert ds.crs == rasterio.crs.CRS.from_epsg(3857)
                assert ds.bounds == pytest.approx(georef.bounds(ROWS, COLS))
                assert ds.nodata == 255
                np.testing.assert_array_equal(ds.read(1), want)
                tags = ds.tags(1)
                assert json.loads(tags["CLASSES"]) == classes and tags["STEP"] == step
                assert tags["MODEL_ID"] == {"cloud": "harbour-gate", "ship": "harbour-ships"}[step]
        with rasterio.open(f"{rec['folder']}/mask-ship.tif") as ds:
            assert ds.read(1, masked=True).mask[:, :CELL].all()            # not run: nodata


def test_stac_items_validate_with_an_asset_per_step(station):
    ground, _ = station
    check = ground.write_catalog()
    assert check["valid"], check["problems"]
    assert check["items"] == 3 and check["rasters_checked"] >= 4          # both masks of both placed frames
    catalog = pystac.Catalog.from_file(check["catalog"])
    items = {i.id: i for i in catalog.get_items(recursive=True)}
    item = items["harbour-f0"]
    assert item.properties["eoedge:model_id"] == "harbour-chain" and item.properties["eoedge:model_version"] == 3
    assert [s["name"] for s in item.properties["eoedge:chain"]] == ["cloud", "ship"]
    assert item.properties["eoedge:chain"][1]["cells_run"] == 4
    gate, ship = item.assets["mask"], item.assets["mask-ship"]
    assert gate.extra_fields["eoedge:step"] == "cloud" and gate.extra_fields["eoedge:model_id"] == "harbour-gate"
    assert ship.extra_fields["eoedge:step"] == "ship" and ship.extra_fields["eoedge:model_version"] == 1
    assert [c["name"] for c in ship.extra_fields["classification:classes"]] == SHIP
    assert [c["name"] for c in gate.extra_fields["classification:classes"]] == GATE
    assert ship.extra_fields["proj:shape"] == [ROWS, COLS]
    # a product with no place keeps its raw step masks as assets, each with its step's classes
    raw = items["unplaced"]
    assert raw.geometry is None and "mask_ship" in raw.assets
    assert [c["name"] for c in raw.assets["mask_ship"].extra_fields["classification:classes"]] == SHIP


def test_the_report_keeps_every_step_mask_after_the_pass(station):
    _, down = station
    kept = down.products["harbour-f0"].arrays
    assert {"mask_png", "mask_ship"} <= set(kept)
