"""The stages after distillation, on a run folder, and the pruning sweep.

`RunContext.open(run_dir)` reads what the distillation run left (lineage.json with its config,
student.pt, the teacher cache) and offers what every later stage needs, built from the ground's
own parts: the data and the teacher (ground.pipeline), fine-tuning with the training loop
(ground.train.fit: with the teacher, with the unpruned student as teacher, or with labels;
optionally FP16-aware), and evaluation as the daemon will run it (ground.evaluate: an operating
point calibrated on training imagery, then scores on the held-out image) for a torch model or
an OpenVINO IR alike.

`sweep()`: criteria x ratios -> prune, fine-tune, evaluate, export, time in OpenVINO; a table
(markdown + JSON) and a PNG of the metric against the size reduction, per criterion.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

FINETUNE_SOURCES = ("teacher", "self", "labels", "none")
Predict = Callable[[np.ndarray], np.ndarray]       # reflectance image (C, H, W) -> probabilities (K, H, W)


class RunContext:
    """A distillation run folder, opened for the later stages."""

    def __init__(self, run_dir: Path, cfg, folder, progress: bool = True):
        self.run_dir, self.cfg, self.folder, self.progress = run_dir, cfg, folder, progress
        self._data = self._teacher = self._teacher_mask = None

    @classmethod
    def open(cls, run_dir: str | Path, progress: bool = True) -> "RunContext":
        from ground.config import ConfigError, parse_config
        from ground.lineage import RunFolder
        run_dir = Path(run_dir)
        lineage = run_dir / "lineage.json"
        if not lineage.is_file():
            raise FileNotFoundError(f"{run_dir} is not a run folder (no lineage.json); "
                                    "make one with `eoedge ground run CONFIG`")
        folder = RunFolder(run_dir)
        raw = folder.record.get("config")
        if not isinstance(raw, dict):
            raise ValueError(f"{lineage}: no config recorded (field 'config')")
        try:
            cfg = parse_config(raw)
        except ConfigError as exc:
            raise ValueError(f"{lineage}: config: {exc}") from None
        # the run may have been made from another working directory: find its folder and cache here
        cfg = replace(cfg, out=run_dir.parent, name=run_dir.name,
                      cache=cfg.cache if raw.get("run", {}).get("cache") else run_dir.parent / ".teacher-cache")
        return cls(run_dir, cfg, folder, progress)

    def log(self, msg: str) -> None:
        if self.progress:
            print(msg, file=sys.stderr)

    # ---- inputs ------------------------------------------------------------------------------------

    @property
    def data(self):
        if self._data is None:
            from ground.pipeline import load_data
            self._data = load_data(self.cfg)
        return self._data

    @property
    def teacher(self):
        if self._teacher is None:
            from ground.pipeline import build_run_teacher
            self._teacher = build_run_teacher(self.cfg, self.data, self.run_dir, self.progress)
        return self._teacher

    @property
    def classes(self) -> list[str]:
        return list(self.cfg.classes)

    @property
    def experiment(self):
        """The experiment whose student the run delivered (its loss is reused for fine-tuning)."""
        stages = self.folder.record.get("stages") or []
        name = next((s["deliver"] for s in reversed(stages) if s.get("deliver")), None) \
            or self.cfg.deliver or self.cfg.experiments[-1].name
        return next((e for e in self.cfg.experiments if e.name == name), self.cfg.experiments[-1])

    @property
    def label_free(self) -> bool:
        e = self.experiment
        return e.mode != "labels" and not e.options.get("ce_weight")

    def path(self, rel: str | Path) -> Path:
        p = Path(rel)
        p = p if p.is_absolute() else self.run_dir / p
        if not p.exists():
            raise FileNotFoundError(f"{p} not found in run folder {self.run_dir}")
        return p

    def load(self, checkpoint: str | Path = "student.pt"):
        """(model, normalisation, meta) of a checkpoint of this run, pruned or not."""
        from ground.prune import load_model
        return load_model(self.path(checkpoint))

    def example(self, norm, tile: int | None = None) -> torch.Tensor:
        """One real normalised tile (1, C, t, t) from the training imagery: the tracing input."""
        import torch
        from ground.export import parity_tiles
        t = tile or self.cfg.tile
        try:
            return torch.from_numpy(parity_tiles(self.cfg.bands, norm, n=1, tile=t))
        except (FileNotFoundError, ValueError):
            return torch.zeros(1, len(self.cfg.bands), t, t)

    # ---- training ----------------------------------------------------------------------------------

    def batches(self, source: str, train_cfg, reference_model=None, norm=None):
        """(BatchSampler, objective) for fine-tuning from `source` (see FINETUNE_SOURCES)."""
        from ground.cache import TeacherCache
        from ground.losses import build_objective
        from ground.teachers import TorchTeacher
        from ground.train import BatchSampler
        if source not in FINETUNE_SOURCES or source == "none":
            raise ValueError(f"fine-tuning source must be one of {FINETUNE_SOURCES[:-1]}, got {source!r}")
        if source == "labels":
            if not self.data.labelled:
                raise ValueError("fine-tuning with labels needs data.labelled in the run's config")
            return BatchSampler(self.data.labelled, train_cfg), build_objective("ce")
        exp = self.experiment
        loss = exp.loss if exp.loss != "ce" else "kl"
        options = {k: v for k, v in exp.options.items() if k == "temperature" and loss == "kl"}
        if source == "self":
            if reference_model is None:
                raise ValueError("fine-tuning source 'self' needs the unpruned model")
            teacher = TorchTeacher(reference_model, norm or self.data.norm, "self", tile=self.cfg.tile,
                                   overlap=self.cfg.overlap)
        else:
            teacher = self.teacher
        # label-free: the teacher (or the unpruned student) labels every image, no human label
        samples = self.data.distill_samples(with_labels=False)
        cache = TeacherCache(self.cfg.cache, teacher)
        sampler = BatchSampler(samples, train_cfg, cache)
        sampler.warm(self.progress)
        mode = getattr(train_cfg, "distill_class_weights", "none")
        if mode != "none":
            # the run's distillation term weighted its classes by counts on the teacher's masks:
            # fine-tune with the same objective (ground.pipeline does the counting)
            from ground.pipeline import teacher_class_weights
            options["distill_weights"] = teacher_class_weights(samples, cache, len(self.classes), mode).tolist()
        return sampler, build_objective(loss, **options)

    def finetune(self, model: torch.nn.Module, steps: int, source: str = "teacher", fp16: bool = False,
                 lr: float | None = None, reference_model=None, norm=None, seed: int = 0,
                 desc: str = "fine-tune") -> list[dict]:
        """Train `model` in place for `steps` with the run's training set-up (a fifth of its lr by
        default); `fp16=True` trains FP16-aware (ground.fp16.fp16_aware)."""
        from ground.fp16 import fp16_aware
        from ground.train import fit
        if steps <= 0 or source == "none":
            return []
        tcfg = replace(self.cfg.train, steps=int(steps), lr=float(lr or self.cfg.train.lr * 0.2), seed=seed,
                       log_every=max(1, int(steps) // 20), checkpoint_every=int(steps))
        sampler, objective = self.batches(source, tcfg, reference_model, norm)
        with fp16_aware(model) if fp16 else nullcontext():
            history = fit(model, sampler, objective, norm or self.data.norm, tcfg, checkpoint=None,
                          progress=self.progress, desc=desc)
        model.eval()
        return history

    def loss_fn(self, norm, source: str = "teacher", reference_model=None, batch: int = 8):
        """A loss on one fixed batch of training crops (for the Taylor criterion)."""
        from ground.train import TrainConfig, _normalize
        tcfg = replace(self.cfg.train, batch=batch, steps=1)
        sampler, objective = self.batches("teacher" if source == "none" else source, tcfg, reference_model, norm)
        x, probs, labels = sampler()
        x = _normalize(x, norm)
        return lambda model: objective(model(x), probs, labels)[0]

    # ---- evaluation --------------------------------------------------------------------------------

    def torch_predict(self, model: torch.nn.Module, norm, fp16: str | None = None) -> Predict:
        """Probabilities of a torch model, as is or in emulated FP16 ("round" or "half")."""
        from ground.evaluate import model_proba
        from ground.fp16 import emulate_fp16
        m = emulate_fp16(model, fp16) if fp16 else model.eval()
        return lambda image: model_proba(m, image, norm, self.cfg.tile, self.cfg.overlap)

    def ir_predict(self, xml: str | Path, norm) -> Predict:
        """Probabilities of an OpenVINO IR run by OpenVINO on this CPU (f32, as the daemon runs it)."""
        from ground.export import _softmax, compile_ir
        from ground.teachers import tiled_predict
        compiled = compile_ir(xml)
        infer = lambda tiles: _softmax(np.asarray(compiled(tiles)[0]))
        return lambda image: tiled_predict(norm.apply(image), infer, self.cfg.tile, self.cfg.overlap)

    def calibrate(self, predict: Predict):
        """The operating point (thresholds + opening) chosen on *training* imagery, as the
        distillation run chose it: against the labels for students that used labels, against the
        teacher's masks for label-free ones. Never the held-out rows."""
        from ground.cache import TeacherCache
        from ground.evaluate import OperatingPoint, sweep_thresholds
        how = self.cfg.calibrate
        if how == "auto":
            how = "labels" if not self.label_free and self.data.labelled else "teacher"
        k = len(self.classes)
        if how == "none":
            return OperatingPoint([None] * k, self.cfg.opening_radius)
        if how == "labels":
            samples = self.data.labelled
            refs = [s.labels for s in samples]
        else:
            samples = self.data.distill_samples(with_labels=False)
            cache = TeacherCache(self.cfg.cache, self.teacher)
            refs = [cache.probs(s, 0).astype(np.float32).argmax(0).astype(np.uint8) for s in samples]
        point, _ = sweep_thresholds([predict(s.image) for s in samples], refs, k, self.cfg.opening_radius)
        return point

    @property
    def evals(self) -> list:
        """The held-out evaluation image(s) of the run's config (eval.data)."""
        data = self.data
        return list(getattr(data, "evals", None) or ([data.eval] if data.eval is not None else []))

    @property
    def eval_name(self) -> str | None:
        ev = self.evals
        return None if not ev else ev[0].name + (f" (+{len(ev) - 1} more)" if len(ev) > 1 else "")

    def teacher_masks(self) -> list | None:
        if self._teacher_mask is None and self.evals:
            self._teacher_mask = [self.teacher.predict_proba(s.image).argmax(0).astype(np.uint8) for s in self.evals]
        return self._teacher_mask

    def evaluate(self, predict: Predict, point=None) -> dict:
        """Scores on the held-out image(s) at an operating point (calibrated here when not given):
        {"operating_point", "miou", "f1", "accuracy", "iou", "agreement", ..., "argmax_miou"}."""
        from ground.evaluate import summary
        from ground.pipeline import evaluate_on
        if not self.evals:
            raise ValueError("the run's config has no eval.data: nothing to score on")
        point = point or self.calibrate(predict)
        res = evaluate_on([predict(s.image) for s in self.evals], point, self.cfg, self.evals, self.teacher_masks())
        row = summary(res)
        row["argmax_miou"] = res["argmax"].get("vs_labels", {}).get("miou")
        row["operating_point"] = point.as_dict(self.classes)
        return row


# ---- the sweep ------------------------------------------------------------------------------------

def sweep(ctx: RunContext, checkpoint: str = "student.pt", criteria: Sequence[str] | None = None,
          ratios: Sequence[float] = (0.3, 0.5, 0.7), by: str = "params", round_to: int | None = 8,
          scope: str = "local", finetune_steps: int = 100, finetune_with: str = "teacher",
          threads: int = 1, out: str = "sweep", latency_repeats: int = 20, latency_rounds: int = 3) -> dict:
    """Every criterion at every ratio: prune, score before and after fine-tuning, export the FP16
    IR and time it in OpenVINO. Writes OUT/sweep.{json,md,png} into the run folder.

    Latency is measured at the end, all IRs in turn, `latency_rounds` times; each point keeps the
    lowest of its per-round medians: on a shared CPU that is the figure least disturbed by other
    jobs, and every point is measured under the same conditions."""
    from tqdm import tqdm
    from ground.export import export_openvino, openvino_latency
    from ground.prune import SWEEP_CRITERIA, get_criterion, prune_to_target
    criteria = list(criteria or SWEEP_CRITERIA)
    for name in criteria:
        get_criterion(name)
    for r in ratios:
        if not 0 < float(r) < 1:
            raise ValueError(f"ratios must be between 0 and 1, got {r}")
    out_dir = ctx.run_dir / out
    out_dir.mkdir(parents=True, exist_ok=True)
    base, norm, _meta = ctx.load(checkpoint)
    example = ctx.example(norm)
    t0 = time.perf_counter()
    rows = []

    irs: dict[str, Path] = {}

    def export(model, tag) -> None:
        irs[tag] = export_openvino(model, out_dir / "ir" / tag, tile=ctx.cfg.tile).xml

    from ground.prune import measure
    size = measure(base, example)
    export(base, "base")
    base_row = {"criterion": "none", "ratio": 0.0, "params": size.params, "macs": size.macs,
                "params_reduction": 0.0, "macs_reduction": 0.0, **_scores(ctx.evaluate(ctx.torch_predict(base, norm))),
                "tag": "base"}
    base_row["miou_pruned"] = base_row["miou"]
    rows.append(base_row)
    jobs = [(c, float(r)) for c in criteria for r in ratios]
    for crit, ratio in tqdm(jobs, desc="sweep", file=sys.stderr, disable=not ctx.progress):
        tag = f"{crit}-{round(ratio * 100)}"
        t_point = time.perf_counter()
        loss_fn = ctx.loss_fn(norm, finetune_with, base) if get_criterion(crit).needs_gradients else None
        res = prune_to_target(base, example, crit, ratio, by=by, round_to=round_to, scope=scope, loss_fn=loss_fn)
        model = res.model
        before_ft = ctx.evaluate(ctx.torch_predict(model, norm))
        if finetune_steps > 0 and finetune_with != "none":
            ctx.finetune(model, finetune_steps, finetune_with, reference_model=base, norm=norm, desc=f"fine-tune {tag}")
            after = ctx.evaluate(ctx.torch_predict(model, norm))
        else:
            after = before_ft
        export(model, tag)
        d = res.as_dict()
        row = {"criterion": crit, "ratio": ratio, "params": res.after.params, "macs": res.after.macs,
               "params_reduction": d["params_reduction"], "macs_reduction": d["macs_reduction"],
               "miou_pruned": before_ft["miou"], "agreement_pruned": before_ft.get("agreement"), **_scores(after),
               "tag": tag, "seconds": round(time.perf_counter() - t_point, 1)}
        rows.append(row)
        ctx.log(f"{tag}: -{row['params_reduction']:.0%} params, mIoU {row['miou_pruned']:.3f} -> "
                f"{row['miou']:.3f} after fine-tuning")
    medians: dict[str, list[float]] = {tag: [] for tag in irs}
    loads = []
    for _ in tqdm(range(latency_rounds), desc="latency rounds", file=sys.stderr, disable=not ctx.progress):
        for tag, xml in irs.items():
            lat = openvino_latency(xml, tile=ctx.cfg.tile, threads=threads, repeats=latency_repeats)
            medians[tag].append(lat["ms_per_tile"])
            loads.append(lat["load_avg_1min"][0])
    for row in rows:
        row["ms_per_tile"] = min(medians[row["tag"]])
        row["ms_rounds"] = medians[row["tag"]]
        row["gmacs_per_s"] = row["macs"] / row["ms_per_tile"] / 1e6
        # the unpruned IR was timed in the same round: the ratio cancels the load of the moment
        row["speedup"] = float(np.median([b / m for b, m in zip(medians["base"], medians[row["tag"]])]))
    report = {"checkpoint": checkpoint, "by": by, "round_to": round_to, "scope": scope,
              "latency": {"threads": threads, "repeats": latency_repeats, "rounds": latency_rounds,
                          "load_avg_min_max": [min(loads), max(loads)]},
              "finetune": {"steps": finetune_steps, "with": finetune_with}, "threads": threads,
              "label_free": ctx.label_free and finetune_with != "labels", "eval": ctx.eval_name,
              "tile": ctx.cfg.tile, "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    (out_dir / "sweep.json").write_text(json.dumps(report, indent=2))
    (out_dir / "sweep.md").write_text(sweep_markdown(report))
    plot_sweep(report, out_dir / "sweep.png")
    ctx.folder.add_stage("sweep", [out_dir / "sweep.json", out_dir / "sweep.md", out_dir / "sweep.png"],
                         {"rows": len(rows)}, checkpoint=checkpoint, by=by, round_to=round_to, scope=scope,
                         finetune=report["finetune"])
    report["out_dir"] = str(out_dir)
    return report


def _scores(row: dict) -> dict:
    return {"miou": row.get("miou"), "f1": row.get("f1"), "accuracy": row.get("accuracy"),
            "agreement": row.get("agreement"), "iou": row.get("iou")}


def sweep_markdown(report: dict) -> str:
    rows = report["rows"]
    base = rows[0]
    lines = [f"Pruning sweep of `{report['checkpoint']}` (target: {report['by']}, round_to={report['round_to']}, "
             f"{report['scope']} scope; fine-tuned {report['finetune']['steps']} steps with "
             f"{report['finetune']['with']}), scored on `{report['eval']}`; OpenVINO CPU latency, "
             f"{report['threads']} thread(s), FP16 IR, {report.get('tile', 256)}x{report.get('tile', 256)} tile, "
             f"lowest of {report['latency']['rounds']} rounds' medians (load average "
             f"{report['latency']['load_avg_min_max'][0]:.1f}..{report['latency']['load_avg_min_max'][1]:.1f} "
             f"on {os.cpu_count()} CPUs).", "",
             "`agreement`: pixel agreement with the teacher's masks, before / after fine-tuning.", "",
             "`speed-up`: the unpruned IR's time over this one's, timed in the same round (median over rounds).", "",
             "| criterion | target | params | -params | -MACs | mIoU pruned | mIoU fine-tuned | delta | "
             "agreement | ms/tile | speed-up | GMAC/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = r["miou"] - base["miou"] if r["miou"] is not None and base["miou"] is not None else None
        lines.append(f"| {r['criterion']} | {r['ratio']:.0%} | {r['params']:,} | {r['params_reduction']:.1%} | "
                     f"{r['macs_reduction']:.1%} | {_f(r.get('miou_pruned'))} | {_f(r['miou'])} | "
                     f"{'-' if delta is None else f'{delta:+.3f}'} | "
                     f"{_f(r.get('agreement_pruned', r.get('agreement')))} / {_f(r.get('agreement'))} | "
                     f"{r['ms_per_tile']:.1f} | {r.get('speedup', 1.0):.2f}x | {r['gmacs_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def plot_sweep(report: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["rows"]
    base = rows[0]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for crit in dict.fromkeys(r["criterion"] for r in rows[1:]):
        pts = sorted((r for r in rows[1:] if r["criterion"] == crit), key=lambda r: r["params_reduction"])
        x = [100 * r[f"{report['by']}_reduction"] for r in pts]
        ax1.plot(x, [r["miou"] for r in pts], "o-", label=crit)
        ax2.plot(x, [r["ms_per_tile"] for r in pts], "o-", label=crit)
    ax1.axhline(base["miou"], color="k", ls="--", lw=1, label="unpruned")
    ax2.axhline(base["ms_per_tile"], color="k", ls="--", lw=1, label="unpruned")
    ax1.set(xlabel=f"{report['by']} reduction (%)", ylabel="mIoU (held-out, fine-tuned)",
            title="metric vs size reduction")
    ax2.set(xlabel=f"{report['by']} reduction (%)", ylabel="OpenVINO ms per tile", title="latency vs size reduction")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cmd_sweep(args) -> int:
    from shared.cliutil import emit
    ctx = RunContext.open(args.run, progress=not args.json)
    res = sweep(ctx, args.checkpoint, args.criteria, args.ratios, by=args.by,
                round_to=None if args.round_to == 0 else args.round_to, scope=args.scope,
                finetune_steps=args.finetune_steps, finetune_with=args.finetune_with, threads=args.threads,
                out=args.out)
    emit(res, args.json, lambda r: sweep_markdown(r) + f"\nwritten: {r['out_dir']}/sweep.{{json,md,png}}")
    return 0


# ---- the stage commands' arguments (kept here, torch-free, so `eoedge ground --help` stays fast) ----

def _run_arg(p) -> None:
    p.add_argument("run", help="run folder (from `eoedge ground run`)")


def _finetune_args(p, default_steps: int, none: bool = True) -> None:
    p.add_argument("--finetune-steps", type=int, default=default_steps, help="fine-tuning steps (0: none)")
    p.add_argument("--finetune-with", choices=FINETUNE_SOURCES if none else FINETUNE_SOURCES[:-1],
                   default="teacher", help="teacher: the run's teacher (pruning-aware distillation); "
                                           "self: the unpruned model teaches; labels: the run's labelled data")


def _prune_args(p, ratios: bool = False) -> None:
    if ratios:
        p.add_argument("--criteria", nargs="+", metavar="NAME",
                       help="criteria by name (default: the six of the study: random magnitude-l1 bn-scale "
                            "fpgm taylor lamp; also magnitude-l2)")
        p.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7], help="targets, 0..1")
    else:
        p.add_argument("--criterion", default="lamp",
                       help="importance criterion: random, magnitude-l1, magnitude-l2, bn-scale, fpgm, taylor, lamp")
        p.add_argument("--target", type=float, default=0.4, help="share of parameters (or MACs) to remove, 0..1")
        p.add_argument("--steps", type=int, default=1, help="iterative pruning steps (fine-tuning between them)")
        p.add_argument("--name", help="output name (pruned/NAME.pt)")
    p.add_argument("--by", choices=("params", "macs"), default="params", help="what the target counts")
    p.add_argument("--round-to", type=int, default=8, help="keep channel counts multiples of this (SIMD); 0: any")
    p.add_argument("--scope", choices=("local", "global"), default="local",
                   help="rank channels within each layer, or across all layers")
    p.add_argument("--checkpoint", default="student.pt", help="checkpoint in the run folder")


def add_prune_args(p) -> None:
    _run_arg(p)
    _prune_args(p)
    _finetune_args(p, 200)


def add_sweep_args(p) -> None:
    _run_arg(p)
    _prune_args(p, ratios=True)
    _finetune_args(p, 100)
    p.add_argument("--threads", type=int, default=1, help="OpenVINO inference threads for the latency")
    p.add_argument("--out", default="sweep", help="folder in the run folder for the table and plot")


def add_fp16_args(p) -> None:
    _run_arg(p)
    p.add_argument("--checkpoint", default="student.pt", help="checkpoint in the run folder (e.g. pruned/lamp-40.pt)")
    p.add_argument("--steps", type=int, default=200, help="FP16-aware fine-tuning steps")
    p.add_argument("--finetune-with", choices=FINETUNE_SOURCES[:-1], default="teacher")
    p.add_argument("--mode", choices=("round", "half"), default="round",
                   help="FP16 emulation for the scores: round (fast) or half (torch float16 kernels)")
    p.add_argument("--lr", type=float, help="learning rate (default: a fifth of the run's)")
    p.add_argument("--name", help="output name (fp16/NAME.pt)")


def add_export_args(p) -> None:
    _run_arg(p)
    p.add_argument("--checkpoint", default="student.pt", help="checkpoint in the run folder")
    p.add_argument("--name", help="export/NAME/ (default: the checkpoint's name)")
    p.add_argument("--fp32", action="store_true", help="keep FP32 weights (default: FP16, what flies)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx")
    p.add_argument("--no-eval", action="store_true", help="skip scoring on the held-out image")
    p.add_argument("--threads", type=int, default=1, help="OpenVINO threads for the latency figure")
