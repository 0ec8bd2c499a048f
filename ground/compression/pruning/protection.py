"""What must not be pruned: the layers whose output channels are the model's output channels."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ground.errors import GroundError


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
        raise GroundError(f"{type(model).__name__}: no convolution or linear layer produces the output; "
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
