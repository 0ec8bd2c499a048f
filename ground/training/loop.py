"""One training loop for every model the factory trains: smp teachers from labels, students from
scratch, output- and feature-distilled students. What differs is the objective
(ground.training.losses), whether teacher outputs come with the batches (ground.training.batches)
and an optional feature term (ground.training.features). Checkpoints carry optimiser, schedule,
step and random state, so `resume` continues a run exactly where it stopped.

Where it runs comes from the config (ground.training.device: `train.device`, `train.precision`)
and from torchrun's environment (ground.training.distributed): under DDP every rank trains its share
of each global batch, rank 0 alone writes checkpoints and shows progress, and a resumed run
continues from rank 0's last checkpoint on every rank. With a `validate` function (higher is
better) the model is scored every `train.val_every` steps: the best weights are kept beside the
checkpoint (`NAME.best.pt`) and restored at the end, and `train.patience` validations without
improvement stop the run early.
"""
from __future__ import annotations

import copy
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ground.data.normalization import Normalization, normalize
from ground.training.batches import BatchSampler
from ground.training.config import TrainConfig
from ground.training.device import Placement, out_of_memory
from ground.training.distributed import Distributed, unwrap
from ground.training.features import FeatureTerm
from ground.models.checkpoints import read_checkpoint, save_checkpoint


def best_path(checkpoint: str | Path) -> Path:
    """Where the best-validated weights of `checkpoint` are kept."""
    p = Path(checkpoint)
    return p.with_name(p.stem + ".best" + p.suffix)


def fit(model: torch.nn.Module, sampler: BatchSampler, objective, norm: Normalization, cfg: TrainConfig,
        checkpoint: str | Path | None = None, arch: dict | None = None, resume: bool = False,
        feature: FeatureTerm | None = None, meta: dict | None = None, progress: bool = True,
        desc: str = "train", device: str | None = None, precision: str | None = None,
        validate: Callable[[torch.nn.Module], float] | None = None) -> list[dict]:
    """Train `model` for cfg.steps optimiser steps; returns the loss history ({step, loss, parts..., s}).

    With `checkpoint`, state is saved every cfg.checkpoint_every steps and at the end; `resume=True`
    picks up from that file (same config) instead of starting over. `device`/`precision` override
    cfg.device/cfg.precision; the model comes back on the device it came from. `cfg.threads` (when
    not 0) sets torch's CPU threads for the training only."""
    with cpu_threads(int(cfg.threads)):
        return _fit(model, sampler, objective, norm, cfg, checkpoint, arch, resume, feature, meta, progress, desc,
                    device, precision, validate)


@contextmanager
def cpu_threads(n: int):
    """torch's intra-op CPU threads set to `n` inside the block (0: left as they are), then restored."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(before)


def _fit(model, sampler, objective, norm, cfg: TrainConfig, checkpoint, arch, resume, feature, meta, progress,
         desc, device, precision, validate) -> list[dict]:
    place = Placement.of(device or cfg.device, precision or cfg.precision)
    ctx = Distributed.from_env(place)
    home = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    model = place.model(model)
    if feature:
        feature.to(place.device)
    params = list(model.parameters()) + (list(feature.adapters.parameters()) if feature else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.steps))
    scaler = place.scaler()
    step, history, best = 0, [], {"score": None, "step": None, "bad": 0}
    if resume and checkpoint is not None and Path(checkpoint).exists():
        step, history, best = _resume(checkpoint, model, opt, sched, sampler, feature, scaler, best)
    if step and hasattr(sampler, "seek"):     # the crops of the steps still to come
        sampler.seek(step)
    net = ctx.wrap(model, place)
    if ctx.enabled and hasattr(sampler, "shard"):      # each rank draws only its share of the batch
        sampler.shard(ctx.rank, ctx.world_size)
    shard = ctx.shard(cfg.batch) if ctx.enabled and not getattr(sampler, "sharded", False) else slice(None)

    def save(path=checkpoint, weights_only=False):
        if path is None or not ctx.is_main:
            return
        m = dict(meta or {}, train=asdict(cfg), best={k: v for k, v in best.items() if k != "state"})
        if feature:
            m["adapters"] = feature.adapters.state_dict()
        m["scaler"] = scaler.state_dict()
        save_checkpoint(path, unwrap(net), arch or {}, norm, meta=m, optimizer=None if weights_only else opt,
                        scheduler=None if weights_only else sched, step=step, history=history)

    net.train()
    if feature:
        feature.adapters.train()
    t0 = time.perf_counter()
    acc: dict[str, float] = {}
    n_acc = 0
    bar = tqdm(total=cfg.steps, initial=step, desc=desc, file=sys.stderr, disable=not (progress and ctx.is_main),
               leave=False)
    while step < cfg.steps:
        x_raw, probs, labels = sampler()
        x_raw, probs, labels = place.batch(*(None if t is None else t[shard] for t in (x_raw, probs, labels)))
        with out_of_memory(cfg.batch, desc, place.device):
            with place.autocast():
                logits = net(normalize(x_raw, norm))
                loss, parts = objective(logits.float(), probs, labels)
                if feature:
                    f = feature(x_raw)
                    parts["feature"] = float(f.detach())
                    loss = loss + f
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss became {float(loss)} at step {step} (lower the lr?)")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if feature and ctx.enabled:     # the adapters sit outside DDP: average their gradients here
                ctx.average_gradients(feature.adapters.parameters())
            scaler.step(opt)
            scaler.update()
        sched.step()
        step += 1
        for k, v in dict(parts, loss=float(loss.detach())).items():
            acc[k] = acc.get(k, 0.0) + v
        n_acc += 1
        validating = validate is not None and cfg.val_every and (step % cfg.val_every == 0 or step == cfg.steps)
        if step % cfg.log_every == 0 or step == cfg.steps or validating:
            history.append({"step": step, **{k: ctx.mean(v / n_acc) for k, v in acc.items()},
                            "lr": sched.get_last_lr()[0], "s": round(time.perf_counter() - t0, 2)})
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            acc, n_acc = {}, 0
        stop = False
        if validating:
            stop = _validate(validate, net, ctx, cfg, step, history, best, save, checkpoint)
        if (step % cfg.checkpoint_every == 0 and step < cfg.steps) or stop:
            save()
        bar.update(1)
        if stop:
            break
    bar.close()
    save()
    ctx.barrier()                  # nobody reads the checkpoint before rank 0 has written it
    model = unwrap(net)
    if best["step"] is not None and checkpoint is not None and best_path(checkpoint).exists():
        model.load_state_dict(read_checkpoint(best_path(checkpoint))["state_dict"])
    elif best.get("state") is not None:
        model.load_state_dict(best["state"])
    best.pop("state", None)
    model.to(home, memory_format=torch.contiguous_format)
    if feature:
        feature.to(home)
    model.eval()
    return history


def _validate(validate, net, ctx: Distributed, cfg: TrainConfig, step: int, history: list, best: dict,
              save, checkpoint) -> bool:
    """Score on rank 0, keep the best weights, and tell every rank whether to stop early."""
    model = unwrap(net)
    score = None
    if ctx.is_main:
        model.eval()
        with torch.no_grad():
            score = float(validate(model))
        model.train()
    score = ctx.broadcast(score)
    history[-1]["val"] = score          # the log entry of this step (fit logs every validated step)
    if best["score"] is None or score > best["score"]:
        best.update(score=score, step=step, bad=0)
        if checkpoint is not None:
            save(best_path(checkpoint), weights_only=True)
        else:
            best["state"] = copy.deepcopy(model.state_dict())
    else:
        best["bad"] += 1
    return bool(cfg.patience) and best["bad"] >= cfg.patience


def _resume(checkpoint, model, opt, sched, sampler: BatchSampler, feature: FeatureTerm | None, scaler=None,
            best: dict | None = None) -> tuple[int, list, dict]:
    """Every state a checkpoint saved (weights, optimiser, schedule, RNGs, adapters, scaler, best
    validation): (step, history, best)."""
    state = read_checkpoint(checkpoint)
    model.load_state_dict(state["state_dict"])
    if state["optimizer"] is not None:
        opt.load_state_dict(state["optimizer"])
    if state["scheduler"] is not None:
        sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    meta = state["meta"]
    if feature and "adapters" in meta:
        feature.adapters.load_state_dict(meta["adapters"])
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return int(state["step"]), list(state["history"]), dict(meta.get("best") or best or {})


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
