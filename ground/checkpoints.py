"""Model checkpoints that rebuild themselves: architecture (registry name + options), weights,
normalisation statistics and training state, so the next stage (pruning, FP16, export) needs only
the file."""
from __future__ import annotations

from pathlib import Path

import torch

from ground.data import Normalization

FORMAT = "eoedge-ground-checkpoint/1"


def save_checkpoint(path: str | Path, model: torch.nn.Module, arch: dict, norm: Normalization,
                    meta: dict | None = None, optimizer=None, scheduler=None, step: int = 0,
                    history: list | None = None) -> Path:
    """`arch` = {"name": registry name or "smp:Arch/encoder", "in_channels", "num_classes", "options"}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "arch": arch, "state_dict": model.state_dict(), "norm": norm.as_dict(),
             "meta": meta or {}, "step": step, "history": history or [],
             "optimizer": optimizer.state_dict() if optimizer is not None else None,
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "rng": torch.get_rng_state()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)          # a crash mid-write never leaves a half checkpoint
    return path


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not an eoedge ground checkpoint (format {FORMAT})")
    return state


def build_arch(arch: dict) -> torch.nn.Module:
    from ground.students import build_student
    try:
        return build_student(arch["name"], int(arch["in_channels"]), int(arch["num_classes"]),
                             **arch.get("options", {}))
    except KeyError as exc:
        raise ValueError(f"checkpoint architecture lacks field {exc.args[0]!r}") from None


def load_model(path: str | Path) -> tuple[torch.nn.Module, Normalization, dict]:
    state = read_checkpoint(path)
    model = build_arch(state["arch"])
    model.load_state_dict(state["state_dict"])
    meta = dict(state["meta"], arch=state["arch"], step=state["step"])
    return model.eval(), Normalization.from_dict(state["norm"]), meta
