"""Where fine-tuning batches come from, by name: the run's teacher (pruning-aware distillation),
`self` (the unpruned model teaches its pruned copy), or the run's `labels`. Label-free sources
never see a human label; the distillation term is weighted per class as the run's was."""
from __future__ import annotations

import numpy as np

from ground.config import Experiment, RunConfig
from ground.data.dataset import Data
from ground.data.normalization import Normalization, class_weights
from ground.data.sample import Sample
from ground.errors import ConfigError
from ground.teachers.cache import TeacherCache
from ground.teachers.torch_teacher import TorchTeacher
from ground.training.batches import BatchSampler
from ground.training.config import FINETUNE_SOURCES, TrainConfig
from ground.training.losses import Objective, build_objective


def teacher_class_weights(samples: list[Sample], cache: TeacherCache, num_classes: int, method) -> np.ndarray:
    """Class weights counted on the teacher's masks (view 0) of the training imagery: label-free.
    Samples that carry labels are counted by their labels."""
    masked = [s if s.labels is not None else
              Sample(s.image, cache.probs(s, 0).astype(np.float32).argmax(0).astype(np.uint8), s.name, s.files)
              for s in samples]
    return class_weights(masked, num_classes, method)


def batch_source(source: str, cfg: RunConfig, train: TrainConfig, data: Data, experiment: Experiment,
                 teacher=None, reference_model=None, norm: Normalization | None = None,
                 progress: bool = True, ctx=None) -> tuple[BatchSampler, Objective]:
    """(BatchSampler, objective) for fine-tuning from `source` (see FINETUNE_SOURCES). Under torchrun
    (`ctx`, ground.training.distributed) each rank labels its share of the cache, then all wait."""
    if source not in FINETUNE_SOURCES or source == "none":
        raise ConfigError(f"fine-tuning source must be one of {FINETUNE_SOURCES[:-1]}, got {source!r}")
    if source == "labels":
        if not data.labelled:
            raise ConfigError("fine-tuning with labels needs data.labelled in the run's config")
        return BatchSampler(data.labelled, train), build_objective("ce")
    loss = experiment.loss if experiment.loss != "ce" else "kl"
    options = {k: v for k, v in experiment.options.items() if k == "temperature" and loss == "kl"}
    if source == "self":
        if reference_model is None:
            raise ConfigError("fine-tuning source 'self' needs the unpruned model")
        teacher = TorchTeacher(reference_model, norm or data.norm, "self", tile=cfg.tile, overlap=cfg.overlap)
    # label-free: the teacher (or the unpruned student) labels every image, no human label
    samples = data.distill_samples(with_labels=False)
    cache = TeacherCache(cfg.cache, teacher)
    sampler = BatchSampler(samples, train, cache)
    sampler.warm(progress, ctx)
    if train.distill_class_weights != "none":
        # the run weighted its distillation term by class counts on the teacher's masks: the same here
        options["distill_weights"] = teacher_class_weights(samples, cache, len(cfg.classes),
                                                           train.distill_class_weights).tolist()
    return sampler, build_objective(loss, **options)
