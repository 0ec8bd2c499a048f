"""Generated scenes placed on Earth (`place = true`): a georeference and a sensing time drawn from
the seed, carried by the camera's frames, and what comes down opens with rasterio where the
generator said the scene lies."""
import json
from datetime import datetime, timezone

import numpy as np
import pytest

from flight_sim.camera import CameraConfig, PushbroomCamera
from flight_sim.generator import SITES, SceneGenerator, placement
from flight_sim.scenes import open_source
from shared.errors import EoedgeError


def test_placement_is_drawn_from_the_seed_and_changes_no_pixel():
    a = SceneGenerator(256, 192, seed=11, place=True)
    b = SceneGenerator(256, 192, seed=11, place=True)
    plain = SceneGenerator(256, 192, seed=11)
    assert a.georef == b.georef and a.sensing_time == b.sensing_time and a.site == b.site
    assert plain.georef is None and plain.sensing_time is None and plain.bounds() is None
    np.testing.assert_array_equal(a.window(0, 64).reflectance, plain.window(0, 64).reflectance)
    assert SceneGenerator(32, 32, seed=11, place=True).scene()[0].georef.crs.startswith("EPSG:32")
    others = {(g.georef, g.sensing_time) for g in (SceneGenerator(64, 64, seed=s, place=True) for s in range(12))}
    assert len(others) == 12


@pytest.mark.parametrize("seed", range(16))
def test_a_placed_scene_lies_off_its_port_in_the_ports_utm_zone_at_10_30_solar_time(seed):
    gen = SceneGenerator(2048, 1024, seed=seed, place=True)
    site, epsg, east, north = next(s for s in SITES if s[0] == gen.site)
    assert gen.georef.crs == f"EPSG:{epsg}"
    a, b, c, d, e, f = gen.georef.transform
    assert (a, b, d, e) == (10.0, 0.0, 0.0, -10.0) and c % 10 == 0 and f % 10 == 0
    left, bottom, right, top = gen.bounds()
    assert (right - left, top - bottom) == (10240.0, 20480.0)
    assert abs((left + right) / 2 - east) <= 10_000 and abs((top + bottom) / 2 - north) <= 10_000
    assert gen.sensing_time.tzinfo == timezone.utc and gen.sensing_time.year == 2026
    central_meridian = (epsg % 100) * 6 - 183
    solar = (gen.sensing_time.hour * 60 + gen.sensing_time.minute + central_meridian * 4) % (24 * 60)
    assert abs(solar - 630) <= 6                                   # 10:30 mean local solar time
    assert gen.describe()["crs"] == gen.georef.crs and gen.describe()["site"] == site


def test_placement_of_another_grid_size():
    _, georef, _ = placement(5, 100, 100, gsd_m=20.0)
    assert georef.transform[0] == 20.0 and georef.transform[2] % 20 == 0


def test_camera_frames_carry_the_placed_scenes_georef_and_time():
    spec = {"kind": "generated", "rows": 256, "cols": 96, "seed": 12, "place": True, "cloud_cover": 0.0}
    source = open_source(spec)
    gen = source.generator
    assert source.georef == gen.georef and source.sensing_time == gen.sensing_time
    frames = list(PushbroomCamera([source], CameraConfig(frame_lines=128)).frames())
    assert [f.georef["transform"] for f in frames] == [list(gen.georef.shifted(r, 0).transform) for r in (0, 128)]
    assert {f.georef["crs"] for f in frames} == {gen.georef.crs}
    assert frames[0].georef["scene_id"] == gen.name
    # each frame's time: the scene's sensing time + its last line (128 lines of 1.33 ms)
    t = datetime.fromisoformat(frames[1].georef["datetime"].replace("Z", "+00:00"))
    assert (t - gen.sensing_time).total_seconds() == pytest.approx(256 * 10 / 7500, abs=1e-3)
    # a placed scene keeps a scenario's own georef table when it gives one
    moved = open_source({**spec, "georef": {"crs": "EPSG:32633", "transform": [10, 0, 500000, 0, -10, 5200000]}})
    assert moved.georef.crs == "EPSG:32633" and moved.sensing_time == gen.sensing_time


def test_place_must_be_a_boolean():
    with pytest.raises(EoedgeError, match=r"place"):
        open_source({"kind": "generated", "rows": 8, "cols": 8, "place": "yes"})


# ------------------------------------------------------------------------------ a flight

SCENARIO = """
name = "placed"
[bundle]
path = "bundle.tar"
public_key = "keys/uplink.pub"
[camera]
frame_lines = 128
mode = "asap"
[[scenes]]
kind = "generated"
rows = 256
cols = 192
seed = 11
cloud_cover = [0.0, 0.0]
water_fraction = 0.45
ships = 4
place = true
[downlink]
first_pass_s = 0.5
pass_every_s = 20.0
pass_duration_s = 1.0
rate_mbps = 80
passes_after_end = 2
"""


@pytest.mark.slow
def test_a_demo_like_scenes_downlinked_masks_open_at_the_bounds_the_generator_declared(tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("zmq")
    rasterio = pytest.importorskip("rasterio")
    pytest.importorskip("pystac")
    from sim_flight import fly, make_flight_bundle
    make_flight_bundle(tmp_path)
    (tmp_path / "scenario.toml").write_text(SCENARIO)
    proc, report = fly(tmp_path / "scenario.toml", tmp_path / "run")
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]
    gen = SceneGenerator(256, 192, seed=11, cloud_cover=[0.0, 0.0], water_fraction=0.45, ships=4, place=True)
    left, bottom, right, top = gen.bounds()
    epsg = gen.georef.epsg
    masks = sorted((tmp_path / "run").glob("ground/pass-*/*/mask.tif"))
    assert len(masks) == 2 and report["stac"]["georeferenced"] == 2
    seen_bounds = []
    for path in masks:
        body = json.loads((path.parent / "product.json").read_text())["body"]
        row0 = body["index"] * 128
        with rasterio.open(path) as ds:
            assert ds.crs == rasterio.crs.CRS.from_epsg(epsg)
            assert tuple(ds.bounds) == pytest.approx((left, top - 10.0 * (row0 + 128), right, top - 10.0 * row0))
            seen_bounds.append(tuple(ds.bounds))
        assert body["georef"]["datetime"].startswith(gen.sensing_time.date().isoformat())
    # the two frames tile the scene the generator declared, top to bottom
    assert min(b[1] for b in seen_bounds) == pytest.approx(bottom) and max(b[3] for b in seen_bounds) == pytest.approx(top)
