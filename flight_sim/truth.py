"""Truth against the model: map a scene's truth classes onto the model's, and say what the
bundle's own policy would decide if the model were perfect.

A scene's truth speaks its own classes (generated scenes: land, water, cloud, shadow, ship;
the ukis chip: clear, cloud, shadow; sen1floods11: land, water). `class_map` sends each onto a
model class of the same name, else through `ALIASES` (land, water, ship -> clear for a
cloud-screening model), else to IGNORE. With that:

- `truth_stats(labels, model_classes, policy)` gives the statistics the policy reads
  (fractions, and connected components where the policy asks for them);
- `expected_decision(...)` runs shared.policy.evaluate on them: the decision a perfect model
  would take. The report compares each daemon decision with it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from shared.policy import classes_needing_components, evaluate

IGNORE = 255
# truth class -> model class to use when the model has no class of that name
ALIASES: dict[str, tuple[str, ...]] = {
    "land": ("clear", "background", "other"), "water": ("clear", "background", "other"),
    "ship": ("clear", "background", "other"), "not water": ("clear", "land", "background"),
    "clear": ("background", "land", "other"),
    "shadow": ("cloud_shadow",), "cloud_shadow": ("shadow",),
    "cloud": ("clouds",),
}


def class_map(truth_classes: Sequence[str], model_classes: Sequence[str]) -> np.ndarray:
    """A 256-entry lookup: truth value -> model class index (IGNORE where none fits)."""
    lut = np.full(256, IGNORE, np.uint8)
    index = {c: i for i, c in enumerate(model_classes)}
    for t, name in enumerate(truth_classes):
        if name in index:
            lut[t] = index[name]
            continue
        for alias in ALIASES.get(name, ()):
            if alias in index:
                lut[t] = index[alias]
                break
    return lut


def to_model_classes(labels: np.ndarray, truth_classes: Sequence[str],
                     model_classes: Sequence[str]) -> np.ndarray:
    return class_map(truth_classes, model_classes)[labels]


def component_sizes(mask: np.ndarray) -> list[int]:
    """Sizes of the 8-connected components of a boolean mask, largest first."""
    from scipy import ndimage
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return []
    return sorted(np.bincount(labels.ravel())[1:].tolist(), reverse=True)


def truth_stats(mapped: np.ndarray, model_classes: Sequence[str], policy: dict | None) -> dict:
    """Policy statistics of a truth mask already in model classes (IGNORE pixels left out)."""
    valid = mapped != IGNORE
    n = int(valid.sum())
    counts = np.bincount(mapped[valid], minlength=len(model_classes))[:len(model_classes)]
    fractions = {c: (float(counts[i]) / n if n else 0.0) for i, c in enumerate(model_classes)}
    stats = {"fractions": fractions, "components": {}}
    if policy:
        for cls in classes_needing_components(policy):
            if cls in model_classes:
                stats["components"][cls] = component_sizes(mapped == model_classes.index(cls))
    return stats


def expected_decision(mapped: np.ndarray, model_classes: Sequence[str], policy: dict) -> dict:
    """What the policy decides on the truth: {keep, priority, rule, reason, fractions}."""
    stats = truth_stats(mapped, model_classes, policy)
    decision = evaluate(policy, stats).as_dict()
    decision["fractions"] = {k: round(v, 4) for k, v in stats["fractions"].items()}
    return decision


def default_targets(model_classes: Sequence[str]) -> list[str]:
    """The classes whose pixels are the value of a frame when the scenario names none: what the
    model finds that is neither cloud nor shadow (for a cloud-screening model: the clear ground)."""
    nuisance = {"cloud", "clouds", "shadow", "cloud_shadow", "haze", "cirrus"}
    return [c for c in model_classes if c not in nuisance] or list(model_classes[:1])
