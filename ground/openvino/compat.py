"""An IR for a device profile (shared.profiles): op versions rewritten down where the semantics
are equal, and a static check of an IR's layers against the profile.

    model, rewrites = downgrade(ov_model, get_profile("myriadx"))   # MaxPool-14 -> MaxPool-8 ...
    problems = check_ir("export/student/model.xml", "myriadx")        # [] when it can run there

OpenVINO writes each layer with the opset of its op version (`MaxPool` version="opset14"); an
older runtime refuses a layer from an opset it does not know (2022.3: `Cannot create MaxPool
layer ... from unsupported opset: opset14`). The rewrites (DOWNGRADES) are the ones where the
newer version only added something the model does not use:

    MaxPool-14     -> MaxPool-8      unless rounding_type = ceil_torch (new in 14)
    AvgPool-14     -> AvgPool-1      unless rounding_type = ceil_torch
    Interpolate-11 -> Interpolate-4  unless mode is bilinear_pillow / bicubic_pillow (new in 11);
                                     v11 takes scales *or* sizes, v4 takes both (the unused one
                                     is a placeholder, as the v4 spec says)

A layer that needs a rewrite the model's attributes forbid raises IncompatibleIR naming it. The
check reads the .xml alone (ElementTree): it is what `bundle` runs before signing.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable

import numpy as np
import openvino as ov
import openvino.opset1 as opset1
import openvino.opset8 as opset8
import openvino.opset10 as opset10

from shared.profiles import DeviceProfile, get_profile
from ground.errors import IncompatibleIR

_OPSET = re.compile(r"^opset(\d+)$")


class _Unequal(Exception):
    """A rewrite that would change what the layer computes (the reason)."""


def _maxpool8(op):
    a = op.get_attributes()
    if a["rounding_type"].lower() == "ceil_torch":
        raise _Unequal("rounding_type ceil_torch has no MaxPool-8 equivalent")
    return opset8.max_pool(op.input_value(0), a["strides"], a["dilations"], a["pads_begin"], a["pads_end"],
                           a["kernel"], a["rounding_type"], a["auto_pad"], a["index_element_type"], a["axis"])


def _avgpool1(op):
    a = op.get_attributes()
    if a["rounding_type"].lower() == "ceil_torch":
        raise _Unequal("rounding_type ceil_torch has no AvgPool-1 equivalent")
    return opset1.avg_pool(op.input_value(0), a["strides"], a["pads_begin"], a["pads_end"], a["kernel"],
                           a["exclude-pad"], a["rounding_type"], a["auto_pad"])


def _interpolate4(op):
    a = op.get_attributes()
    if a["mode"] not in ("nearest", "linear", "linear_onnx", "cubic"):
        raise _Unequal(f"mode {a['mode']} has no Interpolate-4 equivalent")
    given = op.input_value(1)
    n = given.get_partial_shape()[0]
    if n.is_dynamic:
        raise _Unequal("its scales/sizes input has no static length")
    axes = op.input_value(2) if op.get_input_size() > 2 else None
    if a["shape_calculation_mode"] == "scales":      # v4 ignores sizes then: a placeholder
        sizes, scales = opset1.constant(np.ones(n.get_length(), np.int32)), given
    else:                                            # ... and scales in sizes mode
        sizes, scales = given, opset1.constant(np.ones(n.get_length(), np.float32))
    return opset10.interpolate(op.input_value(0), sizes, scales, a["mode"], a["shape_calculation_mode"],
                               a["pads_begin"], a["pads_end"], a["coordinate_transformation_mode"],
                               a["nearest_mode"], a["antialias"], a["cube_coeff"], axes)


# (op type, opset it is written with) -> (the opset of the older version, rewrite)
DOWNGRADES: dict[tuple[str, int], tuple[int, Callable]] = {
    ("MaxPool", 14): (8, _maxpool8),
    ("AvgPool", 14): (1, _avgpool1),
    ("Interpolate", 11): (4, _interpolate4),
}


def opset_number(version: str | None) -> int | None:
    """11 from "opset11"; None for a layer of no standard opset (an extension)."""
    m = _OPSET.match(version or "")
    return int(m.group(1)) if m else None


def downgrade(model, profile: DeviceProfile) -> tuple[object, list[dict]]:
    """Rewrite, in `model` (an ov.Model), every layer `profile` refuses into the older version it
    accepts (DOWNGRADES). Returns (model, [{layer, from, to}]). Layers without a rewrite are left
    for `check_ir` to name; a rewrite the layer's attributes forbid raises IncompatibleIR."""
    rewrites = []
    for op in model.get_ordered_ops():
        info = op.get_type_info()
        opset = opset_number(info.version_id)
        key = (info.name, opset)
        if key not in DOWNGRADES or profile.refusal(info.name, opset) is None:
            continue
        target, rewrite = DOWNGRADES[key]
        name = op.get_friendly_name()
        if profile.refusal(info.name, target) is not None:
            raise IncompatibleIR(f"layer {name!r}: {info.name}-{opset} cannot run on {profile.name}, "
                                 f"nor can {info.name}-{target}: {profile.refusal(info.name, target)}")
        try:
            new = rewrite(op)
        except _Unequal as exc:
            raise IncompatibleIR(f"layer {name!r}: {info.name}-{opset} cannot become {info.name}-{target} "
                                 f"for {profile.name}: {exc}") from None
        new.set_friendly_name(name)
        for i in range(op.get_output_size()):
            for target_input in list(op.output(i).get_target_inputs()):
                target_input.replace_source_output(new.output(i))
        rewrites.append({"layer": name, "from": f"{info.name}-{opset}", "to": f"{info.name}-{target}"})
    if rewrites:
        model.validate_nodes_and_infer_types()
    return model, rewrites


def ir_layers(xml_path: str | Path) -> list[dict]:
    """[{name, type, opset}] of every layer of an IR .xml (opset None: not a standard opset)."""
    xml_path = Path(xml_path)
    if not xml_path.is_file():
        raise FileNotFoundError(f"IR not found: {xml_path}")
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise IncompatibleIR(f"{xml_path}: not an OpenVINO IR ({exc})") from None
    if root.tag != "net":
        raise IncompatibleIR(f"{xml_path}: not an OpenVINO IR (root <{root.tag}>, expected <net>)")
    return [{"name": layer.get("name", ""), "type": layer.get("type", ""),
             "opset": opset_number(layer.get("version"))} for layer in root.iter("layer")]


def check_ir(xml_path: str | Path, profile: str | DeviceProfile) -> list[dict]:
    """Every layer of the IR that `profile` cannot run: [{layer, op, reason}] ([] when it can)."""
    profile = get_profile(profile) if isinstance(profile, str) else profile
    problems = []
    for layer in ir_layers(xml_path):
        reason = profile.refusal(layer["type"], layer["opset"])
        if reason is not None:
            op = layer["type"] + (f"-{layer['opset']}" if layer["opset"] is not None else "")
            problems.append({"layer": layer["name"], "op": op, "reason": reason})
    return problems


def require_compatible(xml_path: str | Path, profile: str | DeviceProfile) -> None:
    """Raise IncompatibleIR naming the first layer (and how many more) `profile` cannot run."""
    profile = get_profile(profile) if isinstance(profile, str) else profile
    problems = check_ir(xml_path, profile)
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more layer(s))" if len(problems) > 1 else ""
        raise IncompatibleIR(f"{xml_path}: {first['op']} (layer {first['layer']!r}) cannot run on "
                             f"{profile.name}: {first['reason']}{more}", problems)


def save_for(model, xml_path: str | Path, profile: str | DeviceProfile, fp16: bool) -> list[dict]:
    """Downgrade `model` for `profile`, save it (FP16 weights unless fp16=False), check the IR
    written; return the rewrites."""
    profile = get_profile(profile) if isinstance(profile, str) else profile
    model, rewrites = downgrade(model, profile)
    ov.save_model(model, str(xml_path), compress_to_fp16=bool(fp16))
    require_compatible(xml_path, profile)
    return rewrites
