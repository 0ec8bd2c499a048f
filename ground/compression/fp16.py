"""FP16 as the satellite computes it: emulated half precision in torch, and FP16-aware fine-tuning.

A Myriad X VPU (and an ARM CPU such as a Raspberry Pi 5) runs the FP16 IR in half precision:
weights *and* activations are float16 (max 65504, 11-bit significand). OpenVINO on this x86 CPU
silently decompresses the FP16 IR and computes in FP32 (see STACK-NOTES), so the ground must
emulate FP16 itself to see what the flight hardware will see:

- `emulate_fp16(model, mode="round")`: a copy of the model as deployed: BatchNorm folded into the
  convolution before it (as OpenVINO does), weights rounded to float16, the input and every
  layer's output rounded to float16 (an overflow becomes inf, a tiny value 0). The maths between
  roundings is FP32; that is the storage-precision effect, which dominates for small CNNs.
  `mode="half"` runs torch's real float16 kernels instead (about 40x slower on this CPU; a
  cross-check of "round").
- `fp16_aware(model)`: a context in which the model's forward runs in emulated FP16 (weights
  and activations rounded, gradients passed straight through the rounding) while the optimiser
  keeps updating the FP32 master weights (deployment-aligned training, as in the
  deployment-aligned NAS paper). Inside it, any training loop trains for FP16.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ground.errors import GroundError

FP16_MAX = float(torch.finfo(torch.float16).max)      # 65504
EMULATION_MODES = ("round", "half")


def round_fp16(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded to the nearest float16 (returned in x's dtype); overflow gives +-inf."""
    return x.to(torch.float16).to(x.dtype)


def round_fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """Rounded to float16 in the forward pass, identity in the backward pass (straight-through):
    the loss sees FP16 numerics while the FP32 master weights still get useful gradients."""
    return x + (round_fp16(x) - x).detach()


# ---- folding BatchNorm, as the deployed graph has it -----------------------------------------------

def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with every Conv -> BatchNorm pair that sits next to each other
    in an `nn.Sequential` folded into one convolution (BatchNorm replaced by Identity). OpenVINO
    folds them too, so the FP16 weights that fly are the *folded* ones. Pairs outside a Sequential
    are left as they are (their FP16 emulation then rounds the two separately)."""
    model = copy.deepcopy(model).eval()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        keys = list(seq._modules)
        for a, b in zip(keys, keys[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats
                    and bn.num_features == conv.out_channels):
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    return model


def _leaves(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if not list(m.children()) and not isinstance(m, nn.Identity))


def _round_output_hook(_module, _inputs, output):
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        return round_fp16_ste(output)
    return output


def _round_input_hook(_module, args):
    return tuple(round_fp16_ste(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


# ---- evaluation: the model as the VPU computes it --------------------------------------------------

class _HalfPrecision(nn.Module):
    """Run a float16 copy with torch's half kernels; FP32 in and out, like the IR's interface."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(torch.float16)).float()


def emulate_fp16(model: nn.Module, mode: str = "round") -> nn.Module:
    """A copy of `model` that computes as the FP16 IR does on FP16 hardware (eval mode, BN folded).

    "round": FP32 arithmetic, but the input, every weight and every layer output rounded to
    float16 (fast). "half": torch float16 kernels throughout (slow on x86, a cross-check).
    The original model is not modified.
    """
    if mode not in EMULATION_MODES:
        raise GroundError(f"FP16 emulation mode must be one of {EMULATION_MODES}, got {mode!r}")
    fused = fuse_batchnorm(model)
    if mode == "half":
        return _HalfPrecision(fused).eval()
    with torch.no_grad():
        for p in fused.parameters():
            p.copy_(round_fp16(p))
        for name, b in fused.named_buffers():
            if b.is_floating_point():
                b.copy_(round_fp16(b))
    fused.register_forward_pre_hook(_round_input_hook)
    for leaf in _leaves(fused):
        leaf.register_forward_hook(_round_output_hook)
    return fused.eval()


def fp16_overflows(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Largest |activation| per layer on `x` in FP32, for the layers that exceed the float16 range
    (what would become inf on the VPU). Empty when everything fits."""
    found: dict[str, float] = {}
    handles = []
    for name, m in model.named_modules():
        if list(m.children()):
            continue

        def hook(_m, _i, out, name=name):
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                peak = float(out.detach().abs().max())
                if peak > FP16_MAX:
                    found[name] = max(peak, found.get(name, 0.0))
        handles.append(m.register_forward_hook(hook))
    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            model(x)
        model.train(was)
    finally:
        for h in handles:
            h.remove()
    return found


# ---- training: FP16 forward, FP32 master weights ----------------------------------------------------

class _RoundFP16(nn.Module):
    """A parametrization: the layer sees its weight (or bias) rounded to float16 (straight-through)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return round_fp16_ste(w)


@contextmanager
def fp16_aware(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model` computes in emulated FP16 (weights, the input and every layer's
    output rounded to float16, straight-through gradients) while its parameters, the FP32 master
    weights, are what any optimiser updates. On exit the model is plain FP32 again, with the
    weights it learnt (state_dict keys unchanged).

        with fp16_aware(student):
            train(student, ...)        # any loop: it sees ordinary parameters
    """
    handles = [model.register_forward_pre_hook(_round_input_hook)]
    handles += [leaf.register_forward_hook(_round_output_hook) for leaf in _leaves(model)]
    # Parametrizing swaps each weight for a new "original" Parameter object; an optimiser must be
    # built inside the block (on model.parameters()), which is what a training call does.
    parametrized = []
    for m in list(model.modules()):
        for pname, p in list(m.named_parameters(recurse=False)):
            if not parametrize.is_parametrized(m, pname):
                parametrize.register_parametrization(m, pname, _RoundFP16(), unsafe=True)
                parametrized.append((m, pname))
    try:
        yield model
    finally:
        for m, pname in parametrized:
            # keep the FP32 master values (not the rounded view) as the plain weight again
            parametrize.remove_parametrizations(m, pname, leave_parametrized=False)
        for h in handles:
            h.remove()
