"""The precision contract: which precision a bundle runs at, and whether this device can.

A bundle's manifest says the precision it was validated at on the ground (`precision`: fp32,
fp16, bf16 or int8; its reference outputs and tolerances were computed at it). The daemon
compiles the model with the matching OpenVINO inference precision hint, so the self-test on the
reference tiles runs at it too:

    precision   INFERENCE_PRECISION_HINT   device capability needed (OPTIMIZATION_CAPABILITIES)
    fp32        f32                        FP32
    fp16        f16                        FP16
    bf16        bf16                       BF16
    int8        f32                        INT8   (the IR's FakeQuantize nodes run as int8
                                                   kernels; the rest of the graph at f32)

The onboard config may force another precision (`[runtime] precision`, e.g. fp32 on a board
without BF16) and may declare the device's capabilities (`[runtime] capabilities`) where
OpenVINO mis-reports them. A precision the device cannot run is refused (PrecisionUnsupported,
code `precision_unsupported`) before anything is compiled.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from onboard.errors import PrecisionUnsupported
from shared.manifest import INFERENCE_HINTS, REQUIRED_CAPABILITY

AUTO = "auto"                 # config value: run each bundle at its manifest's precision


@dataclass(frozen=True)
class Precision:
    """The precision a model runs at: the manifest's (`declared`), the one compiled (`running`),
    whether the config forced it (`overridden`: running differs from declared), the hint, and
    the device capabilities it was checked against."""

    declared: str
    running: str
    overridden: bool
    hint: str
    capabilities: tuple[str, ...]

    def as_dict(self) -> dict:
        return {**asdict(self), "capabilities": list(self.capabilities)}


def choose_precision(declared: str, override: str, capabilities: Sequence[str],
                     device: str) -> Precision:
    """The precision to compile at: `declared` (the manifest's), or `override` unless it is
    "auto"; raise PrecisionUnsupported if the device's capabilities lack what it needs."""
    running = declared if override == AUTO else override
    needed = REQUIRED_CAPABILITY[running]
    if needed not in capabilities:
        forced = f" (forced by [runtime] precision; the bundle says {declared})" \
            if running != declared else ""
        raise PrecisionUnsupported(
            f"precision {running}{forced} needs {needed}, which device {device} cannot run "
            f"(its capabilities: {', '.join(capabilities) or 'none'})")
    return Precision(declared, running, running != declared, INFERENCE_HINTS[running],
                     tuple(capabilities))
