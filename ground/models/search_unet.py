"""The searchable student: a U-Net whose every choice is a constructor argument, so the
architecture search (ground.search.space) can name any member of the family in a checkpoint's
`arch` and `load_model`, the exporter and the pruner handle it like any student.

Per level: width, plain or depthwise-separable convolutions, kernel 3 or 5. For the whole net:
bilinear or transposed-convolution upsampling, concatenated or added skips, the activation.
Only Conv/BatchNorm/activation/MaxPool/Resize (or ConvTranspose)/Concat/Add: OpenVINO exports it
and torch-pruning follows its channel dependencies (the additions and concatenations included).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ground.errors import GroundError
from ground.models.tiny_unet import UNet

ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "leaky-relu": nn.LeakyReLU, "hardswish": nn.Hardswish}
UPSAMPLING = ("bilinear", "transpose")
SKIPS = ("concat", "add")
KERNELS = (3, 5)


def _conv(cin: int, cout: int, kernel: int, separable: bool, act: str) -> list[nn.Module]:
    pad = kernel // 2
    if separable:      # depthwise kxk then pointwise 1x1 (MobileNet style)
        convs = [nn.Conv2d(cin, cin, kernel, padding=pad, groups=cin, bias=False), nn.Conv2d(cin, cout, 1, bias=False)]
    else:
        convs = [nn.Conv2d(cin, cout, kernel, padding=pad, bias=False)]
    return convs + [nn.BatchNorm2d(cout), ACTIVATIONS[act]()]


class Block(nn.Sequential):
    """Two convolutions (the first may be kept full: it sees raw bands at the stem)."""

    def __init__(self, cin: int, cout: int, kernel: int, separable: bool, act: str, full_first: bool = False):
        super().__init__(*_conv(cin, cout, kernel, separable and not full_first, act),
                         *_conv(cout, cout, kernel, separable, act))


class UpLevel(nn.Module):
    """Upsample x2, merge the skip (concatenate, or add after matching its channels), block."""

    def __init__(self, cin: int, cskip: int, cout: int, kernel: int, separable: bool, act: str,
                 upsample: str, skip: str):
        super().__init__()
        self.skip = skip
        cup = cskip if skip == "add" else cin          # an added skip needs equal channels
        if upsample == "transpose":
            self.up = nn.ConvTranspose2d(cin, cup, 2, stride=2)
        else:
            resize = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
            self.up = resize if cup == cin else nn.Sequential(nn.Conv2d(cin, cup, 1, bias=False), resize)
        self.block = Block(cup if skip == "add" else cup + cskip, cout, kernel, separable, act)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        return self.block(x + skip if self.skip == "add" else torch.cat([x, skip], dim=1))


class SearchUNet(UNet):
    """`len(widths)` levels; `separable` and `kernels` per level (a single value applies to all).
    Input sides must be multiples of 2 ** (levels - 1). Output: logits (N, K, H, W)."""

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int] = (8, 16, 32),
                 separable: Sequence[bool] | bool = False, kernels: Sequence[int] | int = 3,
                 upsample: str = "bilinear", skip: str = "concat", activation: str = "relu"):
        super().__init__()
        widths = [int(w) for w in widths]
        n = len(widths)
        separable = [bool(s) for s in (separable if isinstance(separable, (list, tuple)) else [separable] * n)]
        kernels = [int(k) for k in (kernels if isinstance(kernels, (list, tuple)) else [kernels] * n)]
        if n < 2 or min(widths) < 1 or len(separable) != n or len(kernels) != n:
            raise GroundError(f"search-unet: widths {widths}, separable {separable}, kernels {kernels}: "
                              "one positive width, one separable flag and one kernel per level (2 levels or more)")
        for name, value, allowed in (("kernels", kernels, KERNELS), ("upsample", [upsample], UPSAMPLING),
                                     ("skip", [skip], SKIPS), ("activation", [activation], tuple(ACTIVATIONS))):
            if any(v not in allowed for v in value):
                raise GroundError(f"search-unet: {name} must be among {allowed}, got {value}")
        self.config = {"in_channels": int(in_channels), "num_classes": int(num_classes), "widths": widths,
                       "separable": separable, "kernels": kernels, "upsample": upsample, "skip": skip,
                       "activation": activation}
        self.stem = Block(in_channels, widths[0], kernels[0], separable[0], activation, full_first=True)
        self.down = nn.ModuleList(Block(widths[i - 1], widths[i], kernels[i], separable[i], activation)
                                  for i in range(1, n))
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(UpLevel(widths[i + 1], widths[i], widths[i], kernels[i], separable[i], activation,
                                        upsample, skip) for i in reversed(range(n - 1)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)
