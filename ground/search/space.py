"""The student family the architecture search explores, declared in one place.

Every gene is drawn for every trial (a fixed search space: what NSGA-II's crossover and mutation
handle best); `depth` decides how many of the per-level genes the architecture uses, so two
trials that differ only in unused genes are the same architecture (`arch_key`). Adding a choice
is one entry here and one argument of ground.models.search_unet.SearchUNet."""
from __future__ import annotations

import hashlib
import json

from ground.models.search_unet import ACTIVATIONS, KERNELS, SKIPS, UPSAMPLING

MODEL = "search-unet"            # the registry name (ground.models.registry.STUDENTS)
MAX_DEPTH = 5

SPACE = {
    "depth": (3, 4, 5),                                   # levels: depth - 1 poolings
    # widths per level: multiples of 4 (OpenVINO's SIMD blocks; odd counts run no faster)
    "width": ((4, 8, 12, 16), (8, 12, 16, 24, 32), (8, 16, 24, 32, 48), (16, 24, 32, 48, 64),
              (16, 32, 64, 96)),
    "separable": (False, True),                           # per level
    "kernel": KERNELS,                                    # per level: 3 or 5
    "upsample": UPSAMPLING,                               # bilinear or transposed convolution
    "skip": SKIPS,                                        # concatenated or added
    "activation": tuple(ACTIVATIONS),
}


def suggest(trial) -> dict:
    """The `options` of a SearchUNet drawn by an Optuna trial (every gene drawn, `depth` used)."""
    depth = trial.suggest_categorical("depth", SPACE["depth"])
    genes = [(trial.suggest_categorical(f"w{i}", SPACE["width"][i]),
              trial.suggest_categorical(f"sep{i}", SPACE["separable"]),
              trial.suggest_categorical(f"k{i}", SPACE["kernel"])) for i in range(MAX_DEPTH)]
    return {"widths": [g[0] for g in genes[:depth]], "separable": [g[1] for g in genes[:depth]],
            "kernels": [g[2] for g in genes[:depth]],
            **{k: trial.suggest_categorical(k, SPACE[k]) for k in ("upsample", "skip", "activation")}}


def arch_of(options: dict, in_channels: int, num_classes: int) -> dict:
    """A checkpoint's `arch` (ground.models.checkpoints) for these SearchUNet options."""
    return {"name": MODEL, "in_channels": int(in_channels), "num_classes": int(num_classes), "options": options}


def arch_key(arch: dict) -> str:
    """A short stable name of an architecture: trials drawing it twice share one result, and the
    latency cache keys on it."""
    return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]


def describe(options: dict) -> str:
    """One line: widths, then per level s (separable) or p (plain) and the kernel, then the rest."""
    levels = "-".join(f"{w}{'s' if s else 'p'}{k}" for w, s, k in
                      zip(options["widths"], options["separable"], options["kernels"]))
    return f"{levels} {options['upsample']}/{options['skip']}/{options['activation']}"
