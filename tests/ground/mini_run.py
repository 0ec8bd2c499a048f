"""A small run folder as `eoedge ground run` leaves it, on generated imagery (no ../shared/data):
two 6-band scenes found by an absolute glob, a labelled held-out patch, a tiny torch teacher and
an untrained TinyUNet student. Shared by the stage tests."""
from __future__ import annotations

import numpy as np
import tifffile
import torch

from ground.data.normalization import Normalization
from ground.lineage import RunFolder, StageRecord
from ground.models.checkpoints import save_checkpoint
from ground.models.tiny_unet import TinyUNet

# The deployed precision a search or build here is timed at: fp16 where the host computes it (a
# Xeon with AVX-512 FP16), else fp32 (an AVX2 AMD EPYC: ground refuses to time fp16 it cannot run)
def host_precision() -> str:
    from ground.openvino.runtime import capabilities
    return "fp16" if "FP16" in capabilities() else "fp32"


BANDS = ["B02", "B03", "B04", "B08", "B11", "B12"]

SCENES = ("s0.npz", "s1.npz")


def imagery(root) -> None:
    """Two generated 6-band scenes (128 x 256: two 128-tiles each) and a labelled held-out patch
    (images/ + masks/), reflectance 0..0.5 with some structure for the classes to follow."""
    rng = np.random.default_rng(0)
    (root / "scenes").mkdir(parents=True, exist_ok=True)
    for name in SCENES:
        data = rng.uniform(0.02, 0.5, (6, 128, 256)).astype(np.float32)
        data[:, 40:90, 60:200] += 0.3                       # a bright "cloud"
        np.savez(root / "scenes" / name, data=data, bands=np.array(BANDS))
    image = rng.uniform(0.02, 0.5, (6, 128, 256)).astype(np.float32)
    mask = np.zeros((128, 256), np.uint8)
    mask[30:80, 50:150] = 1
    mask[90:110, 160:220] = 2
    image[:, mask == 1] += 0.3
    image[:, mask == 2] *= 0.5
    for folder, array in (("images", image), ("masks", mask)):
        (root / "eval" / folder).mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(root / "eval" / folder / "e0.tif", array, photometric="minisblack")


def make_run(root):
    """A run folder as `eoedge ground run` leaves it: lineage.json with the config, student.pt.
    Its imagery is generated: `scene` sources found by an absolute glob, a labelled patch to score on."""
    imagery(root)
    norm = Normalization(tuple(BANDS), (0.2,) * 6, (0.15,) * 6)
    torch.manual_seed(0)
    teacher = save_checkpoint(root / "teacher.pt", TinyUNet(6, 3, (8, 16)),
                              {"name": "tiny-unet", "in_channels": 6, "num_classes": 3, "options": {"widths": [8, 16]}},
                              norm)
    raw = {"run": {"name": "mini", "out": str(root), "seed": 0, "deliver": "distilled"},
           "data": {"bands": BANDS, "classes": ["clear", "cloud", "shadow"],
                    "unlabelled": [{"source": "scene", "path": str(root / "scenes" / "*.npz")}]},
           # small images keep the test fast: one tile row of imagery
           "eval": {"data": {"source": "patches", "path": str(root / "eval"), "band_names": BANDS},
                    "tile": 128, "overlap": 32},
           "teacher": {"name": f"checkpoint:{teacher}"},
           "student": {"name": "tiny-unet", "widths": [8, 16, 32]},
           "train": {"steps": 2, "batch": 2, "crop": 64, "augment": ["crop"]},
           "experiment": [{"name": "distilled", "mode": "distill", "loss": "kl", "temperature": 2.0}]}
    run = root / "mini"
    folder = RunFolder(run)
    folder.set_config(raw)
    torch.manual_seed(1)
    arch = {"name": "tiny-unet", "in_channels": 6, "num_classes": 3, "options": {"widths": [8, 16, 32]}}
    save_checkpoint(run / "student.pt", TinyUNet(6, 3, (8, 16, 32)), arch, norm)
    folder.add(StageRecord("distill", ["student.pt"], params={"deliver": "distilled"}, label_free=True))
    return run
