"""Models by name, one registry: a config line names the student (`tiny-unet`,
`tiny-unet-separable`) or any segmentation-models-pytorch model as `smp:Arch/encoder`
(e.g. `smp:Unet/resnet18`, `smp:FPN/efficientnet-b4`), students and trained teachers alike."""
from __future__ import annotations

from typing import Callable, Sequence

import segmentation_models_pytorch as smp
from torch import nn

from ground.errors import CheckpointError
from ground.models.search_unet import SearchUNet
from ground.models.tiny_unet import TinyUNet


def _tiny_unet(in_channels: int, num_classes: int, params: int | str | None = None,
               widths: Sequence[int] | None = None, **kw) -> nn.Module:
    if params is not None and widths is not None:
        raise CheckpointError("student: give either params (a budget) or widths, not both")
    if params is not None:
        return TinyUNet.for_budget(in_channels, num_classes, params, **kw)
    kw.pop("multiple_of", None)     # sizing options mean nothing with explicit widths
    kw.pop("depth", None)
    return TinyUNet(in_channels, num_classes, widths or (8, 16, 32, 64), **kw)


def _tiny_unet_separable(in_channels, num_classes, **kw):
    return _tiny_unet(in_channels, num_classes, separable=True, **kw)


STUDENTS: dict[str, Callable[..., nn.Module]] = {
    "tiny-unet": _tiny_unet,
    "tiny-unet-separable": _tiny_unet_separable,
    "search-unet": SearchUNet,          # the architecture search's family (ground.search.space)
}


def build_student(name: str, in_channels: int, num_classes: int, **options) -> nn.Module:
    """A student by registry name, or any smp model as `smp:Arch/encoder` (e.g. `smp:Unet/resnet18`)."""
    if name.startswith("smp:"):
        return build_smp_model(name[4:], in_channels, num_classes, **options)
    if name not in STUDENTS:
        raise CheckpointError(f"unknown student {name!r}; known: {sorted(STUDENTS)} or smp:Arch/encoder")
    return STUDENTS[name](in_channels, num_classes, **options)


def build_smp_model(spec: str, in_channels: int, num_classes: int, **options):
    """`Arch/encoder` (e.g. `FPN/efficientnet-b4`, `Unet/resnet18`) -> an untrained smp model."""
    arch, _, encoder = spec.partition("/")
    if not encoder:
        raise CheckpointError(f"smp model must be written Arch/encoder (e.g. FPN/efficientnet-b4), got {spec!r}")
    options.setdefault("encoder_weights", None)     # never reach for a hub
    try:
        return smp.create_model(arch, encoder_name=encoder, in_channels=in_channels, classes=num_classes, **options)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"smp model {spec!r}: {exc}") from None
