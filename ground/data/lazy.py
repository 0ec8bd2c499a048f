"""Imagery at archive scale: random crops read lazily from many large scenes on disk, never a whole
scene in memory, through a torch DataLoader with worker processes.

A scene on disk is a list of band files (one band of one file each, in the run's band order) on a
grid: multi-band GeoTIFFs/COGs, a folder of single-band files, a SAFE product (JPEG 2000 bands under
GRANULE/*/IMG_DATA), or a patch dataset (images/ + masks/). Crops are windowed reads through rasterio
(GDAL: COG tiles, JPEG 2000 and deflate alike, and coarser bands resampled onto the finest grid
inside the read), so what is read is what is sampled.

    scenes = find_scenes({"layout": "safe", "path": "archive/*.SAFE"}, bands)
    train, val = split_by_scene(scenes, 0.1)        # validation by scene, never by crop
    batches = SceneBatches(train, cfg, distributed, probs=ProbsStore(cache, teacher).fill(train, ctx))
    fit(model, batches, objective, norm, cfg)        # batches() -> (x, teacher probs | None, labels)

Crop `j` of global batch `n` comes from a generator seeded with (seed, n, j): every rank of a DDP run
reads only its share of the batch, the crops do not depend on the number of workers or ranks, and a
resumed run (`seek(step)`) reads the crops it would have read.
"""
from __future__ import annotations

import glob
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from shared.bands import band_from_filename, canonical_band
from shared.hashing import sha256_file
from ground.data.augment import dihedral, transforms_for
from ground.data.sample import IGNORE
from ground.errors import DataError

LAYOUTS = ("geotiff", "band-folder", "safe", "patches")
RASTER_SUFFIXES = (".tif", ".tiff", ".jp2")


@dataclass
class BandRef:
    path: str
    index: int = 1                   # 1-based band of the file (rasterio's numbering)


@dataclass
class SceneOnDisk:
    name: str
    bands: list[BandRef]             # in the run's band order
    height: int                      # the grid crops are cut on: the finest band's
    width: int
    scale: float = 1.0               # file values x scale = reflectance
    labels: BandRef | None = None
    files: list[str] = field(default_factory=list)

    def digest(self) -> str:
        """Names the scene in the teacher cache: the band files' content, order and scale."""
        h = hashlib.sha256(f"{self.height}x{self.width}:{self.scale}".encode())
        for b in self.bands:
            h.update(f"{sha256_file(Path(b.path))}:{b.index}".encode())
        return h.hexdigest()


def _rio():
    import rasterio          # GDAL's windowed reads (COG, JPEG 2000); imported where used (optional)
    return rasterio


def _shape(path: str, opener=None) -> tuple[int, int]:
    with _rio().open(path, opener=opener) as ds:
        return ds.height, ds.width


def _named_files(paths: list[str], where: str) -> dict[str, str]:
    """{band: file} of single-band files with a band name in the file name; the finest kept."""
    out: dict[str, str] = {}
    for p in sorted(paths, key=lambda p: ("20m" in p, "60m" in p, p)):      # SAFE L2A: R10m first
        band = band_from_filename(Path(p).stem)
        if band is not None and band not in out:
            out[band] = p
    if not out:
        raise DataError(f"{where}: no band files (a band name such as B04 in a .tif/.jp2 file name)")
    return out


def _scene_from_band_files(name: str, files: dict[str, str], bands, scale: float, where: str) -> SceneOnDisk:
    missing = [b for b in bands if b not in files]
    if missing:
        raise DataError(f"{where}: band(s) {missing} missing; found {sorted(files)}")
    shapes = [_shape(files[b]) for b in bands]
    h, w = max(s[0] for s in shapes), max(s[1] for s in shapes)
    return SceneOnDisk(name, [BandRef(files[b]) for b in bands], h, w, scale, files=[files[b] for b in bands])


def _geotiff(path: str, bands, scale: float, file_bands=None, labels: str | None = None) -> SceneOnDisk:
    """One multi-band GeoTIFF/COG; band names from its descriptions (GDAL) or `file_bands`."""
    with _rio().open(path) as ds:
        names = list(file_bands) if file_bands else [d for d in ds.descriptions]
        h, w, count = ds.height, ds.width, ds.count
    try:
        names = [canonical_band(n) for n in names]
    except (TypeError, ValueError):
        raise DataError(f"{path}: its bands have no names; give file_bands = [...] in the data table") from None
    if len(names) != count:
        raise DataError(f"{path}: {count} bands but {len(names)} band names")
    missing = [b for b in bands if b not in names]
    if missing:
        raise DataError(f"{path}: band(s) {missing} missing; it has {names}")
    return SceneOnDisk(Path(path).stem, [BandRef(path, names.index(b) + 1) for b in bands], h, w, scale,
                       BandRef(labels) if labels else None, [path] + ([labels] if labels else []))


def _glob(pattern: str) -> list[str]:
    paths = sorted(glob.glob(pattern)) if any(ch in pattern for ch in "*?[") else [pattern]
    paths = [p for p in paths if Path(p).exists()]
    if not paths:
        raise FileNotFoundError(f"lazy imagery: nothing matches {pattern!r}")
    return paths


def find_scenes(spec: dict, bands) -> list[SceneOnDisk]:
    """The scenes a data table names: {layout, path (a glob), scale, file_bands}. Opens file headers only."""
    layout = spec.get("layout", "geotiff")
    if layout not in LAYOUTS:
        raise DataError(f"lazy imagery: layout {layout!r} unknown; known: {LAYOUTS}")
    if "path" not in spec:
        raise DataError(f"lazy imagery ({layout}): a path (glob) is required")
    bands = tuple(canonical_band(b) for b in bands)
    scale = float(spec.get("scale", 1.0))
    pattern = str(spec["path"])
    if layout == "geotiff":
        return [_geotiff(p, bands, scale, spec.get("file_bands")) for p in _glob(pattern)]
    if layout == "band-folder":
        return [_scene_from_band_files(Path(d).name, _named_files(
            [str(p) for p in Path(d).iterdir() if p.suffix.lower() in RASTER_SUFFIXES], d), bands, scale, d)
            for d in _glob(pattern)]
    if layout == "safe":
        return [_scene_from_band_files(Path(d).stem, _named_files(
            glob.glob(str(Path(d) / "GRANULE" / "*" / "IMG_DATA" / "**" / "*.jp2"), recursive=True), d),
            bands, scale, d) for d in _glob(pattern)]
    out = []                           # patches: images/NAME.tif with masks/NAME.tif (same stem)
    for d in _glob(pattern):
        for img in sorted((Path(d) / "images").glob("*.tif*")):
            mask = Path(d) / "masks" / img.name
            out.append(_geotiff(str(img), bands, scale, spec.get("file_bands"),
                                str(mask) if mask.exists() else None))
    if not out:
        raise DataError(f"lazy imagery (patches): no images/*.tif under {pattern!r}")
    return out


def sample_windows(scenes: list[SceneOnDisk], n: int, size: int, seed: int = 0,
                   readers: Readers | None = None) -> list[tuple[SceneOnDisk, int, int, int, int, np.ndarray]]:
    """`n` windows of `size` px (at least one per scene when n >= scenes), drawn in proportion to
    the scenes' area from a generator seeded with `seed`: (scene, r, c, h, w, image (C, h, w))."""
    if not scenes:
        raise DataError("lazy imagery: no scenes")
    readers = readers or Readers()
    rng = np.random.default_rng([int(seed), 17])
    area = np.array([s.height * s.width for s in scenes], np.float64)
    order = list(range(len(scenes)))[:n] if n >= len(scenes) else []
    order += [int(i) for i in rng.choice(len(scenes), n - len(order), p=area / area.sum())]
    out = []
    for i in order:
        s = scenes[i]
        h, w = min(size, s.height), min(size, s.width)
        r, c = int(rng.integers(0, s.height - h + 1)), int(rng.integers(0, s.width - w + 1))
        out.append((s, r, c, h, w, read_window(s, readers, r, c, h, w)))
    return out


def split_by_scene(scenes: list, val, seed: int = 0) -> tuple[list, list]:
    """(train, validation) scenes (anything with a `.name`: scenes on disk, in-memory samples):
    `val` is a fraction of the scenes (at least one when > 0) or a list of scene names. Whole
    scenes go to one side: no crop of a validation scene is trained on."""
    if isinstance(val, (list, tuple)):
        unknown = set(val) - {s.name for s in scenes}
        if unknown:
            raise DataError(f"validation scenes {sorted(unknown)} not among {[s.name for s in scenes]}")
        held = set(val)
    else:
        n = int(round(float(val) * len(scenes))) or (1 if float(val) > 0 else 0)
        if n and n >= len(scenes):
            raise DataError(f"validation split {val}: {len(scenes)} scene(s) leave none to train on")
        order = np.random.default_rng(seed).permutation(len(scenes))
        held = {scenes[i].name for i in order[:n]}
    return [s for s in scenes if s.name not in held], [s for s in scenes if s.name in held]


class Readers:
    """Open datasets, one per file and per process (rasterio handles do not cross process
    boundaries: each DataLoader worker opens its own). `opener` is rasterio's (tests count bytes)."""

    def __init__(self, opener=None):
        self.opener = opener
        self._open: dict[str, object] = {}

    def __getstate__(self):
        return {"opener": self.opener, "_open": {}}

    def get(self, path: str):
        ds = self._open.get(path)
        if ds is None:
            ds = self._open[path] = _rio().open(path, opener=self.opener)
        return ds

    def window(self, ref: BandRef, grid: tuple[int, int], r: int, c: int, h: int, w: int) -> np.ndarray:
        """Rows r..r+h, cols c..c+w of the scene grid from one band, resampled when the file is coarser."""
        rio = _rio()
        ds = self.get(ref.path)
        fy, fx = ds.height / grid[0], ds.width / grid[1]
        win = rio.windows.Window(c * fx, r * fy, w * fx, h * fy)
        same = fy == 1 and fx == 1
        return ds.read(ref.index, window=win, out_shape=(h, w),
                       resampling=rio.enums.Resampling.nearest if same else rio.enums.Resampling.bilinear)


def read_window(scene: SceneOnDisk, readers: Readers, r: int, c: int, h: int, w: int) -> np.ndarray:
    """(bands, h, w) float32 reflectance of one window of a scene."""
    grid = (scene.height, scene.width)
    out = np.stack([readers.window(b, grid, r, c, h, w) for b in scene.bands]).astype(np.float32)
    out *= np.float32(scene.scale)
    return np.nan_to_num(out, nan=0.0)


class ProbsStore:
    """The teacher's probabilities of whole scenes on disk, keyed as ground.teachers.cache keys them
    (teacher identity, scene content, transform 0), as (K, H, W) float16 .npy files read by window
    (memory-mapped). Filled once, block by block (a scene is never held whole), each rank filling
    its share of the scenes under DDP."""

    def __init__(self, root: str | Path, teacher, block: int = 1024):
        self.root = Path(root)
        self.teacher, self.block = teacher, int(block)
        self._teacher_key = hashlib.sha256(teacher.identity.encode()).hexdigest()[:16]
        self._paths: dict[str, Path] = {}

    def path_for(self, scene: SceneOnDisk) -> Path:
        if scene.name not in self._paths:
            key = hashlib.sha256(f"{self._teacher_key}:{scene.digest()}:0".encode()).hexdigest()[:32]
            self._paths[scene.name] = self.root / self._teacher_key / f"{key}.npy"
        return self._paths[scene.name]

    def fill(self, scenes: list[SceneOnDisk], ctx=None, readers: Readers | None = None,
             progress: bool = False) -> "ProbsStore":
        readers = readers or Readers()
        rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
        mine = [s for i, s in enumerate(scenes) if i % world == rank and not self.path_for(s).exists()]
        for s in tqdm(mine, desc="teacher labels (scenes)", disable=not progress, leave=False):
            self._label(s, readers)
        if ctx is not None:
            ctx.barrier()
        return self

    def _label(self, scene: SceneOnDisk, readers: Readers) -> None:
        path = self.path_for(scene)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npy")
        K = self.teacher.num_classes
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(K, scene.height, scene.width))
        m = int(getattr(self.teacher, "overlap", 64))            # context around each block
        for r in range(0, scene.height, self.block):
            for c in range(0, scene.width, self.block):
                r0, c0 = max(r - m, 0), max(c - m, 0)
                r1, c1 = min(r + self.block + m, scene.height), min(c + self.block + m, scene.width)
                probs = self.teacher.predict_proba(read_window(scene, readers, r0, c0, r1 - r0, c1 - c0))
                h, w = min(self.block, scene.height - r), min(self.block, scene.width - c)
                out[:, r:r + h, c:c + w] = probs[:, r - r0:r - r0 + h, c - c0:c - c0 + w]
        out.flush()
        del out
        tmp.replace(path)

    def window(self, scene: SceneOnDisk, r: int, c: int, h: int, w: int) -> np.ndarray:
        return np.asarray(np.load(self.path_for(scene), mmap_mode="r")[:, r:r + h, c:c + w], np.float32)


class SceneCrops(Dataset):
    """Item (base, j) -> one random crop: (x (C, s, s) float32, teacher probs (K, s, s) or (0,), labels
    (s, s) int64, IGNORE where none), from a generator seeded with (base, j). Scenes are drawn in
    proportion to their area (every pixel equally likely), then a window and a D4 view."""

    def __init__(self, scenes: list[SceneOnDisk], crop: int, augment=("flip", "rot90"),
                 probs: ProbsStore | None = None, opener=None):
        if not scenes:
            raise DataError("lazy imagery: no scenes")
        self.scenes, self.crop, self.probs = list(scenes), int(crop), probs
        self.transforms = transforms_for(list(augment))
        area = np.array([s.height * s.width for s in scenes], np.float64)
        self.p = area / area.sum()
        self.readers = Readers(opener)
        self.windows: list[tuple[str, int, int, int, int]] = []     # what was read (this process)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, key):
        base, j = key
        rng = np.random.default_rng([int(base), int(j)])
        s = self.scenes[int(rng.choice(len(self.scenes), p=self.p))]
        size = self.crop
        h, w = min(size, s.height), min(size, s.width)
        r = int(rng.integers(0, s.height - h + 1))
        c = int(rng.integers(0, s.width - w + 1))
        k = int(rng.choice(self.transforms))
        self.windows.append((s.name, r, c, h, w))
        arrays = [read_window(s, self.readers, r, c, h, w)]
        labels = (self.readers.window(s.labels, (s.height, s.width), r, c, h, w).astype(np.int64)
                  if s.labels is not None else np.full((h, w), IGNORE, np.int64))
        arrays.append(labels)
        if self.probs is not None:
            arrays.append(self.probs.window(s, r, c, h, w))
        if (h, w) != (size, size):     # a scene smaller than the crop: mirrored, as random_crop pads
            arrays = [np.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, size - h), (0, size - w)], mode="symmetric")
                      for a in arrays]
        arrays = [dihedral(a, k) for a in arrays]
        p = arrays[2] if self.probs is not None else np.zeros((0,), np.float32)
        return arrays[0], p, arrays[1]


class GlobalBatches:
    """Batch sampler: for batch n = start, start+1, ... the keys (base_n, j) of this rank's share j of
    the global batch (base_n from (seed, n)); endless (the trainer counts steps)."""

    def __init__(self, batch: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        if batch % world:
            raise DataError(f"train.batch {batch} must divide evenly over {world} processes")
        self.batch, self.seed, self.start = batch, seed, start
        n = batch // world
        self.share = range(rank * n, (rank + 1) * n)

    def __iter__(self):
        n = self.start
        while True:
            base = int.from_bytes(hashlib.sha256(f"{self.seed}:{n}".encode()).digest()[:8], "little")
            yield [(base, j) for j in self.share]
            n += 1


class SceneBatches:
    """What `fit` draws batches from (the in-memory BatchSampler's interface): (x, probs | None,
    labels) of this rank's share, from a DataLoader with `workers` processes and pinned memory on
    CUDA. `sharded`: fit does not slice it again; `seek(step)`: a resumed run's next crops."""
    sharded = True
    rng = None

    def __init__(self, dataset: SceneCrops, batch: int, seed: int = 0, workers: int = 0, ctx=None,
                 pin_memory: bool = False):
        self.dataset, self.batch, self.seed, self.workers = dataset, batch, seed, int(workers)
        self.rank, self.world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
        self.pin_memory = pin_memory
        self.seek(0)

    def seek(self, step: int) -> None:
        sampler = GlobalBatches(self.batch, self.seed, self.rank, self.world, start=step)
        # workers start from a fork server, not a fork of this process: a fork copies a process
        # whose other threads (OpenMP, OpenVINO's TBB, CUDA, ZeroMQ) may hold locks mid-call,
        # and CUDA cannot run in a forked child at all
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.workers,
                            pin_memory=self.pin_memory, persistent_workers=False,
                            prefetch_factor=2 if self.workers else None,
                            multiprocessing_context="forkserver" if self.workers else None)
        self._it = iter(loader)

    def __call__(self):
        x, p, y = next(self._it)
        return x, (p if p.numel() else None), y


def validation_score(model: torch.nn.Module, scenes: list[SceneOnDisk], norm, crop: int = 256, n: int = 8,
                     probs: ProbsStore | None = None, seed: int = 1234) -> float:
    """Pixel agreement of `model`'s argmax on `n` fixed crops of the validation scenes, with their
    labels where they have them, else with the teacher's argmax: higher is better."""
    ds = SceneCrops(scenes, crop, augment=(), probs=probs)
    agree = total = 0
    device = next(model.parameters()).device
    for j in range(n):
        x, p, y = ds[(seed, j)]
        ref = y if scenes and ds.scenes[0].labels is not None else (p.argmax(0) if p.size else None)
        if ref is None:
            raise DataError("validation scenes need labels or a teacher's probabilities")
        with torch.no_grad():
            pred = model(torch.from_numpy(norm.apply(x))[None].to(device)).argmax(1)[0].cpu().numpy()
        valid = ref != IGNORE
        agree += int((pred[valid] == ref[valid]).sum())
        total += int(valid.sum())
    return agree / max(total, 1)
