"""The factory's first stages, driven by one config: data -> teacher -> students -> evaluation -> report.

Each function takes artifacts and returns artifacts; `run()` strings them together in a run folder
with a lineage record. Outputs for the next stages (pruning, FP16, export, bundle):
`student.pt` (rebuildable checkpoint with normalisation), `normalization.json`, `report.json`.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ground.config import Experiment, RunConfig
from ground.data import IGNORE, Normalization, Sample, class_weights, load_source


@dataclass
class Data:
    unlabelled: list[Sample]
    labelled: list[Sample]
    eval: Sample | None               # the first evaluation image (figures)
    norm: Normalization
    inputs: dict = field(default_factory=dict)
    evals: list = field(default_factory=list)   # every evaluation image (a patch split may hold many)

    def distill_samples(self, with_labels: bool) -> list[Sample]:
        """Teacher-labelled imagery; with_labels adds the labelled samples (their labels kept) and
        drops their unlabelled duplicates."""
        if not with_labels:
            return self.unlabelled + [Sample(s.image, None, s.name, s.files) for s in self.labelled
                                      if s.digest() not in {u.digest() for u in self.unlabelled}]
        seen = {s.digest() for s in self.labelled}
        return self.labelled + [s for s in self.unlabelled if s.digest() not in seen]


def load_data(cfg: RunConfig) -> Data:
    K = len(cfg.classes)
    unlabelled = [s for spec in cfg.unlabelled for s in load_source(spec, cfg.bands, "train", K, labelled=False)]
    labelled = [s for spec in cfg.labelled for s in load_source(spec, cfg.bands, "train", K)]
    evals = load_source(cfg.eval_data, cfg.bands, "eval", K) if cfg.eval_data is not None else []
    ev = evals[0] if evals else None
    seen, train_imagery = set(), []
    for s in unlabelled + labelled:
        if s.digest() not in seen:
            seen.add(s.digest())
            train_imagery.append(s)
    norm = Normalization.fit(train_imagery, cfg.bands)
    inputs = {f"image:{s.name}": s.digest() for s in unlabelled + labelled + evals}
    return Data(unlabelled, labelled, ev, norm, inputs, evals)


# ---- teachers -------------------------------------------------------------------------------------

def smp_arch(spec: str, cfg: RunConfig, options: dict | None = None) -> dict:
    return {"name": spec if spec.startswith("smp:") else f"smp:{spec}", "in_channels": len(cfg.bands),
            "num_classes": len(cfg.classes), "options": dict(options or {})}


def train_smp_teacher(cfg: RunConfig, data: Data, path: Path, spec: str, train: dict, options: dict | None = None,
                      teacher=None, resume: bool = True, progress: bool = True) -> tuple[object, list]:
    """An smp model trained here: from the labelled data (CE, class-weighted), or, given a `teacher`,
    from that teacher's outputs on all imagery (KL). Resumes from `path` if it exists."""
    from ground.checkpoints import build_arch
    from ground.losses import build_objective
    from ground.train import BatchSampler, TrainConfig, fit
    import torch
    arch = smp_arch(spec, cfg, options)
    torch.manual_seed(cfg.seed)          # the same initial weights on every (re)start
    model = build_arch(arch)
    tcfg = TrainConfig(**{**asdict(cfg.train), **train})
    if teacher is None:
        samples = data.labelled
        if not samples:
            raise ValueError("training a teacher from labels needs data.labelled")
        weights = class_weights(samples, len(cfg.classes), cfg.class_weights)
        objective, cache = build_objective("ce", class_weights=weights.tolist()), None
    else:
        from ground.cache import TeacherCache
        samples = data.distill_samples(with_labels=False)
        objective, cache = build_objective("kl", temperature=1.0), TeacherCache(cfg.cache, teacher)
    sampler = BatchSampler(samples, tcfg, cache)
    sampler.warm(progress)
    history = fit(model, sampler, objective, data.norm, tcfg, checkpoint=path, arch=arch, resume=resume,
                  meta={"name": arch["name"], "role": "teacher"}, progress=progress, desc=f"teacher {spec}")
    return model, history


def build_run_teacher(cfg: RunConfig, data: Data, run_dir: Path, progress: bool = True):
    """The [teacher]: a registry/external teacher as is, or an smp teacher trained here (run/teacher.pt)."""
    from ground.teachers import TorchTeacher, build_teacher
    name = cfg.teacher["name"]
    if name.startswith("smp:"):
        path = run_dir / "teacher.pt"
        model, _ = train_smp_teacher(cfg, data, path, name, cfg.teacher["train"], cfg.teacher["options"],
                                     progress=progress)
        return TorchTeacher(model, data.norm, name, tile=cfg.tile, overlap=cfg.overlap)
    teacher = build_teacher(name, **cfg.teacher["options"])
    if tuple(teacher.bands) != tuple(_canon(cfg.bands)):
        raise ValueError(f"teacher {name} takes bands {teacher.bands}; data.bands is {cfg.bands} (same order please)")
    if teacher.num_classes != len(cfg.classes):
        raise ValueError(f"teacher {name} has {teacher.num_classes} classes; data.classes has {len(cfg.classes)}")
    return teacher


def _canon(bands):
    from shared.bands import canonical_band
    return [canonical_band(b) for b in bands]


def build_feature_teacher(cfg: RunConfig, data: Data, teacher, run_dir: Path, progress: bool = True):
    """A torch teacher for feature distillation: the run's own smp teacher (name "teacher"), a
    checkpoint, or a small smp model trained here on the main teacher's outputs."""
    from ground.teachers import TorchTeacher
    ft = cfg.feature_teacher
    if ft["name"] == "teacher":
        if not hasattr(teacher, "model"):
            raise ValueError("feature_teacher.name = 'teacher' needs a torch [teacher] (smp or checkpoint)")
        return teacher
    if ft["name"].startswith("checkpoint:"):
        return TorchTeacher.from_checkpoint(ft["name"].split(":", 1)[1], tile=cfg.tile, overlap=cfg.overlap)
    model, _ = train_smp_teacher(cfg, data, run_dir / "feature_teacher.pt", ft["name"], ft["train"], ft["options"],
                                 teacher=teacher, progress=progress)
    return TorchTeacher(model, data.norm, ft["name"], tile=cfg.tile, overlap=cfg.overlap)


# ---- students -------------------------------------------------------------------------------------

def student_arch(cfg: RunConfig) -> dict:
    """The resolved architecture (a parameter budget becomes widths), identical for every experiment."""
    from ground.students import TinyUNet, build_student
    opts = {k: v for k, v in cfg.student.items() if k != "name"}
    model = build_student(cfg.student["name"], len(cfg.bands), len(cfg.classes), **opts)
    if isinstance(model, TinyUNet):
        c = model.config
        opts = {"widths": c["widths"], "separable": c["separable"], "upsample": c["upsample"]}
    return {"name": cfg.student["name"], "in_channels": len(cfg.bands), "num_classes": len(cfg.classes),
            "options": opts}


def teacher_class_weights(samples: list[Sample], cache, num_classes: int, method) -> np.ndarray:
    """Class weights counted on the teacher's masks (view 0) of the training imagery: label-free.
    Samples that carry labels are counted by their labels."""
    masked = [s if s.labels is not None else
              Sample(s.image, cache.probs(s, 0).astype(np.float32).argmax(0).astype(np.uint8), s.name, s.files)
              for s in samples]
    return class_weights(masked, num_classes, method)


def train_student(cfg: RunConfig, exp: Experiment, data: Data, teacher, run_dir: Path,
                  feature_teacher=None, progress: bool = True, resume: bool = False):
    from ground.cache import TeacherCache
    from ground.checkpoints import build_arch
    from ground.losses import build_objective
    from ground.train import BatchSampler, FeatureTerm, fit
    import torch
    arch = student_arch(cfg)
    torch.manual_seed(cfg.seed)          # every experiment starts from the same initial student
    model = build_arch(arch)
    weights = class_weights(data.labelled, len(cfg.classes), cfg.class_weights) \
        if data.labelled and cfg.class_weights != "none" else None
    opts = dict(exp.options)
    if weights is not None and exp.loss in ("ce", "weighted-mse") or opts.get("ce_weight"):
        opts["class_weights"] = None if weights is None else weights.tolist()
    if exp.mode == "labels":
        samples, cache = data.labelled, None
    else:
        samples = data.distill_samples(with_labels=bool(exp.options.get("ce_weight")))
        cache = TeacherCache(cfg.cache, teacher)
    sampler = BatchSampler(samples, cfg.train, cache)
    sampler.warm(progress)
    if cache is not None and getattr(cfg.train, "distill_class_weights", "none") != "none":
        opts["distill_weights"] = teacher_class_weights(samples, cache, len(cfg.classes),
                                                        cfg.train.distill_class_weights).tolist()
    objective = build_objective(exp.loss, **opts)
    feature = None
    if exp.mode == "feature":
        feature = FeatureTerm(model, feature_teacher, cfg.feature_teacher["student_layers"],
                              cfg.feature_teacher["layers"], exp.feature_weight, crop=cfg.train.crop)
    path = run_dir / "students" / f"{exp.name}.pt"
    t0 = time.perf_counter()
    try:
        history = fit(model, sampler, objective, data.norm, cfg.train, checkpoint=path, arch=arch, resume=resume,
                      feature=feature, meta={"name": exp.name, "experiment": asdict(exp)}, progress=progress,
                      desc=exp.name)
    finally:
        if feature:
            feature.close()
    seconds = time.perf_counter() - t0
    return model, history, path, {"train_seconds": round(seconds, 1),
                                  "cache": cache.stats() if cache else None, "samples": [s.name for s in samples]}


# ---- evaluation -----------------------------------------------------------------------------------

def calibrate(model, cfg: RunConfig, exp: Experiment | None, data: Data, teacher) -> tuple[object, str]:
    """The operating point chosen on training imagery (never the eval rows): per-class thresholds
    swept against labels (experiments that use labels) or the teacher's masks (label-free ones)."""
    from ground.cache import TeacherCache
    from ground.evaluate import OperatingPoint, model_proba, sweep_thresholds
    how = cfg.calibrate
    if how == "auto":
        uses_labels = exp is not None and (exp.mode == "labels" or exp.options.get("ce_weight"))
        how = "labels" if uses_labels and data.labelled else "teacher"
    if how == "none":
        return OperatingPoint([None] * len(cfg.classes), cfg.opening_radius), how
    samples = data.labelled if how == "labels" else data.distill_samples(with_labels=False)
    if how == "teacher":
        cache = TeacherCache(cfg.cache, teacher)
        refs = [cache.probs(s, 0).astype(np.float32).argmax(0).astype(np.uint8) for s in samples]
    else:
        refs = [s.labels for s in samples]
    probs = [model_proba(model, s.image, data.norm, cfg.tile, cfg.overlap) for s in samples]
    point, _trace = sweep_thresholds(probs, refs, len(cfg.classes), cfg.opening_radius)
    return point, how


def evaluate_on(probs: list, point, cfg: RunConfig, samples: list[Sample], teacher_masks: list | None) -> dict:
    from ground.evaluate import OperatingPoint, evaluate_probs
    labels = [s.labels for s in samples] if all(s.labels is not None for s in samples) else None
    out = evaluate_probs(probs, point, len(cfg.classes), cfg.classes, labels, teacher_masks)
    raw = evaluate_probs(probs, OperatingPoint([None] * len(cfg.classes), 0), len(cfg.classes), cfg.classes,
                         labels, teacher_masks)
    out["argmax"] = {k: v for k, v in raw.items() if k != "operating_point"}
    return out


# ---- the whole run --------------------------------------------------------------------------------

def run(cfg: RunConfig, progress: bool = True, only: list[str] | None = None, log=None) -> dict:
    """Everything a config asks for; returns the report dict (also written as report.json/.md)."""
    from ground.complexity import describe
    from ground.evaluate import OperatingPoint, model_proba, summary
    from ground.lineage import RunFolder, file_sha256
    from ground.report import write_report
    log = log or (lambda msg: print(msg, file=sys.stderr) if progress else None)
    t_start = time.perf_counter()
    run_dir = cfg.run_dir
    folder = RunFolder(run_dir)
    folder.set_config(cfg.raw)
    if cfg.source is not None:
        shutil.copyfile(cfg.source, folder.file("config.toml"))

    data = load_data(cfg)
    data_seconds = time.perf_counter() - t_start
    folder.add_inputs(data.inputs)
    (run_dir / "normalization.json").write_text(json.dumps(data.norm.as_dict(), indent=2))
    log(f"data: {len(data.unlabelled)} unlabelled, {len(data.labelled)} labelled image(s); "
        f"eval: {data.eval.name if data.eval else 'none'}")

    t0 = time.perf_counter()
    teacher = build_run_teacher(cfg, data, run_dir, progress)
    setup_seconds = data_seconds + time.perf_counter() - t0
    folder.add_inputs({f"teacher:{teacher.name}": __import__("hashlib").sha256(teacher.identity.encode()).hexdigest()})
    rows, results = [], {}
    teacher_mask = None
    if data.eval is not None:
        tprobs = [teacher.predict_proba(s.image) for s in data.evals]
        teacher_mask = [p.argmax(0).astype(np.uint8) for p in tprobs]
        tres = evaluate_on(tprobs, OperatingPoint([None] * len(cfg.classes), 0), cfg, data.evals, None)
        results["teacher"] = tres
        size = describe(teacher.model, len(cfg.bands), cfg.tile) if hasattr(teacher, "model") else \
            {"params": getattr(teacher, "params", None), "macs": None}
        rows.append({"name": "teacher", "model": teacher.name, "mode": "teacher", **size,
                     **summary(tres), "seconds": round(time.perf_counter() - t0, 1)})
        log(f"teacher {teacher.name}: mIoU {rows[-1].get('miou')}")

    feature_teacher = None
    histories = {}
    masks = {"teacher": teacher_mask[0] if teacher_mask else None}
    wanted = [e for e in cfg.experiments if only is None or e.name in only]
    if only and len(wanted) != len(only):
        raise ValueError(f"--only: unknown experiment(s) {sorted(set(only) - {e.name for e in cfg.experiments})}")
    for exp in wanted:
        t_exp = time.perf_counter()
        if exp.mode == "feature" and feature_teacher is None:
            feature_teacher = build_feature_teacher(cfg, data, teacher, run_dir, progress)
        model, history, path, info = train_student(cfg, exp, data, teacher, run_dir, feature_teacher, progress)
        histories[exp.name] = history
        point, how = calibrate(model, cfg, exp, data, teacher)
        res = {"train": info, "calibrated_on": how, "checkpoint": str(path.relative_to(run_dir))}
        row = {"name": exp.name, "model": cfg.student["name"], "mode": exp.mode, "loss": exp.loss,
               **exp.options, **describe(model, len(cfg.bands), cfg.tile), "seconds": info["train_seconds"]}
        if data.eval is not None:
            probs = [model_proba(model, s.image, data.norm, cfg.tile, cfg.overlap) for s in data.evals]
            res.update(evaluate_on(probs, point, cfg, data.evals, teacher_mask))
            masks[exp.name] = point.apply(probs[0])
            row.update(summary(res))
        # what this student alone costs end to end: data, teacher set-up, labelling, training, evaluation
        info["run_seconds"] = round(setup_seconds + time.perf_counter() - t_exp, 1)
        results[exp.name] = res
        rows.append(row)
        folder.add_stage(f"student:{exp.name}", [path], summary(res) if data.eval is not None else None,
                         operating_point=point.as_dict(cfg.classes), train_seconds=info["train_seconds"])
        log(f"{exp.name}: mIoU {row.get('miou')} agreement {row.get('agreement')} ({info['train_seconds']} s)")

    deliver = cfg.deliver or wanted[-1].name
    deliver = deliver if deliver in results else None      # e.g. --only left it out
    outputs = []
    if deliver is not None:
        shutil.copyfile(run_dir / results[deliver]["checkpoint"], run_dir / "student.pt")
        outputs = ["student.pt", "normalization.json"]
    report = {"run": cfg.name, "deliver": deliver, "rows": rows, "results": results,
              "normalization": data.norm.as_dict(), "classes": cfg.classes, "bands": cfg.bands,
              "eval": (data.eval.name + (f" (+{len(data.evals) - 1} more)" if len(data.evals) > 1 else ""))
              if data.eval else None, "histories": histories,
              "seconds_total": round(time.perf_counter() - t_start, 1)}
    written = write_report(report, run_dir, data=data, masks=masks, cfg=cfg)
    folder.add_stage("distill", outputs + written, {r["name"]: {k: r.get(k) for k in ("miou", "f1", "agreement")}
                                                    for r in rows}, deliver=deliver)
    report["run_dir"] = str(run_dir)
    return report
