"""`eoedge loop`'s parts that are cheap to check: its policies, its scenarios, its scoring and its
checks. (The whole loop takes ~40 min on 2 cores: `eoedge loop`; figures in docs/closed_loop.md.)"""
import numpy as np
import pytest

from conftest import REPO
from eoedge import demo, loop
from shared.policy import validate_policy
from shared.samples import SELECTIONS


def test_policies_differ_only_in_the_selection():
    policies = {s: validate_policy(loop.learning_policy(s), demo.CLASSES) for s in SELECTIONS}
    assert [p["learning"]["select"] for p in policies.values()] == list(SELECTIONS)
    stripped = [{**p, "learning": {k: v for k, v in p["learning"].items() if k != "select"}}
                for p in policies.values()]
    assert stripped[0] == stripped[1]
    assert policies["random"]["rules"] == validate_policy(demo.POLICY, demo.CLASSES)["rules"]


def test_label_free_config_has_no_labels(tmp_path):
    pytest.importorskip("torch")
    from ground.config import parse_config
    cfg = parse_config(demo.ground_config(tmp_path, [tmp_path / "a.npz"], steps=5, label_free=True))
    assert not cfg.labelled and cfg.experiments[0].options == {"temperature": 1.0}
    assert cfg.calibrate == "teacher"


def test_scenarios_fly_two_kinds_with_a_learning_budget_and_an_uplink():
    from flight_sim.scenario import load_scenario
    one, two = load_scenario(loop.FLIGHT_1), load_scenario(loop.FLIGHT_2)
    surfaces = lambda s: {x.get("surface", "temperate") for x in s.scenes}     # noqa: E731
    assert surfaces(one) == surfaces(two) == {"temperate", "arid"}
    assert one.sections["downlink"]["learning_budget_bytes"] > 0
    assert two.sections["uplinks"] and not one.sections.get("uplinks")
    seeds = lambda s: {x["seed"] for x in s.scenes}        # noqa: E731
    # flight 2 and the evaluation see scenes no flight 1 nor training saw
    assert not seeds(one) & seeds(two)
    evaluated = {seed for seed, _, _ in loop.EVAL_SCENES}
    assert {kind for _, kind, _ in loop.EVAL_SCENES} == set(loop.KINDS)
    trained = {seed for seed, *_ in demo.TRAINING_SCENES}
    assert not evaluated & (seeds(one) | seeds(two) | trained)


def test_scores_per_kind_against_truth_and_teacher():
    truth = np.zeros((4, 4), np.uint8)
    truth[:2] = 1                                           # top half cloud
    scenes = [{"kind": "dust", "truth": truth}, {"kind": "temperate", "truth": truth}]
    perfect, wrong = truth.copy(), np.zeros_like(truth)      # wrong: all clear
    got = loop.scores([perfect, wrong], scenes, teacher=[perfect, perfect])
    assert got["dust"]["miou"] == 1.0 and got["dust"]["teacher_agreement"] == 1.0
    assert got["temperate"]["iou"]["cloud"] == 0.0 and got["temperate"]["teacher_agreement"] == 0.5


def _result(v, unc, rnd, bytes_=(100, 100), within=True):
    ev = {"v1": {"dust": {"miou": v}, "temperate": {"miou": 0.8}},
          "v2-uncertainty": {"dust": {"miou": unc}, "temperate": {"miou": 0.79}},
          "v2-random": {"dust": {"miou": rnd}, "temperate": {"miou": 0.8}}}
    flight = lambda b: {"learning": {"bytes": b}, "report": {"learning": {"science_within_budget": within}}}   # noqa
    return {"evaluation": ev, "flights": {s: {"flight1": flight(b), "flight2": flight(b)}
                                          for s, b in zip(SELECTIONS, bytes_)}}


def test_checks_fail_when_the_loop_does_not_help():
    assert all(c["ok"] for c in loop.checks(_result(0.6, 0.7, 0.65)))
    names = lambda r: {c["name"] for c in loop.checks(r) if not c["ok"]}     # noqa: E731
    assert names(_result(0.6, 0.58, 0.5)) == {"dust-haze mIoU rises after v+1 (uncertainty samples)"}
    assert names(_result(0.6, 0.7, 0.75)) == {"uncertainty samples beat random ones at the same byte budget"}
    assert names(_result(0.6, 0.7, 0.65, bytes_=(100, 90))) == {"both selections downlinked the same learning bytes"}
    assert len(names(_result(0.6, 0.7, 0.65, within=False))) == 1


def test_cli_help_names_the_loop():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "eoedge", "loop", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0 and "--redistil-steps" in out.stdout
