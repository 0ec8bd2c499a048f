"""End to end: the real daemon as a separate process, flown by the simulator with faults on.

The bundle is built from tests/onboard_models.py (a small real OpenVINO IR that reads
brightness: bright -> cloud, dark -> shadow), signed with a key made here. The scene is
generated with a known truth: clear land and sea at the start of the track, overcast at its end.
Faults: a chunk corrupted in transit and the uplink lost midway (resumed), an unsigned and a
corrupted bundle, kill -9 of the daemon mid-flight while the downlink is not pulling (kept products
wait in the daemon and die with it) and its restart, malformed frames, a burst of
frames faster than the daemon takes them.
"""
import json

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("zmq")

from sim_flight import assert_checks_pass, fly_text, make_flight_bundle  # noqa: E402

SCENARIO = """
name = "e2e"
description = "CI: a short flight with every fault on"
[bundle]
path = "bundle.tar"
public_key = "keys/uplink.pub"
private_key = "keys/uplink.key"
chunk_size = 65536
[daemon]
max_frames = 2
telemetry_interval_s = 0.3
[camera]
frame_lines = 128
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
# passes long after acquisition: products wait for the restart (slow on a busy machine) and come down
first_pass_s = 0.5
pass_every_s = 20.0
pass_duration_s = 1.0
rate_mbps = 80
passes_after_end = 3
[faults]
kill_daemon_after_frames = [5]
products_link_down_after_frames = 0     # kept products wait in the daemon when it is killed
restart_after_s = 0.3
unsigned_bundle = true
corrupt_bundle = true
corrupt_chunks = [1]
interrupt_uplink_after_chunks = 2
malformed = ["band_count", "truncated", "not_finite", "bad_dtype"]
malformed_every = 2
burst = {after_frames = 5, frames = 3}
"""


@pytest.fixture(scope="module")
def flight(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    make_flight_bundle(root)
    return fly_text(root, SCENARIO)


def test_every_check_passes_and_exit_code_says_so(flight):
    assert_checks_pass(*flight[:2])


def test_accounting_balances_nothing_lost(flight):
    _, report, _ = flight
    a = report["accounting"]
    assert a["balanced"] and a["pending"] == 0 and a["gave_up"] == 0
    assert a["sent"] == a["frames"] == 8 + 4          # 8 frames of 128 lines + 4 malformed
    assert a["sent"] == a["decided"] + a["errored"]
    assert a["decided"] == 8 and a["errored"] == 4
    # the faults really happened: frames went again after the restart, the burst met a full queue
    assert a["resent"].get("daemon_restart", 0) >= 1
    assert a["refusals"].get("queue_full", 0) >= 1


def test_malformed_frames_each_got_an_error_naming_the_problem(flight):
    _, report, _ = flight
    codes = {m["kind"]: m["code"] for m in report["malformed"]}
    assert set(codes) == {"band_count", "truncated", "not_finite", "bad_dtype"}
    assert all(m["outcome"] == "error" for m in report["malformed"])
    assert codes["truncated"] == "invalid_frame" and codes["bad_dtype"] == "invalid_frame"
    assert codes["not_finite"] == "not_finite"


def test_decisions_right_on_known_truth(flight):
    """Overcast frames are discarded; clear frames (whose value is clear ground) are kept."""
    _, report, _ = flight
    frames = report["decisions"]["by_truth"]
    assert len(frames) == 8
    overcast = [f for f in frames if f["truth_fractions"]["cloud"] >= 0.95]
    clear = [f for f in frames if f["truth_fractions"]["cloud"] == 0 and f["truth_fractions"]["clear"] > 0.3]
    assert overcast and clear
    assert all(not f["keep"] for f in overcast)
    assert all(f["keep"] for f in clear)
    assert report["decisions"]["agreement"] == 1.0


def test_no_kept_product_lost_to_kill_9(flight):
    """Every frame decided keep has its product on the ground, though the daemon was killed
    mid-flight: products are on the daemon's disk before their DECISION says keep and a
    restarted daemon sends again what the ground has not acknowledged, so none is derived again."""
    _, report, out = flight
    kept = {e["frame_id"] for e in report["decisions"]["by_truth"] if e["keep"]}
    down = {json.loads(p.read_text())["frame_id"] for p in out.glob("ground/pass-*/*/product.json")}
    assert kept and kept <= down and report["data"]["products_missing"] == []
    (restart,) = report["restarts"]
    assert restart["products_awaited_from_spill"] >= 1     # the kill took some kept products
    assert restart["products_lost_reprocessed"] == 0
    assert report["simulator"]["acks"]["pending"] == 0
    assert not list(out.glob("daemon/spill/*.product"))      # the ground acknowledged them all


def test_killed_daemon_came_back_with_the_same_model(flight):
    _, report, _ = flight
    (restart,) = report["restarts"]
    assert restart["same_model"] and restart["new_pid"] != restart["killed_pid"]
    assert restart["model_after"]["id"] == "cloud-test" and restart["model_after"]["version"] == 1
    assert report["daemon"]["final_status"]["model"]["id"] == "cloud-test"
    kinds = [e["kind"] for e in report["daemon"]["events"]]
    assert kinds[:3] == ["started", "killed", "started"] and report["daemon"]["exit_code"] == 0


def test_bad_bundles_refused_for_the_right_reason(flight):
    _, report, _ = flight
    attempts = {a["kind"]: a for a in report["uplink"]["attempts"]}
    good = attempts["good"]["upload"]
    assert attempts["good"]["ok"]
    assert good["corrupted_in_transit"] == 1 and good["interrupted_after"] == 2
    assert good["resumed_missing"] and 0 not in good["resumed_missing"]
    assert attempts["unsigned"]["error"].startswith("missing_signature")
    assert attempts["corrupt"]["error"].startswith("checksum_mismatch")
    assert attempts["unsigned"]["still_serving"] and attempts["corrupt"]["still_serving"]


def test_ground_station_wrote_what_came_down(flight):
    from flight_sim.report import decode_png
    _, report, out = flight
    data = report["data"]
    assert data["downlinked"] == data["products"] > 0 and data["left_on_board"] == 0
    assert 0 < data["reduction"] < 1
    # everything kept came down; what was not kept is the clear ground of frames judged too cloudy
    value = report["value"]
    assert value["recall_downlinked"] == value["recall_kept"] > 0.9
    products = sorted(out.glob("ground/pass-*/*/product.json"))
    assert len(products) == data["downlinked"]
    record = json.loads(products[0].read_text())
    mask = decode_png((products[0].parent / "mask.png").read_bytes())
    assert mask.shape == (128, 256) and set(np.unique(mask)) <= {0, 1, 2}
    # the kept pixels themselves: the kept tiles, or the whole frame when every tile was kept
    assert record["bytes"] > 0 and {"tiles.npy", "frame.npy"} & set(record["files"])
    assert "tile_boxes.npy" in record["files"] and "quicklook.jpg" in record["files"]
    for name in ("report.md", "report.json", "timeline.png", "masks.png"):
        assert (out / name).stat().st_size > 0
