"""Scenario files (every bad key named), truth against model classes, the bad bundles the
uplink makes on purpose, and the `eoedge sim` commands."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from flight_sim.scenario import ScenarioError, load_scenario
from flight_sim.truth import IGNORE, class_map, default_targets, expected_decision, to_model_classes

MINIMAL = """
[bundle]
path = "b.tar"
public_key = "k.pub"
[[scenes]]
kind = "generated"
rows = 64
cols = 64
"""


def write(tmp_path, text, name="s.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_minimal_scenario_gets_defaults(tmp_path):
    s = load_scenario(write(tmp_path, MINIMAL))
    assert s.name == "s" and s.camera["frame_lines"] == 512 and s.camera["mode"] == "asap"
    assert s.daemon["max_frames"] == 4 and s.faults["kill_daemon_after_frames"] == []
    assert s.path("bundle", "path") == (tmp_path / "b.tar").resolve()
    assert s.path("bundle", "private_key") is None
    # flown on the simulated clock, kept products spilled by the daemon, nobody slowed
    assert s.run["clock"] == "simulated" and s.daemon["spill"] is True
    assert s.daemon["test_frame_delay_s"] == 0


def test_learning_budget_and_uplinks_are_read(tmp_path):
    s = load_scenario(write(tmp_path, MINIMAL + """
[downlink]
rate_mbps = 10
learning_budget_bytes = 4000
[[uplinks]]
path = "v3.tar"
after_pass = 2
[[uplinks]]
path = "v2.tar"
public_key = "other.pub"
after_pass = 0
"""))
    assert s.downlink["learning_budget_bytes"] == 4000
    assert [u["path"] for u in s.sections["uplinks"]] == ["v2.tar", "v3.tar"]     # by pass
    assert s.sections["uplinks"][0]["public_key"] == "other.pub"
    assert load_scenario(write(tmp_path, MINIMAL, "plain.toml")).sections["uplinks"] == []


@pytest.mark.parametrize("extra, field", [
    ("[camera]\nframe_lines = 0", "camera.frame_lines: must be >= 1"),
    ("[camera]\nmode = \"slow\"", "camera.mode: must be one of realtime, asap"),
    ("[faults]\nkill_daemon = [3]", "faults.kill_daemon: unknown key"),
    ("[faults]\nmalformed = [\"gremlins\"]", "faults.malformed: must be a list of: band_count"),
    ("[faults]\nburst = {after = 1}", "faults.burst: must be a table"),
    ("[daemon]\ntransport = \"udp\"", "daemon.transport"),
    ("[weather]\nrain = true", "unknown key or section 'weather'"),
    ("[payload]\nwindow = true", "payload.window: must be an integer"),
    ("[run]\nclock = \"sundial\"", "run.clock: must be one of simulated, wall"),
    ("[daemon]\ntest_frame_delay_s = -1", "daemon.test_frame_delay_s: must be >= 0"),
    ("[downlink]\nlearning_budget = 5", "downlink.learning_budget: unknown key"),
    ("[downlink]\nlearning_budget_bytes = -5", "downlink.learning_budget_bytes: must be >= 0"),
    ("[downlink]\nlearning_budget_bytes = 5\nlearning_rate_mbps = 1", "give learning_budget_bytes or"),
    ("[[uplinks]]\npath = \"v2.tar\"\nafter_pass = 0\nwhen = 3", "uplinks[0].when: unknown key"),
    ("[[uplinks]]\npath = \"v2.tar\"", "uplinks[0].after_pass: missing"),
    ("[[uplinks]]\npath = \"v2.tar\"\nafter_pass = -1", "uplinks[0].after_pass: must be >= 0"),
    ("[[uplinks]]\nafter_pass = 1", "uplinks[0].path: missing"),
    ("uplinks = 3", "uplinks: [[uplinks]] tables"),
])
def test_bad_values_name_file_and_field(tmp_path, extra, field):
    # a top-level key must come before the first table
    text = extra + "\n" + MINIMAL if extra.startswith("uplinks =") else MINIMAL + "\n" + extra
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as exc:
        load_scenario(path)
    assert field in str(exc.value) and str(path) in str(exc.value)


def test_missing_parts_are_named(tmp_path):
    with pytest.raises(ScenarioError, match="bundle.public_key: missing"):
        load_scenario(write(tmp_path, '[bundle]\npath = "b"\n[[scenes]]\nkind = "generated"'))
    with pytest.raises(ScenarioError, match="scenes: at least one"):
        load_scenario(write(tmp_path, '[bundle]\npath = "b"\npublic_key = "k"'))
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load_scenario(write(tmp_path, "[bundle\n"))
    with pytest.raises(FileNotFoundError, match="nothere.toml"):
        load_scenario(tmp_path / "nothere.toml")


def test_shipped_scenarios_load():
    files = sorted((REPO / "scenarios").glob("*.toml"))
    assert files
    for path in files:
        load_scenario(path)
    for soak in ("soak.toml", "soak_short.toml"):      # minutes of a paced daemon: the wall clock
        assert load_scenario(REPO / "scenarios" / soak).run["clock"] == "wall"


# ----------------------------------------------------------------------------- truth

def test_class_map_by_name_then_alias():
    lut = class_map(("land", "water", "cloud", "shadow", "ship"), ("clear", "cloud", "shadow"))
    assert lut[:5].tolist() == [0, 0, 1, 2, 0]
    lut = class_map(("land", "water", "ship", "mystery"), ("background", "water", "ship"))
    assert lut[:4].tolist() == [0, 1, 2, IGNORE]


def test_expected_decision_follows_the_policy_on_truth():
    policy = {"rules": [{"if": {"class": "cloud", "fraction_above": 0.6}, "then": "discard"},
                        {"if": {"class": "ship", "components_at_least": 2}, "then": "keep", "priority": 1}],
              "default": {"then": "keep", "priority": 5}}
    classes = ("clear", "cloud", "ship")
    overcast = np.ones((10, 10), np.uint8)
    assert expected_decision(overcast, classes, policy)["keep"] is False
    two_ships = np.zeros((10, 10), np.uint8)
    two_ships[1:3, 1:3] = 2
    two_ships[6:8, 6:9] = 2
    d = expected_decision(two_ships, classes, policy)
    assert d["keep"] and d["priority"] == 1 and d["rule"] == 1
    one_ship = np.where(np.arange(100).reshape(10, 10) < 3, 2, 0).astype(np.uint8)
    assert expected_decision(one_ship, classes, policy)["priority"] == 5
    mapped = to_model_classes(np.array([[4, 2]], np.uint8), ("land", "water", "cloud", "shadow", "ship"),
                              ("clear", "cloud", "shadow"))
    assert mapped.tolist() == [[0, 1]]
    assert default_targets(("clear", "cloud", "shadow")) == ["clear"]


# ----------------------------------------------------------------------------- bad bundles

def test_bad_bundle_copies_are_refused_by_the_contract(tmp_path):
    pytest.importorskip("openvino")
    from onboard_models import make_test_manifest, make_test_model_files
    from flight_sim.uplink import corrupt_copy, newer_version_copy, unsigned_copy
    from shared.bundle import ChecksumMismatch, MissingSignature, build_bundle, verify_bundle
    from shared.keys import generate_keypair

    sk, pk = generate_keypair(tmp_path / "keys")
    files = make_test_model_files(tmp_path / "m", tile=32, n_reference=1)
    good = build_bundle(tmp_path / "b.tar", files, make_test_manifest(files, tile=32, overlap=4), sk)
    with pytest.raises(MissingSignature):
        verify_bundle(unsigned_copy(good, tmp_path / "u.tar"), pk)
    with pytest.raises(ChecksumMismatch):
        verify_bundle(corrupt_copy(good, tmp_path / "c.tar"), pk)
    newer = verify_bundle(newer_version_copy(good, tmp_path / "n.tar", sk), pk)
    assert newer.version == 2 and newer.manifest["parent"] == {"model_id": "cloud-test", "version": 1}
    with pytest.raises(ChecksumMismatch):
        verify_bundle(corrupt_copy(tmp_path / "n.tar", tmp_path / "nc.tar"), pk, min_version=1)
    # a bundle whose files are stored xz-compressed: the newer copy holds the same decoded files
    packed = build_bundle(tmp_path / "x.tar", files, make_test_manifest(files, tile=32, overlap=4), sk,
                          compress=True)
    assert verify_bundle(packed, pk).manifest.get("encoding")
    newer = verify_bundle(newer_version_copy(packed, tmp_path / "xn.tar", sk), pk)
    assert newer.version == 2 and newer.manifest["files"] == verify_bundle(packed, pk).manifest["files"]


# ----------------------------------------------------------------------------- CLI

def sim(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "eoedge", "sim", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_every_command_has_help_and_json():
    for cmd in ("run", "generate", "scene"):
        out = sim(cmd, "--help")
        assert out.returncode == 0 and "--json" in out.stdout, out.stderr


def test_generate_then_describe(tmp_path):
    out = sim("generate", "--rows", "96", "--cols", "80", "--seed", "3", "--cloud-cover", "0,1",
              "--out", str(tmp_path / "g.npz"), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["rows"] == 96 and abs(sum(info["fractions"].values()) - 1) <= 0.5e-4 * len(info["fractions"])  # printed to 4 places
    with np.load(tmp_path / "g.npz") as z:
        assert z["data"].shape == (13, 96, 80) and z["data"].dtype == np.uint16
        assert z["truth"].shape == (96, 80)
    desc = json.loads(sim("scene", str(tmp_path / "g.npz"), "--json").stdout)
    assert desc["truth_classes"] == ["land", "water", "cloud", "shadow", "ship"]
    assert desc["object_class"] == "ship"


def test_run_with_a_bad_scenario_names_the_field(tmp_path):
    path = write(tmp_path, MINIMAL + "\n[camera]\ndtype = \"int8\"")
    out = sim("run", str(path))
    assert out.returncode == 1 and "camera.dtype" in out.stderr and "Traceback" not in out.stderr
    out = sim("generate", "--out", str(tmp_path / "x.png"))
    assert out.returncode == 1 and "--out" in out.stderr


GENERATED = 'kind = "generated"\nrows = 64\ncols = 64'


@pytest.mark.parametrize("scenes, field", [
    (GENERATED + '\ncolour = "blue"', "scenes[0].colour: unknown key for a generated scene"),
    ('kind = "painted"', "scenes[0].kind: one of generated, file, dataset"),
    (GENERATED + '\n[[scenes]]\nkind = "generated"\nrows = 64', "scenes[1].cols: missing"),
    ('kind = "dataset"\nname = "ukis"\ncrop = [0, 256]', "scenes[0].crop: unknown key for a dataset scene"),
    ('kind = "file"', "scenes[0].path: a file or folder path expected"),
])
def test_bad_scene_keys_are_named_when_the_scenario_loads(tmp_path, scenes, field):
    """A typo in a [[scenes]] table is found by load_scenario, before any scene is opened."""
    path = write(tmp_path, MINIMAL.replace(GENERATED, scenes))
    with pytest.raises(ScenarioError) as exc:
        load_scenario(path)
    assert field in str(exc.value) and str(path) in str(exc.value)


@pytest.mark.parametrize("downlink, field", [
    ("passes = [{start_s = -1, duration_s = 5, rate_mbps = 10}]", "downlink.passes[0].start_s"),
    ("passes = [{start_s = 1, duration_s = 5}]", "downlink.passes[0]: give rate_mbps or budget_bytes"),
    ("passes = [3]", "downlink.passes[0]: a table"),
    ("pass_every_s = 5\npass_duration_s = 10", "need 0 < pass_duration_s <= pass_every_s"),
])
def test_bad_passes_are_named_when_the_scenario_loads(tmp_path, downlink, field):
    path = write(tmp_path, MINIMAL + "\n[downlink]\n" + downlink)
    with pytest.raises(ScenarioError) as exc:
        load_scenario(path)
    assert field in str(exc.value) and str(path) in str(exc.value)


def test_run_with_a_bad_scene_says_file_and_field_in_one_line(tmp_path):
    path = write(tmp_path, MINIMAL.replace("cols = 64", "cols = 64\ncloud_cover = 2.0"))
    out = sim("run", str(path), "--out", str(tmp_path / "run"))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert str(path) in lines[0] and "scenes[0]" in lines[0] and "cloud_cover" in lines[0]
