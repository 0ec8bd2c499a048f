"""`eoedge demo`'s parts that are cheap to check: its imagery, its ground configs, its chain and
policies, the figures it prints, and its command line. (The whole demo takes minutes: `eoedge demo`.)"""
import io
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import REPO
from eoedge import demo


def test_training_scenes_cover_clear_to_overcast(tmp_path):
    paths = demo.write_training_scenes(tmp_path, 64)
    assert len(paths) == len(demo.TRAINING_SCENES)
    cloud = []
    for p in paths:
        with np.load(p) as z:
            assert z["data"].shape == (13, 64, 64) and z["data"].dtype == np.uint16
            cloud.append(float((z["truth"] == 2).mean()))
    assert min(cloud) == 0.0 and max(cloud) > 0.3
    # the ground's scene source reads them in the teacher's band order
    from shared.scene import read_scene
    scene = read_scene(paths[0]).select(demo.TEACHER_BANDS)
    assert scene.data.shape == (6, 64, 64)


def test_ground_run_reads_only_its_generated_scenes(tmp_path):
    """Nothing of ../shared/data is needed: the demo's run takes its imagery (and so its parity and
    reference tiles) from the generated scenes alone, and its labels from their generated truth."""
    scenes = demo.write_training_scenes(tmp_path / "scenes", 64)
    cfg = demo.ground_config(tmp_path, scenes, steps=5)
    assert [s["source"] for s in cfg["data"]["unlabelled"]] == ["scene"] * len(scenes)
    assert [s["path"] for s in cfg["data"]["unlabelled"]] == [str(p) for p in scenes]
    [labelled] = cfg["data"]["labelled"]
    assert labelled["path"] == str(tmp_path / "scenes" / "labelled") and "data" not in cfg["eval"]
    import tifffile
    for p in scenes:
        with np.load(p) as z:
            image = tifffile.imread(tmp_path / "scenes" / "labelled" / "images" / f"{p.stem}.tif")
            mask = tifffile.imread(tmp_path / "scenes" / "labelled" / "masks" / f"{p.stem}.tif")
            assert np.array_equal(image, z["data"]) and np.array_equal(mask, z["truth"])
    # the generator's land, water and ships are the model's clear; cloud and shadow are themselves
    assert labelled["label_map"] == {"0": 0, "1": 0, "2": 1, "3": 2, "4": 0}


def test_ground_config_and_policy_are_valid(tmp_path):
    pytest.importorskip("torch")
    from ground.config import parse_config
    from shared.policy import validate_policy
    cfg = parse_config(demo.ground_config(tmp_path, [tmp_path / "a.npz"], steps=5))
    assert cfg.bands == demo.TEACHER_BANDS and cfg.classes == demo.CLASSES
    assert cfg.experiments[0].mode == "distill" and cfg.train.steps == 5
    # the factory's recipe (docs/ground.md), not the temperature-2 one that never learnt shadow
    assert cfg.experiments[0].options == {"temperature": 1.0, "ce_weight": 0.5}
    assert cfg.train.balance == 0.5 and cfg.train.distill_class_weights == "log"
    validate_policy(demo.POLICY, demo.CLASSES)


def test_ship_student_learns_the_generated_ships_from_labels_alone(tmp_path):
    pytest.importorskip("torch")
    from ground.config import parse_config
    folders = [tmp_path / "scenes", tmp_path / "scenes-ships"]
    cfg = parse_config(demo.ship_config(tmp_path, folders, steps=5))
    assert cfg.bands == demo.SHIP_BANDS and cfg.classes == ["background", "ship"]
    [exp] = cfg.experiments
    assert exp.mode == "labels" and exp.loss == "ce-dice" and cfg.calibrate == "labels"
    assert [s["path"] for s in cfg.labelled] == [str(f / "labelled") for f in folders]
    # only the generator's ship is a ship; no opening (it would erase hulls under 5 px wide)
    assert demo.TRUTH_TO_SHIPS == {"0": 0, "1": 0, "2": 0, "3": 0, "4": 1} and cfg.opening_radius == 0
    # the harbour scenes are crowded with ships on open water
    [path] = demo.write_training_scenes(tmp_path / "ships", 128, demo.SHIP_SCENES[:1])
    with np.load(path) as z:
        assert (z["truth"] == 4).sum() > 50


def test_the_chain_gates_ships_with_the_cloud_student_and_keeps_ships_under_clear_sky():
    from shared.manifest import check_run_if
    from shared.policy import evaluate, validate_policy
    classes = demo.CLASSES + demo.SHIP_CLASSES
    validate_policy(demo.CHAIN_POLICY, classes)
    validate_policy(demo.SHIP_POLICY, demo.SHIP_CLASSES)
    check_run_if(demo.SHIP_RUN_IF, "chain.steps[1].run_if")
    assert demo.SHIP_RUN_IF["class"] in demo.CLASSES

    def cell(cloud, ship_sizes):
        return {"fractions": {"clear": 1 - cloud, "cloud": cloud, "shadow": 0.0, "background": 1.0, "ship": 0.0},
                "components": {"ship": ship_sizes}}
    ships = evaluate(demo.CHAIN_POLICY, cell(0.1, [12]))
    clear = evaluate(demo.CHAIN_POLICY, cell(0.1, []))
    assert ships.keep and clear.keep and ships.priority < clear.priority
    assert not evaluate(demo.CHAIN_POLICY, cell(0.9, [])).keep


def test_the_demo_flies_the_chain_over_scenes_placed_on_earth():
    from flight_sim.scenario import load_scenario
    from flight_sim.scenes import open_source
    scenario = load_scenario(demo.DEMO_SCENARIO)
    assert scenario.sections["bundle"]["path"].endswith("runs/demo/chain.tar")
    scenes = scenario.scenes
    assert scenes and all(s["kind"] == "generated" and s["place"] is True for s in scenes)
    georefs = [open_source({**s, "rows": 64}).georef for s in scenes]       # placement needs no pixels
    assert all(g is not None and g.crs.startswith("EPSG:32") and g.pixel_size == (10.0, 10.0) for g in georefs)
    assert len({g.crs for g in georefs}) == len(georefs)          # seeds 11 and 12: two ports


def png(mask):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_the_demo_scores_the_ship_step_and_counts_the_cells_decisions(tmp_path):
    """ship_scores reads each downlinked mask_ship.png against its frame's truth (objects too);
    cell_decisions counts the cells by the chain policy's rule and the steps that ran on them."""
    from flight_sim.generator import CLASSES as TRUTH
    truth = np.zeros((16, 16), np.uint8)
    objects = np.zeros((16, 16), np.uint16)
    truth[2:4, 2:8], objects[2:4, 2:8] = TRUTH.index("ship"), 1         # found
    truth[10:12, 10:14], objects[10:12, 10:14] = TRUTH.index("ship"), 2   # missed
    mask = np.zeros((16, 16), np.uint8)
    mask[2:4, 2:8] = 1
    mask[:, 14:] = 255                                                   # the step did not run there
    (tmp_path / "f1").mkdir()
    (tmp_path / "f1" / "mask_ship.png").write_bytes(png(mask))
    frame = SimpleNamespace(frame_id="f1", kind="frame", truth=truth, objects=objects, truth_classes=TRUTH)
    body = {"keep": True, "chain": {"steps": [
        {"name": "cloud", "model_id": "c", "version": 1, "cells_run": 4, "cells_total": 4, "ms": 10.0},
        {"name": "ship", "model_id": "s", "version": 1, "cells_run": 3, "cells_total": 4, "ms": 5.0}]},
        "tile_decisions": [{"keep": True, "rule": 1, "steps_run": ["cloud", "ship"]},
                           {"keep": True, "rule": 1, "steps_run": ["cloud", "ship"]},
                           {"keep": False, "rule": 0, "steps_run": ["cloud"]},
                           {"keep": True, "rule": None, "steps_run": ["cloud", "ship"]}]}
    record = SimpleNamespace(
        payload=SimpleNamespace(states={"a": SimpleNamespace(frame=frame, outcome="decision", body=body)}),
        downlink=SimpleNamespace(station=SimpleNamespace(received=[{"frame_id": "f1", "folder": str(tmp_path / "f1")}])))
    scores = demo.ship_scores(record)
    assert scores["iou"] == pytest.approx(12 / 20, abs=1e-3) and scores["precision"] == 1.0
    assert scores["ships_visible"] == 2 and scores["ships_found"] == 1 and scores["frames_scored"] == 1
    assert 0 < scores["object_f2"] < 1
    dec = demo.cell_decisions(record)
    assert dec["frames"] == {"kept": 1, "discarded": 0}
    assert dec["cells"] == {"discarded: overcast (cloud)": 1, "kept by default (cloud+ship)": 1,
                            "kept: ships under clear sky (cloud+ship)": 2}
    assert len(demo.CHAIN_RULES) == len(demo.CHAIN_POLICY["rules"])
    text = demo.human({"headline": "h", "checks": [], "decisions": dec, "ships": scores,
                       "shadow_iou": 0.8, "stac": "cat.json", "report": {"markdown": "r.md"}, "seconds_total": 1})
    assert "13/13" not in text and "1/2 visible ships found" in text and "shadow IoU 0.800" in text
    assert "kept: ships under clear sky (cloud+ship) 2" in text and "STAC catalogue: cat.json" in text


@pytest.mark.slow
def test_the_demo_bundles_fit_their_budgets_and_pack_into_a_verified_chain(tmp_path):
    """The demo's cloud bundle (its ~100k student, FP16 IR xz-compressed, one reference tile
    holding 4 windows of 28x28) within 250 KB, the ship bundle within 150 KB, and the chain of the
    two verifying step by step: built by the demo's own steps on smaller scenes and 2 training
    steps each (size does not depend on how long they learnt), in a process of its own."""
    pytest.importorskip("torch")
    code = ("import json, sys; from pathlib import Path; from eoedge import demo; "
            "demo.RECIPE['scene_size'] = 256; "
            "print(json.dumps(demo.build_chain(Path(sys.argv[1]), 2, 2, False, True)))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    built = json.loads(out.stdout.strip().splitlines()[-1])
    cloud, ship = built["steps"]["cloud"], built["steps"]["ship"]
    assert cloud["bytes"] <= 250_000 and 90_000 <= cloud["params"] <= 120_000
    assert ship["bytes"] <= 150_000 and ship["params"] <= 25_000
    from shared.bundle import verify_bundle
    from shared.chain import verify_chain_bundle
    pub = tmp_path / "keys" / "uplink.pub"
    v = verify_bundle(cloud["bundle"], pub)
    assert v.manifest["encoding"]["model.xml"] == "xz"
    assert v.manifest["lineage"]["reference_tiles"]["windows_per_tile"] == 4
    assert verify_bundle(ship["bundle"], pub).manifest["postprocess"]["opening_radius"] == 0
    chain = verify_chain_bundle(built["bundle"], pub)
    assert [s["name"] for s in chain["steps"]] == ["cloud", "ship"]
    assert chain["steps"][1]["run_if"] == demo.SHIP_RUN_IF and chain["policy"] == demo.CHAIN_POLICY
    assert chain["classes"] == demo.CLASSES + demo.SHIP_CLASSES
    # the demo's faults uplink bad copies of the chain: a newer version verifies, its corruption not
    from shared.bundle import ChecksumMismatch
    from flight_sim.uplink import corrupt_copy, newer_version_copy
    newer = newer_version_copy(built["bundle"], tmp_path / "newer.tar", tmp_path / "keys" / "uplink.key")
    assert verify_chain_bundle(newer, pub)["version"] == 2
    with pytest.raises(ChecksumMismatch, match="steps/cloud/model.bin"):
        verify_bundle(corrupt_copy(newer, tmp_path / "corrupt.tar"), pub)


def test_demo_help():
    out = subprocess.run([sys.executable, "-m", "eoedge", "demo", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--json" in out.stdout and "--steps" in out.stdout and "--ship-steps" in out.stdout
