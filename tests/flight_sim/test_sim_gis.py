"""Products a GIS can open: a real flight (the daemon as its own process) over a GeoTIFF scene in
UTM 33N and a scene that has no georeference; what came down is opened with rasterio and checked
against the footprint each frame is known to have, and the STAC catalogue is read back.

The STAC items are validated offline: their core against the JSON schemas pystac ships (with
jsonschema), their projection and classification fields through pystac's extension classes
(those extensions' schemas are only online)."""
import json
from datetime import datetime

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("zmq")
rasterio = pytest.importorskip("rasterio")
pystac = pytest.importorskip("pystac")

from sim_flight import fly, make_flight_bundle  # noqa: E402

from flight_sim.camera import CameraConfig, PushbroomCamera  # noqa: E402
from flight_sim.catalog import check_catalog, footprint  # noqa: E402
from flight_sim.products_gis import world_file_lines  # noqa: E402
from flight_sim.scenes import ArraySource, CroppedSource  # noqa: E402
from shared.scene import GeoRef, Scene, write_geotiff  # noqa: E402

SCENE_GEOREF = GeoRef("EPSG:32633", (10.0, 0.0, 500000.0, 0.0, -10.0, 5200000.0))
FRAME_LINES = 128
EPOCH = "2026-06-01T10:00:00Z"

SCENARIO = """
name = "gis"
[bundle]
path = "bundle.tar"
public_key = "keys/uplink.pub"
[camera]
frame_lines = 128
mode = "asap"
[[scenes]]
kind = "file"
path = "scene.tif"
[[scenes]]
kind = "generated"
rows = 128
cols = 128
seed = 3
cloud_cover = [0.0, 0.0]
[downlink]
first_pass_s = 0.5
pass_every_s = 20.0
pass_duration_s = 1.0
rate_mbps = 80
passes_after_end = 2
"""


def clear_scene(rows: int = 256, cols: int = 192) -> Scene:
    from flight_sim.generator import generate_scene
    scene, _ = generate_scene(rows, cols, seed=5, cloud_cover=[0.0, 0.0], water_fraction=0.3)
    dn = np.clip(np.rint(scene.data / 1e-4), 0, 65535).astype(np.uint16)
    return Scene(dn, scene.bands, SCENE_GEOREF, "utm33")


@pytest.fixture(scope="module")
def flight(tmp_path_factory):
    root = tmp_path_factory.mktemp("gis")
    make_flight_bundle(root)
    write_geotiff(root / "scene.tif", clear_scene(), compress="deflate")
    (root / "scenario.toml").write_text(SCENARIO)
    out = root / "run"
    proc, report = fly(root / "scenario.toml", out)
    products = {}
    for path in sorted(out.glob("ground/pass-*/*/product.json")):
        record = json.loads(path.read_text())
        products[record["frame_id"]] = (path.parent, record)
    return proc, report, out, products


def georeferenced(products):
    return {f: v for f, v in products.items() if v[1]["body"].get("georef")}


def test_the_flight_passes_and_reports_its_catalogue(flight):
    proc, report, out, products = flight
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]
    stac = report["stac"]
    assert stac["valid"] and stac["items"] == len(products) == report["data"]["downlinked"]
    assert stac["georeferenced"] == len(georeferenced(products)) == 2     # the GeoTIFF's 2 frames
    assert any(c["name"].startswith("STAC catalogue") and c["ok"] for c in report["checks"])
    md = (out / "report.md").read_text()
    assert "[ground/catalog.json](ground/catalog.json)" in md


def test_downlinked_masks_open_with_rasterio_at_the_frames_footprint(flight):
    _, _, _, products = flight
    seen = 0
    for frame_id, (folder, record) in georeferenced(products).items():
        row0 = record["body"]["index"] * FRAME_LINES
        with rasterio.open(folder / "mask.tif") as ds:
            assert ds.crs == rasterio.crs.CRS.from_epsg(32633)
            assert (ds.height, ds.width) == (FRAME_LINES, 192)
            # the frame's known footprint: the scene's origin moved down by its first row
            x0, y0 = 500000.0, 5200000.0 - 10.0 * row0
            assert tuple(ds.bounds) == pytest.approx((x0, y0 - 10.0 * FRAME_LINES, x0 + 1920.0, y0))
            assert ds.nodata == 255 and ds.descriptions == ("class",)
            assert json.loads(ds.tags(1)["CLASSES"]) == record["body"]["classes"]
            assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
            mask = ds.read(1)
        # the COG holds exactly the mask that came down
        from flight_sim.report import decode_png
        np.testing.assert_array_equal(mask, decode_png((folder / "mask.png").read_bytes()))
        seen += 1
    assert seen == 2


def test_kept_tiles_are_georeferenced_at_their_own_place(flight):
    _, _, out, products = flight
    scene = clear_scene()
    checked = 0
    for frame_id, (folder, record) in georeferenced(products).items():
        row0 = record["body"]["index"] * FRAME_LINES
        boxes = np.load(folder / "tile_boxes.npy")
        names = sorted(p.name for p in folder.glob("tile-*.tif")) or ["frame.tif"]
        if names == ["frame.tif"]:
            boxes = np.array([[0, 0, FRAME_LINES, 192]])
        assert len(names) == len(boxes)
        for name, (r, c, h, w) in zip(names, boxes.tolist()):
            with rasterio.open(folder / name) as ds:
                want = SCENE_GEOREF.shifted(row0 + r, c)
                assert tuple(ds.transform)[:6] == pytest.approx(want.transform)
                assert (ds.height, ds.width) == (h, w)
                assert list(ds.descriptions) == record["body"]["bands"]
                # the tile's pixels are the scene's pixels at that place
                pick = [scene.bands.index(b) for b in record["body"]["bands"]]
                np.testing.assert_array_equal(ds.read(), scene.data[pick, row0 + r:row0 + r + h, c:c + w])
            checked += 1
    assert checked >= 2


def test_quicklook_world_file_puts_it_over_the_frame(flight):
    _, _, _, products = flight
    for frame_id, (folder, record) in georeferenced(products).items():
        assert (folder / "quicklook.jgw").is_file()
        row0 = record["body"]["index"] * FRAME_LINES
        with rasterio.open(folder / "quicklook.jpg") as ds:
            assert ds.crs == rasterio.crs.CRS.from_epsg(32633)
            y0 = 5200000.0 - 10.0 * row0
            assert tuple(ds.bounds) == pytest.approx((500000.0, y0 - 1280.0, 501920.0, y0))


def test_stac_items_valid_with_footprint_datetime_model_and_decision(flight):
    _, report, out, products = flight
    catalog = pystac.Catalog.from_file(str(out / "ground" / "catalog.json"))
    items = {i.id: i for i in catalog.get_items(recursive=True)}
    assert set(items) == set(products)
    validator = pystac.validation.stac_validator.JsonSchemaSTACValidator()
    from pystac.extensions.classification import ClassificationExtension
    from pystac.extensions.projection import ProjectionExtension
    for frame_id, item in items.items():
        folder, record = products[frame_id]
        doc = item.to_dict()
        validator.validate_core(doc, pystac.STACObjectType.ITEM, doc["stac_version"])
        body = record["body"]
        assert item.properties["eoedge:model_id"] == "cloud-test"
        assert item.properties["eoedge:model_version"] == 1
        assert item.properties["eoedge:keep"] is True
        assert item.properties["eoedge:reason"] == body["reason"]
        assert {"mask", "quicklook", "product"} <= set(item.assets)
        if not body.get("georef"):                    # the generated scene knows no place
            assert item.geometry is None and item.bbox is None
            assert not list(folder.glob("*.tif"))     # what came down is all there is
            assert item.assets["mask"].href == "./mask.png" and "frame" in item.assets
            assert ClassificationExtension.ext(item.assets["mask"]).classes
            continue
        proj = ProjectionExtension.ext(item)
        assert proj.code == "EPSG:32633" and proj.shape == [FRAME_LINES, 192]
        assert proj.transform == pytest.approx(list(SCENE_GEOREF.shifted(body["index"] * FRAME_LINES, 0).transform))
        classes = ClassificationExtension.ext(item.assets["mask"]).classes
        assert [c.description for c in classes] == body["classes"]
        # footprint: the frame's corners in WGS 84 (UTM 33N at 500 km east: 15 degrees east)
        lon, lat = np.array(item.geometry["coordinates"][0]).T
        assert item.bbox == pytest.approx([lon.min(), lat.min(), lon.max(), lat.max()])
        assert 14.99 < lon.min() < lon.max() < 15.03 and 46.9 < lat.min() < lat.max() < 47.0
        assert item.datetime.tzinfo is not None and item.datetime.year >= 2026
    full = check_catalog(out / "ground" / "catalog.json")
    assert full["valid"] and full["schema_validated"] == len(items) and full["rasters_checked"] >= 4   # mask + pixels of each
    capped = check_catalog(out / "ground" / "catalog.json", full_checks=1)
    assert capped["valid"] and capped["schema_validated"] == 1 and capped["items"] == len(items)
    # a missing asset file is named, whichever item it is in
    victim = products[sorted(products)[-1]][0] / "product.json"
    victim.rename(victim.with_suffix(".gone"))
    try:
        broken = check_catalog(out / "ground" / "catalog.json", full_checks=0)
        assert not broken["valid"] and "asset product missing" in broken["problems"][0]
    finally:
        victim.with_suffix(".gone").rename(victim)


# ------------------------------------------------------------------------------ no daemon

def test_camera_frames_carry_the_scene_georef_and_utc_time():
    scene = clear_scene(300, 64)
    camera = PushbroomCamera([ArraySource(scene, scale=1e-4)], CameraConfig(frame_lines=128, epoch_utc=EPOCH))
    frames = list(camera.frames())
    assert [f.georef["transform"] for f in frames] == [
        list(SCENE_GEOREF.shifted(r, 0).transform) for r in (0, 128, 256)]
    assert all(f.georef["crs"] == "EPSG:32633" and f.georef["scene_id"] == "utm33" for f in frames)
    t = [datetime.fromisoformat(f.georef["datetime"].replace("Z", "+00:00")) for f in frames]
    assert (t[1] - t[0]).total_seconds() == pytest.approx(128 * 10 / 7500, abs=1e-3)
    assert frames[0].body()["georef"] == frames[0].georef
    # a cropped source moves its georef; a scene without one sends none
    assert CroppedSource(ArraySource(scene), 100, 300).georef == SCENE_GEOREF.shifted(100, 0)
    plain = PushbroomCamera([ArraySource(Scene(scene.data, scene.bands))], CameraConfig(frame_lines=128))
    assert all("georef" not in f.body() for f in plain.frames())


def test_camera_refuses_a_bad_epoch():
    from flight_sim.errors import ScenarioError
    with pytest.raises(ScenarioError, match="epoch_utc"):
        CameraConfig(epoch_utc="2026-06-01 10:00")


def test_footprint_and_world_file_of_a_rotated_raster():
    # a raster turned 90 degrees (b, d non-zero): corners and bbox follow the transform
    rotated = GeoRef("EPSG:32633", (0.0, 10.0, 500000.0, 10.0, 0.0, 5200000.0))
    assert rotated.bounds(20, 30) == (500000.0, 5200000.0, 500200.0, 5200300.0)
    geometry, bbox = footprint(rotated, (20, 30))
    assert len(geometry["coordinates"][0]) == 5 and bbox[0] < bbox[2] and bbox[1] < bbox[3]
    # a 4x smaller quicklook: each of its pixels covers 4x4 frame pixels; C, F a pixel centre
    assert world_file_lines(SCENE_GEOREF, (128, 192), (32, 48)) == [40.0, 0.0, 0.0, -40.0, 500020.0, 5199980.0]


def test_kept_tiles_written_cropped_at_their_box(tmp_path):
    from flight_sim.products_gis import write_tiles
    frame = np.arange(2 * 100 * 90, dtype=np.uint16).reshape(2, 100, 90) + 1
    boxes = np.array([[0, 64, 64, 26], [64, 0, 36, 64]], np.int32)      # two edge tiles, padded
    tiles = np.zeros((2, 2, 64, 64), np.uint16)
    for n, (r, c, h, w) in enumerate(boxes):
        tiles[n, :, :h, :w] = frame[:, r:r + h, c:c + w]
    files = write_tiles(tmp_path, {"tiles": tiles, "tile_boxes": boxes}, SCENE_GEOREF, ["B04", "B08"])
    assert [f.name for f in files] == ["tile-000.tif", "tile-001.tif"]
    for f, (r, c, h, w) in zip(files, boxes.tolist()):
        with rasterio.open(tmp_path / f.name) as ds:
            assert (ds.height, ds.width) == (h, w) and ds.nodata == 0
            assert ds.bounds == pytest.approx(SCENE_GEOREF.shifted(r, c).bounds(h, w))
            assert ds.bounds == pytest.approx((500000 + 10 * c, 5200000 - 10 * (r + h),
                                               500000 + 10 * (c + w), 5200000 - 10 * r))
            np.testing.assert_array_equal(ds.read(), frame[:, r:r + h, c:c + w])
            assert ds.descriptions == ("B04", "B08")
    # without a georef: plain TIFFs, no CRS, same pixels
    (tmp_path / "plain").mkdir()
    plain = write_tiles(tmp_path / "plain", {"tiles": tiles, "tile_boxes": boxes}, None, None)
    with rasterio.open(tmp_path / "plain" / plain[0].name) as ds:
        assert ds.crs is None and ds.read().shape == (2, 64, 26)


def test_a_scenario_places_a_generated_scene_and_names_a_bad_georef():
    from flight_sim.errors import SceneSpecError
    from flight_sim.scenes import open_source
    spec = {"kind": "generated", "rows": 64, "cols": 32, "crop_rows": [16, 64],
            "georef": {"crs": "EPSG:32633", "transform": list(SCENE_GEOREF.transform)}}
    assert open_source(spec).georef == SCENE_GEOREF.shifted(16, 0)
    for bad in ({"crs": "EPSG:32633"}, {"crs": "EPSG:32633", "transform": [10, 0, 0, 0, 0, 0]}, "EPSG:4326"):
        with pytest.raises(SceneSpecError, match=r"scenes\[0\]\.georef"):
            open_source({**spec, "georef": bad})


def test_a_crs_the_bus_lets_through_but_proj_cannot_read_is_a_named_problem(tmp_path):
    from flight_sim.catalog import product_item
    from flight_sim.products_gis import write_gis
    body = {"frame_id": "f", "priority": 1, "classes": ["clear"],
            "georef": {"crs": 'PROJCS["nowhere"]', "transform": [10, 0, 0, 0, -10, 0]}}
    mask = np.zeros((8, 8), np.uint8)
    import cv2
    arrays = {"mask_png": np.frombuffer(cv2.imencode(".png", mask)[1].tobytes(), np.uint8)}
    gis = write_gis(tmp_path, body, arrays)
    assert gis.georef is None and gis.files == [] and gis.problems[0].startswith("georef:")
    (tmp_path / "mask.png").write_bytes(arrays["mask_png"].tobytes())
    item = product_item("f", body, gis, ["mask.png"])
    assert item.geometry is None and item.assets["mask"].href == "./mask.png"


def test_a_safe_products_frames_carry_its_crs_and_sensing_time(tmp_path):
    from test_sim_scenes import make_safe

    from flight_sim.scenes import open_safe
    safe = make_safe(tmp_path)
    mtd = safe / "MTD_MSIL1C.xml"
    mtd.write_text(mtd.read_text().replace(
        "<n1:General_Info>", "<n1:General_Info><Product_Info>"
        "<PRODUCT_START_TIME>2023-06-01T10:15:59.024Z</PRODUCT_START_TIME></Product_Info>"))
    source = open_safe(safe, bands=["B02", "B03", "B04"])
    frames = list(PushbroomCamera([source], CameraConfig(frame_lines=32, epoch_utc=EPOCH)).frames())
    assert [f.georef["crs"] for f in frames] == ["EPSG:32632"] * 2
    assert frames[1].georef["transform"] == [10.0, 0.0, 500000.0, 0.0, -10.0, 5100000.0 - 320.0]
    # the frame's last line, counted from the product's sensing start (not the mission epoch)
    assert frames[0].georef["datetime"] == "2023-06-01T10:15:59.066Z"      # + 32 x 1.33 ms


def test_the_daemon_copies_the_frames_georef_into_its_decision_and_product():
    """onboard.outcomes, the daemon's one place for outcome messages, fed a decoded FRAME."""
    from pathlib import Path
    from types import SimpleNamespace

    from onboard.admission import FrameJob
    from onboard.outcomes import FrameOutcome, decision, product
    from onboard.store import SlotInfo
    from shared.messages import Message, decode, encode

    georef = {"crs": "EPSG:32633", "transform": [10.0, 0.0, 500000.0, 0.0, -10.0, 5200000.0],
              "datetime": "2026-06-01T10:00:00.171Z", "scene_id": "utm33"}
    frame = decode(encode(Message("frame", {"frame_id": "f1", "bands": ["B02", "B04"], "scale": 1e-4,
                                            "georef": georef}, {"data": np.zeros((2, 4, 4), np.uint16)})))
    slot = SlotInfo("a", "cloud-test", 3, Path("."), {"output": {"classes": ["clear", "cloud"]}})
    result = SimpleNamespace(keep=True, priority=1, reason="r", stats={}, tile_decisions=[],
                             timings_ms={"total": 1.0}, products={})
    outcome = FrameOutcome(FrameJob([b"p"], frame, 0.0), slot, result)
    for msg in (decision(outcome, {}, "daemon"), product(outcome, "daemon")):
        assert decode(encode(msg)).body["georef"] == georef
    body = decode(encode(product(outcome, "daemon"))).body
    assert body["bands"] == ["B02", "B04"] and body["scale"] == 1e-4
