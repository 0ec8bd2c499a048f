"""The one command: a config in, the smallest signed bundle that keeps the accuracy out.

    distil -> search (or prune to the budget) -> FP16-aware fine-tune -> export -> bundle -> on-board self-test

Each step is the stage of its own name (ground.stages.*), run over one run folder, with a progress
line per step. The choice (a search front point, or a pruning ratio) is made on the validation
split of the training imagery (ground.search.objectives.validation_split): the fastest candidate
within `tolerance` mIoU of the teacher and within the latency budget, timed by OpenVINO at the
deployed precision. When none qualifies the build stops there and names the closest one
(ground.errors.BudgetNotMet). The delivered bundle's held-out mIoU, latency and bytes are measured
on what was exported; the self-test is the daemon's own (`python -m onboard install` into a
scratch store: verify, self-test, activate), a separate process as on board."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from shared.keys import load_private_key
from ground.config import RunConfig
from ground.errors import BudgetNotMet, StageError
from ground.search.front import closest, pick
from ground.search.objectives import latency
from ground.search.space import arch_key
from ground.stages.bundle import bundle
from ground.stages.distill import distill
from ground.stages.export import export
from ground.stages.fp16_finetune import fp16_finetune
from ground.stages.prune import prune
from ground.stages.run import Run
from ground.stages.search import Candidates, SearchSettings, pick_point, search

PRUNE_TARGETS = (0.3, 0.5, 0.7, 0.85)
STEPS = ("distil", "search", "fp16-finetune", "export", "bundle", "self-test")


def _step(run_log, i: int, what: str) -> None:
    run_log(f"[{i}/{len(STEPS)}] {STEPS[i - 1]}: {what}")


def _refuse(point: dict | None, budget_ms: float, reference: float, tolerance: float, how: str) -> BudgetNotMet:
    head = (f"{how}: nothing meets both {budget_ms} ms per tile and mIoU >= {reference - tolerance:.4f} (the "
            f"teacher's {reference:.4f} - {tolerance})")
    if point is None:
        return BudgetNotMet(f"{head}; no candidate was even timed")
    where = f" ({point['checkpoint']})" if point.get("checkpoint") else f" (trial {point.get('number')})"
    score = f"mIoU {point['miou']:.4f}" if point.get("miou") is not None else "mIoU not measured (too slow to train)"
    return BudgetNotMet(f"{head}; closest: {point.get('arch')}{where}, {score} at {point['ms_per_tile']:.2f} ms per "
                        f"tile", point)


def choose_by_search(run: Run, settings: SearchSettings, budget_ms: float, tolerance: float) -> str:
    report = search(run, settings)
    picked = pick_point(run, report, tolerance, budget_ms)
    if picked is None:
        near = closest(report["rows"], report["teacher_miou"], tolerance, budget_ms) or \
            min(report["timed"], key=lambda r: r["ms_per_tile"], default=None)     # none trained: the fastest timed
        raise _refuse(near, budget_ms, report["teacher_miou"], tolerance, "search")
    run.log(f"picked trial {picked['number']}: {picked['arch']}, validation mIoU {picked['miou']:.4f}, "
            f"{picked['ms_per_tile']:.2f} ms per tile")
    return picked["picked"]


def choose_by_pruning(run: Run, settings: SearchSettings, budget_ms: float, tolerance: float) -> str:
    """Prune the distilled student at growing ratios (lamp, fine-tuned with the teacher); each
    timed and scored on the validation split as a search candidate is; the least pruned that
    meets both wins."""
    folder = run.run_dir / "search" / settings.name
    c = Candidates(run, settings, folder)
    reference, rows = c.teacher_miou(), []
    steps = int(settings.steps or run.cfg.train.steps)
    for target in PRUNE_TARGETS:
        res = prune(run, "lamp", target, finetune_steps=steps, evaluate=False, name=f"build-lamp-{round(target * 100)}")
        model, _, _ = run.load(res["checkpoint"])
        lat = latency(model, arch_key({"checkpoint": res["checkpoint"], "params": res["after"]["params"]}),
                      c.latency, settings.device, settings.precision, run.cfg.tile)
        row = {"checkpoint": res["checkpoint"], "arch": f"lamp {target:.0%}", "miou": c.score(model)["miou"],
               "ms_per_tile": lat["ms_per_tile"], "params": res["after"]["params"]}
        rows.append(row)
        run.log(f"pruned {target:.0%}: validation mIoU {row['miou']:.4f}, {row['ms_per_tile']:.2f} ms per tile")
        if pick([row], reference, tolerance, budget_ms) is not None:
            return row["checkpoint"]
    raise _refuse(closest(rows, reference, tolerance, budget_ms), budget_ms, reference, tolerance, "prune")


def self_test(bundle_path: str | Path, key) -> dict:
    """The daemon's install path on the bundle, in its own process (ground never imports onboard):
    verify the signature, self-test on the reference tiles, activate, in a scratch store."""
    public = load_private_key(key).public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    with tempfile.TemporaryDirectory(prefix="eoedge-build-selftest-") as tmp:
        (Path(tmp) / "uplink.pub").write_bytes(public)
        out = subprocess.run([sys.executable, "-m", "onboard", "install", str(bundle_path), "--store",
                              str(Path(tmp) / "store"), "--key", str(Path(tmp) / "uplink.pub"), "--json"],
                             capture_output=True, text=True, timeout=600)
    try:
        result = json.loads(out.stdout or out.stderr.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        result = {"ok": False, "reason": (out.stderr or out.stdout).strip()[-500:]}
    if out.returncode != 0 or not result.get("ok", False):
        reason = (result.get("error") or {}).get("message") or result.get("message") or result.get("reason")
        raise StageError(f"on-board self-test of {bundle_path} refused it: {reason}")
    return result


def build(cfg: RunConfig, budget_ms: float, key, model_id: str, version: int, tolerance: float = 0.01,
          via: str = "search", settings: SearchSettings | None = None, fp16_steps: int | None = None,
          max_bytes: int | str = "5MB", progress: bool = True) -> dict:
    """Config -> bundle within `budget_ms` per tile at `settings.precision` and `tolerance` mIoU of
    the teacher, or BudgetNotMet naming the closest candidate."""
    if via not in ("search", "prune"):
        raise StageError(f"build goes via search or prune, got {via!r}")
    if budget_ms <= 0 or tolerance < 0:
        raise StageError(f"latency budget must be > 0 and tolerance >= 0, got {budget_ms} and {tolerance}")
    settings = settings or SearchSettings()
    settings = replace(settings, name=settings.name if settings.name != "search" else "build", max_bytes=max_bytes,
                       max_ms=budget_ms * 1.25)          # slower candidates are not trained (timing noise allowed)
    log = (lambda m: print(m, file=sys.stderr)) if progress else (lambda m: None)
    t0 = time.perf_counter()
    _step(log, 1, f"{cfg.name}: teacher -> the config's students")
    report = distill(cfg, progress)
    run = Run.open(report["run_dir"], progress)
    teacher_row = next((r for r in report["rows"] if r["name"] == "teacher"), {})
    _step(log, 2, f"{via} to {budget_ms} ms per tile at {settings.precision} on {settings.device}, within "
                  f"{tolerance} mIoU of the teacher")
    chosen = (choose_by_search if via == "search" else choose_by_pruning)(run, settings, budget_ms, tolerance)
    _step(log, 3, chosen)
    tuned = fp16_finetune(run, chosen, steps=settings.steps or run.cfg.train.steps if fp16_steps is None
                          else fp16_steps, name="build")
    _step(log, 4, f"{tuned['out']} at {settings.precision}")
    exported = export(run, tuned["out"], "build", precision=settings.precision)
    ms = exported["latency"]["ms_per_tile"]
    if ms > budget_ms:
        raise BudgetNotMet(f"the exported model runs {ms:.2f} ms per tile, over the budget {budget_ms} "
                           f"(measured again after fine-tuning; the CPU is shared: load "
                           f"{exported['latency']['load_avg_1min'][0]:.1f})", {"checkpoint": tuned["out"], "ms_per_tile": ms})
    _step(log, 5, f"{model_id} v{version}")
    packed = bundle(run, "export/build", key, model_id, version, max_bytes=max_bytes)
    _step(log, 6, packed["bundle"])
    installed = self_test(packed["bundle"], key)
    metrics = exported.get("metrics", {})
    result = {"bundle": packed["bundle"], "bytes": packed["bytes"], "model_id": model_id, "version": int(version),
              "precision": settings.precision, "device": settings.device, "ms_per_tile": ms,
              "latency_budget_ms": budget_ms, "tolerance": tolerance, "via": via, "checkpoint": tuned["out"],
              "chosen": chosen, "params": exported["params"], "macs": exported["macs"],
              "miou_heldout": metrics.get("openvino", {}).get("miou"), "eval": metrics.get("eval"),
              "teacher_miou_heldout": teacher_row.get("miou"),
              "self_test": installed.get("self_test"), "run_dir": str(run.run_dir),
              "seconds": round(time.perf_counter() - t0, 1)}
    (run.run_dir / "build.json").write_text(json.dumps(result, indent=2))
    return result
