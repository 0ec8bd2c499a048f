"""The search's answer: the Pareto front of mIoU against ms per tile among the candidates that
fit the size budget, as a table and a PNG (size as marker area), and the picks made from it."""
from __future__ import annotations

from pathlib import Path

from optuna.trial import TrialState

from ground.search.space import describe


def rows_of(study) -> list[dict]:
    """Every completed trial as a row: its objectives, size, architecture and checkpoint."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        rows.append({"number": t.number, "miou": t.values[0], "ms_per_tile": t.values[1], "params": a.get("params"),
                     "ir_bytes": a.get("ir_bytes"), "feasible": a.get("constraint", 0.0) <= 0,
                     "checkpoint": a.get("checkpoint"), "options": a.get("options"),
                     "arch": describe(a["options"]) if a.get("options") else "?",
                     "duplicate_of": a.get("duplicate_of"), "probe_loss": a.get("probe_loss")})
    return rows


def timed_of(study) -> list[dict]:
    """Every trial that was timed (stopped ones too): number, state, architecture, ms, params."""
    return [{"number": t.number, "state": t.state.name.lower(), "arch": describe(t.user_attrs["options"]),
             "ms_per_tile": t.user_attrs["ms_per_tile"], "params": t.user_attrs.get("params"),
             "checkpoint": t.user_attrs.get("checkpoint"), "miou": t.values[0] if t.values else None}
            for t in study.get_trials(deepcopy=False) if "ms_per_tile" in t.user_attrs and "options" in t.user_attrs]


def pareto(rows: list[dict]) -> list[dict]:
    """The feasible rows no other feasible row beats on both mIoU and latency, fastest first."""
    ok = [r for r in rows if r["feasible"] and r.get("duplicate_of") is None]
    front = [r for r in ok if not any(o["miou"] >= r["miou"] and o["ms_per_tile"] <= r["ms_per_tile"] and
                                      (o["miou"] > r["miou"] or o["ms_per_tile"] < r["ms_per_tile"]) for o in ok)]
    return sorted(front, key=lambda r: r["ms_per_tile"])


def pick(front: list[dict], reference: float, within: float, budget_ms: float | None = None) -> dict | None:
    """The fastest front point whose mIoU is at least `reference - within` (and, with a budget,
    no slower than `budget_ms`); None when none is."""
    ok = [r for r in front if r["miou"] >= reference - within and (budget_ms is None or r["ms_per_tile"] <= budget_ms)]
    return min(ok, key=lambda r: r["ms_per_tile"]) if ok else None


def closest(rows: list[dict], reference: float, within: float, budget_ms: float) -> dict | None:
    """The candidate nearest to meeting both (relative shortfalls in accuracy and latency added)."""
    def miss(r):
        return max(0.0, reference - within - r["miou"]) / max(within, 1e-3) + max(0.0, r["ms_per_tile"] / budget_ms - 1.0)
    return min(rows, key=miss) if rows else None


def front_markdown(report: dict) -> str:
    f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"
    lines = [f"Pareto front of `{report['study']}`: mIoU on the validation split of the training imagery "
             f"(reference: {report['reference']}; the teacher scores {f(report.get('teacher_miou'))}) in emulated "
             f"FP16 after the on-board post-processing, against OpenVINO ms per {report['tile']}x{report['tile']} "
             f"tile on {report['device']} at {report['precision']}; {report['finished']} trials finished "
             f"({report['pruned']} stopped early), size budget {report['max_bytes']:,} IR bytes.", "",
             "| trial | architecture (width, s/p, kernel per level; upsample/skip/act) | params | IR bytes | "
             "ms/tile | mIoU | checkpoint |", "|---|---|---|---|---|---|---|"]
    for r in report["front"]:
        lines.append(f"| {r['number']} | {r['arch']} | {r['params']:,} | {r['ir_bytes']:,} | {f(r['ms_per_tile'], 2)} | "
                     f"{f(r['miou'])} | {r['checkpoint']} |")
    return "\n".join(lines) + "\n"


def plot_front(rows: list[dict], front: list[dict], path: Path, title: str, teacher: float | None = None,
               extra: list[dict] | None = None) -> Path:
    """mIoU against ms per tile; every candidate grey, the front joined; marker area ~ params.
    `extra`: labelled reference points (e.g. hand-sized students) as black squares."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    area = lambda r: 20 + 400 * (r["params"] or 0) / max(1, max((x["params"] or 0) for x in rows + (extra or [])))
    fig, ax = plt.subplots(figsize=(7, 4.6))
    ax.scatter([r["ms_per_tile"] for r in rows], [r["miou"] for r in rows], s=[area(r) for r in rows],
               c="lightgrey", edgecolors="grey", label="candidates")
    ax.plot([r["ms_per_tile"] for r in front], [r["miou"] for r in front], "-", color="tab:blue", lw=1)
    ax.scatter([r["ms_per_tile"] for r in front], [r["miou"] for r in front], s=[area(r) for r in front],
               c="tab:blue", alpha=0.7, label="Pareto front")
    for r in extra or []:
        ax.scatter([r["ms_per_tile"]], [r["miou"]], s=[area(r)], marker="s", c="black", alpha=0.6)
        ax.annotate(r["label"], (r["ms_per_tile"], r["miou"]), textcoords="offset points", xytext=(6, -10), fontsize=8)
    if teacher is not None:
        ax.axhline(teacher, color="k", ls="--", lw=1, label=f"teacher {teacher:.3f}")
    ax.set(xlabel="OpenVINO ms per tile", ylabel="mIoU", title=title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
