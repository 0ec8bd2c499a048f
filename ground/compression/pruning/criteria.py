"""Pruning criteria, one registry: the six the Edge SpAIce study compares (random, magnitude L1/L2,
BN scale, FPGM, Taylor, LAMP), each a small factory over torch-pruning's importance classes;
adding one is one decorated function."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch_pruning as tp

from ground.errors import ConfigError


@dataclass(frozen=True)
class Criterion:
    name: str
    make: Callable[[], tp.importance.Importance]
    needs_gradients: bool        # Taylor scores weight x gradient: a loss must be back-propagated first
    summary: str


CRITERIA: dict[str, Criterion] = {}


def criterion(name: str, summary: str, needs_gradients: bool = False):
    """Register an importance factory under `name` (the config/CLI spelling)."""
    def register(make: Callable[[], tp.importance.Importance]):
        CRITERIA[name] = Criterion(name, make, needs_gradients, summary)
        return make
    return register


criterion("random", "uniformly random channel scores (the baseline every criterion must beat)")(
    lambda: tp.importance.RandomImportance())
criterion("magnitude-l1", "L1 norm of each channel's weights (Li et al. 2017)")(
    lambda: tp.importance.MagnitudeImportance(p=1))
criterion("magnitude-l2", "L2 norm of each channel's weights")(
    lambda: tp.importance.MagnitudeImportance(p=2))
criterion("bn-scale", "|gamma| of the BatchNorm after the channel (Network Slimming, Liu et al. 2017)")(
    lambda: tp.importance.BNScaleImportance())
criterion("fpgm", "distance to the geometric median of the layer's filters (He et al. 2019)")(
    lambda: tp.importance.FPGMImportance())
criterion("taylor", "first-order Taylor |w * dL/dw| on calibration data (Molchanov et al. 2019)",
          needs_gradients=True)(lambda: tp.importance.TaylorImportance())
criterion("lamp", "layer-adaptive magnitude scores (Lee et al. 2021)")(
    lambda: tp.importance.LAMPImportance())


# The six criteria of the study (magnitude once: L1, as most papers report it).
SWEEP_CRITERIA = ("random", "magnitude-l1", "bn-scale", "fpgm", "taylor", "lamp")


def get_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise ConfigError(f"unknown pruning criterion {name!r}; known: {', '.join(CRITERIA)}")
    return CRITERIA[name]
