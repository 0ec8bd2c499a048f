"""End to end, the closed loop's simulator side: the real daemon with a `learning` policy sends
SAMPLE messages beside its products; they come down within their own budget per pass into the
ground station's learning/ folder; a newer bundle (v2) is uplinked after the first pass and the
later frames (an arid scene) run on it; the report scores the masks per surface and version."""
import json

import pytest

pytest.importorskip("openvino")
pytest.importorskip("zmq")

from sim_flight import assert_checks_pass, fly_text, make_flight_bundle  # noqa: E402

SCENARIO = """
name = "learning-e2e"
description = "CI: learning samples beside products, a newer bundle uplinked after the first pass"
[bundle]
path = "bundle.tar"
public_key = "keys/uplink.pub"
chunk_size = 65536
[daemon]
max_frames = 2
telemetry_interval_s = 0.3
[camera]
frame_lines = 128
mode = "asap"
gap_s = 2.0                 # pass 0 (0.5..1.5 s) ends between the two scenes
[payload]
window = 3
[[scenes]]
kind = "generated"
rows = 256
cols = 256
seed = 7
cloud_cover = 0.3
ships = 2
[[scenes]]
kind = "generated"
rows = 384
cols = 256
seed = 8
surface = "arid"
cloud_cover = 0.3
ships = 0
[[uplinks]]
path = "v2.tar"
after_pass = 0
[downlink]
first_pass_s = 0.5
pass_every_s = 20.0
pass_duration_s = 1.0
rate_mbps = 80
learning_budget_bytes = 100000      # two 6-band 64 x 64 uint16 samples a pass
passes_after_end = 2
"""

LEARNING = {"tiles": 2, "select": "uncertainty", "score": "entropy", "min_score": 0.0, "priority": 9,
            "seed": 0}


@pytest.fixture(scope="module")
def flight(tmp_path_factory):
    from flight_sim.uplink import newer_version_copy
    root = tmp_path_factory.mktemp("learning")
    policy = {"rules": [{"if": {"class": "cloud", "fraction_above": 0.6}, "then": "discard"}],
              "default": {"then": "keep", "priority": 5}, "learning": LEARNING}
    bundle = make_flight_bundle(root, policy=policy)
    newer_version_copy(bundle, root / "v2.tar", root / "keys" / "uplink.key")     # v2, parent v1
    return fly_text(root, SCENARIO)


def test_the_flight_passes_its_checks(flight):
    assert_checks_pass(*flight[:2])


def test_samples_come_down_within_their_budget_beside_the_products(flight):
    from shared.samples import read_samples
    _, report, out = flight
    lr = report["learning"]
    assert lr["samples"] > lr["downlinked"] > 0 and lr["left_on_board"] == lr["samples"] - lr["downlinked"]
    for p in lr["passes"]:
        assert p["learning_used_bytes"] <= p["learning_budget_bytes"] == 100_000
        assert p["science_used_bytes"] <= p["science_budget_bytes"] and p["science_within_budget"]
    assert lr["science_within_budget"] and report["data"]["downlinked"] == report["data"]["products"]
    samples = read_samples(out / "ground" / "learning")
    assert len(samples) == lr["downlinked"] == lr["by_selection"]["uncertainty"]["downlinked"]
    assert {s.model_version for s in samples} <= {1, 2} and all(s.data.shape == (6, 64, 64) for s in samples)


def test_the_uplink_after_pass_0_runs_the_arid_scene(flight):
    """v2 goes up after pass 0; the first frame decided on it is the arid scene's first; the
    masks are scored per (surface, version): temperate with v1, arid with v2."""
    _, report, _ = flight
    up, = report["uplinks"]
    assert up["ok"] and up["version"] == 2 and up["after_pass"] == 0 and up["pass_played"]
    assert up["mission_s"] == pytest.approx(1.5)
    assert up["activated"]["frame_id"].startswith("01-") and up["activated"]["frame_id"].endswith("-0000")
    assert up["model_before"]["version"] == 1 and up["model_after"]["version"] == 2
    by = report["masks_by_version"]
    assert set(by) == {"temperate", "arid"} and set(by["temperate"]) == {"1"} and set(by["arid"]) == {"2"}
    assert by["arid"]["2"]["decided"] == 3 and by["temperate"]["1"]["decided"] == 2
    assert all(0 <= g["miou"] <= 1 for per in by.values() for g in per.values() if g["frames"])
    md = (flight[2] / "report.md").read_text()
    assert "## Learning samples" in md and "## Masks by scene surface and model version" in md
    assert json.loads((flight[2] / "report.json").read_text())["uplinks"][0]["version"] == 2


def test_scheduled_uplinks_checked_before_the_daemon_starts(tmp_path):
    """Each [[uplinks]] bundle verifies with its key (default: the [bundle] one) and names a pass
    of the timeline, before anything flies; errors name the entry."""
    from flight_sim.downlink import Pass
    from flight_sim.errors import ScenarioError, ScenarioFailed
    from flight_sim.runner import _scheduled_uplinks
    from flight_sim.scenario import scenario_from_dict
    from flight_sim.uplink import newer_version_copy
    from shared.keys import generate_keypair
    bundle = make_flight_bundle(tmp_path)
    newer_version_copy(bundle, tmp_path / "v2.tar", tmp_path / "keys" / "uplink.key")
    generate_keypair(tmp_path / "other")

    def scenario(**up):
        return scenario_from_dict({"bundle": {"path": "bundle.tar", "public_key": "keys/uplink.pub"},
                                   "scenes": [{"kind": "generated", "rows": 8, "cols": 8}],
                                   "uplinks": [{"path": "v2.tar", "after_pass": 1, **up}]}, tmp_path)

    passes = [Pass(0, 1, 100), Pass(10, 2, 100)]
    up, = _scheduled_uplinks(scenario(), passes)
    assert (up["version"], up["after_pass"], up["at_s"]) == (2, 1, 12.0)
    with pytest.raises(ScenarioError, match=r"uplinks\[0\].after_pass: 1, but the timeline has 1 passes"):
        _scheduled_uplinks(scenario(), passes[:1])
    with pytest.raises(ScenarioFailed, match=r"uplinks\[0\].path: .*v9.tar"):
        _scheduled_uplinks(scenario(path="v9.tar"), passes)
    with pytest.raises(ScenarioFailed, match=r"uplinks\[0\].path: .*other"):
        _scheduled_uplinks(scenario(public_key="other/uplink.pub"), passes)
