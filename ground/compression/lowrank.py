"""Low-rank factorisation of convolutions by truncated SVD.

A k x k convolution with weight W (out, in, k, k) is a matrix (out, in*k*k) = U S V^T. Kept to
rank r it becomes two convolutions: a k x k one from `in` to r channels (weight V^T, no bias,
the original stride/padding/dilation) and a 1x1 one from r to `out` (weight U S, the original
bias). It computes r * (in*k*k + out) MACs per output pixel instead of out * in*k*k, so a layer
is factorised only where that is fewer. Depthwise/grouped convolutions, 1x1 convolutions and the
output head (ground.compression.pruning.protection) are left as they are.

    res = factorise(model, example, energy=0.9)          # rank per layer: 90% of the squared singular values
    res = factorise(model, example, macs_target=0.5)     # one energy for all layers, at most half the MACs
    res.model, res.ranks, res.before, res.after          # a copy; {layer: rank}; ModelSize before/after

A factorised layer is a `LowRankConv` (an nn.Sequential of the two convolutions) in place of the
conv, so its state_dict keys are `LAYER.0.weight`, `LAYER.1.weight`, `LAYER.1.bias`. Checkpoints
record `{layer: rank}` in their arch (`arch["lowrank"]`); `apply_ranks` rebuilds the structure
(ground.models.checkpoints.build_arch calls it before loading the weights).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ground.compression.pruning.protection import protected_layers
from ground.errors import ConfigError, StageError
from ground.models.size import ModelSize, measure


class LowRankConv(nn.Sequential):
    """A k x k convolution to `rank` channels, then a 1x1 convolution to the original outputs."""

    def __init__(self, conv: nn.Conv2d, rank: int):
        first = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                          dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode)
        second = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None)
        super().__init__(first, second)

    @property
    def rank(self) -> int:
        return self[0].out_channels


def factorisable(conv: nn.Module) -> bool:
    """A plain (ungrouped, untransposed) 2-D convolution with a kernel larger than 1x1."""
    return (type(conv) is nn.Conv2d and conv.groups == 1
            and conv.kernel_size[0] * conv.kernel_size[1] > 1)


def saves_macs(conv: nn.Conv2d, rank: int) -> bool:
    """r * (in*k*k + out) < out * in*k*k: the factorised pair computes fewer MACs."""
    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    return rank * (fan_in + conv.out_channels) < conv.out_channels * fan_in


def svd_of(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, V^T of the weight reshaped to (out, in*k*k), in float64 (exact enough for full rank)."""
    w = conv.weight.detach().double().reshape(conv.out_channels, -1)
    return torch.linalg.svd(w, full_matrices=False)


def low_rank_conv(conv: nn.Conv2d, rank: int, svd=None) -> LowRankConv:
    """`conv` factorised to `rank`; with `svd` (svd_of(conv)) the weights are the truncated SVD,
    without it only the structure is built (a checkpoint's weights fill it)."""
    pair = LowRankConv(conv, rank)
    if svd is not None:
        u, s, vt = svd
        with torch.no_grad():
            pair[0].weight.copy_(vt[:rank].reshape(pair[0].weight.shape).to(conv.weight.dtype))
            pair[1].weight.copy_((u[:, :rank] * s[:rank]).reshape(pair[1].weight.shape).to(conv.weight.dtype))
            if conv.bias is not None:
                pair[1].bias.copy_(conv.bias.detach())
    return pair.train(conv.training)


def apply_ranks(model: nn.Module, ranks: dict[str, int], weights: bool = False, svds: dict | None = None) -> nn.Module:
    """Replace each conv named in `ranks` by its LowRankConv, in place; `weights=True` sets them
    from the truncated SVD (`svds[name]` when given, computed otherwise), else only the structure
    changes. `{}` changes nothing."""
    modules = dict(model.named_modules())
    for name, rank in ranks.items():
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d):
            raise ConfigError(f"low-rank layer {name!r} is not a Conv2d of {type(model).__name__}")
        if int(rank) < 1:
            raise ConfigError(f"low-rank layer {name!r}: rank must be >= 1, got {rank}")
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        svd = ((svds or {}).get(name) or svd_of(conv)) if weights else None
        setattr(parent, child, low_rank_conv(conv, int(rank), svd))
    return model


@dataclass
class LowRankResult:
    model: nn.Module
    energy: float | None             # the retained energy per layer (chosen for a MACs target)
    macs_target: float | None        # share of the original MACs asked for
    round_to: int | None             # ranks rounded up to a multiple of it
    ranks: dict[str, int]            # layer -> rank, the layers factorised
    before: ModelSize
    after: ModelSize
    layers: dict[str, dict] = field(default_factory=dict)   # every candidate: full rank, rank, kept energy
    skipped: dict[str, str] = field(default_factory=dict)   # conv -> why it was left as it is

    def as_dict(self) -> dict:
        return {"energy": self.energy, "macs_target": self.macs_target, "round_to": self.round_to, "ranks": self.ranks,
                "before": asdict(self.before), "after": asdict(self.after),
                "params_reduction": 1.0 - self.after.params / self.before.params,
                "macs_reduction": 1.0 - self.after.macs / self.before.macs,
                "layers": self.layers, "skipped": self.skipped}


def candidates(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, nn.Conv2d], dict[str, str]]:
    """The convolutions that may be factorised, and why each other convolution is not."""
    head = set(protected_layers(model, example))
    inside = {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, LowRankConv) for c in m._modules}
    convs, skipped = {}, {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.modules.conv._ConvNd) or name in inside:
            continue
        if name in head:
            skipped[name] = "output head"
        elif not factorisable(m):
            skipped[name] = ("grouped/depthwise" if getattr(m, "groups", 1) > 1 else
                             "1x1" if type(m) is nn.Conv2d else type(m).__name__)
        else:
            convs[name] = m
    return convs, skipped


def rank_for_energy(cum: torch.Tensor, energy: float) -> int:
    """The smallest r whose r largest squared singular values hold `energy` of the total (`cum`:
    their cumulative share)."""
    return min(int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype))) + 1, len(cum))


def round_rank(rank: int, full: int, round_to: int | None) -> int:
    """`rank` up to a multiple of `round_to` (OpenVINO's kernels favour multiples of 8 channels,
    docs/deploy.md), at most the full rank."""
    return min(full, -(-rank // round_to) * round_to) if round_to else rank


def _plan(convs, spectra, energy: float, round_to: int | None, skipped: dict) -> dict[str, int]:
    ranks = {}
    for name, conv in convs.items():
        r = round_rank(rank_for_energy(spectra[name], energy), len(spectra[name]), round_to)
        if saves_macs(conv, r):
            ranks[name] = r
        else:
            skipped[name] = f"rank {r} saves no MACs"
    return ranks


def _check(energy, macs_target, round_to) -> None:
    if (energy is None) == (macs_target is None):
        raise ConfigError(f"give one of energy or macs_target (got energy={energy}, macs_target={macs_target})")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"energy must be in (0, 1], got {energy}")
    if macs_target is not None and not 0 < macs_target < 1:
        raise ConfigError(f"macs_target is the share of the MACs to keep, in (0, 1); got {macs_target}")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ConfigError(f"round_to must be a positive integer or None, got {round_to!r}")


def factorise(model: nn.Module, example: torch.Tensor, energy: float | None = None,
              macs_target: float | None = None, round_to: int | None = None) -> LowRankResult:
    """A factorised copy of `model`: each eligible conv at the rank retaining `energy` of its
    squared singular values, or, with `macs_target`, at the largest energy (the same for every
    layer) whose model measures at most `macs_target` x the original MACs on `example`. With
    `round_to` each rank is rounded up to a multiple of it (so it keeps at least `energy`)."""
    _check(energy, macs_target, round_to)
    model = copy.deepcopy(model).eval()
    before = measure(model, example)
    convs, skipped = candidates(model, example)
    svds = {name: svd_of(conv) for name, conv in convs.items()}
    spectra = {name: torch.cumsum(s ** 2, 0) / torch.sum(s ** 2) for name, (_, s, _) in svds.items()}

    def build(e: float):
        sk = dict(skipped)
        ranks = _plan(convs, spectra, e, round_to, sk)
        return apply_ranks(copy.deepcopy(model), ranks, weights=True, svds=svds), ranks, sk

    if macs_target is not None:
        energy = _energy_for_macs(build, spectra, example, before.macs * macs_target,
                                  f" (multiples of round_to={round_to})" if round_to else "")
    new, ranks, skipped = build(energy)
    layers = {n: {"full_rank": len(spectra[n]), "rank": ranks.get(n), "energy_kept":
                  float(spectra[n][ranks[n] - 1]) if n in ranks else 1.0} for n in convs}
    return LowRankResult(new.eval(), energy, macs_target, round_to, ranks, before, measure(new, example), layers,
                         skipped)


def _energy_for_macs(build, spectra: dict, example: torch.Tensor, budget: float, round_note: str = "") -> float:
    """The largest energy whose factorised model measures <= `budget` MACs. MACs grow with the
    energy (ranks only grow), so bisect over the energies where some layer's rank changes."""
    levels = sorted({float(v) for cum in spectra.values() for v in cum})
    if not levels:
        raise StageError("no convolution can be factorised (only 1x1, grouped convs and the head)")

    def macs(e: float) -> int:
        return measure(build(e)[0], example).macs

    lo, hi = 0, len(levels) - 1
    smallest = macs(levels[0])
    if smallest > budget:
        raise StageError(f"macs_target out of reach: the lowest ranks{round_note} still leave {smallest:,} MACs "
                         f"(budget {int(budget):,})")
    while lo < hi:                      # invariant: levels[lo] meets the budget
        mid = (lo + hi + 1) // 2
        if macs(levels[mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return levels[lo]
