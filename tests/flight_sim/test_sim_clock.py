"""The simulated mission clock: the same scenario flown by a normal and by a slowed daemon (real
daemon processes, kill -9 included) downlinks the same products in the same passes, byte for byte;
and the clock's own arithmetic."""
import json

import pytest

pytest.importorskip("openvino")
pytest.importorskip("zmq")

from flight_sim.clock import INFINITY, SimulatedClock  # noqa: E402
from sim_flight import fly, make_flight_bundle  # noqa: E402

SLOW_S = 1.0          # what the slowed daemon adds to every frame

SCENARIO = """
name = "clock"
[bundle]
path = "bundle.tar"
public_key = "keys/uplink.pub"
chunk_size = 65536
[daemon]
max_frames = 2
telemetry_interval_s = 0.3
test_frame_delay_s = {delay}
[camera]
frame_lines = 128           # 0.17 s of acquisition per frame: 8 frames in 1.37 s
mode = "asap"
[payload]
window = 3
[[scenes]]
kind = "generated"
rows = 1024
cols = 256
seed = 7
cloud_cover = [0.0, 0.0, 0.3, 1.0, 1.0]
water_fraction = 0.4
ships = 12
[downlink]
# the first pass ends 1.5 s into the mission and has room for two of the ~0.86 MB products:
# the first two kept frames are ready by then on the simulated clock; on the wall clock the
# slowed daemon's second product would be ready only after it (clock = "wall" misses it)
passes = [{{start_s = 0.5, duration_s = 1.0, budget_bytes = 2000000}},
          {{start_s = 30.0, duration_s = 5.0, budget_bytes = 100000000}}]
[faults]
kill_daemon_after_frames = [3]
restart_after_s = 0.3
"""


def _fly(root, name: str, delay: float) -> dict:
    (root / f"{name}.toml").write_text(SCENARIO.format(delay=delay))
    _, report = fly(root / f"{name}.toml", root / name)
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]
    return report


@pytest.fixture(scope="module")
def flights(tmp_path_factory):
    root = tmp_path_factory.mktemp("clock")
    make_flight_bundle(root)
    return _fly(root, "normal", 0.0), _fly(root, "slowed", SLOW_S), root


def _downlink(root, name: str) -> dict:
    """frame_id -> (pass, bytes) from what the ground station wrote."""
    out = {}
    for path in (root / name / "ground").glob("pass-*/*/product.json"):
        record = json.loads(path.read_text())
        out[record["frame_id"]] = (record["pass"], record["bytes"])
    return out


def _decisions(report: dict) -> list:
    return [(e["frame_id"], e["keep"]) for e in report["decisions"]["by_truth"]]


def test_slowed_daemon_downlinks_the_same_products_in_the_same_passes(flights):
    normal, slowed, root = flights
    down = _downlink(root, "normal")
    assert down == _downlink(root, "slowed")
    assert {p for p, _ in down.values()} == {0, 1}              # the budget split them
    for key in ("products", "downlinked", "bytes_downlinked", "left_on_board"):
        assert normal["data"][key] == slowed["data"][key], key
    assert [p["products"] for p in normal["data"]["passes"]] == \
        [p["products"] for p in slowed["data"]["passes"]]
    assert _decisions(normal) == _decisions(slowed)
    assert normal["simulator"]["clock"] == slowed["simulator"]["clock"] == "simulated"


def test_the_slowed_daemon_really_was_slower_and_lost_no_kept_product(flights):
    normal, slowed, _ = flights
    assert slowed["latency_ms"]["daemon_total"]["p50"] >= SLOW_S * 1000
    assert slowed["realtime"]["wall_s"] > normal["realtime"]["wall_s"]
    for r in (normal, slowed):
        assert r["restarts"] and r["data"]["products_missing"] == []
        assert r["restarts"][0]["products_lost_reprocessed"] == 0    # none had to be derived again
        assert r["simulator"]["acks"]["pending"] == 0
        assert r["simulator"]["peak_rss_mb"] > 0 and r["simulator"]["downlink_queue"]["peak_bytes"] > 0


def test_products_wait_on_disk_and_leave_it_when_they_come_down(flights):
    _, _, root = flights
    assert not list((root / "normal" / "downlink_queue").iterdir())   # all came down
    assert not list((root / "normal" / "daemon" / "spill").glob("*.product"))   # all acknowledged


def test_clock_settles_in_acquisition_order_with_outages():
    clock = SimulatedClock({2: 1.0})
    for i, t in enumerate((1.0, 2.0, 3.0)):
        clock.add(f"f{i}", t)
    service = {"f0": 1.5, "f2": 0.5}
    assert [t.frame_id for t in clock.settle(service.get)] == ["f0"]   # f1 still open
    assert clock.now_s(None) == 2.5                     # f1 cannot start before f0 ends
    service["f1"] = 0.25
    f1, f2 = clock.settle(service.get)
    assert (f1.start_s, f1.ready_s) == (2.5, 2.75)
    assert (f2.start_s, f2.ready_s) == (4.0, 4.5)      # acquired at 3, then 1 s down
    assert clock.now_s(5.0) == 5.0 and clock.now_s(None) == INFINITY


def test_in_real_time_on_the_simulated_clock_frames_are_rendered_only_as_the_payload_has_room(tmp_path):
    """A host slower than the orbit (here: every frame due at once, a slowed daemon) rendered
    every overdue frame ahead and held their pixels: the whole scene (3.6 GB on a full tile)."""
    make_flight_bundle(tmp_path)
    text = SCENARIO.format(delay=0.3).replace('mode = "asap"', 'mode = "realtime"\nspeedup = 1000.0')
    text = text.replace("window = 3", "window = 1").replace("kill_daemon_after_frames = [3]",
                                                            "kill_daemon_after_frames = []")
    (tmp_path / "rt.toml").write_text(text)
    _, report = fly(tmp_path / "rt.toml", tmp_path / "rt")
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]
    assert report["camera"]["mode"] == "realtime" and report["accounting"]["decided"] == 8
    assert report["accounting"]["max_buffer"] == 1
