"""Size and cost of a model: parameters and multiply-accumulates per tile, the one counter every
stage and report uses.

MACs come from torch's own FLOP counter (torch.utils.flop_counter, convolutions and matmuls;
1 MAC = 2 FLOPs), on one tile of the deployed size, so students and teachers are counted alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: torch.nn.Module, in_channels: int, tile: int = 256) -> int:
    was = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, in_channels, tile, tile))
    model.train(was)
    return int(counter.get_total_flops() // 2)


def describe(model: torch.nn.Module, in_channels: int, tile: int = 256) -> dict:
    return {"params": count_params(model), "macs": count_macs(model, in_channels, tile), "tile": tile}


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


@dataclass(frozen=True)
class ModelSize:
    params: int
    macs: int            # multiply-accumulates for one input of the example's shape

    def of(self, by: str) -> int:
        return self.params if by == "params" else self.macs


def measure(model: torch.nn.Module, example: torch.Tensor) -> ModelSize:
    """Parameters and MACs of `model` on `example` (N, C, t, t) (MACs per example batch)."""
    was = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(example)
    model.train(was)
    return ModelSize(count_params(model), int(counter.get_total_flops() // 2))
