"""train.threads: torch's CPU threads for the training only (one thread trains several times faster
than two on a loaded shared machine), restored afterwards; 0 leaves torch's setting alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ground.config import parse_config
from ground.data.normalization import Normalization
from ground.data.sample import Sample
from ground.errors import ConfigError
from ground.training.batches import BatchSampler
from ground.training.config import TrainConfig
from ground.training.loop import fit
from ground.training.losses import build_objective

NORM = Normalization(("B02", "B03", "B04"), (0.25,) * 3, (0.15,) * 3)


class Recording(BatchSampler):
    """A sampler that notes torch's thread count each time the loop asks for a batch."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.threads = []

    def __call__(self):
        self.threads.append(torch.get_num_threads())
        return super().__call__()


def _train(threads: int) -> list[int]:
    cfg = TrainConfig(steps=3, batch=2, crop=16, device="cpu", precision="fp32", threads=threads)
    image = np.random.default_rng(0).uniform(0, 0.5, (3, 32, 32)).astype(np.float32)
    sampler = Recording([Sample(image, (image[0] > 0.25).astype(np.uint8), "s")], cfg)
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1))
    fit(model, sampler, build_objective("ce"), NORM, cfg, progress=False)
    return sampler.threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_threads_apply_during_training_and_are_restored(two_threads):
    assert _train(1) == [1, 1, 1]
    assert torch.get_num_threads() == 2


def test_zero_threads_leaves_torch_alone(two_threads):
    assert _train(0) == [2, 2, 2]
    assert torch.get_num_threads() == 2


def test_threads_come_from_the_config_and_negative_is_named():
    raw = {"run": {"name": "t"}, "data": {"bands": ["B02"], "classes": ["a", "b"], "unlabelled": [{"source": "ukis"}]},
           "teacher": {"name": "ukis-csmask-6b-l1c"}, "student": {}, "experiment": [{"name": "e"}]}
    assert parse_config({**raw, "train": {"threads": 1}}).train.threads == 1
    assert parse_config(raw).train.threads == 0
    with pytest.raises(ConfigError, match="threads"):
        parse_config({**raw, "train": {"threads": -2}})
    with pytest.raises(ConfigError, match="threads must be >= 0, got -1"):
        TrainConfig(threads=-1)
