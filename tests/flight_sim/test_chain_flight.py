"""A model chain in flight (issue 16): a real daemon process runs a signed chain bundle (a cloud
gate, then a ship model only on the cells the gate finds clear; small real OpenVINO IRs from
tests/onboard_models.py) over a GeoTIFF scene in UTM 33N; `eoedge sim run` in a subprocess.

What came down: one mask COG per step at the frame's place (rasterio: CRS, bounds), the later
step's nodata (255) where it did not run, the STAC catalogue valid with an asset per step; the
report has the decisions per step (cells run per step, per-step ms) and the gate's saving."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("zmq")
rasterio = pytest.importorskip("rasterio")
pystac = pytest.importorskip("pystac")

from onboard_models import BANDS_6, CLASSES_3, make_test_manifest, make_test_model_files, synthetic_frame  # noqa: E402
from sim_flight import fly  # noqa: E402

from shared.bundle import build_bundle  # noqa: E402
from shared.chain import build_chain_bundle  # noqa: E402
from shared.keys import generate_keypair  # noqa: E402
from shared.scene import GeoRef, Scene, write_geotiff  # noqa: E402

pytestmark = pytest.mark.timeout(300)

TILE = 32                                   # the gate's tile: the chain's cells (16 per 128 x 128 frame)
FRAME = 128
B08 = BANDS_6.index("B08")
SHIP_CLASSES = ("sea", "ship")
GEOREF = GeoRef("EPSG:32633", (10.0, 0.0, 500000.0, 0.0, -10.0, 5200000.0))
CLOUD = (0, 64, 0, 64)                      # the top-left 2 x 2 cells of each frame
SHIP = (80, 86, 90, 96)                     # in a clear cell
POLICY = {"rules": [{"if": {"class": "ship", "largest_component_at_least": 16}, "then": "keep", "priority": 1}],
          "default": {"then": "discard"}}
SCENARIO = """
name = "chain"
[bundle]
path = "chain.tar"
public_key = "keys/uplink.pub"
[camera]
frame_lines = 128
mode = "asap"
[[scenes]]
kind = "file"
path = "scene.tif"
[downlink]
first_pass_s = 0.5
pass_every_s = 20.0
pass_duration_s = 1.0
rate_mbps = 80
passes_after_end = 2
"""


def step_bundle(root, private, name, classes, band_weights=None):
    files = make_test_model_files(root / name, bands=BANDS_6, classes=classes, tile=TILE, n_reference=2,
                                  band_weights=band_weights)
    manifest = make_test_manifest(files, model_id=name, version=1, classes=classes, tile=TILE, overlap=8,
                                  threshold={}, policy={"rules": []})
    return build_bundle(root / f"{name}.tar", files, manifest, private)


def scene() -> Scene:
    """Two frames, each with a cloud over its top-left 2 x 2 cells and a ship (bright in B08 only:
    the gate sees clear sea) in a clear cell."""
    frames = []
    for seed in (0, 1):
        data, _ = synthetic_frame(BANDS_6, FRAME, FRAME, clouds=[CLOUD], noise=0.005, seed=seed)
        r0, r1, c0, c1 = SHIP
        data[B08, r0:r1, c0:c1] = 6000
        frames.append(data)
    return Scene(np.concatenate(frames, axis=1), BANDS_6, GEOREF, "chain-utm33")


@pytest.fixture(scope="module")
def flight(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    private, _ = generate_keypair(root / "keys")
    gate = step_bundle(root, private, "cloud", CLASSES_3)
    ship = step_bundle(root, private, "ship", SHIP_CLASSES, [1.0 if i == B08 else 0.0 for i in range(6)])
    build_chain_bundle(root / "chain.tar", [("cloud", gate, None),
                                            ("ship", ship, {"class": "cloud", "fraction_below": 0.5})],
                       POLICY, private, model_id="chain-test", version=1)
    write_geotiff(root / "scene.tif", scene(), compress="deflate")
    (root / "scenario.toml").write_text(SCENARIO)
    out = root / "run"
    proc, report = fly(root / "scenario.toml", out)
    records = [json.loads(p.read_text()) | {"folder": p.parent}
               for p in sorted(out.glob("ground/pass-*/*/product.json"))]
    return proc, report, out, records


def test_the_chain_flies_and_reports_each_step(flight):
    proc, report, _, _ = flight
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]
    assert report["model"]["id"] == "chain-test"
    assert [s["name"] for s in report["model"]["chain"]] == ["cloud", "ship"]
    chain = report["chain"]
    gate, ship = chain["steps"]
    assert gate["cells_run"] == gate["cells_total"] == 2 * (FRAME // TILE) ** 2
    assert ship["cells_run"] == ship["cells_total"] - 2 * 4          # not the 4 cloudy cells of each frame
    assert len(chain["frames"]) == 2 and all(s["ms"] > 0 for f in chain["frames"] for s in f["steps"])
    assert chain["gate"]["everywhere_ms_estimated"] > chain["gate"]["chain_ms"] > 0
    assert 0 < chain["gate"]["saved_share"] < 1
    names = {c["name"] for c in report["checks"] if c["name"].startswith("chain:")}
    assert len(names) == 2                                            # decisions per step, COGs per step
    md = (flight[2] / "report.md").read_text()
    assert "## Model chain" in md and "Time the gate saved" in md


def test_each_step_mask_is_a_cog_at_the_frame_place(flight):
    _, _, _, records = flight
    assert len(records) == 2                                          # both frames kept: a ship each
    for rec in records:
        index = rec["body"]["index"]
        bounds = GEOREF.shifted(index * FRAME, 0).bounds(FRAME, FRAME)
        with rasterio.open(rec["folder"] / "mask.tif") as gate, rasterio.open(rec["folder"] / "mask-ship.tif") as ship:
            for ds in (gate, ship):
                assert ds.crs == rasterio.crs.CRS.from_epsg(32633)
                assert ds.bounds == pytest.approx(bounds)
                assert ds.nodata == 255
            assert json.loads(gate.tags(1)["CLASSES"]) == list(CLASSES_3)
            assert json.loads(ship.tags(1)["CLASSES"]) == list(SHIP_CLASSES) and ship.tags(1)["STEP"] == "ship"
            g, s = gate.read(1), ship.read(1)
        r0, r1, c0, c1 = CLOUD
        assert (g[r0:r1, c0:c1] == 1).mean() > 0.9                    # the gate saw the cloud
        assert (s[r0:r1, c0:c1] == 255).all()                         # the ship model never ran there
        r0, r1, c0, c1 = SHIP
        assert (s[r0:r1, c0:c1] == 1).mean() > 0.5                    # and found the ship where it ran


def test_stac_items_have_an_asset_per_step(flight):
    _, report, _, _ = flight
    stac = report["stac"]
    assert stac["valid"] and stac["items"] == 2 and stac["rasters_checked"] >= 4
    catalog = pystac.Catalog.from_file(stac["catalog"])
    for item in catalog.get_items(recursive=True):
        assert item.properties["eoedge:model_id"] == "chain-test"
        assert [s["name"] for s in item.properties["eoedge:chain"]] == ["cloud", "ship"]
        assert item.assets["mask"].extra_fields["eoedge:step"] == "cloud"
        ship = item.assets["mask-ship"]
        assert ship.extra_fields["eoedge:model_id"] == "ship"
        assert [c["name"] for c in ship.extra_fields["classification:classes"]] == list(SHIP_CLASSES)
