"""Pruning to a size target: torch-pruning's `pruning_ratio` is a *channel* ratio; what a satellite
cares about is parameters (uplink) and MACs (latency), so `prune_to_target` bisects over
candidate plans (channels kept per group, rounded for SIMD) until the target is met.

torch-pruning's dependency graph finds every layer coupled to a channel (BatchNorm, the
concatenated U-Net skips, depthwise convolutions), so removing a channel keeps the network valid.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn

from ground.compression.pruning.criteria import Criterion, get_criterion
from ground.compression.pruning.protection import protected_layers
from ground.errors import ConfigError, StageError
from ground.models.size import ModelSize, count_params, measure


TARGET_KINDS = ("params", "macs")


# local: every layer loses the same share of channels; global: one ranking across layers (what
# LAMP was designed for: within one layer it orders channels exactly as L2 magnitude does).
SCOPES = ("local", "global")


DEFAULT_ROUND_TO = 8


def conv_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every convolution, by module name (what pruning changes)."""
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}


LossFn = Callable[[nn.Module], torch.Tensor]


def self_distillation_loss(example: torch.Tensor) -> LossFn:
    """A label-free Taylor loss: cross-entropy of the model against its own (frozen) hard
    predictions on `example` (real tiles, please). Used when no teacher/labels are given."""
    cache: dict = {}

    def loss(model: nn.Module) -> torch.Tensor:
        logits = model(example)
        if "target" not in cache:
            cache["target"] = logits.detach().argmax(1)
        return nn.functional.cross_entropy(logits, cache["target"])
    return loss


@dataclass
class PruneStep:
    target_reduction: float        # of the original size, after this step
    channel_ratio: float           # the channel ratio that met it (on the model before the step)
    size: ModelSize
    unscored: list[str] = field(default_factory=list)   # groups the criterion could not score (kept)


@dataclass
class PruneResult:
    model: nn.Module
    criterion: str
    scope: str
    by: str
    target: float
    round_to: int | None
    before: ModelSize
    after: ModelSize
    protected: list[str]
    steps: list[PruneStep]
    widths_before: dict[str, int]
    widths_after: dict[str, int]

    @property
    def reduction(self) -> float:
        """Achieved reduction of the measured quantity (`by`), 0..1."""
        return 1.0 - self.after.of(self.by) / self.before.of(self.by)

    def as_dict(self) -> dict:
        return {"criterion": self.criterion, "scope": self.scope, "by": self.by, "target": self.target, "round_to": self.round_to,
                "before": asdict(self.before), "after": asdict(self.after),
                "params_reduction": 1.0 - self.after.params / self.before.params,
                "macs_reduction": 1.0 - self.after.macs / self.before.macs,
                "protected": self.protected, "steps": [asdict(s) for s in self.steps],
                "widths_before": self.widths_before, "widths_after": self.widths_after}


@dataclass
class _GroupScore:
    """One group of coupled channels: its root layer, how it is pruned, its channel scores."""
    module: str
    handler: Callable
    scores: torch.Tensor      # one importance per channel of the root layer

    @property
    def channels(self) -> int:
        return len(self.scores)


def _score_groups(model: nn.Module, example: torch.Tensor, crit: Criterion, protected: list[str],
                  loss_fn: LossFn | None, seed: int) -> tuple[list[_GroupScore], list[str]]:
    """torch-pruning's groups of `model` and the criterion's score of every channel in them;
    also the root layers of the groups the criterion could not score (left unpruned)."""
    m = copy.deepcopy(model).eval()      # gradients and tracing must not touch the caller's model
    named = dict(m.named_modules())
    names = {mod: n for n, mod in named.items()}
    ignored = [sub for n in protected for sub in named[n].modules()]
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=example)
    if crit.needs_gradients:
        if loss_fn is None:
            raise ConfigError(f"criterion {crit.name!r} needs a loss on calibration data (loss_fn)")
        with torch.enable_grad():
            loss_fn(m).backward()
    importance = crit.make()
    torch.manual_seed(seed)      # RandomImportance draws from the global generator
    out, unscored = [], []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.modules.conv._ConvNd, nn.Linear]):
        dep, _ = group[0]
        try:
            imp = importance(group)
        except (RuntimeError, IndexError):
            # torch-pruning 1.6 fails to reduce some scores over a concatenation (BN scale after a
            # depthwise conv that follows torch.cat): such a group is left whole, and reported.
            unscored.append(names[dep.target.module])
            continue
        if imp is not None:
            out.append(_GroupScore(names[dep.target.module], dep.handler, imp.detach().float().cpu()))
    return out, unscored


def _keep(channels: int, exact: float, round_to: int | None) -> int:
    """Channels a group keeps: `exact` rounded to the nearest multiple of `round_to`, never below
    `round_to` (nor 1): emptying a layer would cut the network. (torch-pruning's own `round_to`
    rounds down, so a small layer can reach zero, and the group is then silently left whole:
    the size would not fall monotonically with the ratio, and no search could aim at a target.)"""
    step = round_to or 1
    return int(min(channels, max(min(step, channels), round(exact / step) * step)))


def _plans(groups: list[_GroupScore], scope: str, round_to: int | None, max_ratio: float,
           resolution: int = 400) -> list[tuple[float, tuple[int, ...]]]:
    """Candidate (channel ratio, channels kept per group), from least to most pruning; every plan
    keeps at most what the one before it keeps, so the size is monotonic along the list."""
    plans: list[tuple[float, tuple[int, ...]]] = []
    if scope == "global":
        ranked = torch.sort(torch.cat([g.scores for g in groups])).values
    for i in range(resolution + 1):
        r = max_ratio * i / resolution
        if scope == "global":
            n = int(round(r * len(ranked)))
            thr = ranked[n - 1] if n > 0 else None
            keep = tuple(_keep(g.channels, g.channels - (0 if thr is None else int((g.scores <= thr).sum())),
                               round_to) for g in groups)
        else:
            keep = tuple(_keep(g.channels, g.channels * (1.0 - r), round_to) for g in groups)
        if not plans or keep != plans[-1][1]:
            plans.append((r, keep))
    return plans


def _apply(model: nn.Module, example: torch.Tensor, groups: list[_GroupScore], keep: tuple[int, ...]) -> nn.Module:
    """A pruned deep copy of `model` keeping the best `keep[i]` channels of group i."""
    m = copy.deepcopy(model).eval()
    named = dict(m.named_modules())
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=example)
    for g, k in zip(groups, keep):
        if k >= g.channels:
            continue
        order = torch.argsort(g.scores).tolist()
        group = dg.get_pruning_group(named[g.module], g.handler, order[:g.channels - k])
        if not dg.check_pruning_group(group):
            # A group can span a concatenation (a depthwise conv right after torch.cat): its
            # weakest channels may all come from one source layer, which would be emptied.
            # Prune the most channels that leave every layer at least one.
            lo, hi = 0, g.channels - k
            while lo < hi:
                n = (lo + hi + 1) // 2
                if dg.check_pruning_group(dg.get_pruning_group(named[g.module], g.handler, order[:n])):
                    lo = n
                else:
                    hi = n - 1
            group = dg.get_pruning_group(named[g.module], g.handler, order[:lo]) if lo else None
        if group is not None:
            group.prune()
    return m


def _check(by: str, target: float, scope: str, steps: int, round_to) -> None:
    if by not in TARGET_KINDS:
        raise ConfigError(f"by must be one of {TARGET_KINDS}, got {by!r}")
    if not 0.0 < float(target) < 1.0:
        raise ConfigError(f"target reduction must be between 0 and 1 (exclusive), got {target}")
    if scope not in SCOPES:
        raise ConfigError(f"scope must be one of {SCOPES}, got {scope!r}")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ConfigError(f"round_to must be a positive integer or None, got {round_to!r}")


def prune_to_target(model: nn.Module, example: torch.Tensor, criterion_name: str, target: float,
                    by: str = "params", round_to: int | None = DEFAULT_ROUND_TO, steps: int = 1,
                    loss_fn: LossFn | None = None, between_steps: Callable[[nn.Module, int], None] | None = None,
                    scope: str = "local", max_channel_ratio: float = 0.95, seed: int = 0) -> PruneResult:
    """Remove channels until the model has lost at least `target` (0..1) of its parameters or MACs.

    `steps` > 1 prunes iteratively: step i reaches `target * i / steps` of the original size, and
    `between_steps(model, i)` (e.g. a short fine-tune) runs after every step but the last; scores
    are computed afresh on the model of each step.
    `round_to` keeps channel counts multiples of it (SIMD-friendly; None for any count).
    `loss_fn(model) -> loss` feeds the gradient criteria (Taylor) with calibration data.
    `scope`: "local" (each layer loses the same share) or "global" (one ranking over all layers).
    The head (`protected_layers`) is never pruned. The input model is not modified.
    """
    crit = get_criterion(criterion_name)
    _check(by, target, scope, steps, round_to)
    example = example.detach()
    protected = protected_layers(model, example)
    before = measure(model, example)
    widths_before = conv_widths(model)
    current = copy.deepcopy(model)
    out_shape = _output_shape(current, example)
    history: list[PruneStep] = []
    for i in range(1, steps + 1):
        step_target = float(target) * i / steps
        goal = before.of(by) * (1.0 - step_target)
        groups, unscored = _score_groups(current, example, crit, protected, loss_fn, seed + i)
        plans = _plans(groups, scope, round_to, max_channel_ratio)
        tried: dict[int, tuple[nn.Module, int]] = {}

        def trial(j: int) -> tuple[nn.Module, int]:
            if j not in tried:
                cand = _apply(current, example, groups, plans[j][1])
                # parameters need no forward pass; MACs do
                tried[j] = (cand, count_params(cand) if by == "params" else measure(cand, example).macs)
            return tried[j]

        most = trial(len(plans) - 1)[1]
        if most > goal:
            raise StageError(
                f"cannot reach {step_target:.0%} fewer {by} with criterion {crit.name!r}, scope {scope} and "
                f"round_to={round_to}: at most {1 - most / before.of(by):.1%} (protected: {', '.join(protected)})")
        # sizes fall along `plans`: bisect for the first plan that meets the goal (least pruning)
        lo, hi = 0, len(plans) - 1
        while lo < hi:
            j = (lo + hi) // 2
            if trial(j)[1] <= goal:
                hi = j
            else:
                lo = j + 1
        current = trial(hi)[0]
        size = measure(current, example)
        got = _output_shape(current, example)
        if got != out_shape:     # a safety net: protected_layers should make this impossible
            raise RuntimeError(f"pruning changed the output shape {out_shape} -> {got}")
        history.append(PruneStep(step_target, plans[hi][0], size, unscored))
        if between_steps is not None and i < steps:
            between_steps(current, i)
    return PruneResult(current, crit.name, scope, by, float(target), round_to, before, size,
                       protected, history, widths_before, conv_widths(current))


def _output_shape(model: nn.Module, example: torch.Tensor) -> tuple[int, ...]:
    was = model.training
    model.eval()
    with torch.no_grad():
        shape = tuple(model(example).shape)
    model.train(was)
    return shape
