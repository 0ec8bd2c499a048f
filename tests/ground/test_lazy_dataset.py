"""Lazy imagery (ground.data.lazy): crops read by window from many scene files through rasterio,
counted at the byte level through rasterio's `opener` (every byte GDAL reads passes through a
Python file object here): sampling crops never reads more than the windows sampled."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from ground.data.lazy import (ProbsStore, SceneBatches, SceneCrops, find_scenes, read_window, Readers,
                              split_by_scene, validation_score)
from ground.data.normalization import Normalization
from ground.errors import DataError
from ground.training.config import TrainConfig
from ground.training.loop import fit
from ground.training.losses import build_objective

BANDS = ["B02", "B03", "B04", "B08"]
SIZE, BLOCK, SCENES = 1024, 128, 12


class CountingOpener:
    """rasterio opener: the file objects GDAL reads through; counts bytes and read calls per file."""

    def __init__(self):
        self.bytes: dict[str, int] = {}
        self.reads = 0

    def __call__(self, path, mode="rb"):
        f = open(path, mode)
        counter = self

        class Counted(io.RawIOBase):
            def readable(self):
                return True

            def seekable(self):
                return True

            def seek(self, *a):
                return f.seek(*a)

            def tell(self):
                return f.tell()

            def read(self, n=-1):
                data = f.read(n)
                counter.bytes[str(path)] = counter.bytes.get(str(path), 0) + len(data)
                counter.reads += 1
                return data

            def readinto(self, b):
                data = self.read(len(b))
                b[:len(data)] = data
                return len(data)

            def close(self):
                f.close()
                super().close()
        return Counted()

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


def write_scene(path, seed: int, labels: bool = False) -> None:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 10000, (len(BANDS), SIZE, SIZE), dtype=np.uint16)
    with rasterio.open(path, "w", driver="GTiff", width=SIZE, height=SIZE, count=len(BANDS), dtype="uint16",
                       tiled=True, blockxsize=BLOCK, blockysize=BLOCK, crs="EPSG:32633",
                       transform=from_origin(500000, 5000000, 10, 10)) as ds:
        ds.write(data)
        ds.descriptions = tuple(BANDS)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    for i in range(SCENES):
        write_scene(root / f"scene_{i:02d}.tif", i)
    return root


def test_sampled_crops_read_only_their_windows(archive):
    scenes = find_scenes({"layout": "geotiff", "path": str(archive / "*.tif"), "scale": 1e-4}, BANDS)
    assert len(scenes) == SCENES and all((s.height, s.width) == (SIZE, SIZE) for s in scenes)
    opener = CountingOpener()
    crops = SceneCrops(scenes, crop=64, augment=("flip",), opener=opener)
    n = 20
    for j in range(n):
        x, p, y = crops[(7, j)]
        assert x.shape == (4, 64, 64) and x.dtype == np.float32 and p.size == 0 and (y == 255).all()
        assert 0 <= x.min() and x.max() <= 1.0
    on_disk = sum(os.path.getsize(archive / f"scene_{i:02d}.tif") for i in range(SCENES))
    # each window reads the 128x128 blocks it touches (all bands: pixel-interleaved) and nothing
    # else; a file's header (IFD, tile offsets) is read once when it is opened
    block_bytes = BLOCK * BLOCK * 2 * len(BANDS)
    touched = sum(len(range(r // BLOCK, (r + h - 1) // BLOCK + 1)) * len(range(c // BLOCK, (c + w - 1) // BLOCK + 1))
                  for _, r, c, h, w in crops.windows)
    header = 16 * 1024
    bound = touched * block_bytes + len(opener.bytes) * header
    assert 0 < opener.total <= bound, (opener.total, bound)
    assert opener.total < on_disk / 10, (opener.total, on_disk)      # nowhere near whole scenes
    assert len(crops.windows) == n
    # and what was read is the right data: one window against the whole band read directly
    name, r, c, h, w = crops.windows[0]
    with rasterio.open(archive / f"{name}.tif") as ds:
        full = ds.read(window=rasterio.windows.Window(c, r, w, h)).astype(np.float32) * np.float32(1e-4)
    scene = next(s for s in scenes if s.name == name)
    np.testing.assert_allclose(read_window(scene, Readers(), r, c, h, w), full)


def test_crops_do_not_depend_on_workers_or_ranks(archive):
    scenes = find_scenes({"layout": "geotiff", "path": str(archive / "scene_0[0-3].tif")}, BANDS)
    ds = SceneCrops(scenes, crop=32, augment=("flip", "rot90"))
    one = SceneBatches(ds, batch=4, seed=5)()
    two = SceneBatches(SceneCrops(scenes, crop=32, augment=("flip", "rot90")), batch=4, seed=5, workers=2)()
    torch.testing.assert_close(one[0], two[0])

    class Rank:
        def __init__(self, rank):
            self.rank, self.world_size = rank, 2
    halves = [SceneBatches(ds, batch=4, seed=5, ctx=Rank(r))()[0] for r in (0, 1)]
    torch.testing.assert_close(torch.cat(halves), one[0])
    # a resumed run reads the crops of the step it resumes at
    b = SceneBatches(ds, batch=4, seed=5)
    b()
    second = b()[0]
    b.seek(1)
    torch.testing.assert_close(b()[0], second)


def test_split_is_by_scene(archive):
    scenes = find_scenes({"layout": "geotiff", "path": str(archive / "*.tif")}, BANDS)
    train, val = split_by_scene(scenes, 0.25, seed=0)
    assert len(val) == 3 and len(train) == SCENES - 3
    assert not {s.name for s in train} & {s.name for s in val}
    train, val = split_by_scene(scenes, ["scene_00"])
    assert [s.name for s in val] == ["scene_00"]
    with pytest.raises(DataError, match="scene_99"):
        split_by_scene(scenes, ["scene_99"])


def test_band_folder_with_a_coarser_band(tmp_path):
    """A folder of single-band files (SAFE-like): the 20 m band is resampled onto the 10 m grid in the read."""
    folder = tmp_path / "S2_scene"
    folder.mkdir()
    for band, size in (("B02", 256), ("B03", 256), ("B11", 128)):
        with rasterio.open(folder / f"T33_{band}.tif", "w", driver="GTiff", width=size, height=size, count=1,
                           dtype="uint16") as ds:
            ds.write(np.full((1, size, size), 1000 if band != "B11" else 3000, np.uint16))
    (scene,) = find_scenes({"layout": "band-folder", "path": str(folder), "scale": 1e-4}, ["B02", "B11"])
    assert (scene.height, scene.width) == (256, 256)
    x = read_window(scene, Readers(), 100, 40, 32, 32)
    assert x.shape == (2, 32, 32)
    np.testing.assert_allclose(x[1], 0.3, atol=1e-6)
    with pytest.raises(DataError, match="B12"):
        find_scenes({"layout": "band-folder", "path": str(folder)}, ["B12"])


class TinyTeacher:
    """A stand-in teacher: class 1 where B02 is bright (probabilities from a sigmoid)."""
    name, num_classes, overlap, identity = "tiny", 2, 8, "tiny-teacher-v1"

    def __init__(self):
        self.calls = []

    def predict_proba(self, image):
        self.calls.append(image.shape)
        p1 = 1 / (1 + np.exp(-(image[0] - 0.5) * 20))
        return np.stack([1 - p1, p1]).astype(np.float32)


def test_teacher_store_fills_by_block_and_distillation_trains(archive, tmp_path):
    scenes = find_scenes({"layout": "geotiff", "path": str(archive / "scene_0[0-2].tif"), "scale": 1e-4}, BANDS)
    teacher = TinyTeacher()
    store = ProbsStore(tmp_path / "cache", teacher, block=256).fill(scenes)
    # never the whole scene: blocks of 256 plus the teacher's overlap on each side
    assert max(h * w for _, h, w in teacher.calls) <= (256 + 16) ** 2
    calls = len(teacher.calls)
    ProbsStore(tmp_path / "cache", teacher, block=256).fill(scenes)       # filled once: cached
    assert len(teacher.calls) == calls
    x = read_window(scenes[0], Readers(), 300, 500, 16, 16)
    np.testing.assert_allclose(store.window(scenes[0], 300, 500, 16, 16), teacher.predict_proba(x), atol=2e-3)

    train, val = split_by_scene(scenes, ["scene_00"])
    cfg = TrainConfig(steps=6, batch=4, crop=32, lr=1e-2, device="cpu", precision="fp32", log_every=1,
                      val_every=2, patience=0, checkpoint_every=6)
    batches = SceneBatches(SceneCrops(train, 32, probs=store), 4, seed=0, workers=1)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
    norm = Normalization(tuple(BANDS), (0.5,) * 4, (0.29,) * 4)
    history = fit(model, batches, build_objective("kl", temperature=1.0), norm, cfg, progress=False,
                  checkpoint=tmp_path / "s.pt", arch={"name": "test"},
                  validate=lambda m: validation_score(m, val, norm, crop=32, n=2, probs=store))
    assert [h["step"] for h in history if "val" in h] == [2, 4, 6]
    assert (tmp_path / "s.best.pt").exists()
