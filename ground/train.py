"""One training loop for every model the factory trains: smp teachers from labels, students from
scratch, output- and feature-distilled students. What differs is the objective (ground.losses),
whether teacher outputs come with the batches (ground.cache) and an optional feature term
(ground.features). Checkpoints carry optimiser, schedule, step and random state, so `resume`
continues a run exactly where it stopped.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ground.augment import dihedral, random_crop, transforms_for
from ground.data import IGNORE, Normalization, Sample


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
    # label-free distillation of a rare class (ground.pipeline.train_student): the share of crops
    # centred on a pixel of a class drawn uniformly (teacher's argmax, or labels), and per-class
    # weights of the distillation term counted on the teacher's masks ("none", "inverse", "log", list)
    balance: float = 0.0
    distill_class_weights: object = "none"

    def __post_init__(self):
        for name in ("steps", "batch", "crop", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"training: {name} must be >= 1, got {getattr(self, name)}")
        if float(self.lr) <= 0:
            raise ValueError(f"training: lr must be > 0, got {self.lr}")
        if not 0.0 <= float(self.balance) <= 1.0:
            raise ValueError(f"training: balance must be within 0..1, got {self.balance}")
        transforms_for(self.augment)     # names checked here, before any work


class BatchSampler:
    """Random (augmented, cropped) batches: raw reflectance crops, teacher probabilities for exactly
    that view (from the cache) when a cache is given, and labels (IGNORE where a sample has none)."""

    def __init__(self, samples: list[Sample], cfg: TrainConfig, cache=None, rng: np.random.Generator | None = None):
        if not samples:
            raise ValueError("training: no samples")
        self.samples, self.cfg, self.cache = samples, cfg, cache
        self.transforms = transforms_for(cfg.augment)
        self.rng = rng or np.random.default_rng(cfg.seed)
        area = np.array([s.image.shape[1] * s.image.shape[2] for s in samples], np.float64)
        self.p = area / area.sum()       # every pixel equally likely, whatever the image size
        self.balance = float(getattr(cfg, "balance", 0.0))
        self.class_counts = None         # (samples, K) pixels per class, for balanced crops

    def _class_map(self, s: Sample, k: int, probs) -> np.ndarray | None:
        """Class ids of view k: the labels where a sample has them, else the teacher's argmax."""
        if s.labels is not None:
            return dihedral(s.labels, k)
        return None if probs is None else np.asarray(probs).argmax(0)

    def count_classes(self) -> np.ndarray:
        """Pixels per class of every sample (view 0: a D4 view has the same counts)."""
        if self.class_counts is None:
            rows = []
            for s in self.samples:
                m = self._class_map(s, 0, self.cache.probs(s, 0) if self.cache is not None else None)
                if m is None:
                    raise ValueError(f"training: balanced crops need labels or a teacher; {s.name} has neither")
                rows.append(np.bincount(m[m != IGNORE].ravel(), minlength=int(m[m != IGNORE].max(initial=0)) + 1))
            k = max(len(r) for r in rows)
            self.class_counts = np.stack([np.pad(r, (0, k - len(r))) for r in rows]).astype(np.float64)
        return self.class_counts

    def _balanced_crop(self, arrays: list, s_index: int, k: int, cls: int, size: int) -> list:
        """The window of `size` centred (as far as the image allows) on a random pixel of class `cls`."""
        s = self.samples[s_index]
        m = self._class_map(s, k, arrays[2] if self.cache is not None else None)
        rows, cols = np.nonzero(m == cls)
        if not len(rows):                # the teacher saw the class in view 0 only: an ordinary crop
            return random_crop(arrays, size, self.rng)
        i = int(self.rng.integers(len(rows)))
        h, w = m.shape
        r = int(np.clip(rows[i] - size // 2, 0, max(h - size, 0)))
        c = int(np.clip(cols[i] - size // 2, 0, max(w - size, 0)))
        return random_crop([a[..., r:r + size, c:c + size] for a in arrays], size, None)

    def warm(self, progress: bool = True) -> None:
        """Run the teacher on every (sample, transform) once up front, with a progress bar."""
        if self.cache is None:
            return
        from tqdm import tqdm
        jobs = [(s, k) for s in self.samples for k in self.transforms]
        for s, k in tqdm(jobs, desc="teacher labels", file=sys.stderr, disable=not progress, leave=False):
            self.cache.probs(s, k)

    def __call__(self):
        xs, ps, ys = [], [], []
        size = self.cfg.crop
        for _ in range(self.cfg.batch):
            cls = None
            if self.balance > 0 and self.rng.random() < self.balance:
                counts = self.count_classes()
                cls = int(self.rng.choice(np.flatnonzero(counts.sum(0) > 0)))   # classes equally often
                i = int(self.rng.choice(len(self.samples), p=counts[:, cls] / counts[:, cls].sum()))
            else:
                i = int(self.rng.choice(len(self.samples), p=self.p))
            s = self.samples[i]
            k = int(self.rng.choice(self.transforms))
            arrays = [dihedral(s.image, k)]
            arrays.append(dihedral(s.labels, k) if s.labels is not None
                          else np.full(arrays[0].shape[1:], IGNORE, np.uint8))
            if self.cache is not None:
                arrays.append(self.cache.probs(s, k))
            if cls is not None:
                crops = self._balanced_crop(arrays, i, k, cls, size)
            else:
                crops = random_crop(arrays, size, self.rng if "crop" in self.cfg.augment else None)
            xs.append(crops[0])
            ys.append(crops[1])
            if self.cache is not None:
                ps.append(crops[2].astype(np.float32))
        x = torch.from_numpy(np.stack(xs).astype(np.float32))
        y = torch.from_numpy(np.stack(ys).astype(np.int64))
        p = torch.from_numpy(np.stack(ps)) if ps else None
        return x, p, y


def _normalize(x: torch.Tensor, norm: Normalization) -> torch.Tensor:
    m = torch.tensor(norm.mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(norm.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


class FeatureTerm:
    """FitNets term: student hooks + adapters vs. a frozen torch teacher's hooks on the same crops."""

    def __init__(self, student, teacher, student_layers, teacher_layers, weight: float = 1.0, crop: int = 64):
        from ground.features import FeatureAdapters, FeatureHooks
        if not hasattr(teacher, "model"):
            raise ValueError(f"feature distillation needs a torch teacher (smp, trained here); "
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
            self.teacher.model(_normalize(x_raw, self.teacher.norm))
        return self.weight * self.adapters.loss(self.s_hooks.features, self.t_hooks.features)

    def close(self):
        self.s_hooks.remove()
        self.t_hooks.remove()


def fit(model: torch.nn.Module, sampler: BatchSampler, objective, norm: Normalization, cfg: TrainConfig,
        checkpoint: str | Path | None = None, arch: dict | None = None, resume: bool = False,
        feature: FeatureTerm | None = None, meta: dict | None = None, progress: bool = True,
        desc: str = "train") -> list[dict]:
    """Train `model` for cfg.steps optimiser steps; returns the loss history ({step, loss, parts..., s}).

    With `checkpoint`, state is saved every cfg.checkpoint_every steps and at the end; `resume=True`
    picks up from that file (same config) instead of starting over."""
    from tqdm import tqdm
    from ground.checkpoints import read_checkpoint, save_checkpoint
    torch.manual_seed(cfg.seed)
    params = list(model.parameters()) + (list(feature.adapters.parameters()) if feature else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.steps))
    step, history = 0, []
    if resume and checkpoint is not None and Path(checkpoint).exists():
        state = read_checkpoint(checkpoint)
        model.load_state_dict(state["state_dict"])
        if state["optimizer"] is not None:
            opt.load_state_dict(state["optimizer"])
        if state["scheduler"] is not None:
            sched.load_state_dict(state["scheduler"])
        step, history = int(state["step"]), list(state["history"])
        torch.set_rng_state(state["rng"])
        if "sampler_rng" in state["meta"]:
            sampler.rng.bit_generator.state = state["meta"]["sampler_rng"]
        if feature and "adapters" in state["meta"]:
            feature.adapters.load_state_dict(state["meta"]["adapters"])

    def save():
        if checkpoint is None:
            return
        m = dict(meta or {}, train=asdict(cfg), sampler_rng=sampler.rng.bit_generator.state)
        if feature:
            m["adapters"] = feature.adapters.state_dict()
        save_checkpoint(checkpoint, model, arch or {}, norm, meta=m, optimizer=opt, scheduler=sched, step=step,
                        history=history)

    model.train()
    if feature:
        feature.adapters.train()
    t0 = time.perf_counter()
    acc: dict[str, float] = {}
    n_acc = 0
    bar = tqdm(total=cfg.steps, initial=step, desc=desc, file=sys.stderr, disable=not progress, leave=False)
    while step < cfg.steps:
        x_raw, probs, labels = sampler()
        logits = model(_normalize(x_raw, norm))
        loss, parts = objective(logits, probs, labels)
        if feature:
            f = feature(x_raw)
            parts["feature"] = float(f.detach())
            loss = loss + f
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {float(loss)} at step {step} (lower the lr?)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        for k, v in dict(parts, loss=float(loss.detach())).items():
            acc[k] = acc.get(k, 0.0) + v
        n_acc += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            history.append({"step": step, **{k: v / n_acc for k, v in acc.items()},
                            "lr": sched.get_last_lr()[0], "s": round(time.perf_counter() - t0, 2)})
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            acc, n_acc = {}, 0
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            save()
        bar.update(1)
    bar.close()
    save()
    model.eval()
    return history


def warmup_cosine(steps: int, warmup: float = 0.1):
    """LR factor: linear warm-up over the first 10% of steps, then cosine decay to ~0 (one cycle)."""
    w = max(1, int(warmup * steps))

    def factor(i: int) -> float:
        if i < w:
            return (i + 1) / w
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (i - w) / max(1, steps - w))))
    return factor


def loss_fell(history: list[dict], key: str = "loss") -> bool:
    """True when the last logged loss is below the first (a cheap sanity check for tests and reports)."""
    vals = [h[key] for h in history if key in h and math.isfinite(h[key])]
    return len(vals) >= 2 and vals[-1] < vals[0]
