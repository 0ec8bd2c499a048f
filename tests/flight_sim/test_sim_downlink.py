"""Downlink passes (priority, budget, readiness), the ground station's files, and the camera's
push-broom timing."""
import io
import json

import numpy as np
import pytest

from flight_sim.camera import CameraConfig, PushbroomCamera, quantise
from flight_sim.downlink import Downlink, GroundStation, Pass, passes_from_spec
from flight_sim.scenes import ArraySource
from shared.messages import Message, encode
from shared.scene import Scene


def png_bytes(mask: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    return buf.getvalue()


def product(frame_id: str, priority: int, size: int, acquired: float = 0.0) -> list:
    arrays = {"tiles": np.zeros(size, np.uint8), "mask_png": png_bytes(np.eye(4, dtype=np.uint8))}
    msg = Message("product", {"frame_id": frame_id, "priority": priority, "acquired": acquired}, arrays)
    return [bytes(p) for p in encode(msg)]


def test_priority_then_age_within_the_budget(tmp_path):
    # one pass with room for two 1000-byte products
    dl = Downlink([Pass(10, 5, 2 * 1300)], GroundStation(tmp_path))
    for fid, prio, t in (("late-low", 5, 3.0), ("urgent", 1, 4.0), ("early-low", 5, 1.0)):
        assert dl.receive(product(fid, prio, 1000, t), ready_s=t) == fid
    assert dl.advance(9.0) == 0                   # the pass has not ended yet
    assert dl.advance(15.0) == 2
    assert list(dl.downlinked) == ["urgent", "early-low"]
    s = dl.summary()
    assert s["left_on_board"] == 1 and s["bytes_downlinked"] == sum(dl.products[f].nbytes for f in dl.downlinked)
    assert s["passes"][0]["used_bytes"] <= 2 * 1300


def test_big_product_waits_small_ones_pass_and_unready_ones_wait(tmp_path):
    dl = Downlink([Pass(10, 5, 3000), Pass(20, 5, 100_000)], GroundStation(tmp_path))
    dl.receive(product("big", 1, 10_000), ready_s=1)
    dl.receive(product("small", 5, 500), ready_s=1)
    dl.receive(product("later", 1, 500), ready_s=16)       # ready after the first pass ended
    dl.finish()
    assert dl.downlinked["small"][0] == 0
    assert dl.downlinked["big"][0] == 1 and dl.downlinked["later"][0] == 1


def test_products_wait_on_disk_not_in_memory(tmp_path):
    """A product waits for its pass as a file of the queue folder; the simulator holds only its
    body (and tile boxes); once down, the file goes and only the mask stays for the report."""
    dl = Downlink([Pass(10, 5, 10**6), Pass(30, 5, 10**6)], GroundStation(tmp_path / "ground"),
                  queue_dir=tmp_path / "q")
    dl.receive(product("a", 1, 50_000), ready_s=None)         # ready time not known yet
    (path,) = (tmp_path / "q").iterdir()
    assert path.stat().st_size >= 50_000 and dl.stored_bytes == dl.products["a"].nbytes
    assert dl.products["a"].arrays == {}                       # no pixels in memory
    dl.advance(20.0)
    assert "a" not in dl.downlinked                            # not ready: the first pass left it
    dl.set_ready("a", 11.0)
    dl.finish()
    assert dl.downlinked["a"][0] == 1 and not list((tmp_path / "q").iterdir())
    assert set(dl.products["a"].arrays) == {"mask_png"} and dl.stored_bytes == 0
    assert dl.peak_stored_bytes == dl.products["a"].nbytes
    assert np.load(tmp_path / "ground" / "pass-01" / "a" / "tiles.npy").shape == (50_000,)


def test_duplicates_and_garbage_are_not_stored(tmp_path):
    dl = Downlink([Pass(0, 1, 10**6)], GroundStation(tmp_path))
    assert dl.receive(product("a", 1, 10), 0) == "a"
    assert dl.receive(product("a", 1, 10), 0) is None
    assert dl.receive([b"\x80garbage"], 0) is None
    assert dl.duplicates == 1 and len(dl.rejected) == 1


def test_ground_station_writes_each_product(tmp_path):
    dl = Downlink([Pass(0, 1, 10**6)], GroundStation(tmp_path / "ground"))
    dl.receive(product("00-scene-0001", 2, 64), 0)
    dl.finish()
    folder = tmp_path / "ground" / "pass-00" / "00-scene-0001"
    record = json.loads((folder / "product.json").read_text())
    assert record["frame_id"] == "00-scene-0001" and record["priority"] == 2
    assert sorted(record["files"]) == ["mask.png", "tiles.npy"]
    from flight_sim.report import decode_png
    np.testing.assert_array_equal(decode_png((folder / "mask.png").read_bytes()), np.eye(4, dtype=np.uint8))
    assert np.load(folder / "tiles.npy").shape == (64,)


def test_pass_timelines():
    explicit = passes_from_spec({"passes": [{"start_s": 30, "duration_s": 10, "rate_mbps": 8},
                                            {"start_s": 5, "duration_s": 2, "budget_bytes": 77}]}, 100)
    assert [p.start_s for p in explicit] == [5, 30]
    assert explicit[1].budget_bytes == 10_000_000 and explicit[0].budget_bytes == 77
    periodic = passes_from_spec({"first_pass_s": 10, "pass_every_s": 60, "pass_duration_s": 8,
                                 "rate_mbps": 1, "passes_after_end": 2}, until_s=100)
    assert [p.start_s for p in periodic] == [10, 70, 130, 190]
    assert periodic[0].budget_bytes == 1_000_000


@pytest.mark.parametrize("spec, field", [({"passes": [{"start_s": -1, "duration_s": 1, "rate_mbps": 1}]},
                                          r"downlink.passes\[0\].start_s"),
                                         ({"passes": [{"start_s": 1, "duration_s": 1}]},
                                          r"downlink.passes\[0\]: give rate_mbps"),
                                         ({"pass_every_s": 5, "pass_duration_s": 9}, "pass_duration_s")])
def test_bad_timelines_name_the_field(spec, field):
    with pytest.raises(ValueError, match=field):
        passes_from_spec(spec, 10)


# ----------------------------------------------------------------------------- the camera

def test_pushbroom_timing_and_frames():
    cfg = CameraConfig(frame_lines=512, gsd_m=10, ground_speed_m_s=7500)
    assert cfg.line_period_s == pytest.approx(10 / 7500)
    assert cfg.frame_period_s == pytest.approx(512 * 10 / 7500)    # 0.68 s
    a = ArraySource(Scene(np.full((2, 1200, 8), 0.25, np.float32), ("B04", "B08"), name="a b/c"))
    b = ArraySource(Scene(np.full((2, 100, 8), 0.5, np.float32), ("B04", "B08"), name="b"))
    cam = PushbroomCamera([a, b], CameraConfig(frame_lines=512, gap_s=2.0))
    sched = cam.schedule()
    assert [(s, i, r0, r1) for s, i, r0, r1, _ in sched] == [(0, 0, 0, 512), (0, 1, 512, 1024),
                                                            (0, 2, 1024, 1200), (1, 0, 0, 100)]
    line = 10 / 7500
    assert sched[0][4] == pytest.approx(512 * line) and sched[2][4] == pytest.approx(1200 * line)
    assert sched[3][4] == pytest.approx(1200 * line + 2.0 + 100 * line)
    frames = list(cam.frames())
    assert frames[2].data.shape == (2, 176, 8) and frames[2].data.dtype == np.uint16
    assert frames[0].data[0, 0, 0] == 2500 and frames[0].scale == pytest.approx(1e-4)
    assert frames[0].frame_id == "00-a_b_c-0000" and len({f.frame_id for f in frames}) == 4
    assert cam.frame_count() == 4 and cam.duration_s == pytest.approx(1300 * line + 2.0)


def test_quantise_and_band_selection():
    refl = np.array([[[0.0, 0.12341, 7.0]]], np.float32)
    dn, scale = quantise(refl, "uint16")
    assert dn.tolist() == [[[0, 1234, 65535]]] and scale == pytest.approx(1e-4)
    f32, scale = quantise(refl, "float32")
    assert f32.dtype == np.float32 and scale == 1.0
    src = ArraySource(Scene(np.zeros((3, 4, 4), np.float32), ("B02", "B03", "B04")))
    (frame,) = PushbroomCamera([src], CameraConfig(frame_lines=4, bands=("B04", "B02"))).frames()
    assert frame.bands == ("B04", "B02")


@pytest.mark.parametrize("bad", [dict(frame_lines=0), dict(gsd_m=0), dict(dtype="int8"), dict(gap_s=-1)])
def test_camera_config_names_the_field(bad):
    with pytest.raises(ValueError, match="camera."):
        CameraConfig(**bad)
