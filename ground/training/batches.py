"""Batch sources: random (augmented, cropped) batches of raw reflectance crops, the teacher's
probabilities for exactly that view (from the cache) and labels; class-balanced crops for rare
classes."""
from __future__ import annotations

import sys

import numpy as np
import torch
from tqdm import tqdm

from ground.data.augment import dihedral, random_crop, transforms_for
from ground.data.sample import IGNORE, Sample
from ground.errors import ConfigError, DataError
from ground.training.config import TrainConfig


class BatchSampler:
    """Random (augmented, cropped) batches: raw reflectance crops, teacher probabilities for exactly
    that view (from the cache) when a cache is given, and labels (IGNORE where a sample has none).

    Crop j of batch n is drawn from a generator seeded with (seed, n, j), as the lazy scene loader
    draws (ground.data.lazy.GlobalBatches): under DDP `shard(rank, world)` makes each rank draw only
    its share of every global batch (no rank cuts crops it throws away) and the N shares together are
    the single process's batch; `seek(step)` gives a resumed run the batches it would have drawn."""

    def __init__(self, samples: list[Sample], cfg: TrainConfig, cache=None):
        if not samples:
            raise DataError("training: no samples")
        self.samples, self.cfg, self.cache = samples, cfg, cache
        self.transforms = transforms_for(cfg.augment)
        area = np.array([s.image.shape[1] * s.image.shape[2] for s in samples], np.float64)
        self.p = area / area.sum()       # every pixel equally likely, whatever the image size
        self.balance = float(getattr(cfg, "balance", 0.0))
        self.class_counts = None         # (samples, K) pixels per class, for balanced crops
        self.step = 0                    # the global batch the next call draws
        self.share = range(int(cfg.batch))
        self.sharded = False

    def shard(self, rank: int, world: int) -> None:
        """Draw only this rank's contiguous share of every global batch of cfg.batch crops."""
        if self.cfg.batch % world:
            raise ConfigError(f"train.batch {self.cfg.batch} must divide evenly over {world} processes")
        n = self.cfg.batch // world
        self.share, self.sharded = range(rank * n, (rank + 1) * n), world > 1

    def seek(self, step: int) -> None:
        self.step = int(step)

    def _class_map(self, s: Sample, k: int, probs) -> np.ndarray | None:
        """Class ids of view k: the labels where a sample has them, else the teacher's argmax."""
        if s.labels is not None:
            return dihedral(s.labels, k)
        return None if probs is None else np.asarray(probs).argmax(0)

    def count_classes(self) -> np.ndarray:
        """Pixels per class of every sample (view 0: a D4 view has the same counts)."""
        if self.class_counts is None:
            rows = []
            for s in self.samples:
                m = self._class_map(s, 0, self.cache.probs(s, 0) if self.cache is not None else None)
                if m is None:
                    raise DataError(f"training: balanced crops need labels or a teacher; {s.name} has neither")
                rows.append(np.bincount(m[m != IGNORE].ravel(), minlength=int(m[m != IGNORE].max(initial=0)) + 1))
            k = max(len(r) for r in rows)
            self.class_counts = np.stack([np.pad(r, (0, k - len(r))) for r in rows]).astype(np.float64)
        return self.class_counts

    def _balanced_crop(self, arrays: list, s_index: int, k: int, cls: int, size: int,
                       rng: np.random.Generator) -> list:
        """The window of `size` centred (as far as the image allows) on a random pixel of class `cls`."""
        s = self.samples[s_index]
        m = self._class_map(s, k, arrays[2] if self.cache is not None else None)
        rows, cols = np.nonzero(m == cls)
        if not len(rows):                # the teacher saw the class in view 0 only: an ordinary crop
            return random_crop(arrays, size, rng)
        i = int(rng.integers(len(rows)))
        h, w = m.shape
        r = int(np.clip(rows[i] - size // 2, 0, max(h - size, 0)))
        c = int(np.clip(cols[i] - size // 2, 0, max(w - size, 0)))
        return random_crop([a[..., r:r + size, c:c + size] for a in arrays], size, None)

    def warm(self, progress: bool = True, ctx=None) -> None:
        """Run the teacher on every (sample, transform) once up front, with a progress bar. Under DDP
        (`ctx`, ground.training.distributed) each rank labels its share, then all wait for all."""
        if self.cache is None:
            return
        rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
        jobs = [(s, k) for s in self.samples for k in self.transforms][rank::world]
        for s, k in tqdm(jobs, desc="teacher labels", file=sys.stderr, disable=not progress or rank != 0,
                         leave=False):
            self.cache.probs(s, k)
        if ctx is not None:
            ctx.barrier()

    def __call__(self):
        xs, ps, ys = [], [], []
        size = self.cfg.crop
        for j in self.share:
            rng = np.random.default_rng([int(self.cfg.seed), self.step, j])
            cls = None
            if self.balance > 0 and rng.random() < self.balance:
                counts = self.count_classes()
                cls = int(rng.choice(np.flatnonzero(counts.sum(0) > 0)))   # classes equally often
                i = int(rng.choice(len(self.samples), p=counts[:, cls] / counts[:, cls].sum()))
            else:
                i = int(rng.choice(len(self.samples), p=self.p))
            s = self.samples[i]
            k = int(rng.choice(self.transforms))
            arrays = [dihedral(s.image, k)]
            arrays.append(dihedral(s.labels, k) if s.labels is not None
                          else np.full(arrays[0].shape[1:], IGNORE, np.uint8))
            if self.cache is not None:
                arrays.append(self.cache.probs(s, k))
            if cls is not None:
                crops = self._balanced_crop(arrays, i, k, cls, size, rng)
            else:
                crops = random_crop(arrays, size, rng if "crop" in self.cfg.augment else None)
            xs.append(crops[0])
            ys.append(crops[1])
            if self.cache is not None:
                ps.append(crops[2].astype(np.float32))
        self.step += 1
        x = torch.from_numpy(np.stack(xs).astype(np.float32))
        y = torch.from_numpy(np.stack(ys).astype(np.int64))
        p = torch.from_numpy(np.stack(ps)) if ps else None
        return x, p, y


class MixedSampler:
    """Each batch drawn from several BatchSamplers, a fixed number of crops from each (e.g. the
    re-distillation's replay of the original imagery beside the downlinked samples): the parts'
    crops concatenated in order. Every part draws from its own seed, so adding one part does not
    change what another draws."""

    sharded = False

    def __init__(self, parts: list[BatchSampler]):
        if not parts:
            raise DataError("training: a mixed batch needs at least one part")
        self.parts = parts

    def seek(self, step: int) -> None:
        for p in self.parts:
            p.seek(step)

    def __call__(self):
        drawn = [p() for p in self.parts]
        x = torch.cat([d[0] for d in drawn])
        y = torch.cat([d[2] for d in drawn])
        probs = [d[1] for d in drawn]
        p = torch.cat(probs) if all(q is not None for q in probs) else None
        return x, p, y
