"""Teachers by name, one registry:

- `smp:Arch/encoder` (e.g. `smp:FPN/efficientnet-b4`, the default): any segmentation-models-pytorch
  model, trained here from labels (ground.training.teacher), with `encoder_weights=None`.
- `ukis-csmask-6b-l1c` (and -6b-l2a, -4b-l1c, -4b-l2a): the cloud/shadow models of ukis-csmask.
- `openvino:PATH` (an .onnx or IR .xml): any external model; give bands, mean, std, classes.
- `checkpoint:PATH`: a torch checkpoint of a run (trained, distilled or pruned).
"""
from __future__ import annotations

from typing import Callable

from ground.errors import GroundError
from ground.teachers.base import Teacher
from ground.teachers.openvino_teacher import OpenVINOTeacher, ukis_csmask_teacher
from ground.teachers.torch_teacher import TorchTeacher


DEFAULT_TEACHER = "smp:FPN/efficientnet-b4"


TEACHERS: dict[str, Callable[..., Teacher]] = {
    "ukis-csmask-6b-l1c": lambda **kw: ukis_csmask_teacher("6b-l1c", **kw),
    "ukis-csmask-6b-l2a": lambda **kw: ukis_csmask_teacher("6b-l2a", **kw),
    "ukis-csmask-4b-l1c": lambda **kw: ukis_csmask_teacher("4b-l1c", **kw),
    "ukis-csmask-4b-l2a": lambda **kw: ukis_csmask_teacher("4b-l2a", **kw),
}


def build_teacher(name: str, **options) -> Teacher:
    """A ready teacher: a registry name, `openvino:PATH` (with bands/mean/std/num_classes options),
    or `checkpoint:PATH` (a torch teacher trained here by ground.train)."""
    if name in TEACHERS:
        return TEACHERS[name](**options)
    if name.startswith("openvino:"):
        missing = [k for k in ("bands", "mean", "std", "num_classes") if k not in options]
        if missing:
            raise GroundError(f"teacher {name}: an external model needs {missing} in the [teacher] table")
        return OpenVINOTeacher(name.split(":", 1)[1], **options)
    if name.startswith("checkpoint:"):
        return TorchTeacher.from_checkpoint(name.split(":", 1)[1], **options)
    raise GroundError(f"unknown teacher {name!r}; known: {sorted(TEACHERS)}, openvino:PATH, checkpoint:PATH "
                     f"(train an smp teacher, e.g. {DEFAULT_TEACHER}, with `eoedge ground train-teacher`)")
