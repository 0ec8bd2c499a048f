"""Feature distillation (FitNets, Romero et al. 2015): intermediate student features are mapped by
learned 1x1 adapters onto teacher features at chosen layers, and their squared error is added to the
output objective. Layers are chosen by module name (`model.named_modules()`), read with forward hooks.

    hooks = FeatureHooks(student, ["up.0", "up.1"])       # records on every forward
    adapters = FeatureAdapters.probe(student, s_layers, teacher, t_layers, example)
    loss = adapters.loss(hooks.features, teacher_hooks.features)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ground.errors import ConfigError
from ground.data.normalization import normalize


class FeatureHooks:
    """Forward hooks on named submodules; `features[name]` holds the latest output of each."""

    def __init__(self, model: nn.Module, layers: list[str]):
        modules = dict(model.named_modules())
        missing = [n for n in layers if n not in modules]
        if missing:
            sample = [n for n in modules if n][:12]
            raise ConfigError(f"feature layers {missing} not found in {type(model).__name__}; "
                             f"some layer names: {sample} ...")
        self.layers = list(layers)
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._recorder(n)) for n in layers]

    def _recorder(self, name: str):
        def hook(_module, _inputs, output):
            self.features[name] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class FeatureAdapters(nn.Module):
    """One 1x1 conv per (student layer -> teacher layer) pair; trained with the student, dropped after."""

    def __init__(self, pairs: list[tuple[str, str]], student_channels: list[int], teacher_channels: list[int]):
        super().__init__()
        self.pairs = list(pairs)
        self.adapters = nn.ModuleList(nn.Conv2d(s, t, 1) for s, t in zip(student_channels, teacher_channels))

    @classmethod
    def probe(cls, student: nn.Module, student_layers: list[str], teacher: nn.Module, teacher_layers: list[str],
              example_s: torch.Tensor, example_t: torch.Tensor | None = None) -> "FeatureAdapters":
        """Size the adapters by one dry forward pass of each network."""
        if len(student_layers) != len(teacher_layers):
            raise ConfigError(f"feature layers: {len(student_layers)} student layers but {len(teacher_layers)} "
                             "teacher layers; they pair one to one")
        channels = []
        for model, layers, x in ((student, student_layers, example_s),
                                 (teacher, teacher_layers, example_s if example_t is None else example_t)):
            with FeatureHooks(model, layers) as h, torch.no_grad():
                was = model.training
                model.eval()
                model(x.to(next(model.parameters()).device))     # the teacher may sit on a GPU
                model.train(was)
                channels.append([h.features[n].shape[1] for n in layers])
        return cls(list(zip(student_layers, teacher_layers)), *channels)

    def loss(self, student_feats: dict[str, torch.Tensor], teacher_feats: dict[str, torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for (s_name, t_name), adapter in zip(self.pairs, self.adapters):
            s = adapter(student_feats[s_name])
            t = teacher_feats[t_name].detach()
            if s.shape[-2:] != t.shape[-2:]:      # different strides: compare at the teacher's resolution
                s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
            total = total + F.mse_loss(s, t)
        return total / max(1, len(self.pairs))


class FeatureTerm:
    """FitNets term: student hooks + adapters vs. a frozen torch teacher's hooks on the same crops."""

    def __init__(self, student, teacher, student_layers, teacher_layers, weight: float = 1.0, crop: int = 64):
        if not hasattr(teacher, "model"):
            raise ConfigError(f"feature distillation needs a torch teacher (smp, trained here); "
                             f"{teacher.name} is a black box")
        self.teacher = teacher
        self.weight = float(weight)
        self.teacher.model.eval().requires_grad_(False)
        ex_s = torch.zeros(1, len(teacher.bands), crop, crop)
        self.adapters = FeatureAdapters.probe(student, student_layers, teacher.model, teacher_layers, ex_s)
        self.s_hooks = FeatureHooks(student, student_layers)
        self.t_hooks = FeatureHooks(teacher.model, teacher_layers)

    def __call__(self, x_raw: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.teacher.model(normalize(x_raw, self.teacher.norm))
        return self.weight * self.adapters.loss(self.s_hooks.features, self.t_hooks.features)

    def to(self, device) -> "FeatureTerm":
        """Adapters and the frozen teacher on the training device."""
        self.adapters.to(device)
        self.teacher.model.to(device)
        return self

    def close(self):
        self.s_hooks.remove()
        self.t_hooks.remove()
