"""Evaluation: operating point as on board (threshold + opening), threshold sweep, scores, report shape."""
import numpy as np
import pytest

from ground.data.sample import IGNORE
from ground.evaluation.operating_point import OperatingPoint, sweep_thresholds
from ground.evaluation.scores import evaluate_probs, scores, summary


def _scene(seed=0):
    """Probabilities whose argmax over-predicts class 1: a threshold on class 1 fixes it."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((40, 40), np.uint8)
    truth[5:20, 5:20] = 1
    truth[25:35, 22:38] = 2
    p = np.full((3, 40, 40), 0.05, np.float32)
    p[truth, np.arange(40)[:, None], np.arange(40)[None]] = 0.6
    spill = (rng.random((40, 40)) < 0.3) & (truth == 0)
    p[1][spill] = 0.7                      # weak false clouds, below 0.75
    p[1][truth == 1] = 0.9
    return p / p.sum(0, keepdims=True), truth


def test_sweep_finds_the_threshold_that_removes_false_positives():
    p, truth = _scene()
    raw = scores(p.argmax(0).astype(np.uint8), truth, 3)["miou"]
    point, trace = sweep_thresholds([p], [truth], 3)
    assert point.thresholds[0] is None                 # the background is never thresholded
    assert point.thresholds[1] is not None
    tuned = scores(point.apply(p), truth, 3)["miou"]
    assert tuned > raw + 0.1 and tuned > 0.95
    assert max(t["miou"] for t in trace) == pytest.approx(tuned)


def test_opening_removes_specks_as_on_board():
    p, truth = _scene(1)
    p2 = p.copy()
    p2[2, 2, 2] = p2[2, 2, 30] = 5.0                  # two one-pixel "shadows"
    p2 /= p2.sum(0, keepdims=True)
    closed = OperatingPoint([None, None, None], 0).apply(p2)
    opened = OperatingPoint([None, None, None], 2).apply(p2)
    assert closed[2, 2] == 2 and opened[2, 2] == 0 and opened[2, 30] == 0
    assert (opened[25:35, 22:38] == 2).mean() > 0.9   # the real shadow survives a disk(2) opening


def test_evaluate_reports_labels_teacher_and_ignores_unlabelled():
    p, truth = _scene()
    labels = truth.copy()
    labels[:, :10] = IGNORE
    res = evaluate_probs(p, OperatingPoint([None, None, None], 0), 3, ["clear", "cloud", "shadow"], labels,
                         teacher_mask=p.argmax(0).astype(np.uint8))
    assert res["vs_labels"]["pixels"] == 40 * 30
    assert res["vs_teacher"]["accuracy"] == 1.0         # the argmax is the teacher mask here
    row = summary(res)
    assert set(row) >= {"miou", "f1", "accuracy", "iou", "agreement"}
    assert set(row["iou"]) == {"clear", "cloud", "shadow"}


def test_report_table_has_the_published_columns(tmp_path):
    from ground.evaluation.report import add_gains, markdown, write_report
    rows = [{"name": "teacher", "mode": "teacher", "params": None, "macs": None, "miou": 0.78},
            {"name": "scratch", "mode": "labels", "params": 100_000, "macs": 5e8, "miou": 0.60, "f1": 0.7},
            {"name": "distilled", "mode": "distill", "loss": "kl", "params": 100_000, "macs": 5e8, "miou": 0.75,
             "f1": 0.8}]
    report = {"run": "r", "rows": rows, "classes": ["clear", "cloud", "shadow"], "deliver": "distilled",
              "histories": {"scratch": [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]}}
    add_gains(rows)
    assert rows[2]["gain_miou"] == pytest.approx(0.15) and rows[2]["gain_rel"] == pytest.approx(0.25)
    md = markdown(report)
    assert "| teacher |" in md and "+0.150 (+25.0%)" in md and "MACs/tile" in md
    written = write_report(report, tmp_path)
    assert {"report.md", "report.json", "curves.png"} <= set(written)
    assert (tmp_path / "curves.png").stat().st_size > 1000
