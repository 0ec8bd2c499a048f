"""How a model is trained: steps, batches, crops, learning rate, augmentation, balance. One table
of the run config (`[train]`), checked before any work starts."""
from __future__ import annotations

from dataclasses import dataclass, field

from ground.data.augment import transforms_for
from ground.errors import ConfigError
from ground.training.device import PRECISIONS

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
    # where and how (ground.training.device): "auto" = CUDA when present, else the CPU; "cuda:1", "cpu".
    # precision "auto" = bf16 on a GPU that has it (else fp16 with a grad scaler), fp32 on the CPU
    device: str = "auto"
    precision: str = "auto"
    workers: int = 0          # DataLoader worker processes of the lazy scene dataset (0: in the trainer)
    # torch CPU threads while training (0: torch's default, one per core). On a shared, loaded machine
    # one thread is several times faster than two spinning against other jobs (docs/ground.md)
    threads: int = 0
    # validation (a split by scene) every val_every steps (0: none); stop after `patience` validations
    # without improvement (0: never); the best weights are kept and restored
    val_every: int = 0
    patience: int = 0
    validation: object = 0.0  # scenes of the training imagery held out: a fraction, or a list of names

    def __post_init__(self):
        for name in ("steps", "batch", "crop", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"training: {name} must be >= 1, got {getattr(self, name)}")
        if float(self.lr) <= 0:
            raise ConfigError(f"training: lr must be > 0, got {self.lr}")
        if not 0.0 <= float(self.balance) <= 1.0:
            raise ConfigError(f"training: balance must be within 0..1, got {self.balance}")
        for name in ("workers", "threads", "val_every", "patience"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"training: {name} must be >= 0, got {getattr(self, name)}")
        if isinstance(self.validation, (int, float)) and not 0.0 <= float(self.validation) < 1.0:
            raise ConfigError(f"training: validation must be a fraction within 0..1 or scene names, "
                              f"got {self.validation}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"training: precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError(f"training: device must be a name (auto, cpu, cuda, cuda:N), got {self.device!r}")
        transforms_for(self.augment)     # names checked here, before any work
