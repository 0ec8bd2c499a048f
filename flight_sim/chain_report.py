"""The scenario report's model-chain section (issue 16): what each step of a chain bundle did.

A chain bundle (shared.chain) flies a gate (step 1, e.g. the cloud model) on every cell of a
frame and each later step only on the cells its `run_if` passes. From the DECISIONs' `chain.steps`
(per step: model, cells run of the frame's cells, milliseconds) and the masks that came down:

- `steps`: per step its model and version, classes, `run_if`, frames, cells run / total (and the
  share), its milliseconds (sum, p50 per frame), and its downlinked mask against the truth mapped
  onto that step's classes, where the step ran (a later step's mask is 255 where it did not);
- `frames`: each decided frame's steps (cells run / total, ms);
- `gate`: the time the gate saved against running every step everywhere, estimated from the same
  flight: a later step's milliseconds per cell it ran on, times every cell of every frame (linear
  in cells: each run of passing cells also pays a fixed cost, so this is an estimate; fly the chain
  built without `run_if` for the measured figure, as benchmarks/bench_chain.py does).

`model_info(rec)` describes the bundle (a chain's classes are the union of its steps', gate first);
`StepMasks` scores the masks; `chain_section(rec, normal, masks)`; `chain_checks(r)`; `md_chain(r)`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from flight_sim.products_gis import decode_image, step_mask_file, step_mask_part
from flight_sim.truth import IGNORE, to_model_classes
from shared.metrics import SegmentationScores, confusion_matrix

NOT_RUN = 255        # a later step's mask where it did not run (the PRODUCT's chain.nodata)


def model_info(rec) -> dict:
    """The report's `model`: id, version, classes, bands, tile; a chain's steps too."""
    man = rec.manifest
    if not rec.chain:
        return {"id": man["model_id"], "version": man["version"], "classes": list(man["output"]["classes"]),
                "bands": man["input"]["bands"], "tile": man["input"].get("tile_size")}
    c = rec.chain
    return {"id": c["model_id"], "version": c["version"], "classes": list(c["classes"]), "bands": c["bands"],
            "tile": c["steps"][0]["tile_size"],
            "chain": [{k: s[k] for k in ("name", "model_id", "version", "classes", "bands", "tile_size",
                                         "precision", "run_if")} for s in c["steps"]]}


class StepMasks:
    """Each step's downlinked mask against the truth in that step's classes, where it ran. Its
    `result()` is the gate's scores (the report's `masks`) plus `steps` (every step's)."""

    def __init__(self, steps: list[dict], n_examples: int):
        self.steps = steps
        self.n_examples = n_examples
        self.cm = [np.zeros((len(s["classes"]),) * 2, np.int64) for s in steps]
        self.frames = [0] * len(steps)
        self.pixels = [[0, 0] for _ in steps]          # (pixels the step ran on, pixels) of scored frames
        self.examples: list[tuple] = []              # the gate's (frame, truth, mask), for masks.png

    def add(self, seen) -> None:
        f = seen.frame
        if not (seen.down and seen.product is not None) or f.truth is None:
            return
        for i, step in enumerate(self.steps):
            part = step_mask_part(step, i)
            if part not in seen.product.arrays:
                continue
            try:
                pred = decode_image(np.ascontiguousarray(seen.product.arrays[part]).tobytes())[0]
            except Exception:                          # a mask that does not decode is not scored
                continue
            mapped = to_model_classes(f.truth, f.truth_classes, step["classes"])
            if pred.shape != mapped.shape:
                continue
            ran = pred != NOT_RUN
            valid = ran & (mapped != IGNORE)
            self.cm[i] += confusion_matrix(mapped[valid], pred[valid], len(step["classes"]))
            self.frames[i] += 1
            self.pixels[i][0] += int(ran.sum())
            self.pixels[i][1] += int(ran.size)
            if i == 0 and len(self.examples) < self.n_examples:
                self.examples.append((f, mapped, pred))

    def step_result(self, i: int) -> dict:
        out = {"frames": self.frames[i], "classes": list(self.steps[i]["classes"]),
               "ran_share": round(self.pixels[i][0] / self.pixels[i][1], 4) if self.pixels[i][1] else None}
        if self.cm[i].sum():
            out.update(SegmentationScores.from_confusion(self.cm[i], self.steps[i]["classes"]).as_dict())
            out["confusion"] = self.cm[i].tolist()
        return out

    def result(self) -> dict:
        steps = {s["name"]: self.step_result(i) for i, s in enumerate(self.steps)}
        return {**steps[self.steps[0]["name"]], "steps": steps}


def _p50(values: list[float]) -> float | None:
    return round(float(np.median(values)), 3) if values else None


def chain_section(rec, normal: list, masks: dict) -> dict | None:
    """The report's `chain` (module docstring), None for a single model's flight."""
    if not rec.chain:
        return None
    steps = rec.chain["steps"]
    per = {s["name"]: {"cells_run": 0, "cells_total": 0, "ms": [], "frames": 0} for s in steps}
    frames, chain_ms = [], 0.0
    for st in normal:
        body = st.body if st.outcome == "decision" else None
        ran = ((body or {}).get("chain") or {}).get("steps") or []
        if not ran:
            continue
        frames.append({"frame_id": st.frame.frame_id, "keep": bool(body.get("keep")),
                       "steps": [{k: s.get(k) for k in ("name", "cells_run", "cells_total", "ms")} for s in ran]})
        for s in ran:
            p = per.get(s.get("name"))
            if p is None:
                continue
            p["frames"] += 1
            p["cells_run"] += int(s.get("cells_run") or 0)
            p["cells_total"] += int(s.get("cells_total") or 0)
            p["ms"].append(float(s.get("ms") or 0.0))
            chain_ms += float(s.get("ms") or 0.0)
    out_steps = []
    everywhere_ms, estimable = 0.0, True
    for i, s in enumerate(steps):
        p = per[s["name"]]
        ms = sum(p["ms"])
        per_cell = ms / p["cells_run"] if p["cells_run"] else None
        if i == 0:
            everywhere_ms += ms
        elif per_cell is not None:
            everywhere_ms += per_cell * p["cells_total"]
        elif p["cells_total"]:
            estimable = False                     # never ran: no cost per cell to scale
        out_steps.append({"name": s["name"], "model_id": s["model_id"], "version": s["version"],
                          "classes": s["classes"], "run_if": s["run_if"], "frames": p["frames"],
                          "cells_run": p["cells_run"], "cells_total": p["cells_total"],
                          "cells_run_share": round(p["cells_run"] / p["cells_total"], 4) if p["cells_total"] else None,
                          "ms_total": round(ms, 3), "ms_p50": _p50(p["ms"]),
                          "ms_per_cell_run": round(per_cell, 3) if per_cell is not None else None,
                          "mask": (masks.get("steps") or {}).get(s["name"]),
                          "mask_file": step_mask_file(s, i)})
    gate = {"chain_ms": round(chain_ms, 3),
            "everywhere_ms_estimated": round(everywhere_ms, 3) if estimable and frames else None,
            "how": "each later step's ms per cell it ran on x every cell of every frame, plus the gate's ms"}
    if gate["everywhere_ms_estimated"]:
        gate["saved_ms"] = round(everywhere_ms - chain_ms, 3)
        gate["saved_share"] = round(1 - chain_ms / everywhere_ms, 4)
    return {"steps": out_steps, "frames": frames, "gate": gate}


def chain_checks(r: dict, received: list[dict]) -> list[dict]:
    """The report's check lines: every decision carries every step's accounting; every product
    that came down (`received`: the ground station's records) has one mask COG per step."""
    c = r.get("chain")
    if not c:
        return []
    names = [s["name"] for s in c["steps"]]
    decided = r["accounting"].get("decided") or 0
    complete = [f for f in c["frames"] if [s["name"] for s in f["steps"]] == names]
    out = [{"name": "chain: every decision reports each step (cells run, ms)",
            "ok": len(complete) == len(c["frames"]) == decided,
            "detail": f"{len(complete)}/{decided} decisions with steps {', '.join(names)}; " + ", ".join(
                f"{s['name']} ran on {s['cells_run']}/{s['cells_total']} cells" for s in c["steps"])}]
    down = [p for p in received if p.get("georeferenced")]
    if down:
        want = [s["mask_file"] for s in c["steps"]]
        bad = [p["frame_id"] for p in down if not all(w in p.get("gis", []) for w in want)]
        out.append({"name": "chain: one mask COG per step in every product that came down", "ok": not bad,
                    "detail": f"{len(down) - len(bad)}/{len(down)} products with {', '.join(want)}"
                              + (f"; missing in {bad[:5]}" if bad else "")})
    return out


def md_chain(r: dict) -> list[str]:
    c = r.get("chain")
    if not c:
        return []
    L = ["", "## Model chain", "",
         f"Chain {r['model']['id']} v{r['model']['version']}: "
         + " -> ".join(f"{s['name']} ({s['model_id']} v{s['version']})" for s in c["steps"]), "",
         "| step | runs if | frames | cells run / total | share | ms total | ms p50 per frame | ms per cell run "
         "| mask IoU (where it ran) | pixels it ran on |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for s in c["steps"]:
        m = s.get("mask") or {}
        iou = ", ".join(f"{k} {v['iou']:.3f}" for k, v in (m.get("per_class") or {}).items()
                        if v.get("iou") is not None) or "n/a"
        L.append(f"| {s['name']} | {_run_if(s['run_if'])} | {s['frames']} | {s['cells_run']}/{s['cells_total']} | "
                 f"{_pct(s['cells_run_share'])} | {s['ms_total']:.1f} | {s['ms_p50']} | {s['ms_per_cell_run']} | "
                 f"{iou} | {_pct(m.get('ran_share'))} |")
    g = c["gate"]
    L += [""]
    if g.get("everywhere_ms_estimated"):
        L.append(f"Time the gate saved: the chain took {g['chain_ms']:.1f} ms of model time; every step "
                 f"everywhere would take ~{g['everywhere_ms_estimated']:.1f} ms ({g['how']}): "
                 f"**{_pct(g['saved_share'])} saved** ({g['saved_ms']:.1f} ms).")
    else:
        L.append(f"Time the gate saved: not estimable from this flight (a later step never ran); chain "
                 f"{g['chain_ms']:.1f} ms.")
    L += ["", "| frame | keep | " + " | ".join(f"{s['name']} cells, ms" for s in c["steps"]) + " |",
          "|---|---|" + "---|" * len(c["steps"])]
    for f in c["frames"]:
        by = {s["name"]: s for s in f["steps"]}
        L.append(f"| {f['frame_id']} | {f['keep']} | " + " | ".join(
            f"{by[s['name']]['cells_run']}/{by[s['name']]['cells_total']}, {by[s['name']]['ms']:.1f}"
            if s["name"] in by else "-" for s in c["steps"]) + " |")
    return L + [""]


def _run_if(run_if: Any) -> str:
    if not run_if:
        return "always (the gate)"
    return ", ".join(f"{k} {v}" for k, v in run_if.items())


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
