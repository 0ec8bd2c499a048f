"""`eoedge demo`'s parts that are cheap to check: its imagery, its ground config and policy, and
its command line. (The whole demo takes minutes: `eoedge demo`.)"""
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
    reference tiles) from the generated scenes alone."""
    scenes = demo.write_training_scenes(tmp_path / "scenes", 64)
    cfg = demo.ground_config(tmp_path, scenes, steps=5)
    assert [s["source"] for s in cfg["data"]["unlabelled"]] == ["scene"] * len(scenes)
    assert [s["path"] for s in cfg["data"]["unlabelled"]] == [str(p) for p in scenes]
    assert not cfg["data"].get("labelled") and "data" not in cfg["eval"]


def test_ground_config_and_policy_are_valid(tmp_path):
    pytest.importorskip("torch")
    from ground.config import parse_config
    from shared.policy import validate_policy
    cfg = parse_config(demo.ground_config(tmp_path, [tmp_path / "a.npz"], steps=5))
    assert cfg.bands == demo.TEACHER_BANDS and cfg.classes == demo.CLASSES
    assert cfg.experiments[0].mode == "distill" and cfg.train.steps == 5
    validate_policy(demo.POLICY, demo.CLASSES)


def test_demo_help():
    out = subprocess.run([sys.executable, "-m", "eoedge", "demo", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--json" in out.stdout and "--steps" in out.stdout
