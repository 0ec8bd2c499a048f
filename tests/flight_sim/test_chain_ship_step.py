"""The harbour chain's ship step: configs/ships.toml trains on the named harbours only and scores
the held-out one (Genoa), which no training crop, calibration or threshold ever reads. And the
cloudy harbour the chain flies: the real harbour's place and ships, a generated sky.

The training runs `ground` in a child process (torch stays out of this pytest worker, which
compiles OpenVINO models for the flight tests)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared.datasets import DataMissing, load_ships_port

REPO = Path(__file__).resolve().parents[2]

TINY_RUN = """
import json, sys
from ground.config import load_config
from ground.data.normalization import Normalization
from ground.models.checkpoints import save_checkpoint
from ground.models.registry import build_student
from ground.stages.distill import distill
# a tiny stand-in teacher (only the report's teacher row reads it; the student learns the labels)
arch = {"name": "tiny-unet", "in_channels": 5, "num_classes": 2, "options": {"widths": [2, 4, 8, 16]}}
teacher = save_checkpoint(sys.argv[2] + "/teacher.pt", build_student("tiny-unet", 5, 2, widths=[2, 4, 8, 16]),
                          arch, Normalization(("B02", "B03", "B04", "B08", "B11"), (0.1,) * 5, (0.1,) * 5))
cfg = load_config(sys.argv[1], {"run.out": sys.argv[2], "run.cache": sys.argv[2] + "/cache",
                                "teacher.name": "checkpoint:" + str(teacher),
                                "train.steps": 2, "train.batch": 2, "train.crop": 32,
                                "student.params": "5k"})
report = distill(cfg, progress=False)
print(json.dumps({"eval": report["eval"], "classes": report["classes"], "bands": report["bands"],
                  "trained_on": report["results"]["scratch"]["train"]["samples"],
                  "calibrated_on": report["results"]["scratch"]["calibrated_on"],
                  "iou": report["results"]["scratch"]["vs_labels"]["per_class"], "run_dir": report["run_dir"]}))
"""


@pytest.fixture(scope="module")
def harbours():
    try:
        load_ships_port("honolulu")
    except DataMissing as exc:
        pytest.skip(f"the sen2ships harbours are not here: {exc}")


def test_ship_config_trains_without_the_held_out_harbour(harbours, tmp_path):
    proc = subprocess.run([sys.executable, "-c", TINY_RUN, str(REPO / "configs" / "ships.toml"), str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["trained_on"] == ["casablanca", "busan", "algiers", "cartagena"]
    assert "genoa" not in out["trained_on"] and out["eval"] == "genoa"
    assert out["classes"] == ["background", "ship"] and out["bands"] == ["B02", "B03", "B04", "B08", "B11"]
    assert set(out["iou"]) == {"background", "ship"}              # scored on Genoa's hand-drawn vessels
    assert (Path(out["run_dir"]) / "student.pt").is_file()


def test_cloudy_harbour_keeps_the_harbour_place_and_its_visible_ships(harbours):
    from flight_sim.generator import CLASSES
    from flight_sim.harbour import cloudy_harbour
    clear, instances, _ = load_ships_port("honolulu")
    h = cloudy_harbour("honolulu", seed=4, cloud_cover=0.4)   # a sky that casts shadows on the chip
    assert h.scene.georef == clear.georef and h.scene.bands == clear.bands
    cloud = h.truth == CLASSES.index("cloud")
    assert 0.15 < cloud.mean() < 0.65                              # about the cover asked for (a small chip)
    assert (h.shadow >= 0.5).any()
    assert (h.shadow[h.truth == CLASSES.index("shadow")] >= 0.5).all()   # shadow truth: only where cast
    # a vessel is a target where the sky is clear, never under cloud
    assert np.array_equal(h.ships > 0, (instances > 0) & ~cloud)
    assert np.array_equal(h.truth == CLASSES.index("ship"), h.ships > 0)
    # clear pixels outside any shadow are the real harbour's, untouched
    untouched = (h.cloud_opacity == 0) & (h.shadow == 0)
    assert untouched.any() and np.allclose(h.scene.data[:, untouched], clear.data[:, untouched])
    # under thick cloud the scene is cloud-bright; in full shadow darker than the clear harbour
    thick = h.cloud_opacity > 0.9
    assert np.median(h.scene.band("B08")[thick]) > 0.3
    dark = (h.shadow > 0.5) & (h.cloud_opacity < 0.05)
    assert dark.any() and np.median(h.scene.band("B08")[dark]) < np.median(clear.band("B08")[dark])


def test_a_harbour_scene_names_what_is_wrong():
    from flight_sim.errors import SceneSpecError
    from flight_sim.scenes import check_scene_spec
    with pytest.raises(SceneSpecError, match=r"scenes\[0\]\.port"):
        check_scene_spec({"kind": "harbour", "seed": 1})
    with pytest.raises(SceneSpecError, match=r"scenes\[0\]\.cloud: unknown key"):
        check_scene_spec({"kind": "harbour", "port": "genoa", "cloud": 0.4})
