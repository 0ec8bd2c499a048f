"""`eoedge demo`'s parts that are cheap to check: its imagery, its ground config and policy, and
its command line. (The whole demo takes minutes: `eoedge demo`.)"""
import json
import subprocess
import sys

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


@pytest.mark.slow
def test_the_demo_bundle_fits_250_kb_with_its_reference(tmp_path):
    """The demo's bundle (its ~100k student, FP16 IR xz-compressed, one reference tile holding 4
    windows of 28x28) within 250 KB: built by the demo's own steps 2-5 on smaller scenes and 2
    distillation steps (size does not depend on how long it learnt), in a process of its own."""
    pytest.importorskip("torch")
    code = ("import json, sys; from pathlib import Path; from eoedge import demo; "
            "demo.RECIPE['scene_size'] = 256; "
            "print(json.dumps(demo.build_bundle(Path(sys.argv[1]), 2, True)))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    built = json.loads(out.stdout.strip().splitlines()[-1])
    assert built["bytes"] <= 250_000 and 90_000 <= built["params"] <= 120_000
    from shared.bundle import verify_bundle
    v = verify_bundle(built["bundle"], tmp_path / "keys" / "uplink.pub")
    assert v.manifest["encoding"]["model.xml"] == "xz"
    assert v.manifest["lineage"]["reference_tiles"]["windows_per_tile"] == 4


def test_demo_help():
    out = subprocess.run([sys.executable, "-m", "eoedge", "demo", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--json" in out.stdout and "--steps" in out.stdout
