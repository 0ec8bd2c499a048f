"""Pruning stage: a checkpoint of a run in, a pruned and fine-tuned checkpoint `pruned/NAME.pt` out,
scored before and after on the held-out image, with its lineage record."""
from __future__ import annotations

from ground.compression.pruning.criteria import get_criterion
from ground.compression.pruning.plan import DEFAULT_ROUND_TO, prune_to_target
from ground.errors import ConfigError
from ground.stages.run import Run, save_compressed


def prune(run: Run, criterion_name: str, target: float, by: str = "params",
          round_to: int | None = DEFAULT_ROUND_TO, steps: int = 1, scope: str = "local",
          checkpoint: str = "student.pt", finetune_steps: int = 200, finetune_with: str = "teacher",
          name: str | None = None, evaluate: bool = True) -> dict:
    """Prune a checkpoint of the run to `target`, fine-tune it (pruning-aware distillation with the
    run's teacher by default; "self": the unpruned model teaches; "labels"; "none"), score it
    before and after on the held-out image, and write `pruned/NAME.pt`. With `steps` > 1 the
    fine-tuning budget is spread over the steps. Under torchrun every rank prunes the same weights
    alike and fine-tunes its share of each batch; rank 0 alone scores and writes."""
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    base, norm, meta = run.load(checkpoint)
    example = run.example(norm)
    name = name or f"{criterion_name}-{round(100 * target)}{'-macs' if by == 'macs' else ''}"
    per_step = max(1, finetune_steps // steps) if finetune_steps > 0 else 0

    def between(model, i):
        run.finetune(model, per_step, finetune_with, reference_model=base, norm=norm, desc=f"fine-tune step {i}")

    loss_fn = run.loss_fn(norm, finetune_with, base) if get_criterion(criterion_name).needs_gradients else None
    res = prune_to_target(base, example, criterion_name, target, by=by, round_to=round_to, steps=steps,
                          loss_fn=loss_fn, between_steps=between if per_step else None, scope=scope)
    scored = evaluate and bool(run.evals) and run.ctx.is_main
    metrics = {}
    if scored:
        metrics["unpruned"] = run.evaluate(run.torch_predict(base, norm))
        metrics["pruned"] = run.evaluate(run.torch_predict(res.model, norm))
    history = run.finetune(res.model, finetune_steps - per_step * (steps - 1), finetune_with,
                           reference_model=base, norm=norm, desc="fine-tune") if per_step else []
    if scored:
        metrics["fine_tuned"] = run.evaluate(run.torch_predict(res.model, norm))
    info = {"source": checkpoint, **res.as_dict(), "finetune": {"steps": finetune_steps, "with": finetune_with,
                                                                "final_loss": history[-1]["loss"] if history else None}}
    return save_compressed(run, "prune", "pruned", name, res.model, meta["arch"], norm, checkpoint, info, metrics,
                           finetune_with)
