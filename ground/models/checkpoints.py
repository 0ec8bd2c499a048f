"""Model checkpoints that rebuild themselves: architecture (registry name + options), weights,
normalisation statistics and training state, so the next stage (pruning, FP16, export) needs only
the file. ONE `load_model`, pruned checkpoints included: channel pruning changes layer widths, not
the architecture, so the registry builds the unpruned model and `fit_to_state_dict` shrinks its
layers to the saved shapes before loading. A low-rank factorisation does change it (a conv becomes
two): the checkpoint's arch names the factorised layers and `build_arch` rebuilds them."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ground.compression.lowrank import apply_ranks
from ground.data.normalization import Normalization
from ground.errors import CheckpointError, ConfigError
from ground.models.registry import build_student


FORMAT = "eoedge-ground-checkpoint/1"


def save_checkpoint(path: str | Path, model: torch.nn.Module, arch: dict, norm: Normalization,
                    meta: dict | None = None, optimizer=None, scheduler=None, step: int = 0,
                    history: list | None = None) -> Path:
    """`arch` = {"name": registry name or "smp:Arch/encoder", "in_channels", "num_classes", "options"}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "arch": arch, "state_dict": model.state_dict(), "norm": norm.as_dict(),
             "meta": meta or {}, "step": step, "history": history or [],
             "optimizer": optimizer.state_dict() if optimizer is not None else None,
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "rng": torch.get_rng_state()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)          # a crash mid-write never leaves a half checkpoint
    return path


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an eoedge ground checkpoint (format {FORMAT})")
    return state


def build_arch(arch: dict) -> torch.nn.Module:
    """The registry's model, with the convolutions named in `arch["lowrank"]` ({layer: rank},
    ground.compression.lowrank) factorised: the structure only, the weights come from the state_dict."""
    try:
        model = build_student(arch["name"], int(arch["in_channels"]), int(arch["num_classes"]),
                              **arch.get("options", {}))
    except KeyError as exc:
        raise CheckpointError(f"checkpoint architecture lacks field {exc.args[0]!r}") from None
    try:
        return apply_ranks(model, arch.get("lowrank") or {})
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint architecture field 'lowrank': {exc}") from None


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


def load_model(path: str | Path) -> tuple[torch.nn.Module, Normalization, dict]:
    """(model in eval mode, normalisation, meta) of a ground checkpoint, pruned or not."""
    state = read_checkpoint(path)
    model = fit_to_state_dict(build_arch(state["arch"]), state["state_dict"])
    meta = dict(state["meta"], arch=state["arch"], step=state["step"])
    return model.eval(), Normalization.from_dict(state["norm"]), meta
