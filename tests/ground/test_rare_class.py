"""Training for a rare class (ships on under 1 % of the pixels): the CE + soft Dice loss and the
precise BatchNorm statistics recomputed after a short run (ground.training.batchnorm)."""
from __future__ import annotations

import numpy as np
import torch

from ground.data.normalization import Normalization
from ground.data.sample import IGNORE
from ground.training.batchnorm import recalibrate_batchnorm
from ground.training.losses import build_objective, soft_dice


def _labels() -> torch.Tensor:
    y = torch.zeros(2, 32, 32, dtype=torch.long)
    y[:, 10:13, 10:13] = 1                       # 9 ship pixels of 1024 per image
    return y


def test_dice_is_not_lowered_by_predicting_no_ship():
    y = _labels()
    right = torch.where(y == 1, 8.0, -8.0)
    right = torch.stack([-right, right], 1)      # (N, 2, H, W) logits agreeing with y
    nothing = torch.stack([torch.full((2, 32, 32), 8.0), torch.full((2, 32, 32), -8.0)], 1)
    assert float(soft_dice(right, y)) < 0.01
    assert float(soft_dice(nothing, y)) > 0.9
    loss = build_objective("ce-dice", class_weights=[1.0, 1.0])
    # plain CE barely tells predicting no ship from the right answer; CE + Dice does
    assert float(loss(nothing, None, y)[0]) - float(loss(right, None, y)[0]) > 0.9
    y_ignored = y.clone()
    y_ignored[:, :5] = IGNORE
    value, parts = loss(right, None, y_ignored)
    assert torch.isfinite(value) and {"ce", "dice"} <= set(parts)


def test_batchnorm_statistics_recomputed_on_the_final_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))
    model[1].running_mean.fill_(5.0)             # what a short run's lagging averages look like
    model.eval()
    xs = [torch.rand(4, 2, 8, 8) for _ in range(3)]
    it = iter(xs)
    norm = Normalization(("B02", "B03"), (0.0, 0.0), (1.0, 1.0))
    assert recalibrate_batchnorm(model, lambda: (next(it), None, None), norm, batches=3) == 1
    with torch.no_grad():
        means = torch.stack([model[0](x).mean((0, 2, 3)) for x in xs]).mean(0)
    np.testing.assert_allclose(model[1].running_mean.numpy(), means.numpy(), atol=1e-5)
    assert model[1].momentum == 0.1 and not model.training
