"""The scenario report: figures from a RunRecord, written as JSON, markdown and two PNGs.

Figures (report.json keys):
- `accounting`: frames sent, decided, errored (by code), given up, pending; `balanced` is true
  when every frame sent has exactly one outcome and none is pending. Refusals (queue_full...),
  resends (after a restart, a timeout) and duplicates ignored say how it got there.
- `data`: bytes acquired (frames as the camera sent them), bytes of products made and
  downlinked; `reduction` = downlinked / acquired.
- `value`: where truth exists, recall of target pixels (classes `report.targets`) and of
  target objects (ships) in what was kept on board and in what came down (a kept frame's
  tiles, or the whole frame when its product has no tile boxes).
- `decisions`: each decision against the bundle's own policy applied to the truth
  (flight_sim.truth.expected_decision): agreement (a quality figure), the frames where they
  differ, and the clear-cut frames (truth >= 95% cloud, or <= 5% cloud with targets) on which
  a check demands agreement.
- `masks`: class masks that came down against the truth: confusion, per-class IoU, mIoU (a model
  chain: the gate's, with every step's in `masks.steps`).
- `masks_by_version`: the same masks grouped by the scene's surface (a generated scene's
  `surface`, "other" for the rest) and the model version that made them (the frame's DECISION
  `model`): {surface: {version: {model_id, version, frames, decided, miou, per_class, ...}}}, so
  the frames scored with a bundle and with the one uplinked after it are told apart.
- `learning`: the learning samples (SAMPLE messages): received, downlinked, left on board,
  bytes, by selection, the models that chose them, per pass the learning and science budgets
  and bytes used, and `science_within_budget` (every pass kept its products within their budget).
- `uplinks`: the scheduled uplinks ([[uplinks]]) as flown: after which pass, mission time, the
  bundle's model and version, installed or refused, and `activated`: the first frame decided
  with it (frame id, order of acquisition, mission time acquired).
- `chain` (a chain bundle; flight_sim.chain_report): per step cells run / total, milliseconds, its
  mask against the truth where it ran; per frame the same; the time the gate saved (estimated).
- `latency_ms`: daemon-side total per frame and payload round trip, p50/p90/p99/max.
- `realtime`: acquisition time of the frames over the daemon's processing time for them (its
  per-frame time less the wait in its queue; > 1: it keeps up with the orbit), and over the wall
  time from the first frame sent to the last outcome (meaningful when frames go as fast as
  possible).
- `uplink`, `restarts`, `daemon`: installs and refusals, kill -9 and what came back.
- `simulator`: its clock ("simulated" or "wall") and the simulated timeline, its own peak RSS
  over the run, the most its downlink queue held on disk, its acknowledgements to the daemon.

timeline.png: frames from send to outcome, kills and restarts, buffers; passes on mission time.
masks.png: quicklook, truth and downlinked mask for a few frames.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flight_sim.camera import preview_rgb
from flight_sim.runner import RunRecord
from flight_sim.soak import soak_checks
from flight_sim.chain_report import StepMasks, chain_checks, chain_section, md_chain, model_info
from flight_sim.truth import IGNORE, default_targets, expected_decision, to_model_classes
from shared.jsonable import jsonable
from shared.metrics import SegmentationScores, confusion_matrix


CLEAR_CUT_CLOUD = 0.95     # a frame at least this cloudy (or at most 1 - this) leaves no doubt


def _pct(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    p = np.percentile(values, [50, 90, 99])
    return {"n": len(values), "p50": round(float(p[0]), 2), "p90": round(float(p[1]), 2),
            "p99": round(float(p[2]), 2), "max": round(float(max(values)), 2)}


def decode_png(blob: bytes | np.ndarray) -> np.ndarray:
    from PIL import Image
    raw = bytes(np.asarray(blob, np.uint8).tobytes()) if isinstance(blob, np.ndarray) else blob
    return np.asarray(Image.open(io.BytesIO(raw)))


def _region(frame_shape: tuple[int, int], arrays: dict) -> np.ndarray:
    """Pixels of a frame that came down: its kept tiles' boxes, else all of it."""
    boxes = arrays.get("tile_boxes")
    if boxes is None:
        return np.ones(frame_shape, bool)
    region = np.zeros(frame_shape, bool)
    for r, c, h, w in np.asarray(boxes).reshape(-1, 4):
        region[r:r + h, c:c + w] = True
    return region


def build_report(rec: RunRecord) -> dict:
    """The report (figures as in the module docstring), its checks and `ok` when all pass."""
    model = model_info(rec)            # a chain's classes: every step's, gate first
    classes = model["classes"]
    targets = rec.scenario.sections["report"].get("targets") or default_targets(classes)
    states = list(rec.payload.states.values()) if rec.payload else []
    normal = [s for s in states if s.frame.kind == "frame"]
    value, decisions, masks, examples, by_version = _score_against_truth(rec, normal, classes, targets)
    report = {
        "scenario": rec.scenario.name, "description": rec.scenario.description,
        "out_dir": str(rec.out_dir),
        "model": model, "chain": chain_section(rec, normal, masks),
        "scenes": rec.scenes, "camera": rec.camera,
        "accounting": rec.payload.accounting() if rec.payload else {},
        "malformed": _malformed(states),
        "data": _data(rec),
        "value": value, "decisions": decisions, "masks": masks, "masks_by_version": by_version,
        "learning": rec.downlink.learning_summary() if rec.downlink else None,
        "uplinks": _scheduled_uplinks(rec, normal),
        "latency_ms": _latency(states),
        "realtime": _realtime(rec, normal),
        "uplink": rec.uplink, "restarts": rec.restarts, "crashes": rec.crashes,
        "daemon": _daemon(rec),
        "simulator": _simulator(rec),
        "soak": rec.soak.report(states, rec.t_fly) if rec.soak is not None and rec.soak.active else None,
        "timed_out": rec.timed_out,
        "wall_s": round(rec.t_end - rec.t0, 3),
    }
    report["checks"] = _checks(report) + chain_checks(report, rec.downlink.station.received if rec.downlink else [])
    report["ok"] = all(c["ok"] for c in report["checks"])
    report["_examples"] = examples          # not written to JSON; for masks.png
    return report


# ------------------------------------------------------------------------------- latency, time

def _latency(states: list) -> dict:
    """Daemon-side total per decided frame and the payload's round trip, in ms."""
    daemon_ms = [s.body["timings_ms"]["total"] for s in states
                 if s.outcome == "decision" and "total" in (s.body.get("timings_ms") or {})]
    round_trip_ms = [(s.outcome_at - s.last_sent) * 1000 for s in states
                     if s.outcome in ("decision", "error") and s.last_sent]
    return {"daemon_total": _pct(daemon_ms), "round_trip": _pct(round_trip_ms)}


def _realtime(rec: RunRecord, normal: list) -> dict:
    """Acquisition time over the daemon's processing time (and over the wall time)."""
    line = rec.camera.get("line_period_s", 0.0)
    acquisition_s = sum((s.frame.row1 - s.frame.row0) * line for s in normal)
    # the daemon's own time per frame (from acceptance, less the wait in its queue): its capacity
    service_s = sum(max(0.0, s.body["timings_ms"].get("total", 0) - s.body["timings_ms"].get("queue", 0))
                    for s in normal if s.outcome == "decision" and s.body.get("timings_ms")) / 1000
    first = min((s.first_sent for s in normal if s.first_sent), default=None)
    last = max((s.outcome_at for s in normal if s.outcome_at), default=None)
    wall_s = (last - first) if first and last else None
    rt = {"acquisition_s": round(acquisition_s, 3), "service_s": round(service_s, 3),
          "factor": round(acquisition_s / service_s, 3) if service_s else None,
          "wall_s": round(wall_s, 3) if wall_s else None,
          "wall_factor": round(acquisition_s / wall_s, 3) if wall_s else None,
          "frame_period_s": rec.camera.get("frame_period_s"),
          "mode": rec.camera.get("mode"), "speedup": rec.camera.get("speedup")}
    rt["keeps_up"] = bool(rt["factor"] and rt["factor"] >= 1.0)
    return rt


# ------------------------------------------------------------------------------- truth

@dataclass
class _Seen:
    """One frame with truth, as the report scores it."""

    frame: Any                   # flight_sim.camera.CapturedFrame
    mapped: np.ndarray           # its truth in model classes
    decision: dict | None        # the daemon's decision body, None if it did not decide
    product: Any                 # flight_sim.downlink.Stored, None if none arrived
    down: bool                   # its product came down in a pass
    region: np.ndarray           # the pixels its product carries (none without a product)

    @property
    def kept(self) -> bool:
        return bool(self.decision and self.decision.get("keep"))


def _frames_with_truth(rec: RunRecord, normal: list, classes: list[str]):
    """A `_Seen` for each frame whose scene has truth, one at a time (frames can be large)."""
    downlink = rec.downlink
    for s in normal:
        f = s.frame
        if f.truth is None or f.truth_classes is None:
            continue
        mapped = to_model_classes(f.truth, f.truth_classes, classes)
        product = downlink.products.get(f.frame_id) if downlink else None
        region = _region(mapped.shape, product.arrays) if product else np.zeros(mapped.shape, bool)
        yield _Seen(f, mapped, s.body if s.outcome == "decision" else None, product,
                    bool(downlink and f.frame_id in downlink.downlinked), region)


def _score_against_truth(rec: RunRecord, normal: list, classes: list[str],
                         targets: list[str]) -> tuple[dict, dict, dict, list, dict | None]:
    """(value, decisions, masks, mask examples, masks by surface and model version): every
    frame with truth scored once."""
    value = _ValueTally(targets, [classes.index(t) for t in targets if t in classes])
    decisions = _DecisionTally(classes, rec.manifest.get("policy"))
    n_examples = rec.scenario.sections["report"]["mask_examples"]
    # a chain: each step's mask in its own classes where it ran (the gate's is the report's `masks`)
    masks = StepMasks(rec.chain["steps"], n_examples) if rec.chain else _MaskTally(classes, n_examples)
    by_version = None if rec.chain else _VersionMaskTally(classes, rec.scenes)
    for seen in _frames_with_truth(rec, normal, classes):
        value.add(seen)
        decisions.add(seen)
        masks.add(seen)
        if by_version is not None:
            by_version.add(seen)
    return (value.result(), decisions.result(targets), masks.result(), masks.examples,
            by_version.result() if by_version is not None else None)


class _ValueTally:
    """Target pixels and objects in what was kept on board and in what came down."""

    def __init__(self, targets: list[str], target_idx: list[int]):
        self.target_idx = target_idx
        self.value = {"targets": targets, "target_pixels": 0, "kept_pixels": 0,
                      "downlinked_pixels": 0, "objects": 0, "objects_kept": 0,
                      "objects_downlinked": 0, "object_class": None}

    def add(self, seen: _Seen) -> None:
        v, f = self.value, seen.frame
        if self.target_idx:
            tmask = np.isin(seen.mapped, self.target_idx)
            v["target_pixels"] += int(tmask.sum())
            if seen.kept:
                v["kept_pixels"] += int((tmask & seen.region).sum())
                if seen.down:
                    v["downlinked_pixels"] += int((tmask & seen.region).sum())
        if f.objects is not None:
            v["object_class"] = f.object_class
            for oid in np.unique(f.objects[f.objects > 0]):
                v["objects"] += 1
                # an object counts as kept when most of it lies in the product's region
                if seen.kept and seen.region[f.objects == oid].mean() >= 0.5:
                    v["objects_kept"] += 1
                    v["objects_downlinked"] += int(seen.down)

    def result(self) -> dict:
        v = self.value
        for key in ("kept", "downlinked"):
            v[f"recall_{key}"] = (round(v[f"{key}_pixels"] / v["target_pixels"], 4)
                                  if v["target_pixels"] else None)
            v[f"object_recall_{key}"] = (round(v[f"objects_{key}"] / v["objects"], 4)
                                         if v["objects"] else None)
        return v


class _DecisionTally:
    """Each decision against the bundle's own policy applied to the truth."""

    def __init__(self, classes: list[str], policy: dict | None):
        self.classes, self.policy = classes, policy
        self.decisions = {"with_truth": 0, "agree": 0, "disagree": [], "by_truth": []}

    def add(self, seen: _Seen) -> None:
        got, d = seen.decision, self.decisions
        if not self.policy or got is None:
            return
        exp = expected_decision(seen.mapped, self.classes, self.policy)
        d["with_truth"] += 1
        entry = {"frame_id": seen.frame.frame_id, "keep": bool(got["keep"]),
                 "expected_keep": exp["keep"], "truth_fractions": exp["fractions"],
                 "reason": got.get("reason", ""), "expected_reason": exp["reason"]}
        d["by_truth"].append(entry)
        if bool(got["keep"]) == exp["keep"]:
            d["agree"] += 1
        else:
            d["disagree"].append(entry)

    def result(self, targets: list[str]) -> dict:
        d = self.decisions
        d["agreement"] = round(d["agree"] / d["with_truth"], 4) if d["with_truth"] else None
        d["clear_cut"] = [e for e in d["by_truth"] if _clear_cut(e["truth_fractions"], targets)]
        return d


def _clear_cut(fractions: dict, targets: list[str]) -> bool:
    """Truth that leaves no doubt: overcast, or clear of cloud with value in it."""
    cloud = fractions.get("cloud", 0.5)
    return cloud >= CLEAR_CUT_CLOUD or (cloud <= 1 - CLEAR_CUT_CLOUD
                                        and sum(fractions.get(t, 0) for t in targets) >= 0.05)


class _MaskTally:
    """Class masks that came down against the truth: a confusion matrix, a few examples."""

    def __init__(self, classes: list[str], n_examples: int):
        self.classes, self.n_examples = classes, n_examples
        self.cm = np.zeros((len(classes), len(classes)), np.int64)
        self.frames = 0
        self.examples: list[tuple] = []      # (frame, truth, mask) for masks.png

    def add(self, seen: _Seen) -> None:
        if not (seen.down and seen.product is not None and "mask_png" in seen.product.arrays):
            return
        try:
            pred = decode_png(seen.product.arrays["mask_png"])
        except Exception:                    # a mask that does not decode is not scored
            return
        if pred.shape != seen.mapped.shape:
            return
        valid = seen.mapped != IGNORE
        self.cm += confusion_matrix(seen.mapped[valid], pred[valid], len(self.classes))
        self.frames += 1
        if len(self.examples) < self.n_examples:
            self.examples.append((seen.frame, seen.mapped, pred))

    def result(self) -> dict:
        masks = {"frames": self.frames}
        if self.frames:
            masks.update(SegmentationScores.from_confusion(self.cm, self.classes).as_dict())
            masks["confusion"] = self.cm.tolist()
        return masks


def _frame_model(seen: _Seen) -> tuple[str | None, int | None]:
    """(model id, version) that decided a frame: its DECISION's `model`, else its product's."""
    model = (seen.decision or {}).get("model") or (seen.product.body.get("model") if seen.product else None) or {}
    return model.get("id") or model.get("model_id"), model.get("version")


class _VersionMaskTally:
    """The downlinked masks against the truth, one confusion matrix per (scene surface, model
    version); frames decided per group besides (a discarded frame sends no mask)."""

    def __init__(self, classes: list[str], scenes: list[dict]):
        self.classes = classes
        self.surfaces = [s.get("surface") or "other" for s in scenes]
        self.groups: dict[tuple[str, int | None], dict] = {}

    def add(self, seen: _Seen) -> None:
        if seen.decision is None:
            return
        f = seen.frame
        surface = self.surfaces[f.scene_index] if 0 <= f.scene_index < len(self.surfaces) else "other"
        model_id, version = _frame_model(seen)
        g = self.groups.setdefault((surface, version), {"model_id": model_id, "decided": 0, "frames": 0,
                                                        "cm": np.zeros((len(self.classes),) * 2, np.int64)})
        g["decided"] += 1
        product = seen.product
        if not (seen.down and product is not None and "mask_png" in product.arrays):
            return
        mapped = seen.mapped
        classes = product.body.get("classes") or self.classes
        if list(classes) != list(self.classes):          # a newer model with other classes
            return
        try:
            pred = decode_png(product.arrays["mask_png"])
        except Exception:
            return
        if pred.shape != mapped.shape:
            return
        valid = mapped != IGNORE
        g["cm"] += confusion_matrix(mapped[valid], pred[valid], len(self.classes))
        g["frames"] += 1

    def result(self) -> dict:
        out: dict[str, dict] = {}
        for (surface, version), g in sorted(self.groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            entry = {"model_id": g["model_id"], "version": version, "decided": g["decided"],
                     "frames": g["frames"]}
            if g["frames"]:
                entry.update(SegmentationScores.from_confusion(g["cm"], self.classes).as_dict())
            out.setdefault(surface, {})[str(version)] = entry
        return out


def _scheduled_uplinks(rec: RunRecord, normal: list) -> list[dict]:
    """The scheduled uplinks as flown, each with the first frame (in acquisition order) that a
    DECISION says ran on its model version."""
    decided = sorted(((s.frame.acquired, s.frame.frame_id, s.body.get("model") or {}) for s in normal
                      if s.outcome == "decision"), key=lambda x: x[0])
    out = []
    for up in rec.uplinks:
        first = next(((i, fid, t) for i, (t, fid, m) in enumerate(decided)
                      if (m.get("id") or m.get("model_id")) == up["model_id"] and m.get("version") == up["version"]),
                     None)
        activated = ({"frame_id": first[1], "frame_order": first[0], "acquired_s": first[2]}
                     if up["ok"] and first else None)
        out.append({**{k: v for k, v in up.items() if k != "upload"},
                    "chunks": up["upload"].get("chunks"), "activated": activated})
    return out


# ------------------------------------------------------------------------------- the rest

def _data(rec: RunRecord) -> dict:
    """Bytes acquired, made into products and downlinked; the passes."""
    dl = rec.downlink.summary() if rec.downlink else {}
    acquired = rec.acquired_bytes
    return {"bytes_acquired": acquired, "bytes_products": dl.get("bytes_produced", 0),
            "bytes_downlinked": dl.get("bytes_downlinked", 0),
            "reduction": round(dl.get("bytes_downlinked", 0) / acquired, 5) if acquired else None,
            "products": dl.get("products", 0), "downlinked": dl.get("downlinked", 0),
            "left_on_board": dl.get("left_on_board", 0), "products_missing": rec.products_missing,
            "duplicates_ignored": dl.get("duplicates_ignored", 0), "passes": dl.get("passes", [])}


def _malformed(states: list) -> list[dict]:
    """The frames broken on purpose and what became of each."""
    return [{"frame_id": s.frame.frame_id, "kind": s.frame.kind, "outcome": s.outcome,
             "code": (s.body or {}).get("code"), "message": (s.body or {}).get("message", "")[:200]}
            for s in states if s.frame.kind != "frame"]


def _daemon(rec: RunRecord) -> dict:
    """The daemon's starts, kills and stops (seconds since the run began), exit, last status."""
    rss = [t["rss_mb"] for t in rec.telemetry if isinstance(t.get("rss_mb"), (int, float))]
    return {"events": [{k: v for k, v in e.items() if k != "t"} | {"t": round(e["t"] - rec.t0, 3)}
                       for e in rec.daemon_events],
            "exit_code": rec.exit_code, "final_status": _slim_status(rec.final_status),
            "heartbeats": len(rec.telemetry), "rss_mb_max": max(rss) if rss else None}


def _simulator(rec: RunRecord) -> dict:
    """The simulator's own: its clock, its peak memory, its downlink queue on disk, the
    acknowledgements it gave the daemon."""
    dl = rec.downlink
    return {"clock": "simulated" if rec.clock is not None else "wall",
            "timeline": rec.clock.summary() if rec.clock is not None else None,
            "peak_rss_mb": rec.peak_rss_mb,
            "downlink_queue": {"folder": str(dl.queue_dir) if dl else None,
                               "peak_bytes": dl.peak_stored_bytes if dl else 0},
            "acks": dict(rec.acks)}


def _slim_status(status: dict) -> dict:
    keep = ("model", "state", "frames", "queue_depth", "pending_products", "latency_ms", "rss_mb",
            "store")
    return {k: status[k] for k in keep if k in status} if isinstance(status, dict) else {}


def _checks(r: dict) -> list[dict]:
    """The scenario's pass/fail lines: what a reader should see hold."""
    out = []

    def check(name: str, ok: bool, detail: str) -> None:
        out.append({"name": name, "ok": bool(ok), "detail": detail})

    a = r["accounting"]
    check("accounting balances", a.get("balanced", False) and not r["timed_out"],
          f"sent {a.get('sent')} = decided {a.get('decided')} + errored {a.get('errored')} "
          f"+ given up {a.get('gave_up')}; pending {a.get('pending')}")
    check("the daemon never died on its own", not r["crashes"],
          f"{len(r['crashes'])} unplanned exits (restarted)" if r["crashes"] else "no unplanned exit")
    bad = [m for m in r["malformed"] if m["outcome"] != "error"]
    if r["malformed"]:
        check("malformed frames answered with an error", not bad,
              f"{len(r['malformed']) - len(bad)}/{len(r['malformed'])} got an error outcome")
    for att in r["uplink"].get("attempts", []):
        if att["kind"] == "good":
            check("bundle uplinked and installed", att["ok"], att.get("error") or "installed")
        else:
            check(f"{att['kind']} bundle refused, model kept serving",
                  not att["ok"] and att.get("still_serving", False), str(att.get("error"))[:160])
    for i, rs in enumerate(r["restarts"]):
        check(f"restart {i + 1}: same active model after kill -9", rs["same_model"],
              f"{rs['model_before']} -> {rs['model_after']}, {rs['frames_resent']} frames resent, "
              f"{rs.get('products_lost_reprocessed', 0)} reprocessed for a lost product")
    d = r["decisions"]
    cut = d.get("clear_cut", [])
    if cut:
        wrong = [e["frame_id"] for e in cut if e["keep"] != e["expected_keep"]]
        check("clear-cut frames decided as the policy says on the truth (overcast discarded, "
              "clear kept)", not wrong,
              f"{len(cut) - len(wrong)}/{len(cut)} right" + (f"; wrong: {wrong}" if wrong else ""))
    missing, down = r["data"]["products_missing"], r["data"]
    check("every kept frame's product arrived", not missing,
          f"missing {missing}" if missing else f"{down['products']} products, none lost "
          f"({sum(x.get('products_lost_reprocessed', 0) for x in r['restarts'])} processed again)")
    for name, ok, detail in soak_checks(r["soak"]) if r.get("soak") else ():
        check(name, ok, detail)
    for up in r.get("uplinks") or []:
        check(f"scheduled uplink {up['index']} (v{up['version']} after pass {up['after_pass']}) installed",
              up["ok"], up.get("error") or (f"first frame on it: {up['activated']['frame_id']}"
                                            if up.get("activated") else "no frame decided on it"))
    lr = r.get("learning") or {}
    if lr.get("samples"):
        check("science products within their budget in every pass (learning samples beside them)",
              lr["science_within_budget"],
              f"{lr['downlinked']}/{lr['samples']} samples down, {_size(lr['bytes_downlinked'])} of "
              f"the learning budget")
    if r["daemon"]["exit_code"] is not None:
        check("daemon shut down cleanly", r["daemon"]["exit_code"] == 0,
              f"exit code {r['daemon']['exit_code']}")
    return out


# =============================================================================== writing

def headline(r: dict) -> str:
    a, d, v, rt = r["accounting"], r["data"], r["value"], r["realtime"]
    lat = r["latency_ms"]["daemon_total"]
    parts = [f"scenario {r['scenario']}: {'OK' if r['ok'] else 'CHECKS FAILED'}",
             f"frames sent {a.get('sent')}, decided {a.get('decided')}, errored {a.get('errored')}, "
             f"pending {a.get('pending')} ({'balanced' if a.get('balanced') else 'NOT balanced'})",
             f"data reduction {_fmt_pct(d['reduction'])} ({_size(d['bytes_downlinked'])} down of "
             f"{_size(d['bytes_acquired'])} acquired)"]
    if v["recall_downlinked"] is not None:
        obj = (f", {v['object_class']}s {_fmt_pct(v['object_recall_downlinked'])}"
               if v["object_recall_downlinked"] is not None else "")
        parts.append(f"value kept: {'/'.join(v['targets'])} pixels {_fmt_pct(v['recall_downlinked'])}{obj}")
    if lat.get("n"):
        parts.append(f"latency p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms; real-time factor "
                     f"{rt['factor']} ({'keeps up' if rt['keeps_up'] else 'falls behind'})")
    c = r.get("chain")
    if c:
        saved = c["gate"].get("saved_share")
        parts.append("chain: " + ", ".join(f"{s['name']} on {s['cells_run']}/{s['cells_total']} cells "
                                           f"({s['ms_total']:.0f} ms)" for s in c["steps"])
                     + (f"; the gate saved ~{_fmt_pct(saved)} of model time (estimated)" if saved is not None else ""))
    lr = r.get("learning") or {}
    if lr.get("samples"):
        parts.append(f"learning samples: {lr['downlinked']}/{lr['samples']} down "
                     f"({_size(lr['bytes_downlinked'])}), {lr['left_on_board']} left on board; science "
                     f"within its budget every pass: {lr['science_within_budget']}")
    for up in r.get("uplinks") or []:
        act = up.get("activated")
        parts.append(f"uplink after pass {up['after_pass']}: v{up['version']} "
                     + ("installed" if up["ok"] else "REFUSED")
                     + (f", first frame on it {act['frame_id']}" if act else ""))
    dec = r["decisions"]
    if dec["with_truth"]:
        parts.append(f"decisions agree with the policy on the truth: {dec['agree']}/{dec['with_truth']}"
                     + (f"; masks mIoU {r['masks']['miou']:.3f}" if r["masks"].get("miou") is not None else ""))
    return "\n".join(parts)


def _fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _size(n: int | None) -> str:
    n = n or 0
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n}"


def markdown(r: dict) -> str:
    """report.md: the headline, then checks, frames, data and value, decisions, timing, uplink."""
    L = [f"# Scenario report: {r['scenario']}", "", r["description"] or "", "",
         "```", headline(r), "```", ""]
    L += _md_checks(r) + _md_frames(r) + _md_data(r) + _md_stac(r) + _md_decisions(r) + md_chain(r) + _md_timing(r)
    L += _md_learning(r) + _md_by_version(r) + _md_uplink_and_daemon(r) + _md_soak(r)
    return "\n".join(L)


def _md_learning(r: dict) -> list[str]:
    lr = r.get("learning") or {}
    if not lr.get("messages"):
        return []
    L = ["", "## Learning samples", "",
         f"{lr['samples']} samples received ({lr['messages']} SAMPLE messages, {_size(lr['bytes_received'])}), "
         f"{lr['downlinked']} downlinked ({_size(lr['bytes_downlinked'])}), {lr['left_on_board']} left on "
         f"board; science within budget every pass: {lr['science_within_budget']}", "",
         "| selection | samples | downlinked | bytes down |", "|---|---:|---:|---:|"]
    L += [f"| {sel} | {x['samples']} | {x['downlinked']} | {x['bytes_downlinked']:,} |"
          for sel, x in lr["by_selection"].items()]
    L += ["", "| pass | learning used / budget | science used / budget | samples |", "|---:|---:|---:|---:|"]
    L += [f"| {p['pass']} | {p['learning_used_bytes']:,} / {p['learning_budget_bytes']:,} | "
          f"{p['science_used_bytes']:,} / {p['science_budget_bytes']:,} | {p['samples']} |" for p in lr["passes"]]
    return L


def _md_by_version(r: dict) -> list[str]:
    groups = r.get("masks_by_version") or {}
    rows = [(surface, g) for surface, per in groups.items() for g in per.values()]
    if not rows or not (r.get("uplinks") or len(rows) > 1):
        return []
    L = ["", "## Masks by scene surface and model version", "",
         "| surface | model | version | frames decided | masks scored | mIoU |", "|---|---|---:|---:|---:|---:|"]
    L += [f"| {surface} | {g['model_id']} | {g['version']} | {g['decided']} | {g['frames']} | "
          f"{'n/a' if g.get('miou') is None else format(g['miou'], '.3f')} |" for surface, g in rows]
    for up in r.get("uplinks") or []:
        act = up.get("activated")
        L.append(f"- uplink {up['index']}: v{up['version']} after pass {up['after_pass']} (mission "
                 f"{up['mission_s']} s): {'installed' if up['ok'] else 'refused: ' + str(up.get('error'))[:150]}"
                 + (f"; first frame on it {act['frame_id']} (acquired {act['acquired_s']} s)" if act else ""))
    return L


def _md_soak(r: dict) -> list[str]:
    """The soak's figures: frames, restarts by cause, the longest gap, RSS and fds over time."""
    s = r.get("soak")
    if not s:
        return []
    f, p = s["frames"], s["process"]
    L = ["## Soak", "",
         f"frames sent {f['sent']}, decided {f['decided']}, errored {f['errored']} "
         f"({', '.join(f'{k} {v}' for k, v in f['error_codes'].items()) or 'none'}), lost {f['lost']}",
         f"restarts {s['restarts_total']}: " + (", ".join(f"{k} {v}" for k, v in s["restarts"].items())
                                               or "none"),
         f"longest gap without an outcome {s['longest_gap_without_outcome_s']} s "
         f"(at {s['longest_gap_at_s']} s)", ""]
    if p.get("samples"):
        L += ["| s | pid | RSS MB | open fds |", "|---:|---:|---:|---:|"]
        L += [f"| {t:.0f} | {pid} | {rss:.1f} | {fds} |" for t, pid, rss, fds in p["timeline"]]
        L.append("")
    L += [f"- {e['t']:.0f} s: {e['kind']}" for e in s["events"]] + [""]
    return L


def _stac_check(stac: dict) -> dict:
    """A check line for the catalogue: valid items, rasters opened at the place they claim."""
    if not stac.get("items"):
        return {"name": "STAC catalogue of the products", "ok": True, "detail": "no product came down"}
    detail = (f"{stac['items']} items ({stac.get('georeferenced', 0)} georeferenced), "
              f"{stac['rasters_checked']} GeoTIFFs opened with rasterio at their item's place")
    problems = stac["problems"] + stac.get("gis_problems", [])
    return {"name": "STAC catalogue valid, products open at their place", "ok": not problems,
            "detail": detail + (f"; {problems[0]}" if problems else "")}


def _md_stac(r: dict) -> list[str]:
    stac = r.get("stac")
    if not stac or not stac.get("catalog"):
        return []
    rel = os.path.relpath(stac["catalog"], r["out_dir"])
    return ["", "## Products on the map", "",
            f"STAC catalogue: [{rel}]({rel}): {stac['items']} items, {stac.get('georeferenced', 0)} "
            f"with a footprint; masks and kept tiles as Cloud-Optimized GeoTIFFs beside each item "
            f"(open them in QGIS, or `rasterio.open`).", ""]


def _md_checks(r: dict) -> list[str]:
    L = ["## Checks", "", "| check | result | detail |", "|---|---|---|"]
    L += [f"| {c['name']} | {'pass' if c['ok'] else '**FAIL**'} | {c['detail']} |" for c in r["checks"]]
    return L


def _md_frames(r: dict) -> list[str]:
    a = r["accounting"]
    L = ["", "## Frames", "",
         "| sent | decided | errored | given up | pending | attempts | refusals | resent | duplicates ignored | max payload buffer |",
         "|---|---|---|---|---|---|---|---|---|---|",
         f"| {a.get('sent')} | {a.get('decided')} | {a.get('errored')} | {a.get('gave_up')} | "
         f"{a.get('pending')} | {a.get('attempts')} | {a.get('refusals')} | {a.get('resent')} | "
         f"{a.get('duplicates_ignored')} | {a.get('max_buffer')} |", ""]
    if a.get("error_codes"):
        L += [f"Error outcomes by code: {a['error_codes']}", ""]
    if r["malformed"]:
        L += ["| malformed frame | outcome | code |", "|---|---|---|"]
        L += [f"| {m['kind']} | {m['outcome']} | {m['code']} |" for m in r["malformed"]]
        L += [""]
    return L


def _md_data(r: dict) -> list[str]:
    d, v = r["data"], r["value"]
    L = ["## Data and value", "",
         f"- acquired {_size(d['bytes_acquired'])}; products {d['products']} "
         f"({_size(d['bytes_products'])}); downlinked {d['downlinked']} ({_size(d['bytes_downlinked'])}); "
         f"left on board {d['left_on_board']}; reduction {_fmt_pct(d['reduction'])}",
         f"- value ({', '.join(v['targets'])} pixels): kept {_fmt_pct(v['recall_kept'])}, "
         f"downlinked {_fmt_pct(v['recall_downlinked'])} of {v['target_pixels']} true pixels"]
    if v["objects"]:
        L.append(f"- {v['object_class']}s: {v['objects']} visible; kept {_fmt_pct(v['object_recall_kept'])}, "
                 f"downlinked {_fmt_pct(v['object_recall_downlinked'])}")
    L += ["", "| pass | start s | end s | budget | used | products | left on board |", "|---|---|---|---|---|---|---|"]
    L += [f"| {p['pass']} | {p['start_s']:.2f} | {p['end_s']:.2f} | {_size(p['budget_bytes'])} | "
          f"{_size(p['used_bytes'])} | {p['products']} | {p['left_on_board']} |" for p in d["passes"]]
    return L


def _md_decisions(r: dict) -> list[str]:
    dec = r["decisions"]
    L = ["", "## Decisions against the truth", "",
         f"{dec['agree']}/{dec['with_truth']} decisions agree with the bundle's policy applied to the "
         f"truth (agreement {_fmt_pct(dec['agreement'])}).", ""]
    if dec["by_truth"]:
        L += ["| frame | keep | expected | truth fractions | reason |", "|---|---|---|---|---|"]
        L += [f"| {e['frame_id']} | {e['keep']} | {e['expected_keep']} | "
              f"{', '.join(f'{k} {x:.2f}' for k, x in e['truth_fractions'].items())} | {e['reason'][:70]} |"
              for e in dec["by_truth"]]
    m = r["masks"]
    if m.get("frames"):
        L += ["", f"Masks that came down ({m['frames']} frames) against the truth: mIoU "
              f"{m.get('miou', float('nan')):.3f}, accuracy {m.get('accuracy', float('nan')):.3f}; IoU "
              + ", ".join(f"{c} {v['iou']:.3f}" for c, v in m.get("per_class", {}).items()
                          if v.get("iou") is not None)]
    return L


def _md_timing(r: dict) -> list[str]:
    lat, rt = r["latency_ms"], r["realtime"]
    return ["", "## Timing", "",
            f"- daemon latency per frame (ms): {lat['daemon_total']}",
            f"- payload round trip (ms): {lat['round_trip']}",
            f"- real time: {rt['acquisition_s']} s of acquisition took the daemon {rt['service_s']} s "
            f"of processing: factor {rt['factor']} ({'keeps up' if rt['keeps_up'] else 'falls behind'}); "
            f"first frame sent to last outcome {rt['wall_s']} s (factor {rt['wall_factor']}, mode "
            f"{rt['mode']}, frame period {rt['frame_period_s']:.3f} s)"]


def _md_uplink_and_daemon(r: dict) -> list[str]:
    L = ["", "## Uplink and daemon", ""]
    for att in r["uplink"].get("attempts", []):
        up = att["upload"]
        L.append(f"- {att['kind']} bundle: {up['chunks']} chunks of {up['chunk_size']} B, "
                 f"{up['corrupted_in_transit']} corrupted in transit and resent, interrupted after "
                 f"{up['interrupted_after']} (resumed {len(up['resumed_missing'])} missing); install "
                 f"{'ok' if att['ok'] else 'refused: ' + str(att.get('error'))[:150]}")
    for i, rs in enumerate(r["restarts"]):
        L.append(f"- kill -9 #{i + 1}: pid {rs['killed_pid']} -> {rs['new_pid']} after "
                 f"{rs['downtime_s']} s; model {rs['model_before']} -> {rs['model_after']}; "
                 f"{rs['frames_resent']} frames resent, {rs.get('products_lost_reprocessed', 0)} kept "
                 f"frames processed again (their product died with the daemon)")
    dm, sim = r["daemon"], r["simulator"]
    L += [f"- daemon exit code {dm['exit_code']}, {dm['heartbeats']} heartbeats, max RSS "
          f"{dm['rss_mb_max']} MB",
          f"- simulator: {sim['clock']} clock, peak RSS {sim['peak_rss_mb']} MB, products waiting "
          f"for a pass on disk at most {_size(sim['downlink_queue']['peak_bytes'])}; "
          f"{sim['acks']['sent']} products acknowledged to the daemon "
          f"({sim['acks']['removed']} spilled copies removed)", "", "![timeline](timeline.png)", ""]
    if r["masks"].get("frames"):
        L += ["![masks](masks.png)", ""]
    return L


def write_report(r: dict, rec: RunRecord, out_dir: Path | None = None) -> dict[str, Path]:
    out_dir = Path(out_dir or rec.out_dir)
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md",
             "timeline": out_dir / "timeline.png"}
    if rec.downlink is not None and "stac" not in r:
        # the ground station's STAC catalogue over what came down, written and checked now
        r["stac"] = rec.downlink.station.write_catalog()
        r["checks"].append(_stac_check(r["stac"]))
        r["ok"] = all(c["ok"] for c in r["checks"])
        if r["stac"].get("catalog"):
            paths["catalog"] = Path(r["stac"]["catalog"])
    doc = jsonable({k: v for k, v in r.items() if not k.startswith("_")})
    paths["json"].write_text(json.dumps(doc, indent=1))
    plot_timeline(rec, paths["timeline"])
    if r.get("_examples"):
        paths["masks"] = out_dir / "masks.png"
        plot_masks(r["_examples"], r["masks"].get("classes") or r["model"]["classes"], paths["masks"])
    paths["markdown"].write_text(markdown(r))
    return paths


# =============================================================================== figures

CLASS_COLOURS = {"clear": (0.35, 0.6, 0.3), "cloud": (0.95, 0.95, 0.95), "shadow": (0.25, 0.25, 0.35),
                 "cloud_shadow": (0.25, 0.25, 0.35), "water": (0.1, 0.3, 0.7), "ship": (0.9, 0.2, 0.1),
                 "land": (0.55, 0.45, 0.3)}


def _palette(classes: list[str]) -> np.ndarray:
    import matplotlib
    cmap = matplotlib.colormaps["tab10"]
    pal = np.zeros((256, 3))
    for i, c in enumerate(classes):
        pal[i] = CLASS_COLOURS.get(c, cmap(i % 10)[:3])
    pal[IGNORE] = (1.0, 0.0, 1.0)
    return pal


def plot_timeline(rec: RunRecord, path: Path) -> None:
    """timeline.png: frames from release to outcome with kills and restarts, the buffers (both on
    wall time), and the passes with what came down (on mission time)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = rec.t_fly or rec.t0
    fig, axes = plt.subplots(3, 1, figsize=(11, 9), gridspec_kw={"height_ratios": [3, 1.2, 1.2]})
    axes[1].sharex(axes[0])                  # both on wall time; the passes are on mission time
    _plot_frames(axes[0], rec, t0)
    _plot_events(axes[:2], rec, t0)
    _plot_buffers(axes[1], rec, t0)
    _plot_passes(axes[2], rec)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _frame_colour(state) -> str:
    if state.outcome == "decision":
        return "tab:green" if state.body.get("keep") else "tab:gray"
    return "tab:red" if state.outcome == "error" else "tab:orange"


def _plot_frames(ax, rec: RunRecord, t0: float) -> None:
    states = list(rec.payload.states.values()) if rec.payload else []
    for y, s in enumerate(states):
        if not s.first_sent:
            continue
        end = s.outcome_at or rec.t_end
        start = rec.release.get(s.frame.frame_id, s.first_sent)
        ax.plot([start - t0, s.first_sent - t0], [y, y], color="0.8", lw=1)
        ax.plot([s.first_sent - t0, end - t0], [y, y], color=_frame_colour(s), lw=3,
                solid_capstyle="butt")
    ax.set_ylabel("frame (send order)")
    ax.set_title(f"{rec.scenario.name}: frames from release (grey) and send to outcome "
                 f"(green kept, grey discarded, red error)")
    ax.invert_yaxis()


EVENT_STYLES = {"daemon_killed": ("tab:red", "kill -9"), "daemon_restarted": ("tab:blue", "restart"),
                "burst": ("tab:purple", "burst")}


def _plot_events(axes, rec: RunRecord, t0: float) -> None:
    """Kills, restarts and bursts as dashed lines across the wall-time panels."""
    n_frames = len(rec.payload.states) if rec.payload else 0
    for e in rec.events:
        if e["kind"] in EVENT_STYLES:
            colour, label = EVENT_STYLES[e["kind"]]
            for a in axes:
                a.axvline(e["t"] - t0, color=colour, ls="--", lw=1)
            axes[0].text(e["t"] - t0, n_frames, label, color=colour, fontsize=8, va="bottom")


def _plot_buffers(ax, rec: RunRecord, t0: float) -> None:
    if rec.samples:
        ts = np.array([s[0] for s in rec.samples]) - t0
        ax.step(ts, [s[1] for s in rec.samples], where="post", label="payload buffer")
        ax.step(ts, [s[2] for s in rec.samples], where="post", label="payload in flight")
    if rec.telemetry:
        ax.plot([t["t"] - t0 for t in rec.telemetry], [t.get("queue_depth", 0) for t in rec.telemetry],
                "k.", ms=3, label="daemon queue (telemetry)")
    ax.set_ylabel("frames")
    ax.set_xlabel("wall time since first frame (s)")
    ax.legend(fontsize=8, loc="upper right")


def _plot_passes(ax, rec: RunRecord) -> None:
    dl = rec.downlink
    if dl:
        for p in dl.passes:
            ax.axvspan(p.start_s, p.end_s, color="tab:blue", alpha=0.15)
        if dl.downlinked:
            down = sorted(t for _, t in dl.downlinked.values())
            sizes = [dl.products[f].nbytes for f, _ in sorted(dl.downlinked.items(), key=lambda kv: kv[1][1])]
            ax.step(down, np.cumsum(sizes) / 1e6, where="post", color="tab:blue", label="downlinked MB")
        states = rec.payload.states.values() if rec.payload else []
        acq = sorted((s.frame.acquired, s.frame.nbytes) for s in states if s.frame.kind == "frame")
        if acq:
            ax.step([a for a, _ in acq], np.cumsum([b for _, b in acq]) / 1e6, where="post",
                    color="tab:gray", label="acquired MB")
    ax.set_xlabel("mission time (s); shaded: ground-station passes")
    ax.set_ylabel("MB")
    ax.legend(fontsize=8, loc="upper left")


def _rgb(frame) -> np.ndarray:
    rgb = frame.extra.get("preview")
    if rgb is None and frame.data is not None:
        rgb = preview_rgb(frame.data, frame.bands, frame.scale)
    return rgb if rgb is not None else np.zeros(frame.truth.shape + (3,))


def plot_masks(examples: list, classes: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pal = _palette(classes)
    fig, axes = plt.subplots(len(examples), 3, figsize=(10, 2.6 * len(examples)), squeeze=False)
    for row, (frame, truth, pred) in enumerate(examples):
        for col, (img, title) in enumerate(((_rgb(frame), f"{frame.frame_id} (true colour)"),
                                            (pal[truth], "truth"), (pal[pred], "mask downlinked"))):
            ax = axes[row, col]
            ax.imshow(img, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=pal[i]) for i in range(len(classes))]
    fig.legend(handles, classes, loc="lower center", ncol=len(classes), fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
