"""Structured (channel) pruning with torch-pruning: a registry of criteria, a target in parameters
or MACs, one-shot or iterative, channel counts rounded for SIMD, the output head protected.

    result = prune_to_target(model, example, "lamp", target=0.4, by="params", round_to=8)
    result.model            # a smaller nn.Module of the same class (channels removed, not masked)

torch-pruning's dependency graph finds every layer coupled to a channel (BatchNorm, the
concatenated U-Net skips, depthwise convolutions), so removing a channel keeps the network valid.
Its `pruning_ratio` is a *channel* ratio; what a satellite cares about is parameters (uplink) and
MACs (latency), so `prune_to_target` bisects the channel ratio until the size target is met.

The criteria are the six the Edge SpAIce study compares (random, magnitude L1/L2, BN scale, FPGM,
Taylor, LAMP), each a small factory in `CRITERIA`; adding one is one decorated function.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
import torch_pruning as tp
from torch import nn

# ---- the criteria registry ------------------------------------------------------------------------


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
TARGET_KINDS = ("params", "macs")
# local: every layer loses the same share of channels; global: one ranking across layers (what
# LAMP was designed for: within one layer it orders channels exactly as L2 magnitude does).
SCOPES = ("local", "global")
DEFAULT_ROUND_TO = 8


def get_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise ValueError(f"unknown pruning criterion {name!r}; known: {', '.join(CRITERIA)}")
    return CRITERIA[name]


# ---- sizes ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSize:
    params: int
    macs: int            # multiply-accumulates for the example input (one tile)

    def of(self, by: str) -> int:
        return self.params if by == "params" else self.macs


def measure(model: nn.Module, example: torch.Tensor) -> ModelSize:
    """Parameters and MACs (torch-pruning's counter) of `model` on `example`."""
    was_training = model.training
    macs, params = tp.utils.count_ops_and_params(model, example)
    model.train(was_training)
    return ModelSize(int(params), int(macs))


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every convolution, by module name (what pruning changes)."""
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}


# ---- what must not be pruned ------------------------------------------------------------------------

_PARAMETRIC = ("Convolution", "Addmm", "Mm", "Linear", "Bmm")


def protected_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the layers whose output channels *are* the model's output channels.

    Walks the autograd graph back from the output through shape-keeping operations (activation,
    upsampling, addition, concatenation, BatchNorm ...) and stops at each convolution / linear
    layer it meets: those produce the classes, so pruning them would change the output shape.
    (The input side needs no protection: torch-pruning never prunes the input tensor.)
    """
    param_names = {p: n for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        out = model(example)
    model.train(was_training)
    outputs = out if isinstance(out, (tuple, list)) else [out]
    found: set[str] = set()
    seen: set = set()
    stack = [o.grad_fn for o in outputs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if any(fn.name().startswith(p) for p in _PARAMETRIC):
            for p in _leaf_params(fn):
                name = param_names.get(p)
                if name is not None and p.dim() > 1:     # the weight, not a bias
                    owner = name.rsplit(".", 1)[0] if "." in name else ""
                    if owner in modules:
                        found.add(owner)
            continue     # stop: what is upstream of this layer may shrink freely
        stack.extend(f for f, _ in fn.next_functions if f is not None)
    if not found:
        raise ValueError(f"{type(model).__name__}: no convolution or linear layer produces the output; "
                         "cannot tell which layer is the head")
    return sorted(found)


def _leaf_params(fn, depth: int = 3) -> Iterable[torch.Tensor]:
    """Parameters feeding a layer's node directly (through at most a transpose/view)."""
    for nxt, _ in fn.next_functions:
        if nxt is None:
            continue
        if hasattr(nxt, "variable"):
            yield nxt.variable
        elif depth > 1 and not any(nxt.name().startswith(p) for p in _PARAMETRIC) and \
                nxt.name().startswith(("T", "View", "Reshape", "Permute", "Transpose")):
            yield from _leaf_params(nxt, depth - 1)


# ---- pruning ----------------------------------------------------------------------------------------

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
            raise ValueError(f"criterion {crit.name!r} needs a loss on calibration data (loss_fn)")
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
    if by not in TARGET_KINDS:
        raise ValueError(f"by must be one of {TARGET_KINDS}, got {by!r}")
    if not 0.0 < float(target) < 1.0:
        raise ValueError(f"target reduction must be between 0 and 1 (exclusive), got {target}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive integer or None, got {round_to!r}")
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
                tried[j] = (cand, _count_params(cand) if by == "params" else measure(cand, example).macs)
            return tried[j]

        most = trial(len(plans) - 1)[1]
        if most > goal:
            raise ValueError(
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


# ---- saving and loading pruned models ---------------------------------------------------------------


def fit_to_state_dict(model: nn.Module, state_dict: dict) -> nn.Module:
    """Shrink the layers of a freshly built (unpruned) `model` to the shapes in a pruned
    `state_dict`, then load it. Works for Conv/ConvTranspose/BatchNorm/Linear layers, which is
    what channel pruning changes; the architecture itself (registry name + options) is unchanged."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        own = {k[len(prefix):]: v for k, v in state_dict.items()
               if k.startswith(prefix) and "." not in k[len(prefix):]}
        if not own:
            continue
        for key, value in own.items():
            current = getattr(module, key, None)
            if isinstance(current, torch.Tensor) and current.shape != value.shape:
                fresh = torch.empty(value.shape, dtype=current.dtype)
                setattr(module, key, nn.Parameter(fresh, current.requires_grad)
                        if isinstance(current, nn.Parameter) else fresh)
        w = getattr(module, "weight", None)
        if isinstance(module, nn.modules.conv._ConvNd) and w is not None:
            depthwise = module.groups > 1 and module.groups == module.in_channels
            if module.transposed:
                module.in_channels, module.out_channels = w.shape[0], w.shape[1] * module.groups
            else:
                module.out_channels = w.shape[0]
                module.in_channels = w.shape[1] * (w.shape[0] if depthwise else module.groups)
                if depthwise:
                    module.groups = module.in_channels = w.shape[0]
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.num_features = own.get("running_mean", own.get("weight")).shape[0]
        elif isinstance(module, nn.Linear) and w is not None:
            module.out_features, module.in_features = w.shape
    model.load_state_dict(state_dict)
    return model


def load_model(path):
    """(model, normalisation, meta) from a ground checkpoint, pruned or not (D's format)."""
    from ground.checkpoints import build_arch, read_checkpoint
    from ground.data import Normalization
    state = read_checkpoint(path)
    model = fit_to_state_dict(build_arch(state["arch"]), state["state_dict"])
    meta = dict(state["meta"], arch=state["arch"], step=state["step"])
    return model.eval(), Normalization.from_dict(state["norm"]), meta


# ---- the stage: a checkpoint of a run folder in, a pruned (and fine-tuned) checkpoint out ----------


def prune_stage(run_dir, criterion_name: str, target: float, by: str = "params",
                round_to: int | None = DEFAULT_ROUND_TO, steps: int = 1, scope: str = "local",
                checkpoint: str = "student.pt", finetune_steps: int = 200, finetune_with: str = "teacher",
                name: str | None = None, evaluate: bool = True, progress: bool = True) -> dict:
    """Prune a checkpoint of a run folder to `target`, fine-tune it (pruning-aware distillation
    with the run's teacher by default; "self": the unpruned model teaches; "labels"; "none"),
    score it before and after on the held-out image, and write `pruned/NAME.pt` with a lineage
    record. With `steps` > 1 the fine-tuning budget is spread over the steps."""
    from ground.checkpoints import save_checkpoint
    from ground.sweep import RunContext
    ctx = RunContext.open(run_dir, progress)
    base, norm, meta = ctx.load(checkpoint)
    example = ctx.example(norm)
    name = name or f"{criterion_name}-{round(100 * target)}{'-macs' if by == 'macs' else ''}"
    per_step = max(1, finetune_steps // steps) if finetune_steps > 0 else 0

    def between(model, i):
        ctx.finetune(model, per_step, finetune_with, reference_model=base, norm=norm, desc=f"fine-tune step {i}")

    loss_fn = ctx.loss_fn(norm, finetune_with, base) if get_criterion(criterion_name).needs_gradients else None
    res = prune_to_target(base, example, criterion_name, target, by=by, round_to=round_to, steps=steps,
                          loss_fn=loss_fn, between_steps=between if per_step else None, scope=scope)
    metrics = {}
    if evaluate and ctx.evals:
        metrics["unpruned"] = ctx.evaluate(ctx.torch_predict(base, norm))
        metrics["pruned"] = ctx.evaluate(ctx.torch_predict(res.model, norm))
    history = ctx.finetune(res.model, finetune_steps - per_step * (steps - 1), finetune_with,
                           reference_model=base, norm=norm, desc="fine-tune") if per_step else []
    if evaluate and ctx.evals:
        metrics["fine_tuned"] = ctx.evaluate(ctx.torch_predict(res.model, norm))
    out = ctx.run_dir / "pruned" / f"{name}.pt"
    info = {"source": checkpoint, **res.as_dict(), "finetune": {"steps": finetune_steps, "with": finetune_with,
                                                                "final_loss": history[-1]["loss"] if history else None}}
    save_checkpoint(out, res.model, meta["arch"], norm, meta={"name": name, "role": "pruned", "prune": info})
    summary = {k: {m: v.get(m) for m in ("miou", "f1", "accuracy", "agreement")} for k, v in metrics.items()}
    ctx.folder.add_stage(f"prune:{name}", [out], summary, **info,
                         label_free=ctx.label_free and finetune_with != "labels")
    return {"checkpoint": str(out.relative_to(ctx.run_dir)), "run_dir": str(ctx.run_dir), **info,
            "metrics": metrics}


def cmd_prune(args) -> int:
    """`eoedge ground prune RUN ...` (the row lives in ground/cli.py)."""
    from shared.cliutil import emit
    res = prune_stage(args.run, args.criterion, args.target, by=args.by,
                      round_to=None if args.round_to == 0 else args.round_to, steps=args.steps, scope=args.scope,
                      checkpoint=args.checkpoint, finetune_steps=args.finetune_steps,
                      finetune_with=args.finetune_with, name=args.name, progress=not args.json)

    def human(r: dict) -> str:
        lines = [f"{r['criterion']} ({r['scope']}, round_to={r['round_to']}): {r['before']['params']:,} -> "
                 f"{r['after']['params']:,} params (-{r['params_reduction']:.1%}), MACs -{r['macs_reduction']:.1%}"]
        for k, v in r["metrics"].items():
            lines.append(f"  mIoU {k}: {v['miou']:.4f}")
        lines.append(f"checkpoint: {r['run_dir']}/{r['checkpoint']}")
        return "\n".join(lines)
    emit(res, args.json, human)
    return 0
