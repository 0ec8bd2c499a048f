"""Validation during training (ground.training.loop.fit with `validate`, ground.training.validation):
the split is by scene, the best weights are kept on disk and restored, patience stops a run early,
and the sen2ships harbours load with the instance counts their SOURCE.md gives."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from shared.metrics import airbus_f2
from ground.data.normalization import Normalization
from ground.data.sample import Sample
from ground.errors import ConfigError
from ground.models.checkpoints import read_checkpoint
from ground.training.batches import BatchSampler
from ground.training.config import TrainConfig
from ground.training.loop import best_path, fit
from ground.training.losses import build_objective
from ground.training.validation import agreement, split_samples

NORM = Normalization(("B02", "B03", "B04"), (0.25,) * 3, (0.15,) * 3)


def _samples(n=4):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        image = rng.uniform(0, 0.5, (3, 48, 48)).astype(np.float32)
        out.append(Sample(image, (image[0] > 0.25).astype(np.uint8), f"scene{i}"))
    return out


def test_split_by_scene():
    train, val = split_samples(_samples(), 0.25)
    assert len(val) == 1 and len(train) == 3 and val[0].name not in {s.name for s in train}
    assert [s.name for s in split_samples(_samples(), ["scene2"])[1]] == ["scene2"]
    with pytest.raises(ConfigError, match="scene9"):
        split_samples(_samples(), ["scene9"])
    with pytest.raises(ConfigError, match="none to train on"):
        split_samples(_samples(1), 0.5)


def test_best_weights_kept_and_patience_stops_early(tmp_path):
    cfg = TrainConfig(steps=40, batch=4, crop=32, lr=1e-2, device="cpu", precision="fp32", log_every=5,
                      val_every=2, patience=2, checkpoint_every=100)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    scores = iter([0.5, 0.9, 0.7, 0.6, 0.95, 0.1])      # best at the 2nd validation, then two worse
    snapshots = {}

    def validate(m):
        snapshots[len(snapshots) + 1] = {k: v.clone() for k, v in m.state_dict().items()}
        return next(scores)
    path = tmp_path / "m.pt"
    history = fit(model, BatchSampler(_samples(), cfg), build_objective("ce"), NORM, cfg, checkpoint=path,
                  arch={"name": "test"}, progress=False, validate=validate)
    vals = [(h["step"], h["val"]) for h in history if "val" in h]
    assert vals == [(2, 0.5), (4, 0.9), (6, 0.7), (8, 0.6)]          # stopped after 2 without improvement
    assert read_checkpoint(path)["step"] == 8 and read_checkpoint(path)["meta"]["best"]["step"] == 4
    best = read_checkpoint(best_path(path))
    assert best["step"] == 4
    for k, v in model.state_dict().items():                            # the best weights came back
        torch.testing.assert_close(v, snapshots[2][k])
        torch.testing.assert_close(best["state_dict"][k], snapshots[2][k])


def test_agreement_scores_against_labels():
    s = _samples(1)
    model = nn.Sequential(nn.Conv2d(3, 2, 1))
    score = agreement(model, s, NORM, tile=32, overlap=8)
    assert 0.0 <= score <= 1.0


def test_sen2ships_harbours(data_root):
    from ground.data.ships import SHIP_PORTS, load_port
    counts = {"casablanca": 15, "honolulu": 12, "busan": 54, "algiers": 27, "cartagena": 19, "genoa": 29}
    for city in SHIP_PORTS:
        sample, instances = load_port(city)
        assert sample.image.shape[0] == 5 and 0 <= sample.image.min() and sample.image.max() <= 1
        assert len(np.unique(instances)) - 1 == counts[city]
        assert airbus_f2(instances, instances) == 1.0
        # the masks sit on bright hulls (SOURCE.md's check): B08 brighter on ships than on a 1-4 px ring
        ship = instances > 0
        ring = ndimage.binary_dilation(ship, iterations=4) & ~ship
        assert np.median(sample.image[3][ship]) > np.median(sample.image[3][ring])
