"""Validation during training: a split of the training imagery by scene (never by crop: crops of one
scene are too alike to tell memorising from learning), scored every `train.val_every` steps by
ground.training.loop.fit, which keeps the best weights and stops early after `train.patience`."""
from __future__ import annotations

import numpy as np
import torch

from ground.data.lazy import split_by_scene
from ground.data.normalization import Normalization
from ground.data.sample import IGNORE, Sample
from ground.errors import ConfigError, DataError
from ground.evaluation.predict import model_proba


def split_samples(samples: list[Sample], val, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """(train, validation) by scene (ground.data.lazy.split_by_scene), refused as a config error."""
    try:
        return split_by_scene(samples, val, seed)
    except DataError as err:
        raise ConfigError(f"train.validation: {err}") from None


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
