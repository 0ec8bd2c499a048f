"""One training loop for every model the factory trains: smp teachers from labels, students from
scratch, output- and feature-distilled students. What differs is the objective
(ground.training.losses), whether teacher outputs come with the batches (ground.training.batches)
and an optional feature term (ground.training.features). Checkpoints carry optimiser, schedule,
step and random state, so `resume` continues a run exactly where it stopped.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from ground.data.normalization import Normalization, normalize
from ground.training.batches import BatchSampler
from ground.training.config import TrainConfig
from ground.training.features import FeatureTerm
from ground.models.checkpoints import read_checkpoint, save_checkpoint


def fit(model: torch.nn.Module, sampler: BatchSampler, objective, norm: Normalization, cfg: TrainConfig,
        checkpoint: str | Path | None = None, arch: dict | None = None, resume: bool = False,
        feature: FeatureTerm | None = None, meta: dict | None = None, progress: bool = True,
        desc: str = "train") -> list[dict]:
    """Train `model` for cfg.steps optimiser steps; returns the loss history ({step, loss, parts..., s}).

    With `checkpoint`, state is saved every cfg.checkpoint_every steps and at the end; `resume=True`
    picks up from that file (same config) instead of starting over."""
    torch.manual_seed(cfg.seed)
    params = list(model.parameters()) + (list(feature.adapters.parameters()) if feature else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.steps))
    step, history = 0, []
    if resume and checkpoint is not None and Path(checkpoint).exists():
        step, history = _resume(checkpoint, model, opt, sched, sampler, feature)

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
        logits = model(normalize(x_raw, norm))
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


def _resume(checkpoint, model, opt, sched, sampler: BatchSampler, feature: FeatureTerm | None) -> tuple[int, list]:
    """Every state a checkpoint saved (weights, optimiser, schedule, RNGs, adapters): (step, history)."""
    state = read_checkpoint(checkpoint)
    model.load_state_dict(state["state_dict"])
    if state["optimizer"] is not None:
        opt.load_state_dict(state["optimizer"])
    if state["scheduler"] is not None:
        sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if "sampler_rng" in state["meta"]:
        sampler.rng.bit_generator.state = state["meta"]["sampler_rng"]
    if feature and "adapters" in state["meta"]:
        feature.adapters.load_state_dict(state["meta"]["adapters"])
    return int(state["step"]), list(state["history"])


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
