"""Search stage: the architecture search over a run (ground.search), on the target's own clock.

`search(run, settings)` opens (or joins) the study in `search/NAME/` of the run folder, runs
`settings.workers` processes on it until `settings.trials` trials have finished, and writes the
Pareto front: `front.{json,md,png}`, with every trial's checkpoint in `trials/N.pt` (a
`search-unet` checkpoint any later stage loads: fp16-finetune, export, bundle). `pick` copies the
fastest front point within a given mIoU of the teacher to `search/NAME/picked.pt`.

Each trial: draw an architecture (ground.search.space), time its IR on the device at the deployed
precision (cached), stop it if over the size budget (or over `max_ms`, a latency budget), distil a probe from the run's teacher on the
training split, stop it when a finished trial at least as fast has a clearly lower loss, distil
the rest, then score mIoU on the validation split in emulated FP16 after the on-board
post-processing."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import optuna
import torch

from shared.units import parse_bytes
from ground.errors import StageError
from ground.evaluation.operating_point import OperatingPoint
from ground.evaluation.scores import evaluate_on, summary
from ground.lineage import StageRecord
from ground.models.checkpoints import build_arch, save_checkpoint
from ground.models.size import count_params
from ground.search.front import front_markdown, pareto, pick, plot_front, rows_of, timed_of
from ground.search.objectives import Hopeless, LatencyCache, accuracy, check_target, dominated, latency, validation_split
from ground.search.space import arch_key, arch_of, suggest
from ground.search.study import SIZE, open_study, storage, work
from ground.stages.run import Run
from ground.teachers.cache import TeacherCache


@dataclass
class SearchSettings:
    name: str = "search"
    trials: int = 16
    workers: int = 1
    device: str = "CPU"
    precision: str = "fp16"
    sampler: str = "nsga2"
    population: int = 8
    steps: int | None = None            # distillation steps per candidate (default: the run's train.steps)
    probe: float = 0.4                  # share of the steps after which a hopeless candidate stops
    margin: float = 0.05                # "clearly lower": by this share of the loss
    storage: str | None = None          # RDB URL or journal path (default: search/NAME/study.journal)
    max_bytes: int | str = "5MB"        # IR bytes a candidate may have (the uplink budget)
    max_ms: float | None = None         # candidates slower than this per tile are not trained (a latency budget)
    val_fraction: float = 0.25
    reference: str = "auto"             # validation masks: human labels where they exist, else the teacher's
    seed: int = 0
    fp16_train: bool = False            # distil FP16-aware (slower) instead of scoring FP16 only

    @classmethod
    def read(cls, path: Path) -> "SearchSettings":
        raw = json.loads(path.read_text())
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


class Candidates:
    """What one worker process needs to score trials: the run's split view and the caches."""

    def __init__(self, run: Run, settings: SearchSettings, folder: Path):
        self.run, self.s, self.folder = run, settings, folder
        self.cache = TeacherCache(run.cfg.cache, run.teacher)
        data, self.reference, self.teacher_val = validation_split(
            run.data, lambda sample: self.cache.probs(sample, 0).astype("float32"), settings.val_fraction,
            2 * run.cfg.train.crop, settings.reference)
        self.view = run.with_data(data)
        self.latency = LatencyCache(folder / "latency")
        self.steps = int(settings.steps or run.cfg.train.steps)
        self.max_bytes = parse_bytes(settings.max_bytes)

    def teacher_miou(self) -> float:
        """The teacher scored on the validation strips against the same reference (1.0 against its own masks)."""
        k = len(self.run.classes)
        res = evaluate_on(self.teacher_val, OperatingPoint([None] * k, 0), self.run.classes, self.view.evals, None)
        return summary(res)["miou"]

    def train(self, model, steps: int, phase: str, number: int) -> list[dict]:
        lr = self.run.cfg.train.lr if phase == "probe" else None       # the rest at the fine-tuning rate
        return self.view.finetune(model, steps, "teacher", fp16=self.s.fp16_train, lr=lr, seed=self.s.seed,
                                  desc=f"trial {number} {phase}")

    def score(self, model) -> dict:
        return self.view.evaluate(self.view.torch_predict(model, self.run.data.norm, fp16="round"))

    def evaluate(self, trial: optuna.Trial) -> tuple[float, float]:
        options = suggest(trial)
        arch = arch_of(options, len(self.run.cfg.bands), len(self.run.classes))
        key = arch_key(arch)
        trial.set_user_attr("options", options)
        trial.set_user_attr("arch_key", key)
        twin = self._twin(trial, key)
        if twin is not None:
            return twin
        torch.manual_seed(self.s.seed)                  # every candidate from the same seed
        model = build_arch(arch)
        lat = latency(model, key, self.latency, self.s.device, self.s.precision, self.run.cfg.tile)
        for k in ("ir_bytes", "ms_per_tile"):
            trial.set_user_attr(k, lat[k])
        trial.set_user_attr("params", count_params(model))
        trial.set_user_attr("constraint", float(lat["ir_bytes"] - self.max_bytes))
        trial.set_constraint(SIZE, float(lat["ir_bytes"] - self.max_bytes))
        if lat["ir_bytes"] > self.max_bytes:
            raise optuna.TrialPruned(f"IR {lat['ir_bytes']:,} bytes, over the budget {self.max_bytes:,}")
        if self.s.max_ms is not None and lat["ms_per_tile"] > self.s.max_ms:
            raise optuna.TrialPruned(f"{lat['ms_per_tile']:.2f} ms per tile, over the latency budget {self.s.max_ms}")
        probe_steps = max(1, int(self.steps * self.s.probe))

        def on_probe(loss: float) -> None:
            trial.set_user_attr("probe_loss", loss)
            done = [{"number": t.number, **t.user_attrs} for t in trial.study.get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if "duplicate_of" not in t.user_attrs]
            by = dominated(loss, lat["ms_per_tile"], done, self.s.margin)
            if by is not None:
                raise Hopeless(by, loss)

        t0 = time.perf_counter()
        try:
            row, _ = accuracy(model, lambda m, n, phase: self.train(m, n, phase, trial.number), self.score,
                              self.steps, probe_steps, on_probe)
        except Hopeless as exc:
            raise optuna.TrialPruned(str(exc)) from None
        ckpt = self.folder / "trials" / f"{trial.number}.pt"
        save_checkpoint(ckpt, model, arch, self.run.data.norm,
                        meta={"name": f"trial-{trial.number}", "role": "search", "search": {
                            "study": self.s.name, "trial": trial.number, "miou_validation": row["miou"],
                            "ms_per_tile": lat["ms_per_tile"], "device": self.s.device,
                            "precision": self.s.precision, "operating_point": row["operating_point"]}})
        trial.set_user_attr("checkpoint", str(ckpt.relative_to(self.run.run_dir)))
        trial.set_user_attr("train_seconds", round(time.perf_counter() - t0, 1))
        self.run.log(f"trial {trial.number}: mIoU {row['miou']:.4f}, {lat['ms_per_tile']:.2f} ms/tile, "
                     f"{trial.user_attrs['params']:,} params")
        return row["miou"], lat["ms_per_tile"]

    @staticmethod
    def _twin(trial: optuna.Trial, key: str) -> tuple[float, float] | None:
        """The result of a finished trial of the same architecture, recorded on `trial` (an
        architecture is not trained twice)."""
        for t in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                                optuna.trial.TrialState.PRUNED)):
            if t.user_attrs.get("arch_key") != key or "duplicate_of" in t.user_attrs:
                continue
            if t.state == optuna.trial.TrialState.PRUNED:
                raise optuna.TrialPruned(f"same architecture as trial {t.number}, which was stopped")
            for k in ("ir_bytes", "ms_per_tile", "params", "constraint", "checkpoint", "probe_loss"):
                if k in t.user_attrs:
                    trial.set_user_attr(k, t.user_attrs[k])
            trial.set_constraint(SIZE, float(t.user_attrs.get("constraint", 0.0)))
            trial.set_user_attr("duplicate_of", t.number)
            return t.values[0], t.values[1]
        return None


def _study(settings: SearchSettings, folder: Path):
    return open_study(storage(settings.storage or folder / "study.journal"), settings.name, settings.sampler,
                      settings.seed, settings.population)


def share_cores(workers: int) -> None:
    """Torch threads per worker process: the machine's cores shared out (two threads on one core
    mostly spin against each other)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers)))


def worker(run_dir: str, name: str, progress: bool = False) -> list[int]:
    """One worker process: open the run and the study in `search/NAME/`, run trials until done."""
    run = Run.open(run_dir, progress)
    folder = run.run_dir / "search" / name
    settings = SearchSettings.read(folder / "settings.json")
    share_cores(settings.workers)
    candidates = Candidates(run, settings, folder)
    study = _study(settings, folder)
    return work(study, candidates.evaluate, settings.trials, run.log)


def search(run: Run, settings: SearchSettings) -> dict:
    """Run (or resume, or join) the study until it holds `settings.trials` finished trials, with
    `settings.workers` processes on this machine; write the front. Returns the report."""
    check_target(settings.device, settings.precision)
    if settings.trials < 1 or settings.workers < 1:
        raise StageError(f"trials and workers must be >= 1, got {settings.trials} and {settings.workers}")
    folder = run.run_dir / "search" / settings.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(asdict(settings), indent=2))
    t0 = time.perf_counter()
    if settings.workers > 1:
        share_cores(settings.workers)
    candidates = Candidates(run, settings, folder)
    study = _study(settings, folder)
    if "teacher_miou" not in study.user_attrs:
        study.set_user_attr("teacher_miou", candidates.teacher_miou())
        study.set_user_attr("reference", candidates.reference)
    others = [multiprocessing.get_context("spawn").Process(target=worker, args=(str(run.run_dir), settings.name))
              for _ in range(settings.workers - 1)]
    for p in others:
        p.start()
    try:
        work(study, candidates.evaluate, settings.trials, run.log)
    finally:
        for p in others:
            p.join()
    failed = [p.exitcode for p in others if p.exitcode]
    if failed:
        raise StageError(f"{len(failed)} search worker process(es) failed (exit codes {failed}); "
                         f"run the command again to resume the study in {folder}")
    report = front_report(run, study, settings, folder)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    run.folder.add(StageRecord(f"search:{settings.name}", [folder / "front.json", folder / "front.png"],
                               inputs={"teacher": run.teacher.name}, params=asdict(settings),
                               metrics={"finished": report["finished"], "front": len(report["front"])},
                               label_free=report["reference"] == "teacher"))
    return report


def front_report(run: Run, study, settings: SearchSettings, folder: Path) -> dict:
    """front.{json,md,png} in the search folder, and the report they hold."""
    rows = rows_of(study)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    report = {"study": settings.name, "storage": settings.storage or str(folder / "study.journal"),
              "device": settings.device, "precision": settings.precision, "tile": run.cfg.tile,
              "sampler": settings.sampler, "max_bytes": parse_bytes(settings.max_bytes),
              "teacher_miou": study.user_attrs.get("teacher_miou"), "reference": study.user_attrs.get("reference"),
              "finished": sum(s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for s in states),
              "pruned": sum(s == optuna.trial.TrialState.PRUNED for s in states),
              "failed": sum(s == optuna.trial.TrialState.FAIL for s in states),
              "rows": rows, "front": pareto(rows), "timed": timed_of(study), "folder": str(folder)}
    (folder / "front.json").write_text(json.dumps(report, indent=2))
    (folder / "front.md").write_text(front_markdown(report))
    plot_front(rows, report["front"], folder / "front.png", f"{settings.name}: {settings.device} {settings.precision}",
               report["teacher_miou"])
    return report


def pick_point(run: Run, report: dict, within: float, budget_ms: float | None = None) -> dict | None:
    """Copy the fastest front point within `within` mIoU of the teacher (and the budget) to
    `search/NAME/picked.pt`; None when no point qualifies."""
    point = pick(report["front"], report["teacher_miou"], within, budget_ms)
    if point is None:
        return None
    out = Path(report["folder"]) / "picked.pt"
    shutil.copyfile(run.run_dir / point["checkpoint"], out)
    run.folder.add(StageRecord(f"search-pick:{report['study']}", [out], inputs={"checkpoint": point["checkpoint"]},
                               params={"within": within, "budget_ms": budget_ms, "trial": point["number"]},
                               metrics={"miou_validation": point["miou"], "ms_per_tile": point["ms_per_tile"]},
                               label_free=report["reference"] == "teacher"))
    return {**point, "picked": str(out.relative_to(run.run_dir))}
