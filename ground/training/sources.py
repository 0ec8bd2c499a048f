"""Where fine-tuning batches come from, by name: the run's teacher (pruning-aware distillation),
`self` (the unpruned model teaches its pruned copy), or the run's `labels`. Label-free sources
never see a human label; the distillation term is weighted per class as the run's was."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ground.config import Experiment, RunConfig
from ground.data.dataset import Data
from ground.data.normalization import Normalization, class_weights
from ground.data.sample import Sample
from ground.errors import ConfigError
from ground.teachers.cache import TeacherCache
from ground.teachers.torch_teacher import TorchTeacher
from ground.training.batches import BatchSampler, MixedSampler
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
                 progress: bool = True, ctx=None, mix: tuple[list[Sample], float] | None = None
                 ) -> tuple[BatchSampler | MixedSampler, Objective]:
    """(BatchSampler, objective) for fine-tuning from `source` (see FINETUNE_SOURCES). Under torchrun
    (`ctx`, ground.training.distributed) each rank labels its share of the cache, then all wait.

    `mix = (samples, replay)`: batches of new imagery (`samples`, which the teacher labels) with
    round(batch * replay) crops of every batch from the run's own imagery, so the model keeps what
    it learnt there (ground.stages.redistil)."""
    if source not in FINETUNE_SOURCES or source == "none":
        raise ConfigError(f"fine-tuning source must be one of {FINETUNE_SOURCES[:-1]}, got {source!r}")
    if source == "labels":
        if mix is not None:
            raise ConfigError("new samples are unlabelled: mixing them in needs a teacher, not 'labels'")
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
    if mix is None:
        sampler = BatchSampler(samples, train, cache)
        sampler.warm(progress, ctx)
    else:
        sampler = _mixed(samples, mix, train, cache, progress, ctx)
        samples = samples + list(mix[0])
    if train.distill_class_weights != "none":
        # the run weighted its distillation term by class counts on the teacher's masks: the same here
        options["distill_weights"] = teacher_class_weights(samples, cache, len(cfg.classes),
                                                           train.distill_class_weights).tolist()
    return sampler, build_objective(loss, **options)


def _mixed(replay_samples: list[Sample], mix: tuple[list[Sample], float], train: TrainConfig, cache,
           progress: bool, ctx) -> MixedSampler:
    """Replay crops of the run's imagery, then crops of the new samples, in every batch."""
    new, replay = list(mix[0]), float(mix[1])
    if not 0.0 <= replay < 1.0:
        raise ConfigError(f"replay must be within 0..1 (the share of each batch from the run's own imagery; "
                          f"1 would never show the new samples), got {replay}")
    if not new:
        raise ConfigError("re-distillation: no new samples to learn from")
    n_old = round(train.batch * replay)
    if replay > 0 and n_old == 0 or n_old >= train.batch:
        raise ConfigError(f"replay {replay} of a batch of {train.batch} leaves "
                          f"{'no replay crop' if n_old == 0 else 'no new crop'}: change train.batch or replay")
    parts = []
    if n_old:      # its own seed stream: the replay crops do not depend on the new samples
        parts.append(BatchSampler(replay_samples, replace(train, batch=n_old, seed=train.seed * 2 + 1), cache))
    parts.append(BatchSampler(new, replace(train, batch=train.batch - n_old, seed=train.seed * 2), cache))
    for p in parts:
        p.warm(progress, ctx)
    return MixedSampler(parts)
