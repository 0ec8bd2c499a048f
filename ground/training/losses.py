"""Distillation objectives, one registry by name (a config line picks one; `eoedge ground list` shows them).

Every objective has one call signature:
    objective(student_logits (N,K,H,W), teacher_probs (N,K,H,W) | None, labels (N,H,W) long | None)
        -> (loss tensor, {part: float})
- `weighted-mse`: black-box output distillation of de Vieilleville et al. (ISPRS 2020): per-class
  weighted squared error between student and teacher probabilities.
- `kl`: Hinton et al. (2015): KL(teacher_T || student_T) * T^2 at temperature T.
- `ce`: cross-entropy on labels only (the student trained from scratch, and teachers).
- `ce-dice`: `ce` + soft Dice of the foreground classes (Milletari et al. 2016): a loss that a rare
  class (ships on 0.1-0.9 % of the pixels) cannot lower by predicting background everywhere.
Any of them mixes in cross-entropy on labels with `ce_weight` (0..1) where labels exist:
    loss = (1 - ce_weight) * distillation + ce_weight * CE.
Feature distillation (FitNets) lives in ground.training.features and adds to these.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ground.data.sample import IGNORE
from ground.errors import ConfigError


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor | None,
                  class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Class-weighted CE over labelled pixels; 0 (with a graph) when nothing is labelled."""
    if labels is None or not bool((labels != IGNORE).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, weight=class_weights, ignore_index=IGNORE)


def weighted_mse(logits: torch.Tensor, teacher_probs: torch.Tensor,
                 class_weights: torch.Tensor | None = None) -> torch.Tensor:
    sq = (torch.softmax(logits, 1) - teacher_probs) ** 2
    if class_weights is not None:
        sq = sq * class_weights.view(1, -1, 1, 1)
    return sq.sum(1).mean()


def pixel_weights(teacher_probs: torch.Tensor, class_weights: torch.Tensor | None) -> torch.Tensor | None:
    """(N,H,W) weight of each pixel: its class weights averaged by the teacher's probabilities, so a
    pixel the teacher calls shadow counts as much as the (rare) shadow class is worth."""
    if class_weights is None:
        return None
    return (teacher_probs * class_weights.view(1, -1, 1, 1)).sum(1)


def kl_divergence(logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0,
                  class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 KL(p_T || q_T), with p_T = softmax(log p / T): the teacher's tempered distribution from its
    probabilities alone (log p = logits - const), so cached probabilities suffice."""
    t = float(temperature)
    log_p = torch.log(teacher_probs.clamp_min(1e-8))
    p_t = torch.softmax(log_p / t, 1)
    log_q_t = torch.log_softmax(logits / t, 1)
    kl = (p_t * (torch.log(p_t.clamp_min(1e-12)) - log_q_t)).sum(1)
    w = pixel_weights(teacher_probs, class_weights)
    if w is not None:
        kl = kl * w
    return kl.mean() * t * t


class Objective:
    """A distillation loss plus optional label cross-entropy."""
    needs_teacher = True

    def __init__(self, ce_weight: float = 0.0, class_weights: Sequence[float] | None = None,
                 distill_weights: Sequence[float] | None = None):
        if not 0.0 <= float(ce_weight) <= 1.0:
            raise ConfigError(f"ce_weight must be within 0..1, got {ce_weight}")
        self.ce_weight = float(ce_weight)
        self.class_weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        # per-class weights of the distillation term only (label-free: counted on the teacher's masks);
        # weighted-mse falls back to class_weights as before
        self.distill_weights = None if distill_weights is None else \
            torch.as_tensor(distill_weights, dtype=torch.float32)

    def distill(self, logits, teacher_probs) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, logits, teacher_probs=None, labels=None):
        if teacher_probs is None:
            raise ConfigError(f"{type(self).__name__} needs teacher outputs")
        d = self.distill(logits, teacher_probs)
        parts = {"distill": float(d.detach())}
        if self.ce_weight > 0:
            ce = cross_entropy(logits, labels, self.class_weights)
            parts["ce"] = float(ce.detach())
            return (1 - self.ce_weight) * d + self.ce_weight * ce, parts
        return d, parts


class WeightedMSE(Objective):
    def distill(self, logits, teacher_probs):
        w = self.distill_weights if self.distill_weights is not None else self.class_weights
        return weighted_mse(logits, teacher_probs, w)


class KL(Objective):
    def __init__(self, temperature: float = 2.0, **kw):
        super().__init__(**kw)
        if float(temperature) <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def distill(self, logits, teacher_probs):
        return kl_divergence(logits, teacher_probs, self.temperature, self.distill_weights)


class CrossEntropy(Objective):
    """Labels only: a student from scratch, or a teacher trained here."""
    needs_teacher = False

    def __call__(self, logits, teacher_probs=None, labels=None):
        ce = cross_entropy(logits, labels, self.class_weights)
        return ce, {"ce": float(ce.detach())}


def soft_dice(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice of the classes 1..K-1 over the labelled pixels of the batch (class 0 is the
    background); a class absent from the batch and predicted absent counts as perfect."""
    valid = (labels != IGNORE).unsqueeze(1)
    probs = torch.softmax(logits, 1)[:, 1:] * valid
    onehot = F.one_hot(labels.clamp(0, logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2)[:, 1:] * valid
    inter = (probs * onehot).sum((0, 2, 3))
    total = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return 1 - ((2 * inter + 1) / (total + 1)).mean()


class CrossEntropyDice(CrossEntropy):
    """Labels only: CE + `dice_weight` x soft Dice of the foreground classes (rare positives)."""

    def __init__(self, dice_weight: float = 1.0, **kw):
        super().__init__(**kw)
        self.dice_weight = float(dice_weight)

    def __call__(self, logits, teacher_probs=None, labels=None):
        ce, parts = super().__call__(logits, teacher_probs, labels)
        if labels is None or not bool((labels != IGNORE).any()):
            return ce, parts
        dice = soft_dice(logits, labels)
        parts["dice"] = float(dice.detach())
        return ce + self.dice_weight * dice, parts


LOSSES: dict[str, Callable[..., Objective]] = {"weighted-mse": WeightedMSE, "kl": KL, "ce": CrossEntropy,
                                               "ce-dice": CrossEntropyDice}


def build_objective(name: str, **options) -> Objective:
    if name not in LOSSES:
        raise ConfigError(f"unknown distillation loss {name!r}; known: {sorted(LOSSES)}")
    try:
        return LOSSES[name](**options)
    except TypeError as exc:
        raise ConfigError(f"loss {name!r}: {exc}") from None
