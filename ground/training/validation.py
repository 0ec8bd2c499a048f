"""Validation during training: a split of the training imagery by scene (never by crop: crops of one
scene are too alike to tell memorising from learning), scored every `train.val_every` steps by
ground.training.loop.fit, which keeps the best weights and stops early after `train.patience`."""
from __future__ import annotations

import numpy as np
import torch

from ground.data.normalization import Normalization
from ground.data.sample import IGNORE, Sample
from ground.errors import ConfigError
from ground.evaluation.predict import model_proba


def split_samples(samples: list[Sample], val, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """(train, validation): `val` a fraction of the scenes (at least one when > 0) or a list of names."""
    if isinstance(val, (list, tuple)):
        missing = set(val) - {s.name for s in samples}
        if missing:
            raise ConfigError(f"train.validation: scene(s) {sorted(missing)} not among {[s.name for s in samples]}")
        held = set(val)
    else:
        n = int(round(float(val) * len(samples))) or (1 if float(val) > 0 else 0)
        if n and n >= len(samples):
            raise ConfigError(f"train.validation {val}: {len(samples)} scene(s) leave none to train on")
        order = np.random.default_rng(seed).permutation(len(samples))
        held = {samples[i].name for i in order[:n]}
    return [s for s in samples if s.name not in held], [s for s in samples if s.name in held]


def agreement(model: torch.nn.Module, samples: list[Sample], norm: Normalization, cache=None,
              tile: int = 256, overlap: int = 64) -> float:
    """Pixel agreement of `model`'s argmax over whole validation scenes with their labels where they
    have them, else with the teacher's argmax (from the cache): higher is better."""
    agree = total = 0
    for s in samples:
        if s.labels is not None:
            ref = s.labels
        elif cache is not None:
            ref = cache.probs(s, 0).astype(np.float32).argmax(0)
        else:
            raise ConfigError(f"validation scene {s.name}: no labels and no teacher to score against")
        pred = model_proba(model, s.image, norm, tile, overlap).argmax(0)
        valid = ref != IGNORE
        agree += int((pred[valid] == ref[valid]).sum())
        total += int(valid.sum())
    return agree / max(total, 1)
