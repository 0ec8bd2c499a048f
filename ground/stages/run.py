"""A run: its config, its data, its teacher and its lineage, opened once for every stage.

`Run.open(run_dir)` reads what distillation left (lineage.json with its config); `Run.create(cfg)`
starts a new folder. What the stages share beyond that (fine-tuning with the run's set-up,
calibrating and scoring as the daemon will run a model) is a thin call into the library.
"""
from __future__ import annotations

import hashlib
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ground.compression.fp16 import fp16_aware
from ground.config import Experiment, RunConfig, parse_config
from ground.data.dataset import Data, load_data
from ground.data.normalization import Normalization, normalize
from ground.data.reference import reference_tiles
from ground.errors import ConfigError, RunFolderError, StageError
from ground.evaluation.operating_point import OperatingPoint, calibrate, calibration_source
from ground.evaluation.predict import Predict, ir_predictor, torch_predictor
from ground.evaluation.scores import evaluate_on, summary
from ground.lineage import RunFolder, StageRecord
from ground.models.checkpoints import load_model, save_checkpoint
from ground.teachers.cache import TeacherCache
from ground.teachers.registry import build_teacher
from ground.teachers.torch_teacher import TorchTeacher
from ground.training.device import Placement
from ground.training.distributed import Distributed
from ground.training.loop import fit
from ground.training.losses import Objective
from ground.training.sources import batch_source
from ground.training.teacher import train_smp_teacher


def run_teacher(cfg: RunConfig, data: Data, run_dir: Path, progress: bool = True):
    """The [teacher]: a registry/external teacher as is, or an smp teacher trained here (teacher.pt)."""
    name = cfg.teacher["name"]
    if name.startswith("smp:"):
        model, _ = train_smp_teacher(cfg, data, run_dir / "teacher.pt", name, cfg.teacher["train"],
                                     cfg.teacher["options"], progress=progress)
        return TorchTeacher(model, data.norm, name, tile=cfg.tile, overlap=cfg.overlap, device=cfg.train.device)
    teacher = build_teacher(name, **cfg.teacher["options"])
    if tuple(teacher.bands) != tuple(cfg.bands):
        raise ConfigError(f"teacher {name} takes bands {teacher.bands}; data.bands is {cfg.bands} (same order please)")
    if teacher.num_classes != len(cfg.classes):
        raise ConfigError(f"teacher {name} has {teacher.num_classes} classes; data.classes has {len(cfg.classes)}")
    return teacher


class Run:
    """A run folder with its config; data and teacher are loaded when first asked for."""

    def __init__(self, cfg: RunConfig, folder: RunFolder, progress: bool = True):
        self.cfg, self.folder, self.progress = cfg, folder, progress
        self.run_dir = folder.path
        self._data = self._teacher = self._teacher_masks = self._ctx = None

    @classmethod
    def create(cls, cfg: RunConfig, progress: bool = True) -> "Run":
        folder = RunFolder(cfg.run_dir)
        folder.set_config(cfg.raw)
        return cls(cfg, folder, progress)

    @classmethod
    def open(cls, run_dir: str | Path, progress: bool = True) -> "Run":
        run_dir = Path(run_dir)
        lineage = run_dir / "lineage.json"
        if not lineage.is_file():
            raise RunFolderError(f"{run_dir} is not a run folder (no lineage.json); "
                                 "make one with `eoedge ground run CONFIG`")
        folder = RunFolder(run_dir)
        raw = folder.record.get("config")
        if not isinstance(raw, dict):
            raise RunFolderError(f"{lineage}: no config recorded (field 'config')")
        try:
            cfg = parse_config(raw)
        except ConfigError as exc:
            raise ConfigError(f"{lineage}: config: {exc}") from None
        # the run may have been made from another working directory: find its folder and cache here
        cfg = replace(cfg, out=run_dir.parent, name=run_dir.name,
                      cache=cfg.cache if raw.get("run", {}).get("cache") else run_dir.parent / ".teacher-cache")
        return cls(cfg, folder, progress)

    def share_inputs(self, other: "Run") -> None:
        """Reuse `other`'s loaded data, teacher and teacher masks (a view of the same run)."""
        self._data, self._teacher, self._teacher_masks = other._data, other._teacher, other._teacher_masks

    def with_data(self, data: Data) -> "Run":
        """The same run (folder, config, teacher) seeing other data: e.g. the architecture search's
        split of the training imagery, whose `evals` are a validation strip of it."""
        view = Run(self.cfg, self.folder, self.progress)
        view._data, view._teacher = data, self.teacher
        return view

    @property
    def ctx(self) -> Distributed:
        """torchrun's process group (or one process) on the run's device: every rank fine-tunes its
        share of each batch; rank 0 alone evaluates and writes (checkpoints, lineage, reports)."""
        if self._ctx is None:
            self._ctx = Distributed.from_env(Placement.of(self.cfg.train.device, self.cfg.train.precision))
        return self._ctx

    def log(self, msg: str) -> None:
        if self.progress and self.ctx.is_main:
            print(msg, file=sys.stderr)

    # ---- inputs ---------------------------------------------------------------------------------

    @property
    def data(self) -> Data:
        if self._data is None:
            self._data = load_data(self.cfg)
        return self._data

    @property
    def teacher(self):
        if self._teacher is None:
            self._teacher = run_teacher(self.cfg, self.data, self.run_dir, self.progress)
        return self._teacher

    def teacher_digest(self) -> str:
        return hashlib.sha256(self.teacher.identity.encode()).hexdigest()

    @property
    def classes(self) -> list[str]:
        return list(self.cfg.classes)

    @property
    def experiment(self) -> Experiment:
        """The experiment whose student the run delivered (its loss is reused for fine-tuning)."""
        name = next((s.get("params", {}).get("deliver") for s in reversed(self.folder.stages())
                     if s.get("params", {}).get("deliver")), None) or self.cfg.deliver or self.cfg.experiments[-1].name
        return next((e for e in self.cfg.experiments if e.name == name), self.cfg.experiments[-1])

    @property
    def label_free(self) -> bool:
        e = self.experiment
        return e.mode != "labels" and not e.options.get("ce_weight")

    def path(self, rel: str | Path) -> Path:
        p = Path(rel)
        p = p if p.is_absolute() else self.run_dir / p
        if not p.exists():
            raise RunFolderError(f"{p} not found in run folder {self.run_dir}")
        return p

    def load(self, checkpoint: str | Path = "student.pt"):
        """(model, normalisation, meta) of a checkpoint of this run, pruned or not."""
        return load_model(self.path(checkpoint))

    def tiles(self, n: int, norm: Normalization | None = None, tile: int | None = None):
        """`n` tiles of the run's training imagery and where they came from (ground.data.reference)."""
        return reference_tiles(self.data.distill_samples(with_labels=False), n, tile or self.cfg.tile, norm)

    def example(self, norm: Normalization) -> torch.Tensor:
        """One normalised tile (1, C, t, t) of the training imagery: the tracing input."""
        return torch.from_numpy(self.tiles(1, norm)[0])

    # ---- training -------------------------------------------------------------------------------

    def batches(self, source: str, train, reference_model=None, norm=None, mix=None):
        teacher = self.teacher if source == "teacher" else None
        return batch_source(source, self.cfg, train, self.data, self.experiment, teacher, reference_model,
                            norm, self.progress, self.ctx, mix)

    def finetune(self, model: torch.nn.Module, steps: int, source: str = "teacher", fp16: bool = False,
                 lr: float | None = None, reference_model=None, norm=None, seed: int = 0,
                 desc: str = "fine-tune", mix=None) -> list[dict]:
        """Train `model` in place for `steps` with the run's set-up (a fifth of its lr by default);
        `fp16=True` trains FP16-aware (ground.compression.fp16.fp16_aware). `mix = (samples, replay)`:
        batches of new imagery that the teacher labels beside a `replay` share of the run's own
        (ground.training.sources.batch_source)."""
        if steps <= 0 or source == "none":
            return []
        train = replace(self.cfg.train, steps=int(steps), lr=float(lr or self.cfg.train.lr * 0.2), seed=seed,
                        log_every=max(1, int(steps) // 20), checkpoint_every=int(steps))
        sampler, objective = self.batches(source, train, reference_model, norm, mix)
        with fp16_aware(model) if fp16 else nullcontext():
            history = fit(model, sampler, objective, norm or self.data.norm, train, checkpoint=None,
                          progress=self.progress, desc=desc)
        model.eval()
        return history

    def loss_fn(self, norm, source: str = "teacher", reference_model=None, batch: int = 8):
        """A loss on one fixed batch of training crops (for the Taylor criterion)."""
        train = replace(self.cfg.train, batch=batch, steps=1)
        sampler, objective = self.batches("teacher" if source == "none" else source, train, reference_model, norm)
        x, probs, labels = sampler()
        x = normalize(x, norm)
        return lambda model: _loss(objective, model, x, probs, labels)

    # ---- evaluation -----------------------------------------------------------------------------

    def torch_predict(self, model: torch.nn.Module, norm: Normalization, fp16: str | None = None) -> Predict:
        """A torch model tiled as the run evaluates, as is or in emulated FP16 ("round", "half")."""
        return torch_predictor(model, norm, self.cfg.tile, self.cfg.overlap, fp16)

    def ir_predict(self, xml: str | Path, norm: Normalization, precision: str = "fp32") -> Predict:
        """An OpenVINO IR run by OpenVINO on this CPU at `precision`, as the daemon runs it."""
        return ir_predictor(xml, norm, self.cfg.tile, self.cfg.overlap, precision)

    def calibrate(self, predict: Predict, uses_labels: bool | None = None) -> OperatingPoint:
        """The operating point on *training* imagery (ground.evaluation.operating_point.calibrate):
        against labels for models that learnt from labels, the teacher's masks otherwise."""
        how = calibration_source(self.cfg.calibrate, not self.label_free if uses_labels is None else uses_labels,
                                 self.data)
        cache = TeacherCache(self.cfg.cache, self.teacher) if how == "teacher" else None
        return calibrate(predict, how, self.data, cache, len(self.classes), self.cfg.opening_radius)

    @property
    def evals(self) -> list:
        """The held-out evaluation image(s) of the run's config (eval.data)."""
        return list(self.data.evals)

    @property
    def eval_name(self) -> str | None:
        ev = self.evals
        return None if not ev else ev[0].name + (f" (+{len(ev) - 1} more)" if len(ev) > 1 else "")

    def teacher_masks(self) -> list | None:
        if self._teacher_masks is None and self.evals:
            self._teacher_masks = [self.teacher.predict_proba(s.image).argmax(0).astype(np.uint8)
                                   for s in self.evals]
        return self._teacher_masks

    def evaluate(self, predict: Predict, point: OperatingPoint | None = None) -> dict:
        """Scores on the held-out image(s) at an operating point (calibrated here when not given):
        {"operating_point", "miou", "f1", "accuracy", "iou", "agreement", ..., "argmax_miou"}."""
        if not self.evals:
            raise StageError("the run's config has no eval.data: nothing to score on")
        point = point or self.calibrate(predict)
        res = evaluate_on([predict(s.image) for s in self.evals], point, self.classes, self.evals,
                          self.teacher_masks())
        row = summary(res)
        row["argmax_miou"] = res["argmax"].get("vs_labels", {}).get("miou")
        row["operating_point"] = point.as_dict(self.classes)
        return row


METRIC_KEYS = ("miou", "f1", "accuracy", "agreement")


def save_compressed(run: Run, kind: str, folder: str, name: str, model, arch: dict, norm: Normalization,
                    checkpoint: str, info: dict, metrics: dict, finetune_with: str) -> dict:
    """What every compression stage (prune, lowrank) ends with: `FOLDER/NAME.pt`, its lineage
    record (label-free unless the fine-tuning used labels), and the stage's result. Under torchrun
    rank 0 alone writes; another rank returns {"rank": r} (its command prints nothing)."""
    if not run.ctx.is_main:
        return not_main(run)
    out = run.run_dir / folder / f"{name}.pt"
    save_checkpoint(out, model, arch, norm, meta={"name": name, "role": folder, kind: info})
    run.folder.add(StageRecord(f"{kind}:{name}", [out], inputs={"checkpoint": checkpoint}, params=info,
                               metrics={k: {m: v.get(m) for m in METRIC_KEYS} for k, v in metrics.items()},
                               label_free=run.label_free and finetune_with != "labels"))
    return {"checkpoint": str(out.relative_to(run.run_dir)), "run_dir": str(run.run_dir), **info,
            "metrics": metrics}


def not_main(run: Run) -> dict:
    """What a stage returns on a torchrun rank other than 0 (rank 0 writes and reports)."""
    return {"rank": run.ctx.rank, "run_dir": str(run.run_dir)}


def _loss(objective: Objective, model, x, probs, labels) -> torch.Tensor:
    return objective(model(x), probs, labels)[0]


def point_of(row: dict) -> OperatingPoint:
    """The OperatingPoint a scores row (Run.evaluate) was taken at."""
    op = row["operating_point"]
    return OperatingPoint(list(op["thresholds"]), int(op["opening_radius"]))
