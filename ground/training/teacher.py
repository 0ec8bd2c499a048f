"""Teachers trained here: an smp model from the labelled data (CE, class-weighted), or from another
teacher's outputs on all imagery (KL): a small torch teacher for feature distillation."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from ground.config import RunConfig
from ground.data.dataset import Data
from ground.data.normalization import class_weights
from ground.errors import DataError
from ground.models.checkpoints import build_arch
from ground.teachers.cache import TeacherCache
from ground.training.batches import BatchSampler
from ground.training.loop import TrainConfig, fit
from ground.training.losses import build_objective


def smp_arch(spec: str, cfg: RunConfig, options: dict | None = None) -> dict:
    return {"name": spec if spec.startswith("smp:") else f"smp:{spec}", "in_channels": len(cfg.bands),
            "num_classes": len(cfg.classes), "options": dict(options or {})}


def train_smp_teacher(cfg: RunConfig, data: Data, path: Path, spec: str, train: dict, options: dict | None = None,
                      teacher=None, resume: bool = True, progress: bool = True) -> tuple[object, list]:
    """An smp model trained here: from the labelled data (CE, class-weighted), or, given a `teacher`,
    from that teacher's outputs on all imagery (KL). Resumes from `path` if it exists."""
    arch = smp_arch(spec, cfg, options)
    torch.manual_seed(cfg.seed)          # the same initial weights on every (re)start
    model = build_arch(arch)
    tcfg = TrainConfig(**{**asdict(cfg.train), **train})
    if teacher is None:
        samples = data.labelled
        if not samples:
            raise DataError("training a teacher from labels needs data.labelled")
        weights = class_weights(samples, len(cfg.classes), cfg.class_weights)
        objective, cache = build_objective("ce", class_weights=weights.tolist()), None
    else:
        samples = data.distill_samples(with_labels=False)
        objective, cache = build_objective("kl", temperature=1.0), TeacherCache(cfg.cache, teacher)
    sampler = BatchSampler(samples, tcfg, cache)
    sampler.warm(progress)
    history = fit(model, sampler, objective, data.norm, tcfg, checkpoint=path, arch=arch, resume=resume,
                  meta={"name": arch["name"], "role": "teacher"}, progress=progress, desc=f"teacher {spec}")
    return model, history
