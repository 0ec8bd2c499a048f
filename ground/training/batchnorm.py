"""Precise BatchNorm statistics (Wu & Johnson, "Rethinking BatchNorm", 2021): after a short run the
running means and variances still hold the early steps' activations (momentum 0.1), so the model in
eval mode sees other statistics than it was trained with. Recomputing them as plain averages over a
few batches of the final weights closes that gap; no weight changes."""
from __future__ import annotations

import torch

from ground.data.normalization import Normalization, normalize


def recalibrate_batchnorm(model: torch.nn.Module, sampler, norm: Normalization, batches: int = 16) -> int:
    """Reset every BatchNorm's running statistics and average them over `batches` batches of
    `sampler` (x, probs, labels) in train mode without gradients; returns the number of layers."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not layers or batches <= 0:
        return 0
    saved = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None                   # cumulative average over the batches below
    device = next(model.parameters()).device
    was_training = model.training
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            x = sampler()[0]
            model(normalize(x.to(device), norm))
    for m, mom in zip(layers, saved):
        m.momentum = mom
    model.train(was_training)
    return len(layers)
