"""How a model is trained: steps, batches, crops, learning rate, augmentation, balance. One table
of the run config (`[train]`), checked before any work starts."""
from __future__ import annotations

from dataclasses import dataclass, field

from ground.data.augment import transforms_for
from ground.errors import ConfigError

# where fine-tuning batches come from (ground.training.sources)
FINETUNE_SOURCES = ("teacher", "self", "labels", "none")


@dataclass
class TrainConfig:
    steps: int = 400
    batch: int = 16
    crop: int = 128
    lr: float = 5e-3
    weight_decay: float = 1e-4
    augment: list = field(default_factory=lambda: ["flip", "rot90", "crop"])
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    # label-free distillation of a rare class (ground.stages.distill.train_student): the share of crops
    # centred on a pixel of a class drawn uniformly (teacher's argmax, or labels), and per-class
    # weights of the distillation term counted on the teacher's masks ("none", "inverse", "log", list)
    balance: float = 0.0
    distill_class_weights: object = "none"

    def __post_init__(self):
        for name in ("steps", "batch", "crop", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"training: {name} must be >= 1, got {getattr(self, name)}")
        if float(self.lr) <= 0:
            raise ConfigError(f"training: lr must be > 0, got {self.lr}")
        if not 0.0 <= float(self.balance) <= 1.0:
            raise ConfigError(f"training: balance must be within 0..1, got {self.balance}")
        transforms_for(self.augment)     # names checked here, before any work
