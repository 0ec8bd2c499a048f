"""The first stage, driven by one config: data -> teacher -> students (one per experiment) ->
evaluation -> report. Writes `student.pt` (the delivered student: a rebuildable checkpoint with
its normalisation), `normalization.json`, `report.{json,md}` and figures, with lineage records."""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict

import numpy as np
import torch

from ground.config import Experiment, RunConfig
from ground.data.dataset import Data
from ground.data.lazy import ProbsStore, SceneBatches, SceneCrops, validation_score
from ground.data.sources import lazy_scenes
from ground.data.normalization import class_weights
from ground.errors import ConfigError
from ground.evaluation.operating_point import OperatingPoint, calibration_source
from ground.evaluation.report import write_report
from ground.evaluation.scores import evaluate_on, summary
from ground.lineage import RunFolder, StageRecord
from ground.models.checkpoints import build_arch
from ground.models.registry import build_student
from ground.models.size import describe
from ground.models.tiny_unet import TinyUNet
from ground.stages.run import Run
from ground.teachers.cache import TeacherCache
from ground.teachers.torch_teacher import TorchTeacher
from ground.training.batches import BatchSampler
from ground.training.features import FeatureTerm
from ground.training.loop import fit
from ground.training.losses import build_objective
from ground.training.sources import teacher_class_weights
from ground.training.device import Placement
from ground.training.distributed import Distributed
from ground.training.teacher import train_smp_teacher
from ground.training.validation import agreement, split_samples


def student_arch(cfg: RunConfig) -> dict:
    """The resolved architecture (a parameter budget becomes widths), identical for every experiment."""
    opts = {k: v for k, v in cfg.student.items() if k != "name"}
    model = build_student(cfg.student["name"], len(cfg.bands), len(cfg.classes), **opts)
    if isinstance(model, TinyUNet):
        c = model.config
        opts = {"widths": c["widths"], "separable": c["separable"], "upsample": c["upsample"]}
    return {"name": cfg.student["name"], "in_channels": len(cfg.bands), "num_classes": len(cfg.classes),
            "options": opts}


def feature_teacher(run: Run):
    """A torch teacher for feature distillation: the run's own smp teacher (name "teacher"), a
    checkpoint, or a small smp model trained here on the main teacher's outputs."""
    cfg, ft = run.cfg, run.cfg.feature_teacher
    if ft["name"] == "teacher":
        if not hasattr(run.teacher, "model"):
            raise ConfigError("feature_teacher.name = 'teacher' needs a torch [teacher] (smp or checkpoint)")
        return run.teacher
    if ft["name"].startswith("checkpoint:"):
        return TorchTeacher.from_checkpoint(ft["name"].split(":", 1)[1], tile=cfg.tile, overlap=cfg.overlap,
                                            device=cfg.train.device)
    model, _ = train_smp_teacher(cfg, run.data, run.run_dir / "feature_teacher.pt", ft["name"], ft["train"],
                                 ft["options"], teacher=run.teacher, progress=run.progress)
    return TorchTeacher(model, run.data.norm, ft["name"], tile=cfg.tile, overlap=cfg.overlap, device=cfg.train.device)


def _objective(cfg: RunConfig, exp: Experiment, data: Data, samples, cache):
    weights = class_weights(data.labelled, len(cfg.classes), cfg.class_weights) \
        if data.labelled and cfg.class_weights != "none" else None
    opts = dict(exp.options)
    if weights is not None and exp.loss in ("ce", "ce-dice", "weighted-mse") or opts.get("ce_weight"):
        opts["class_weights"] = None if weights is None else weights.tolist()
    if cache is not None and cfg.train.distill_class_weights != "none":
        opts["distill_weights"] = teacher_class_weights(samples, cache, len(cfg.classes),
                                                        cfg.train.distill_class_weights).tolist()
    return build_objective(exp.loss, **opts)


def uses_labels(exp: Experiment) -> bool:
    return exp.mode == "labels" or bool(exp.options.get("ce_weight"))


def scene_batches(run: Run, exp: Experiment, ctx: Distributed):
    """Imagery at archive scale (`scenes` sources): (batches of crops read by window from the scene
    files, validate | None, names of the scenes trained on). Validation is a split by scene; the
    teacher's probabilities of every scene are stored once (ground.data.lazy.ProbsStore, keyed as
    the teacher cache), each rank filling its share."""
    cfg = run.cfg
    specs = cfg.labelled if exp.mode == "labels" else cfg.unlabelled + cfg.labelled
    scenes = list({s.name: s for spec in specs for s in lazy_scenes(spec, cfg.bands)}.values())
    held = []
    if cfg.train.val_every and cfg.train.validation:
        scenes, held = split_samples(scenes, cfg.train.validation, cfg.seed)
    probs = None
    if exp.mode != "labels":
        probs = ProbsStore(cfg.cache, run.teacher).fill(scenes + held, ctx, progress=run.progress and ctx.is_main)
    crops = SceneCrops(scenes, cfg.train.crop, cfg.train.augment, probs)
    cuda = Placement.of(cfg.train.device, cfg.train.precision).cuda
    batches = SceneBatches(crops, cfg.train.batch, cfg.seed, cfg.train.workers, ctx, pin_memory=cuda)
    norm = run.data.norm
    validate = (lambda m: validation_score(m, held, norm, cfg.tile, 8, probs)) if held else None  # noqa: E731
    return batches, validate, [s.name for s in scenes]


def train_student(run: Run, exp: Experiment, feature=None, resume: bool = False):
    """One experiment's student: (model, history, checkpoint path, info)."""
    cfg, data = run.cfg, run.data
    arch = student_arch(cfg)
    torch.manual_seed(cfg.seed)          # every experiment starts from the same initial student
    model = build_arch(arch)
    if exp.mode == "labels":
        samples, cache = data.labelled, None
    else:
        samples = data.distill_samples(with_labels=bool(exp.options.get("ce_weight")))
        cache = TeacherCache(cfg.cache, run.teacher)
    ctx = Distributed.from_env()
    if any(s.get("source") == "scenes" for s in cfg.unlabelled + cfg.labelled):
        sampler, validate, names = scene_batches(run, exp, ctx)
    else:
        validate = None
        if cfg.train.val_every and cfg.train.validation:
            # validation by scene: these images are scored during training, never trained on
            samples, held = split_samples(samples, cfg.train.validation, cfg.seed)
            validate = lambda m: agreement(m, held, data.norm, cache, cfg.tile, cfg.overlap)   # noqa: E731
        sampler = BatchSampler(samples, cfg.train, cache)
        sampler.warm(run.progress, ctx)
        names = [s.name for s in samples]
    # class weights from the in-memory imagery, or from the sampled windows of the scene files
    objective = _objective(cfg, exp, data, samples, cache)
    term = None
    if exp.mode == "feature":
        term = FeatureTerm(model, feature, cfg.feature_teacher["student_layers"], cfg.feature_teacher["layers"],
                           exp.feature_weight, crop=cfg.train.crop)
    path = run.run_dir / "students" / f"{exp.name}.pt"
    t0 = time.perf_counter()
    try:
        history = fit(model, sampler, objective, data.norm, cfg.train, checkpoint=path, arch=arch, resume=resume,
                      feature=term, meta={"name": exp.name, "experiment": asdict(exp)}, progress=run.progress,
                      desc=exp.name, validate=validate)
    finally:
        if term:
            term.close()
    return model, history, path, {"train_seconds": round(time.perf_counter() - t0, 1),
                                  "cache": cache.stats() if cache else None, "samples": names}


def _teacher_row(run: Run, t0: float) -> tuple[dict, dict, list]:
    """The teacher scored on the held-out image(s) by its plain argmax: (row, result, masks)."""
    cfg, teacher = run.cfg, run.teacher
    probs = [teacher.predict_proba(s.image) for s in run.evals]
    masks = [p.argmax(0).astype(np.uint8) for p in probs]
    res = evaluate_on(probs, OperatingPoint([None] * len(cfg.classes), 0), cfg.classes, run.evals, None)
    size = describe(teacher.model, len(cfg.bands), cfg.tile) if hasattr(teacher, "model") else \
        {"params": getattr(teacher, "params", None), "macs": None}
    row = {"name": "teacher", "model": teacher.name, "mode": "teacher", **size, **summary(res),
           "seconds": round(time.perf_counter() - t0, 1)}
    return row, res, masks


def _student_row(run: Run, exp: Experiment, feature, teacher_masks) -> tuple[dict, dict, list, object]:
    """Train, calibrate and score one experiment: (row, result, history, mask of the first eval image)."""
    cfg = run.cfg
    model, history, path, info = train_student(run, exp, feature)
    labels = uses_labels(exp)
    predict = run.torch_predict(model, run.data.norm)
    point = run.calibrate(predict, labels)
    res = {"train": info, "calibrated_on": calibration_source(cfg.calibrate, labels, run.data),
           "checkpoint": str(path.relative_to(run.run_dir))}
    row = {"name": exp.name, "model": cfg.student["name"], "mode": exp.mode, "loss": exp.loss,
           **exp.options, **describe(model, len(cfg.bands), cfg.tile), "seconds": info["train_seconds"]}
    mask = None
    if run.evals:
        probs = [predict(s.image) for s in run.evals]
        res.update(evaluate_on(probs, point, cfg.classes, run.evals, teacher_masks))
        mask = point.apply(probs[0])
        row.update(summary(res))
    run.folder.add(StageRecord(f"student:{exp.name}", [path],
                               params={"experiment": asdict(exp), "operating_point": point.as_dict(cfg.classes),
                                       "train_seconds": info["train_seconds"]},
                               metrics=summary(res) if run.evals else {}, label_free=not labels))
    return row, res, history, mask


def _train_only(cfg: RunConfig, wanted: list[Experiment], ctx: Distributed) -> dict:
    """A rank other than 0 under torchrun: the same training (its share of every batch and of the
    teacher labelling), no evaluation, and nothing written to the run folder (its lineage goes to a
    scratch folder; checkpoints are rank 0's, in the real run folder)."""
    with tempfile.TemporaryDirectory(prefix=f"eoedge-rank{ctx.rank}-") as scratch:
        run = Run(cfg, RunFolder(scratch), progress=False)
        run.run_dir = cfg.run_dir
        feature = feature_teacher(run) if any(e.mode == "feature" for e in wanted) else None
        for exp in wanted:
            train_student(run, exp, feature)          # as rank 0 does
    return {"run": cfg.name, "rank": ctx.rank, "run_dir": str(cfg.run_dir)}


def distill(cfg: RunConfig, progress: bool = True, only: list[str] | None = None) -> dict:
    """Everything a config asks for; returns the report dict (also written as report.json/.md)."""
    wanted = [e for e in cfg.experiments if only is None or e.name in only]
    if only and len(wanted) != len(only):
        raise ConfigError(f"--only: unknown experiment(s) {sorted(set(only) - {e.name for e in cfg.experiments})}")
    t_start = time.perf_counter()
    ctx = Distributed.from_env(Placement.of(cfg.train.device, cfg.train.precision))   # a bad device fails here
    if not ctx.is_main:
        return _train_only(cfg, wanted, ctx)
    run = Run.create(cfg, progress)
    if cfg.source is not None:
        shutil.copyfile(cfg.source, run.folder.file("config.toml"))
    data = run.data
    run.folder.add_inputs(data.inputs)
    (run.run_dir / "normalization.json").write_text(json.dumps(data.norm.as_dict(), indent=2))
    run.log(f"data: {len(data.unlabelled)} unlabelled, {len(data.labelled)} labelled image(s); "
            f"eval: {run.eval_name or 'none'}")
    t0 = time.perf_counter()
    run.folder.add_inputs({f"teacher:{run.teacher.name}": run.teacher_digest()})
    rows, results, histories, masks, teacher_masks = [], {}, {}, {}, None
    if run.evals:
        row, results["teacher"], teacher_masks = _teacher_row(run, t0)
        rows.append(row)
        masks["teacher"] = teacher_masks[0]
        run.log(f"teacher {run.teacher.name}: mIoU {row.get('miou')}")
    feature = feature_teacher(run) if any(e.mode == "feature" for e in wanted) else None
    setup_seconds = time.perf_counter() - t_start          # data + teacher + its evaluation, shared by all
    for exp in wanted:
        t_exp = time.perf_counter()
        row, results[exp.name], histories[exp.name], masks[exp.name] = _student_row(run, exp, feature, teacher_masks)
        # what this student alone costs end to end: data, teacher set-up, labelling, training, evaluation
        results[exp.name]["train"]["run_seconds"] = round(setup_seconds + time.perf_counter() - t_exp, 1)
        rows.append(row)
        run.log(f"{exp.name}: mIoU {row.get('miou')} agreement {row.get('agreement')} ({row['seconds']} s)")
    deliver = cfg.deliver or wanted[-1].name
    deliver = deliver if deliver in results else None      # e.g. --only left it out
    outputs = []
    if deliver is not None:
        shutil.copyfile(run.run_dir / results[deliver]["checkpoint"], run.run_dir / "student.pt")
        outputs = ["student.pt", "normalization.json"]
    report = {"run": cfg.name, "deliver": deliver, "rows": rows, "results": results,
              "normalization": data.norm.as_dict(), "classes": cfg.classes, "bands": cfg.bands,
              "eval": run.eval_name, "histories": histories, "seconds_total": round(time.perf_counter() - t_start, 1)}
    written = write_report(report, run.run_dir, data=data, masks=masks, cfg=cfg)
    run.folder.add(StageRecord("distill", outputs + written, inputs={"config": str(cfg.source or "")},
                               params={"deliver": deliver},
                               metrics={r["name"]: {k: r.get(k) for k in ("miou", "f1", "agreement")} for r in rows},
                               label_free=None if deliver is None else
                               not uses_labels(next(e for e in cfg.experiments if e.name == deliver))))
    report["run_dir"] = str(run.run_dir)
    return report
