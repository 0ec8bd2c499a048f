"""The run's report, shaped like the published tables (de Vieilleville et al., ISPRS 2020; Edge SpAIce,
EDHPC 2025): one row per model (teacher, student from scratch, output-distilled, feature-distilled)
with parameters, MACs, mIoU, F1 and the relative gain over the student trained from scratch; as
markdown and JSON, plus PNG figures (training curves; image, labels, teacher and student masks).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ground.models.size import human


def _baseline(rows: list[dict]) -> dict | None:
    """The row gains are measured against: the student from labels, else the first student."""
    students = [r for r in rows if r["mode"] != "teacher"]
    return next((r for r in students if r["mode"] == "labels"), students[0] if students else None)


def add_gains(rows: list[dict]) -> None:
    base = _baseline(rows)
    for r in rows:
        if base is None or r.get("miou") is None or base.get("miou") is None or r is base or r["mode"] == "teacher":
            r["gain_miou"] = None
            continue
        r["gain_miou"] = r["miou"] - base["miou"]
        r["gain_rel"] = (r["miou"] - base["miou"]) / base["miou"] if base["miou"] else None


def _fmt(v, digits=3):
    return "-" if v is None else f"{v:.{digits}f}"


def markdown_table(report: dict) -> str:
    rows = report["rows"]
    classes = report["classes"]
    base = _baseline(rows)
    head = ["model", "mode", "params", "MACs/tile", "mIoU", "F1", "acc"] + [f"IoU {c}" for c in classes] + \
        ["agree", f"gain vs {base['name'] if base else '-'}", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        iou = r.get("iou", {})
        gain = "-" if r.get("gain_miou") is None else f"{r['gain_miou']:+.3f} ({100 * r['gain_rel']:+.1f}%)"
        cells = [r["name"] + ("" if r["mode"] == "teacher" else ""), r["mode"] + (f" ({r['loss']})" if r.get("loss") and r["mode"] != "labels" else ""),
                 "-" if r.get("params") is None else human(r["params"]),
                 "-" if r.get("macs") is None else human(r["macs"]),
                 _fmt(r.get("miou")), _fmt(r.get("f1")), _fmt(r.get("accuracy"))] + \
                [_fmt(iou.get(c)) for c in classes] + \
                [_fmt(r.get("agreement")), gain, _fmt(r.get("seconds"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    out = [f"# Distillation report: {report['run']}", "",
           f"Evaluated on `{report.get('eval')}` (scores against human labels; `agree` is pixel agreement with "
           "the teacher). Students are post-processed as on board: calibrated per-class thresholds (chosen on "
           "training imagery) then opening; the teacher row is its plain argmax.", "",
           markdown_table(report), "",
           (f"Delivered student: `{report['deliver']}` (student.pt, normalization.json). " if report.get("deliver")
            else "No student delivered (the run.deliver experiment was not run). ") +
           f"Total run time {report.get('seconds_total')} s."]
    winners = [r for r in report["rows"] if r.get("miou") is not None]
    if winners:
        best = max(winners, key=lambda r: r["miou"])
        out += ["", f"Best mIoU: **{best['name']}** ({best['miou']:.3f})."]
    return "\n".join(out) + "\n"


def _colour(mask: np.ndarray, k: int) -> np.ndarray:
    from matplotlib import colormaps
    cmap = colormaps["tab10"]
    rgb = np.array([cmap(i)[:3] for i in range(max(k, 1))])
    out = np.zeros(mask.shape + (3,))
    valid = mask < k
    out[valid] = rgb[mask[valid]]
    return out


def figures(report: dict, run_dir: Path, data=None, masks: dict | None = None) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    hist = report.get("histories") or {}
    if hist:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, h in hist.items():
            if h:
                ax.plot([p["step"] for p in h], [p["loss"] for p in h], label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title("training curves")
        fig.tight_layout()
        fig.savefig(run_dir / "curves.png", dpi=100)
        plt.close(fig)
        written.append("curves.png")
    if data is not None and data.eval is not None and masks:
        k = len(report["classes"])
        img = data.eval.image
        bands = [b for b in ("B04", "B03", "B02") if b in data.norm.bands]
        rgb = np.stack([img[data.norm.bands.index(b)] for b in bands], -1) if len(bands) == 3 else \
            np.repeat(img[:1].transpose(1, 2, 0), 3, -1)
        rgb = np.clip(rgb / max(np.percentile(rgb, 99), 1e-6), 0, 1)
        panels = [("image", rgb)]
        if data.eval.labels is not None:
            panels.append(("labels", _colour(data.eval.labels, k)))
        panels += [(name, _colour(m, k)) for name, m in masks.items() if m is not None]
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2 * img.shape[1] / img.shape[2] + 0.6))
        for ax, (title, im) in zip(np.atleast_1d(axes), panels):
            ax.imshow(im, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(run_dir / "masks.png", dpi=100)
        plt.close(fig)
        written.append("masks.png")
    return written


def write_report(report: dict, run_dir: Path, data=None, masks=None, cfg=None) -> list[str]:
    add_gains(report["rows"])
    run_dir = Path(run_dir)
    written = figures(report, run_dir, data, masks)
    (run_dir / "report.md").write_text(markdown(report))
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=lambda o: o.tolist()
                                                    if hasattr(o, "tolist") else str(o)))
    return ["report.md", "report.json"] + written
