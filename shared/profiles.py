"""Device profiles: what an IR must be for the computer that will fly it.

A profile names a target (`cpu-x86`, `rpi4`, `rpi5`, `myriadx`) and fixes, as a contract
between the ground (which exports, checks and bundles for it) and the daemon (which runs it):

- `openvino`: the runtime versions it runs, `[min, max)` (max None: no upper bound known);
- `max_opset`: the newest opset the oldest of those runtimes can read (an IR layer is written
  with the opset of its op version: `MaxPool` from opset14 is MaxPool-14, which OpenVINO 2022.3,
  knowing opset1..opset10, refuses);
- `ops`: the IR layer types its plugin runs (None: every op of those opsets), and
  `op_versions`: for ops the plugin runs only in some versions (Myriad: Interpolate-1 and -4);
- `computes`: the precision the device computes in by default (f32, f16), `precisions`: the
  bundle precisions (shared.manifest.PRECISIONS) it may be validated at;
- `self_test`: the least tolerance of the daemon's self-test on that device (the ground's own
  tolerance is raised to it): f16 arithmetic moves probabilities by ~1e-3 on a small U-Net.

Names are IR layer types as the .xml writes them (`Const`, `ReLU`, not the Python op names).
`get_profile(name)` raises UnknownProfile naming the known ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from shared.errors import UnknownProfile

DEFAULT_PROFILE = "cpu-x86"           # what a manifest without `profile` was checked against

# The layers an IR needs whatever the network (graph plumbing).
_PLUMBING = ("Parameter", "Result", "Const", "Convert")

# The MYRIAD plugin of OpenVINO 2022.3 (its sources: the ops it maps to VPU stages), restricted
# to what segmentation networks of this project use.
_MYRIAD_OPS = _PLUMBING + (
    "Convolution", "GroupConvolution", "ConvolutionBackpropData", "MaxPool", "AvgPool",
    "Interpolate", "SoftMax", "Concat", "Add", "Subtract", "Multiply", "Divide", "ReLU", "Clamp",
    "Sigmoid", "Tanh", "PRelu", "Elu", "Swish", "HSwish", "HSigmoid", "Mish", "ReduceMean",
    "Reshape", "Squeeze", "Unsqueeze", "Transpose", "ShapeOf", "Gather", "StridedSlice",
    "Pad", "BatchNormInference",
)


@dataclass(frozen=True)
class SelfTest:
    """The least tolerance of the daemon's self-test on the device."""

    max_abs_diff: float
    min_mask_agreement: float


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    device: str                                   # the OpenVINO device name the daemon uses
    openvino: tuple[str, str | None]              # [min, max) runtime versions
    max_opset: int
    computes: str                                 # f32 | f16
    precisions: tuple[str, ...]
    self_test: SelfTest
    ops: tuple[str, ...] | None = None
    op_versions: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def refusal(self, op_type: str, opset: int | None) -> str | None:
        """Why this profile cannot run a layer of `op_type` from opset `opset` (None: a layer
        of no standard opset, an extension), or None when it can."""
        if opset is None:
            return f"{op_type} is not an op of a standard opset"
        if self.ops is not None and op_type not in self.ops:
            return f"{op_type} is not run by {self.device} on {self.name}"
        if opset > self.max_opset:
            return (f"{op_type}-{opset} is from opset{opset}; OpenVINO {self.openvino[0]} reads "
                    f"opset1..opset{self.max_opset}")
        allowed = self.op_versions.get(op_type)
        if allowed is not None and opset not in allowed:
            return (f"{op_type}-{opset}: {self.device} runs only "
                    + ", ".join(f"{op_type}-{v}" for v in allowed))
        return None

    def runtime_accepts(self, version: str) -> bool:
        """Whether an OpenVINO version string ("2022.3.2", "2026.4.1-...") is in the range."""
        v = version_tuple(version)
        lo, hi = self.openvino
        return v >= version_tuple(lo) and (hi is None or v < version_tuple(hi))

    def as_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "device": self.device,
                "openvino": {"min": self.openvino[0], "max_exclusive": self.openvino[1]},
                "max_opset": self.max_opset, "ops": list(self.ops) if self.ops else None,
                "op_versions": {k: list(v) for k, v in self.op_versions.items()},
                "computes": self.computes, "precisions": list(self.precisions),
                "self_test": {"max_abs_diff": self.self_test.max_abs_diff,
                              "min_mask_agreement": self.self_test.min_mask_agreement}}


def version_tuple(version: str) -> tuple[int, ...]:
    """(2022, 3, 2) from "2022.3.2-9279-..." (the leading dotted numbers)."""
    out = []
    for part in version.split("-", 1)[0].split("."):
        if not part.isdigit():
            break
        out.append(int(part))
    return tuple(out)


PROFILES: dict[str, DeviceProfile] = {p.name: p for p in (
    DeviceProfile("cpu-x86", "x86-64 CPU (the test bench, a ground station)", "CPU",
                  ("2024.0", None), 14, "f32", ("fp32", "fp16", "bf16", "int8"), SelfTest(1e-2, 0.99)),
    # Cortex-A72: no FP16 arithmetic; the ARM CPU plugin runs f32 (and ignores an f16 hint)
    DeviceProfile("rpi4", "Raspberry Pi 4 (Cortex-A72, aarch64)", "CPU",
                  ("2024.0", None), 14, "f32", ("fp32", "int8"), SelfTest(1e-2, 0.99)),
    # Cortex-A76 has FP16 arithmetic: the ARM CPU plugin computes f16 by default
    DeviceProfile("rpi5", "Raspberry Pi 5 (Cortex-A76, aarch64)", "CPU",
                  ("2024.0", None), 14, "f16", ("fp32", "fp16", "int8"), SelfTest(2e-2, 0.98)),
    # The MYRIAD plugin exists only up to 2022.3 LTS, which reads opset1..opset10; the VPU
    # computes f16 (an fp32 bundle's FP16 IR runs there as f16: the tolerance allows for it)
    DeviceProfile("myriadx", "Intel Movidius Myriad X VPU (NCS2, MA2485 boards)", "MYRIAD",
                  ("2022.3", "2022.4"), 10, "f16", ("fp32", "fp16"), SelfTest(3e-2, 0.98),
                  ops=_MYRIAD_OPS, op_versions={"Interpolate": (1, 4)}),
)}


def get_profile(name: str) -> DeviceProfile:
    try:
        return PROFILES[name]
    except (KeyError, TypeError):
        raise UnknownProfile(f"unknown device profile {name!r} (known: {', '.join(PROFILES)})") from None
