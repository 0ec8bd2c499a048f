"""The one place the daemon meets OpenVINO's Python API, for every runtime it runs on.

OpenVINO 2022.3 LTS (the last with the MYRIAD plugin; Python 3.7-3.10) has its API under
`openvino.runtime` (`from openvino.runtime import Core`); 2023.1 and later put it at the top
(`openvino.Core`), and 2026 has no `openvino.runtime` any more. The ops the daemon adds around a
model (input scaling, activation) are taken from opset10, which both know. The rest of
`onboard` imports OpenVINO names from here only.

    from onboard import ov
    core = ov.Core(); ov.VERSION          # "2026.4.1-..." or "2022.3.2-..."
"""
from __future__ import annotations

import openvino

if hasattr(openvino, "Core"):            # 2023.1 and later
    from openvino import AsyncInferQueue, Core, Model, Output, PartialShape, Tensor, Type, get_version
    from openvino import opset10 as ops
else:                                    # 2022.x
    from openvino.runtime import AsyncInferQueue, Core, Model, Output, PartialShape, Tensor, Type, get_version
    from openvino.runtime import opset10 as ops

__all__ = ["AsyncInferQueue", "Core", "Model", "Output", "PartialShape", "Tensor", "Type", "ops", "VERSION",
           "rt_string", "property_string", "shared_tensor"]

VERSION = get_version()


def shared_tensor(array):
    """An ov.Tensor over `array`'s memory (no copy): OpenVINO reads or writes the array itself."""
    return Tensor(array, shared_memory=True)


def rt_string(value) -> str:
    """A runtime-info value as text (2022.3 gives str, later releases an OVAny)."""
    return value if isinstance(value, str) else value.astype(str)


def property_string(value) -> str:
    """A compiled model's property as text: an element type as its short name (f32), the rest str()."""
    return value.to_string() if isinstance(value, Type) else str(value)
