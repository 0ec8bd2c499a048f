"""What a candidate of the architecture search is worth, measured the way it will fly.

- accuracy: a short label-free distillation from the run's teacher (a probe, then the rest: the
  probe's loss decides whether a hopeless candidate stops early), then mIoU on a validation split
  of the *training* imagery (never the held-out evaluation data) in emulated FP16 after the
  on-board post-processing. The stage supplies the training and scoring (ground.stages.search,
  through the run's own fine-tuning and calibration); this module orders them.
- latency: the candidate exported to an OpenVINO IR and timed by OpenVINO on the target device at
  the deployed precision, per tile (ground.openvino.runtime.openvino_latency; not FLOPs), cached
  per (architecture, device, precision, tile, batch).
- size: the IR's bytes (FP16 weights) and the parameter count, a constraint.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from ground.data.dataset import Data
from ground.data.sample import Sample
from ground.errors import StageError
from ground.openvino.export import export_openvino
from ground.openvino.runtime import check_precision, openvino_latency

DEVICES = ("CPU",)      # what ground.openvino.runtime compiles for today


class Hopeless(Exception):
    """A candidate whose distillation curve an already finished one dominates (stop it early)."""

    def __init__(self, by: int, loss: float):
        super().__init__(f"dominated by trial {by} at the probe (loss {loss:.4f})")
        self.by, self.loss = by, loss


def check_target(device: str, precision: str) -> None:
    """Refuse a device the runtime cannot time on, or a precision it does not compute natively."""
    if device not in DEVICES:
        raise StageError(f"--device {device}: latency is timed by OpenVINO on {', '.join(DEVICES)} only here "
                         "(device handling for other targets is not in this build)")
    check_precision(precision, device)


class LatencyCache:
    """One JSON file per (architecture, device, precision, tile, batch) under `folder`: several
    worker processes share it without a lock (a file is written whole, then renamed)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: tuple) -> Path:
        return self.folder / f"{hashlib.sha256(json.dumps(list(key)).encode()).hexdigest()[:24]}.json"

    def get(self, key: tuple) -> dict | None:
        p = self.path(key)
        return json.loads(p.read_text()) if p.is_file() else None

    def put(self, key: tuple, value: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"key": list(key), **value}, f)
        os.replace(tmp, self.path(key))


def latency(model, key: str, cache: LatencyCache, device: str = "CPU", precision: str = "fp16", tile: int = 256,
            batch: int = 1, repeats: int = 20) -> dict:
    """ms per tile of `model` (architecture `key`) as OpenVINO runs its FP16-weight IR on `device`
    at `precision`, and the IR's bytes; from the cache when this architecture was timed before."""
    ckey = (key, device, precision, int(tile), int(batch))
    found = cache.get(ckey)
    if found is not None:
        return {**found, "cached": True}
    with tempfile.TemporaryDirectory(prefix="eoedge-search-ir-") as tmp:
        ir = export_openvino(model, tmp, fp16=True, tile=tile)
        lat = openvino_latency(ir.xml, tile=tile, batch=batch, threads=1, repeats=repeats, precision=precision)
    value = {"ms_per_tile": lat["ms_per_tile"], "p90_ms": lat["p90_ms"], "ir_bytes": sum(ir.sizes.values()),
             "load_avg_1min": lat["load_avg_1min"][0], "inference_precision": lat["inference_precision"]}
    cache.put(ckey, value)
    return {**value, "cached": False}


def validation_split(data: Data, teacher_probs: Callable[[Sample], np.ndarray], fraction: float = 0.25,
                     min_rows: int = 256, reference: str = "auto") -> tuple[Data, str, list[np.ndarray]]:
    """(a view of the run's data for the search, the reference used, the teacher's probabilities on
    the validation strips: it saw the whole image, as when it labels). Each training image with at
    least `min_rows` rows gives its last `fraction` of rows to validation and the rest to training
    (smaller images stay whole in training); the view's `evals` are those strips, labelled by the
    human labels the training imagery has where `reference` allows ("auto", "labels"), else by the
    teacher's masks ("teacher"). The run's own held-out data is never part of it."""
    if reference not in ("auto", "labels", "teacher"):
        raise StageError(f"validation reference must be auto, labels or teacher, got {reference!r}")
    if not 0 < fraction < 1:
        raise StageError(f"validation fraction must be between 0 and 1, got {fraction}")
    human = {s.digest(): s.labels for s in data.labelled if s.labels is not None}
    train, val, used, probs = [], [], set(), []
    for s in data.distill_samples(with_labels=False):
        h = s.image.shape[1]
        if h < min_rows:
            train.append(s)
            continue
        cut = h - max(32, int(round(h * fraction / 32)) * 32)
        labels = human.get(s.digest()) if reference != "teacher" else None
        used.add("labels" if labels is not None else "teacher")
        p = teacher_probs(s)[:, cut:]
        probs.append(p)
        ref = labels[cut:] if labels is not None else p.argmax(0)
        train.append(Sample(s.image[:, :cut], None, f"{s.name}[:{cut}]", s.files))
        val.append(Sample(s.image[:, cut:], np.ascontiguousarray(ref, dtype=np.uint8), f"{s.name}[{cut}:]", s.files))
    if not val:
        raise StageError(f"no training image has {min_rows} rows or more: nothing to hold out for validation")
    if reference == "labels" and used != {"labels"}:
        raise StageError("validation reference 'labels': some training images have no human labels")
    kind = "labels" if used == {"labels"} else "teacher" if used == {"teacher"} else "labels+teacher"
    return replace(data, unlabelled=train, labelled=[], eval=val[0], evals=val), kind, probs


def dominated(loss: float, ms: float, finished: list[dict], margin: float = 0.05, least: int = 4) -> int | None:
    """The number of a finished trial at least as fast whose probe loss is lower by more than
    `margin` (relative), once `least` trials have finished: this candidate is then hopeless."""
    done = [t for t in finished if t.get("probe_loss") is not None]
    if len(done) < least:
        return None
    for t in sorted(done, key=lambda t: t["probe_loss"]):
        if t["ms_per_tile"] <= ms and t["probe_loss"] < loss * (1.0 - margin):
            return t["number"]
    return None


def accuracy(model, train: Callable[[object, int, str], list[dict]], score: Callable[[object], dict],
             steps: int, probe_steps: int, on_probe: Callable[[float], None]) -> tuple[dict, float]:
    """Distil `probe_steps`, let `on_probe(loss)` stop a hopeless candidate (it raises Hopeless),
    distil the rest, score: (the scores row, the probe loss)."""
    history = train(model, probe_steps, "probe")
    tail = [h["loss"] for h in history[-3:]] or [float("nan")]
    probe = float(np.mean(tail))
    on_probe(probe)
    if steps > probe_steps:
        train(model, steps - probe_steps, "rest")
    return score(model), probe
