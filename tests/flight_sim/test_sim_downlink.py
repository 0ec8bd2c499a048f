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


# ------------------------------------------------------------------------------- learning samples

FRAME_GEOREF = {"crs": "EPSG:32632", "transform": [10.0, 0.0, 500_000.0, 0.0, -10.0, 4_900_000.0]}


def sample_message(frame_id: str, windows, size: int = 32, selection: str = "uncertainty",
                   version: int = 3, priority: int = 9, entropy=None) -> list:
    """A SAMPLE as the daemon sends it: raw uint16 tiles of 4 bands, one per window (row, col)."""
    entropy = entropy or [0.5 + 0.01 * i for i in range(len(windows))]
    tiles = np.stack([np.full((4, size, size), 1000 + 10 * i, np.uint16) for i in range(len(windows))])
    body = {"frame_id": frame_id, "priority": priority, "model": {"model_id": "cloud-student", "version": version},
            "selection": selection, "bands": ["B02", "B03", "B04", "B08"], "scale": 1e-4,
            "samples": [{"row": r, "col": c, "size": size, "entropy": e, "ambiguous": 0.1}
                        for (r, c), e in zip(windows, entropy)],
            "scene": "arid-1", "acquired": 1.5, "georef": FRAME_GEOREF}
    return [bytes(p) for p in encode(Message("sample", body, {"tiles": tiles}))]


def test_a_sample_comes_down_as_a_readable_file_with_its_window_georef(tmp_path):
    """The ground station writes each downlinked sample with shared.samples.write_sample into
    <station>/learning/: read back, it carries the tile's own georeference (the frame's shifted
    by its window), the model version that chose it, and its values."""
    from shared.samples import read_sample, read_samples
    dl = Downlink([Pass(10, 5, 10**6, learning_budget_bytes=10**6)], GroundStation(tmp_path / "ground"),
                  queue_dir=tmp_path / "q")
    assert dl.receive(sample_message("f-0001", [(64, 96), (0, 0)]), ready_s=2.0) == "f-0001"
    assert len(list((tmp_path / "q").iterdir())) == 2          # one message per sample, on disk
    dl.finish()
    files = sorted((tmp_path / "ground" / "learning").iterdir())
    assert [f.name for f in files] == ["f-0001-r0-c0.npz", "f-0001-r64-c96.npz"]
    s = read_sample(files[1])
    assert (s.row, s.col, s.size, s.model_id, s.model_version) == (64, 96, 32, "cloud-student", 3)
    assert s.georef == {"crs": "EPSG:32632",
                        "transform": [10.0, 0.0, 500_000.0 + 960.0, 0.0, -10.0, 4_900_000.0 - 640.0]}
    assert s.data.shape == (4, 32, 32) and s.data.dtype == np.uint16 and int(s.data[0, 0, 0]) == 1000
    assert s.selection == "uncertainty" and s.scene == "arid-1"
    assert len(read_samples(tmp_path / "ground" / "learning")) == 2
    learning = dl.summary()["learning"]
    assert learning["samples"] == learning["downlinked"] == 2 and learning["left_on_board"] == 0
    assert learning["by_selection"]["uncertainty"]["downlinked"] == 2
    assert not list((tmp_path / "q").iterdir()) and dl.stored_bytes == 0


def test_learning_budget_zero_sends_no_sample_while_products_go_down(tmp_path):
    dl = Downlink([Pass(10, 5, 10**6)], GroundStation(tmp_path / "ground"))   # default: no learning budget
    dl.receive(product("p", 1, 1000), ready_s=1.0)
    dl.receive(sample_message("p", [(0, 0)]), ready_s=1.0)
    dl.finish()
    assert "p" in dl.downlinked
    assert not (tmp_path / "ground" / "learning").exists()
    learning = dl.summary()["learning"]
    assert learning["samples"] == 1 and learning["downlinked"] == 0 and learning["left_on_board"] == 1
    assert dl.pass_log[0]["learning_used_bytes"] == 0 and dl.pass_log[0]["samples_left_on_board"] == 1


def test_samples_never_take_the_science_budget(tmp_path):
    """The science products get exactly what they would get without any sample on board, and
    each pass's learning bytes stay within the learning budget; the most uncertain go first."""
    def fly(with_samples: bool):
        dl = Downlink([Pass(10, 5, 2600, learning_budget_bytes=20_000), Pass(20, 5, 2600, learning_budget_bytes=20_000)],
                      GroundStation(tmp_path / f"g{with_samples}"), queue_dir=tmp_path / f"q{with_samples}")
        for i in range(4):
            dl.receive(product(f"p{i}", 5, 1000, float(i)), ready_s=float(i))
            if with_samples:
                dl.receive(sample_message(f"p{i}", [(0, 0), (32, 0)], entropy=[0.1 * i, 0.9 - 0.1 * i]),
                           ready_s=float(i))
        dl.finish()
        return dl

    plain, mixed = fly(False), fly(True)
    assert mixed.downlinked == plain.downlinked
    for e in mixed.pass_log:
        assert e["used_bytes"] <= e["budget_bytes"] and e["science_within_budget"]
        assert 0 < e["learning_used_bytes"] <= e["learning_budget_bytes"]
    assert [e["used_bytes"] for e in mixed.pass_log] == [e["used_bytes"] for e in plain.pass_log]
    first = [r for r in mixed.station.samples_received if r["pass"] == 0]
    entropies = [r["entropy"] for r in first]
    assert entropies == sorted(entropies, reverse=True) and entropies[0] == pytest.approx(0.9)
    assert mixed.summary()["learning"]["science_within_budget"] is True


def test_sample_duplicates_and_bad_samples_are_refused(tmp_path):
    dl = Downlink([Pass(0, 1, 10**6, learning_budget_bytes=10**6)], GroundStation(tmp_path))
    assert dl.receive(sample_message("a", [(0, 0)]), 0) == "a"
    assert dl.receive(sample_message("a", [(0, 0)]), 0) is None      # processed again after a restart
    bad = sample_message("b", [(0, 0)], selection="clever")          # valid message, unknown selection
    assert dl.receive(bad, 0) is None
    assert dl.sample_duplicates == 1 and "selection" in dl.rejected[-1]


@pytest.mark.parametrize("spec, field", [
    ({"learning_budget_bytes": -1}, "downlink.learning_budget_bytes"),
    ({"learning_budget_bytes": 5, "learning_rate_mbps": 1}, "not both"),
    ({"passes": [{"start_s": 0, "duration_s": 1, "rate_mbps": 1, "learning_bytes": 3}]},
     r"downlink.passes\[0\].learning_bytes"),
])
def test_learning_budget_spec_errors_name_the_field(spec, field):
    from flight_sim.errors import ScenarioError
    with pytest.raises(ScenarioError, match=field):
        passes_from_spec(spec, 10.0)


def test_learning_budget_from_the_table_or_a_rate():
    periodic = passes_from_spec({"pass_every_s": 10, "pass_duration_s": 4, "rate_mbps": 8,
                                 "learning_rate_mbps": 2, "passes_after_end": 1}, 5.0)
    assert periodic[0].learning_budget_bytes == 1_000_000 and periodic[0].budget_bytes == 4_000_000
    explicit = passes_from_spec({"learning_budget_bytes": 700,
                                 "passes": [{"start_s": 0, "duration_s": 1, "budget_bytes": 10},
                                            {"start_s": 5, "duration_s": 1, "budget_bytes": 10,
                                             "learning_budget_bytes": 0}]}, 5.0)
    assert [p.learning_budget_bytes for p in explicit] == [700, 0]
    assert passes_from_spec({"rate_mbps": 1}, 5.0)[0].learning_budget_bytes == 0
