"""Low-rank stage: a checkpoint of a run in, its convolutions factorised by truncated SVD
(ground.compression.lowrank) and fine-tuned, `lowrank/NAME.pt` out, scored before and after on
the held-out image, with its lineage record. The checkpoint's arch names the factorised layers
(`arch["lowrank"]`), so `load_model` and every later stage (FP16, export, bundle) rebuild it."""
from __future__ import annotations

from ground.compression.lowrank import factorise
from ground.stages.run import Run, save_compressed


def default_name(energy: float | None, macs_target: float | None, round_to: int | None) -> str:
    how = f"energy-{round(100 * energy)}" if energy is not None else f"macs-{round(100 * macs_target)}"
    return f"{how}-r{round_to}" if round_to else how


def lowrank(run: Run, checkpoint: str = "student.pt", energy: float | None = None, macs_target: float | None = None,
            round_to: int | None = None, finetune_steps: int = 200, finetune_with: str = "teacher",
            name: str | None = None) -> dict:
    """Factorise a checkpoint of the run (rank per layer by retained `energy`, or one energy for
    all layers meeting `macs_target`, the share of the MACs to keep; ranks rounded up to a
    multiple of `round_to` if given), fine-tune it (distillation from the run's teacher by
    default; "self": the unfactorised model teaches; "labels"; "none"), score it before and after
    on the held-out image, and write `lowrank/NAME.pt`. Under torchrun every rank factorises alike and
    fine-tunes its share of each batch; rank 0 alone scores and writes."""
    base, norm, meta = run.load(checkpoint)
    res = factorise(base, run.example(norm), energy=energy, macs_target=macs_target, round_to=round_to)
    name = name or default_name(energy, macs_target, round_to)
    metrics = {}
    scored = bool(run.evals) and run.ctx.is_main
    if scored:
        metrics["original"] = run.evaluate(run.torch_predict(base, norm))
        metrics["factorised"] = run.evaluate(run.torch_predict(res.model, norm))
    history = run.finetune(res.model, finetune_steps, finetune_with, reference_model=base, norm=norm)
    if scored:
        metrics["fine_tuned"] = run.evaluate(run.torch_predict(res.model, norm))
    info = {"source": checkpoint, **res.as_dict(), "finetune": {"steps": finetune_steps, "with": finetune_with,
                                                                "final_loss": history[-1]["loss"] if history else None}}
    # an already factorised checkpoint keeps its layers: its ranks and the new ones together
    arch = dict(meta["arch"], lowrank={**(meta["arch"].get("lowrank") or {}), **res.ranks})
    return save_compressed(run, "lowrank", "lowrank", name, res.model, arch, norm, checkpoint, info, metrics,
                           finetune_with)
