"""The keep/discard policy: validation names the field, evaluation takes the first matching rule."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from shared import policy as P
from shared.policy import Decision, PolicyError, classes_needing_components, evaluate, validate_policy

BRIEF_POLICY = {
    "rules": [
        {"if": {"class": "cloud", "fraction_above": 0.7}, "then": "discard"},
        {"if": {"class": "ship", "largest_component_at_least": 20}, "then": "keep", "priority": 1},
    ],
    "default": {"then": "keep", "priority": 5},
}
CLASSES = ["clear", "cloud", "ship"]


def stats(cloud=0.1, ship=0.0, ships=()):
    return {"fractions": {"clear": 1 - cloud - ship, "cloud": cloud, "ship": ship},
            "components": {"ship": list(ships)}}


def test_cloudy_frame_is_discarded_by_rule_0():
    d = evaluate(BRIEF_POLICY, stats(cloud=0.82))
    assert d == Decision(keep=False, priority=0, rule=0, reason=d.reason)
    assert "cloud fraction 0.820 > 0.7" in d.reason and "discard" in d.reason


def test_a_large_ship_is_kept_with_priority_1():
    d = evaluate(BRIEF_POLICY, stats(ship=0.01, ships=[3, 25, 7]))
    assert (d.keep, d.priority, d.rule) == (True, 1, 1)
    assert "largest ship component 25 px >= 20" in d.reason


def test_nothing_matches_so_the_default_decides():
    d = evaluate(BRIEF_POLICY, stats(cloud=0.3, ships=[5, 19]))
    assert (d.keep, d.priority, d.rule) == (True, 5, None)
    assert d.reason.startswith("default: no rule matched (of 2)")


def test_first_matching_rule_wins():
    both = stats(cloud=0.9, ship=0.02, ships=[40])
    assert evaluate(BRIEF_POLICY, both).rule == 0
    swapped = copy.deepcopy(BRIEF_POLICY)
    swapped["rules"].reverse()
    assert (evaluate(swapped, both).keep, evaluate(swapped, both).rule) == (True, 0)


def test_thresholds_are_strict_and_components_default_to_none():
    assert evaluate(BRIEF_POLICY, stats(cloud=0.7)).keep            # 0.7 is not above 0.7
    assert not evaluate(BRIEF_POLICY, stats(cloud=0.7000001)).keep
    assert evaluate(BRIEF_POLICY, stats(ships=[20])).rule == 1       # at least: inclusive
    assert evaluate(BRIEF_POLICY, stats(ships=[])).rule is None      # no components: largest 0


def test_fraction_below_components_at_least_and_and_conditions():
    policy = {"rules": [
        {"if": {"class": "clear", "fraction_below": 0.05}, "then": "discard"},
        {"if": {"class": "ship", "components_at_least": {"count": 2, "min_size": 10}},
         "then": "keep", "priority": 2},
        {"if": {"class": "ship", "components_at_least": 3, "fraction_above": 0.001},
         "then": "keep", "priority": 3},
    ], "default": {"then": "discard"}}
    assert evaluate(policy, {"fractions": {"clear": 0.01, "ship": 0.0}, "components": {"ship": []}}).rule == 0
    two_big = evaluate(policy, stats(ship=0.01, ships=[12, 30, 2]))
    assert (two_big.rule, two_big.priority) == (1, 2) and "2 ship components of >= 10 px >= 2" in two_big.reason
    three_small = evaluate(policy, stats(ship=0.01, ships=[2, 3, 4]))
    assert (three_small.rule, three_small.priority) == (2, 3)
    assert "3 ship components >= 3 and ship fraction 0.010 > 0.001" in three_small.reason
    # both conditions of rule 2 must hold
    assert evaluate(policy, stats(ship=0.0, ships=[2, 3, 4])).rule is None
    assert evaluate(policy, stats(ship=0.0, ships=[2, 3, 4])).keep is False


def test_keep_rule_without_priority_takes_the_default_priority():
    policy = {"rules": [{"if": {"class": "cloud", "fraction_below": 0.2}, "then": "keep"}],
              "default": {"then": "keep", "priority": 7}}
    assert evaluate(policy, stats(cloud=0.1)).priority == 7
    assert evaluate({"rules": []}, stats()).as_dict() == {
        "keep": True, "priority": P.DEFAULT_PRIORITY, "rule": None,
        "reason": "default: no rule matched (of 0) -> keep (priority 5)"}


def test_stats_from_a_real_label_chip(data_root):
    # Fractions and components as the daemon computes them, from the real human labels.
    msk = np.load(data_root / "ukis_csmask_s2" / "sentinel2.npz")["msk"][..., 0]
    cloud = float((msk == 4).mean())
    s = {"fractions": {"clear": float(np.isin(msk, (1, 2, 3)).mean()), "cloud": cloud,
                      "ship": 0.0}, "components": {"ship": []}}
    assert 0.1 < cloud < 0.3                              # 49597 / 262144 cloud pixels
    assert evaluate(BRIEF_POLICY, s).keep
    strict = copy.deepcopy(BRIEF_POLICY)
    strict["rules"][0]["if"]["fraction_above"] = round(cloud - 0.01, 3)
    assert evaluate(strict, s).rule == 0


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p["rules"][1]["if"].update({"class": "shipp"}),
     "policy.rules[1].if.class: unknown class 'shipp'"),
    (lambda p: p["rules"][0]["if"].update({"fraction_above": 1.5}),
     "policy.rules[0].if.fraction_above: must be a number in 0..1"),
    (lambda p: p["rules"][0]["if"].update({"fraction_abov": 0.5}),
     "policy.rules[0].if.fraction_abov: unknown condition"),
    (lambda p: p["rules"][1]["if"].update({"largest_component_at_least": -1}),
     "policy.rules[1].if.largest_component_at_least: must be an integer >= 0"),
    (lambda p: p["rules"][1]["if"].update({"largest_component_at_least": 2.5}),
     "policy.rules[1].if.largest_component_at_least: must be an integer >= 0"),
    (lambda p: p["rules"][0]["if"].pop("fraction_above"), "policy.rules[0].if: needs a condition"),
    (lambda p: p["rules"][0]["if"].pop("class"), "policy.rules[0].if.class: must be a class name"),
    (lambda p: p["rules"][0].update({"then": "maybe"}), "policy.rules[0].then: must be one of keep, discard"),
    (lambda p: p["rules"][1].update({"priority": -1}), "policy.rules[1].priority: must be an integer >= 0"),
    (lambda p: p["rules"][1].update({"when": 1}), "policy.rules[1].when: unknown field"),
    (lambda p: p["rules"].append("discard"), "policy.rules[2]: must be an object"),
    (lambda p: p["default"].update({"then": None}), "policy.default.then: must be one of"),
    (lambda p: p.update({"rules": {}}), "policy.rules: must be a list"),
    (lambda p: p.update({"rule": []}), "policy.rule: unknown field"),
    (lambda p: p["rules"][1]["if"].update({"components_at_least": {"min_size": 3}}),
     "policy.rules[1].if.components_at_least.count: missing"),
])
def test_validation_names_the_field(mutate, message):
    p = copy.deepcopy(BRIEF_POLICY)
    mutate(p)
    with pytest.raises(PolicyError) as exc:
        validate_policy(p, classes=CLASSES)
    assert str(exc.value).startswith(message), str(exc.value)
    assert exc.value.field == message.split(":")[0]


def test_without_a_class_list_any_class_name_is_accepted():
    p = copy.deepcopy(BRIEF_POLICY)
    p["rules"][1]["if"]["class"] = "boat"
    assert validate_policy(p) is p
    with pytest.raises(PolicyError, match="unknown class 'boat'"):
        validate_policy(p, classes=CLASSES)


def test_stats_missing_what_a_rule_reads():
    with pytest.raises(PolicyError, match=r"^stats.components.ship: missing"):
        evaluate(BRIEF_POLICY, {"fractions": {"cloud": 0.1}})
    with pytest.raises(PolicyError, match=r"^stats.fractions.cloud: missing"):
        evaluate(BRIEF_POLICY, {"fractions": {}, "components": {"ship": []}})
    with pytest.raises(PolicyError, match=r"^stats.fractions.cloud: must be a number in 0..1"):
        evaluate(BRIEF_POLICY, stats(cloud=float("nan")))
    with pytest.raises(PolicyError, match=r"^stats.fractions: missing"):
        evaluate(BRIEF_POLICY, {})


def test_classes_needing_components():
    assert classes_needing_components(BRIEF_POLICY) == ["ship"]
    assert classes_needing_components({"rules": []}) == []


def test_a_new_condition_kind_is_one_registration(monkeypatch):
    monkeypatch.setattr(P, "CONDITIONS", dict(P.CONDITIONS))

    def check(value, field):
        if not isinstance(value, list) or len(value) != 2:
            raise PolicyError(field, "must be [low, high]")
        return [P._fraction(v, f"{field}[{i}]") for i, v in enumerate(value)]

    @P.condition("fraction_between", check)
    def _between(value, cls, s):
        f = s["fractions"][cls]
        return value[0] < f < value[1], f"{cls} fraction {f:.2f} in ({value[0]}, {value[1]})"

    policy = {"rules": [{"if": {"class": "cloud", "fraction_between": [0.2, 0.4]},
                         "then": "keep", "priority": 2}]}
    d = evaluate(policy, stats(cloud=0.3))
    assert (d.rule, d.priority) == (0, 2) and "cloud fraction 0.30 in (0.2, 0.4)" in d.reason
    assert evaluate(policy, stats(cloud=0.5)).rule is None
    with pytest.raises(PolicyError, match=r"policy.rules\[0\].if.fraction_between\[1\]: must be"):
        validate_policy({"rules": [{"if": {"class": "cloud", "fraction_between": [0.2, 4]},
                                    "then": "keep"}]})
