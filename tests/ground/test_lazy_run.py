"""`eoedge ground run` over imagery at archive scale: a `scenes` data source (GeoTIFF patches on
disk, read lazily by window) drives a small run from its config, with normalisation and class
weights from sampled windows, a validation split by scene, and the teacher's probabilities stored
once per scene. Every byte GDAL reads is counted (rasterio's opener, as in test_lazy_dataset.py)."""
from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from ground.config import load_config
from ground.data.normalization import Normalization
from ground.errors import ConfigError
from ground.models.checkpoints import build_arch, save_checkpoint
from ground.stages.distill import distill
from test_lazy_dataset import CountingOpener      # noqa: E402

BANDS = ["B02", "B03", "B04", "B08"]
SIZE, BLOCK, SCENES = 1024, 64, 6
pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = """
    [run]
    name = "{name}"
    out = "runs"
    cache = "cache"
    deliver = "distilled"

    [data]
    bands = ["B02", "B03", "B04", "B08"]
    classes = ["dark", "bright"]
    labelled = [{{ source = "scenes", layout = "patches", path = "archive", scale = 1e-4, windows = 4, window = 128 }}]

    [eval]
    calibrate = "none"
    tile = 128
    overlap = 32

    [teacher]
    name = "checkpoint:teacher.pt"

    [student]
    params = "20k"

    [train]
    steps = 4
    batch = 4
    crop = 64
    augment = ["flip", "crop"]
    device = "cpu"
    val_every = 2
    validation = ["s5"]

    [[experiment]]
    name = "scratch"
    mode = "labels"

    [[experiment]]
    name = "distilled"
    loss = "kl"
"""


def _tif(path, data, tiled=True) -> None:
    with rasterio.open(path, "w", driver="GTiff", width=SIZE, height=SIZE, count=data.shape[0], dtype=data.dtype,
                       tiled=tiled, blockxsize=BLOCK, blockysize=BLOCK, crs="EPSG:32633",
                       transform=from_origin(500000, 5000000, 10, 10)) as ds:
        ds.write(data)
        if data.shape[0] == len(BANDS):
            ds.descriptions = tuple(BANDS)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Six 1024x1024 4-band patches with masks (bright squares = class 1) and a small torch teacher."""
    root = tmp_path_factory.mktemp("lazy-run")
    for sub in ("images", "masks"):
        (root / "archive" / sub).mkdir(parents=True)
    for i in range(SCENES):
        rng = np.random.default_rng(i)
        data = rng.integers(500, 3000, (len(BANDS), SIZE, SIZE), dtype=np.uint16)
        mask = np.zeros((1, SIZE, SIZE), np.uint8)
        for r, c in rng.integers(0, SIZE - 40, (30, 2)):
            data[:, r:r + 40, c:c + 40] += 5000
            mask[0, r:r + 40, c:c + 40] = 1
        _tif(root / "archive" / "images" / f"s{i}.tif", data)
        _tif(root / "archive" / "masks" / f"s{i}.tif", mask)
    arch = {"name": "tiny-unet", "in_channels": 4, "num_classes": 2, "options": {"widths": [4, 8]}}
    save_checkpoint(root / "teacher.pt", build_arch(arch), arch,
                    Normalization(tuple(BANDS), (0.3,) * 4, (0.2,) * 4), meta={"name": "tiny-teacher"})
    return root


@pytest.fixture
def counted(monkeypatch):
    """Every rasterio.open of the process reads through a CountingOpener."""
    opener, real = CountingOpener(), rasterio.open

    def open_counted(path, *args, opener_=None, **kw):
        kw["opener"] = kw.get("opener") or opener
        return real(path, *args, **kw)
    monkeypatch.setattr(rasterio, "open", open_counted)
    return opener


def _scene_bytes(opener: CountingOpener, names) -> int:
    return sum(n for p, n in opener.bytes.items() if os.path.basename(p) in {f"{s}.tif" for s in names}
               and "images" in p)


def _run(project, name: str, only: list[str]):
    (project / f"{name}.toml").write_text(textwrap.dedent(CONFIG.format(name=name)))
    cwd = os.getcwd()
    os.chdir(project)
    try:
        return distill(load_config(project / f"{name}.toml"), progress=False, only=only)
    finally:
        os.chdir(cwd)


def test_a_run_from_a_config_reads_only_windows_of_the_scenes(project, counted):
    report = _run(project, "labels", ["scratch"])
    trained = report["results"]["scratch"]["train"]["samples"]
    assert sorted(trained) == [f"s{i}" for i in range(SCENES - 1)]          # s5 is the validation scene
    history = report["histories"]["scratch"]
    assert [h["step"] for h in history if "val" in h] == [2, 4]
    on_disk = sum(os.path.getsize(project / "archive" / "images" / f"s{i}.tif") for i in range(SCENES - 1))
    read = _scene_bytes(counted, trained)
    # 4 normalisation windows of 128 px and 16 crops of 64 px (each touching at most 9 and 4 blocks
    # of 64 px), plus a header per file: nowhere near the scenes
    block = BLOCK * BLOCK * 2 * len(BANDS)
    assert 0 < read <= (4 * 9 + 16 * 4) * block + SCENES * 16 * 1024, read
    assert read < on_disk / 10
    norm = report["normalization"]
    assert norm["bands"] == BANDS and all(0.05 < m < 0.6 for m in norm["mean"])   # from the windows, scaled


def test_the_teacher_labels_each_scene_once_then_runs_read_windows(project, counted):
    first = _run(project, "distilled-1", ["distilled"])
    stored = list((project / "cache").rglob("*.npy"))
    assert len([p for p in stored if p.stat().st_size > SIZE * SIZE * 2 * 2]) == SCENES   # one per scene, (2, H, W)
    assert _scene_bytes(counted, [f"s{i}" for i in range(SCENES)]) > 0
    counted.bytes.clear()
    second = _run(project, "distilled-2", ["distilled"])                  # the same teacher: stored
    assert len(list((project / "cache").rglob("*.npy"))) == len(stored)
    trained = second["results"]["distilled"]["train"]["samples"]
    on_disk = sum(os.path.getsize(project / "archive" / "images" / f"{s}.tif") for s in trained)
    assert _scene_bytes(counted, trained) < on_disk / 10
    assert first["deliver"] == second["deliver"] == "distilled"
    assert (project / "runs" / "distilled-2" / "student.pt").exists()


def test_scene_sources_do_not_mix_with_in_memory_ones(project):
    text = textwrap.dedent(CONFIG.format(name="mixed")).replace(
        'labelled = [', 'unlabelled = [{ source = "ukis", rows = [0, 64] }]\nlabelled = [')
    (project / "mixed.toml").write_text(text)
    with pytest.raises(ConfigError, match="scenes"):
        load_config(project / "mixed.toml")
