"""Pruning sweep stage: every criterion at every ratio of a checkpoint of the run: prune, score
before and after fine-tuning, export the FP16 IR and time it in OpenVINO; a table (markdown +
JSON) and a PNG of the metric and the latency against the size reduction, per criterion."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from ground.compression.lowrank import factorise
from ground.compression.pruning.criteria import SWEEP_CRITERIA, get_criterion
from ground.compression.pruning.plan import prune_to_target
from ground.errors import ConfigError
from ground.lineage import StageRecord
from ground.models.size import measure
from ground.openvino.export import export_openvino
from ground.openvino.runtime import interleaved_latency
from ground.stages.run import Run


def _pruned(run: Run, base, norm, example, crit: str, ratio: float, prune_args: dict, finetune_with: str):
    loss_fn = run.loss_fn(norm, finetune_with, base) if get_criterion(crit).needs_gradients else None
    return prune_to_target(base, example, crit, ratio, loss_fn=loss_fn, **prune_args).model


def _point(run: Run, base, norm, example, label: str, ratio: float, model, finetune_steps: int,
           finetune_with: str, t0: float) -> dict:
    """One compressed model scored before and after fine-tuning: its table row (latency comes later)."""
    tag = f"{label}-{round(ratio * 100)}"
    before, size = measure(base, example), measure(model, example)
    before_ft = after = run.evaluate(run.torch_predict(model, norm))
    if finetune_steps > 0 and finetune_with != "none":
        run.finetune(model, finetune_steps, finetune_with, reference_model=base, norm=norm, desc=f"fine-tune {tag}")
        after = run.evaluate(run.torch_predict(model, norm))
    row = {"criterion": label, "ratio": ratio, "params": size.params, "macs": size.macs,
           "params_reduction": 1.0 - size.params / before.params, "macs_reduction": 1.0 - size.macs / before.macs,
           "miou_pruned": before_ft["miou"], "agreement_pruned": before_ft.get("agreement"), **_scores(after),
           "tag": tag, "seconds": round(time.perf_counter() - t0, 1)}
    run.log(f"{tag}: -{row['params_reduction']:.0%} params, -{row['macs_reduction']:.0%} MACs, mIoU "
            f"{row['miou_pruned']:.3f} -> {row['miou']:.3f} after fine-tuning")
    return row


def _lowrank_macs(rows: list[dict], ratio: float) -> float:
    """The share of MACs the pruned points at `ratio` keep (their mean): low-rank is compared at it."""
    kept = [1.0 - r["macs_reduction"] for r in rows if r["ratio"] == ratio and r["criterion"] != "none"]
    return float(np.mean(kept)) if kept else 1.0 - ratio


def time_irs(irs: dict[str, Path], rows: list[dict], tile: int, threads: int, repeats: int, rounds: int,
             progress: bool) -> list[float]:
    """Latency of all IRs in turn (ground.openvino.runtime.interleaved_latency); each row keeps the
    lowest of its per-round medians and its speed-up over the unpruned IR ("base") timed in the same
    round. Returns the load averages seen."""
    timing, loads = interleaved_latency({tag: (xml, "fp32") for tag, xml in irs.items()}, "base", tile, threads,
                                        repeats, rounds, progress)
    for row in rows:
        row.update(timing[row["tag"]])
        row["gmacs_per_s"] = row["macs"] / row["ms_per_tile"] / 1e6
    return loads


def sweep(run: Run, checkpoint: str = "student.pt", criteria: Sequence[str] | None = None,
          ratios: Sequence[float] = (0.3, 0.5, 0.7), by: str = "params", round_to: int | None = 8,
          scope: str = "local", finetune_steps: int = 100, finetune_with: str = "teacher",
          threads: int = 1, out: str = "sweep", latency_repeats: int = 20, latency_rounds: int = 3,
          lowrank: bool = False) -> dict:
    """Every criterion at every ratio: prune, score before and after fine-tuning, export the FP16
    IR and time it in OpenVINO (`time_irs`). With `lowrank`, also a truncated-SVD factorisation
    (ground.compression.lowrank) at each ratio, at the MACs the pruned points of that ratio keep:
    the two compared at equal MACs. Writes OUT/sweep.{json,md,png} into the run folder."""
    criteria = list(criteria or SWEEP_CRITERIA)
    for name in criteria:
        get_criterion(name)
    for r in ratios:
        if not 0 < float(r) < 1:
            raise ConfigError(f"ratios must be between 0 and 1, got {r}")
    out_dir = run.run_dir / out
    out_dir.mkdir(parents=True, exist_ok=True)
    base, norm, _meta = run.load(checkpoint)
    example = run.example(norm)
    t0 = time.perf_counter()
    size = measure(base, example)
    irs = {"base": export_openvino(base, out_dir / "ir" / "base", tile=run.cfg.tile).xml}
    rows = [{"criterion": "none", "ratio": 0.0, "params": size.params, "macs": size.macs,
             "params_reduction": 0.0, "macs_reduction": 0.0, **_scores(run.evaluate(run.torch_predict(base, norm))),
             "tag": "base"}]
    rows[0]["miou_pruned"] = rows[0]["miou"]
    prune_args = {"by": by, "round_to": round_to, "scope": scope}
    jobs = [(c, float(r)) for c in criteria for r in ratios] + ([("lowrank", float(r)) for r in ratios] if lowrank else [])
    for crit, ratio in tqdm(jobs, desc="sweep", file=sys.stderr, disable=not run.progress):
        t_point = time.perf_counter()
        model = factorise(base, example, macs_target=_lowrank_macs(rows, ratio)).model if crit == "lowrank" \
            else _pruned(run, base, norm, example, crit, ratio, prune_args, finetune_with)
        row = _point(run, base, norm, example, crit, ratio, model, finetune_steps, finetune_with, t_point)
        irs[row["tag"]] = export_openvino(model, out_dir / "ir" / row["tag"], tile=run.cfg.tile).xml
        rows.append(row)
    loads = time_irs(irs, rows, run.cfg.tile, threads, latency_repeats, latency_rounds, run.progress)
    report = {"checkpoint": checkpoint, "by": by, "round_to": round_to, "scope": scope, "lowrank": lowrank,
              "latency": {"threads": threads, "repeats": latency_repeats, "rounds": latency_rounds,
                          "load_avg_min_max": [min(loads), max(loads)]},
              "finetune": {"steps": finetune_steps, "with": finetune_with}, "threads": threads,
              "label_free": run.label_free and finetune_with != "labels", "eval": run.eval_name,
              "tile": run.cfg.tile, "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    (out_dir / "sweep.json").write_text(json.dumps(report, indent=2))
    (out_dir / "sweep.md").write_text(sweep_markdown(report))
    plot_sweep(report, out_dir / "sweep.png")
    run.folder.add(StageRecord("sweep", [out_dir / "sweep.json", out_dir / "sweep.md", out_dir / "sweep.png"],
                               inputs={"checkpoint": checkpoint}, params={**prune_args, "finetune": report["finetune"]},
                               metrics={"rows": len(rows)}, label_free=report["label_free"]))
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
