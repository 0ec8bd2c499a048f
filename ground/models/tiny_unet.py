"""Students: the small networks that fly.

`TinyUNet` is the hand-written U-Net of de Vieilleville et al. (ISPRS 2020, "Towards distillation
of deep neural networks for satellite on-board image segmentation"): an encoder of double 3x3
convolutions and max-pools, a decoder of upsampling + concatenated skips, a 1x1 head. It uses only
Conv/BatchNorm/ReLU/MaxPool/Upsample (or ConvTranspose)/Concat, so it exports cleanly to ONNX and
OpenVINO and torch-pruning can follow its channel dependencies (the concatenations included).

Any segmentation-models-pytorch model can be a student too (ground.models.registry).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ground.errors import GroundError
from ground.models.size import count_params

UPSAMPLE_MODES = ("bilinear", "nearest", "transpose")


def _conv(cin: int, cout: int, separable: bool) -> list[nn.Module]:
    if separable:  # depthwise 3x3 then pointwise 1x1 (MobileNet style): ~8x fewer weights
        return [nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, separable: bool = False):
        super().__init__(*_conv(cin, cout, separable), *_conv(cout, cout, separable))


class Up(nn.Module):
    """Upsample x2, concatenate the skip, double conv."""

    def __init__(self, cin: int, cskip: int, cout: int, separable: bool, mode: str):
        super().__init__()
        if mode == "transpose":
            self.up = nn.ConvTranspose2d(cin, cin, 2, stride=2)
        else:
            self.up = nn.Upsample(scale_factor=2, mode=mode,
                                  **({"align_corners": False} if mode == "bilinear" else {}))
        self.conv = DoubleConv(cin + cskip, cout, separable)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """What every U-Net student shares: `stem`, `down` blocks with max-pools between them, `up`
    levels called as `level(x, skip)`, a `head`; `config["widths"]` gives the depth."""

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.config["widths"]) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.multiple or x.shape[-2] % self.multiple:
            raise GroundError(f"{type(self).__name__} input {tuple(x.shape[-2:])} must be a multiple of {self.multiple}"
                             " (tile or pad it first)")
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(self.pool(skips[-1])))
        x = skips.pop()
        for block in self.up:
            x = block(x, skips.pop())
        return self.head(x)


class TinyUNet(UNet):
    """U-Net with `len(widths)` levels (`len(widths) - 1` poolings) and concatenated skips.

    Input height and width must be multiples of 2 ** (len(widths) - 1). Output: logits (N, K, H, W).
    """

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int] = (8, 16, 32, 64),
                 separable: bool = False, upsample: str = "bilinear"):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2 or min(widths) < 1:
            raise GroundError(f"widths must hold at least two positive channel counts, got {widths}")
        if upsample not in UPSAMPLE_MODES:
            raise GroundError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        self.config = {"in_channels": int(in_channels), "num_classes": int(num_classes),
                       "widths": list(widths), "separable": bool(separable), "upsample": upsample}
        # The first convolution sees raw bands: keep it a full conv even when separable
        # (a depthwise conv over 6 bands would mix nothing).
        self.stem = nn.Sequential(*_conv(in_channels, widths[0], False), *_conv(widths[0], widths[0], separable))
        self.down = nn.ModuleList(DoubleConv(a, b, separable) for a, b in zip(widths[:-1], widths[1:]))
        self.pool = nn.MaxPool2d(2)
        # decoder level i takes the level below (widths[i+1] channels) and the skip of level i
        self.up = nn.ModuleList(Up(widths[i + 1], widths[i], widths[i], separable, upsample)
                                for i in reversed(range(len(widths) - 1)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    @classmethod
    def for_budget(cls, in_channels: int, num_classes: int, params: int | str, depth: int = 4,
                   separable: bool = False, upsample: str = "bilinear", multiple_of: int = 1) -> "TinyUNet":
        """The widest TinyUNet (widths w, 2w, 4w, ... rounded to `multiple_of`) with at most `params` parameters."""
        budget = parse_count(params)
        best = None
        base = float(max(1, multiple_of))
        while True:
            widths = tuple(max(multiple_of, int(round(base * 2 ** i / multiple_of)) * multiple_of)
                           for i in range(depth))
            n = count_tiny_unet_params(in_channels, num_classes, widths, separable, upsample)
            if n > budget:
                break
            best = widths
            base += 0.25
        if best is None:
            raise GroundError(f"no TinyUNet of depth {depth} fits in {budget} parameters")
        return cls(in_channels, num_classes, best, separable=separable, upsample=upsample)


def count_tiny_unet_params(in_channels, num_classes, widths, separable=False, upsample="bilinear") -> int:
    with torch.device("meta"):  # no memory, no init cost
        return count_params(TinyUNet(in_channels, num_classes, widths, separable, upsample))


def parse_count(value: int | str) -> int:
    """'100k' -> 100000, '1.5M' -> 1500000, 120000 -> 120000."""
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value).strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise GroundError(f"not a parameter count: {value!r} (use e.g. 120000, 100k, 1.5M)") from None
