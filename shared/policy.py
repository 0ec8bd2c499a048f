"""The keep/discard policy: rules as data, validated, evaluated from per-frame statistics.

A policy is plain JSON (it travels in the bundle manifest and in a `set_policy` command)::

    {"rules": [{"if": {"class": "cloud", "fraction_above": 0.7}, "then": "discard"},
               {"if": {"class": "ship", "largest_component_at_least": 20},
                "then": "keep", "priority": 1}],
     "default": {"then": "keep", "priority": 5}}

Rules are tried in order; the first whose conditions all hold decides. A rule's `if` names one
class and one or more conditions on it (all must hold). `priority` orders the downlink queue:
smaller is more urgent (1 goes before 5); a discard has no priority (0). Bounds (shared.limits):
priorities 0..2^31-1, counts and sizes 0..2^53-1, at most 256 rules, class names of at most 64
characters.

Statistics, computed on board for a frame or a tile::

    {"fractions": {class: fraction of pixels 0..1}, "components": {class: [sizes in pixels]}}

`components` is needed only for the classes named by component conditions
(`classes_needing_components(policy)`).

To add a condition kind, write one function below and decorate it with `@condition(...)`:
validation, evaluation, the reason text and the list of kinds all come from that registry.

An optional `learning` block asks the daemon to send a few of each frame's model tiles down as
learning samples (shared.samples), whatever the frame's decision::

    "learning": {"tiles": 2, "select": "uncertainty", "score": "entropy", "min_score": 0.0,
                 "priority": 9, "seed": 0}

`tiles` (1..64, required) samples per frame at most; `select` "uncertainty" (the `tiles`
highest-`score` tiles with score >= `min_score`) or "random" (`tiles` tiles drawn uniformly,
seeded by `seed` and the frame id: reproducible; score and min_score are not used); `score`
"entropy" or "ambiguous" (shared.samples.SCORES); `min_score` 0..1; `priority` of the SAMPLE
message (default 9); `seed` 0..2^53-1. `learning_block` fills the defaults, `choose_samples`
picks the tiles.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from shared.errors import PolicyError
from shared.limits import MAX_COUNT, MAX_NAME_CHARS, MAX_PRIORITY, MAX_RULES, quote
from shared.samples import SCORES, SELECTIONS

ACTIONS = ("keep", "discard")
DEFAULT_PRIORITY = 5
DEFAULT_POLICY: dict = {"rules": [], "default": {"then": "keep", "priority": DEFAULT_PRIORITY}}
MAX_LEARNING_TILES = 64                 # shared.messages.MAX_SAMPLES: one SAMPLE message's worth
LEARNING_DEFAULTS: dict = {"select": "uncertainty", "score": "entropy", "min_score": 0.0,
                           "priority": 9, "seed": 0}


@dataclass(frozen=True)
class Decision:
    keep: bool
    priority: int
    rule: int | None        # index of the rule that decided; None when the default did
    reason: str

    def as_dict(self) -> dict:
        return {"keep": self.keep, "priority": self.priority, "rule": self.rule,
                "reason": self.reason}


# ---------------------------------------------------------------------------------------------
# The registry of condition kinds
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConditionKind:
    name: str
    check: Callable[[Any, str], Any]           # (raw value, field path) -> normalised value
    holds: Callable[[Any, str, dict], tuple[bool, str]]  # (value, class, stats) -> (ok, detail)
    needs_components: bool
    doc: str


CONDITIONS: dict[str, ConditionKind] = {}


def condition(name: str, check: Callable[[Any, str], Any], needs_components: bool = False):
    """Register `holds(value, cls, stats) -> (bool, detail)` as the condition kind `name`."""
    def register(holds):
        CONDITIONS[name] = ConditionKind(name, check, holds, needs_components,
                                         (holds.__doc__ or "").strip())
        return holds
    return register


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fraction(value: Any, field: str) -> float:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise PolicyError(field, f"must be a number in 0..1, got {quote(value)}")
    return float(value)


def _count(value: Any, field: str, maximum: int = MAX_COUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PolicyError(field, f"must be an integer >= 0, got {quote(value)}")
    if value > maximum:
        raise PolicyError(field, f"must be <= {maximum}, got {quote(value)}")
    return value


def _count_or_spec(value: Any, field: str) -> dict:
    """`3` or `{"count": 3, "min_size": 10}` (components smaller than min_size are not counted)."""
    if isinstance(value, dict):
        unknown = set(value) - {"count", "min_size"}
        if unknown:
            raise PolicyError(f"{field}.{sorted(unknown)[0]}", "unknown field (expected count, min_size)")
        if "count" not in value:
            raise PolicyError(f"{field}.count", "missing")
        return {"count": _count(value["count"], f"{field}.count"),
                "min_size": _count(value.get("min_size", 1), f"{field}.min_size")}
    return {"count": _count(value, field), "min_size": 1}


def _fraction_of(cls: str, stats: dict) -> float:
    return stats["fractions"][cls]


def _components_of(cls: str, stats: dict) -> list:
    return stats["components"][cls]


@condition("fraction_above", _fraction)
def _fraction_above(value: float, cls: str, stats: dict) -> tuple[bool, str]:
    """the class covers more than this fraction of the pixels"""
    f = _fraction_of(cls, stats)
    return f > value, f"{cls} fraction {f:.3f} {'>' if f > value else '<='} {value:g}"


@condition("fraction_below", _fraction)
def _fraction_below(value: float, cls: str, stats: dict) -> tuple[bool, str]:
    """the class covers less than this fraction of the pixels"""
    f = _fraction_of(cls, stats)
    return f < value, f"{cls} fraction {f:.3f} {'<' if f < value else '>='} {value:g}"


@condition("largest_component_at_least", _count, needs_components=True)
def _largest_component_at_least(value: int, cls: str, stats: dict) -> tuple[bool, str]:
    """the largest connected component of the class has at least this many pixels"""
    largest = max(_components_of(cls, stats), default=0)
    ok = largest >= value
    return ok, f"largest {cls} component {largest} px {'>=' if ok else '<'} {value}"


@condition("components_at_least", _count_or_spec, needs_components=True)
def _components_at_least(value: dict, cls: str, stats: dict) -> tuple[bool, str]:
    """at least `count` connected components of the class (of at least `min_size` pixels)"""
    n = sum(1 for s in _components_of(cls, stats) if s >= value["min_size"])
    ok = n >= value["count"]
    size = f" of >= {value['min_size']} px" if value["min_size"] > 1 else ""
    return ok, f"{n} {cls} components{size} {'>=' if ok else '<'} {value['count']}"


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def _check_action(block: dict, field: str) -> None:
    then = block.get("then")
    if then not in ACTIONS:
        raise PolicyError(f"{field}.then", f"must be one of {', '.join(ACTIONS)}, got {quote(then)}")
    if "priority" in block:
        _count(block["priority"], f"{field}.priority", MAX_PRIORITY)


def _check_class(cls: Any, field: str, classes: Iterable[str] | None) -> None:
    if not isinstance(cls, str) or not cls or len(cls) > MAX_NAME_CHARS:
        raise PolicyError(field, f"must be a class name (a string of 1..{MAX_NAME_CHARS} "
                                 f"characters), got {quote(cls)}")
    if classes is not None and cls not in classes:
        raise PolicyError(field, f"unknown class {quote(cls)} (classes: {', '.join(classes)})")


def validate_policy(policy: Any, classes: Iterable[str] | None = None,
                    field: str = "policy") -> dict:
    """Check a policy; raise PolicyError naming the field (`policy.rules[1].if.class: ...`).

    With `classes` (the model's output classes) every class a rule names must be one of them.
    Returns the policy unchanged.
    """
    classes = list(classes) if classes is not None else None
    if not isinstance(policy, dict):
        raise PolicyError(field, f"must be an object, got {type(policy).__name__}")
    unknown = set(policy) - {"rules", "default", "learning"}
    if unknown:
        raise PolicyError(f"{field}.{sorted(unknown)[0]}",
                          "unknown field (expected rules, default, learning)")
    if "learning" in policy:
        validate_learning(policy["learning"], f"{field}.learning")
    rules = policy.get("rules", [])
    if not isinstance(rules, list):
        raise PolicyError(f"{field}.rules", "must be a list")
    if len(rules) > MAX_RULES:
        raise PolicyError(f"{field}.rules", f"more than {MAX_RULES} rules ({len(rules)})")
    for i, rule in enumerate(rules):
        rf = f"{field}.rules[{i}]"
        if not isinstance(rule, dict):
            raise PolicyError(rf, "must be an object with 'if' and 'then'")
        unknown = set(rule) - {"if", "then", "priority"}
        if unknown:
            raise PolicyError(f"{rf}.{sorted(unknown)[0]}", "unknown field (expected if, then, priority)")
        cond = rule.get("if")
        if not isinstance(cond, dict):
            raise PolicyError(f"{rf}.if", "missing or not an object")
        _check_class(cond.get("class"), f"{rf}.if.class", classes)
        kinds = [k for k in cond if k != "class"]
        if not kinds:
            raise PolicyError(f"{rf}.if", f"needs a condition: one of {', '.join(CONDITIONS)}")
        for k in kinds:
            if k not in CONDITIONS:
                raise PolicyError(f"{rf}.if.{k}",
                                  f"unknown condition (known: {', '.join(CONDITIONS)})")
            CONDITIONS[k].check(cond[k], f"{rf}.if.{k}")
        _check_action(rule, rf)
    default = policy.get("default", DEFAULT_POLICY["default"])
    if not isinstance(default, dict):
        raise PolicyError(f"{field}.default", "must be an object with 'then'")
    unknown = set(default) - {"then", "priority"}
    if unknown:
        raise PolicyError(f"{field}.default.{sorted(unknown)[0]}", "unknown field (expected then, priority)")
    _check_action(default, f"{field}.default")
    return policy


def validate_learning(block: Any, field: str = "policy.learning") -> dict:
    """Check a `learning` block (module docstring); raise PolicyError naming the field. Returns
    the block unchanged."""
    if not isinstance(block, dict):
        raise PolicyError(field, f"must be an object with 'tiles', got {type(block).__name__}")
    unknown = set(block) - {"tiles", *LEARNING_DEFAULTS}
    if unknown:
        raise PolicyError(f"{field}.{sorted(unknown)[0]}",
                          f"unknown field (expected tiles, {', '.join(LEARNING_DEFAULTS)})")
    if "tiles" not in block:
        raise PolicyError(f"{field}.tiles", f"missing (samples per frame, 1..{MAX_LEARNING_TILES})")
    if _count(block["tiles"], f"{field}.tiles", MAX_LEARNING_TILES) < 1:
        raise PolicyError(f"{field}.tiles", f"must be >= 1, got {block['tiles']}")
    for name, allowed in (("select", SELECTIONS), ("score", SCORES)):
        if name in block and block[name] not in allowed:
            raise PolicyError(f"{field}.{name}", f"must be one of {', '.join(allowed)}, "
                                                 f"got {quote(block[name])}")
    if "min_score" in block:
        _fraction(block["min_score"], f"{field}.min_score")
    if "priority" in block:
        _count(block["priority"], f"{field}.priority", MAX_PRIORITY)
    if "seed" in block:
        _count(block["seed"], f"{field}.seed")
    return block


def learning_block(policy: dict) -> dict | None:
    """A validated policy's `learning` block with its defaults filled in, or None."""
    block = policy.get("learning")
    return None if block is None else {**LEARNING_DEFAULTS, **block}


def _draw_key(seed: int, frame_id: str, index: int) -> bytes:
    return hashlib.sha256(f"{seed}:{frame_id}:{index}".encode()).digest()


def choose_samples(scores: Sequence[Sequence[float]], block: dict, frame_id: str) -> list[int]:
    """The indices of a frame's tiles to send as learning samples, in sending order.

    `scores`: per tile (in the inference grid's order) [entropy, ambiguous] (shared.samples.SCORES
    order); `block`: a validated `learning` block (defaults filled by `learning_block` or not).
    uncertainty: the `tiles` tiles of highest `score` with score >= `min_score`, highest first
    (ties: the earlier tile). random: `tiles` tiles drawn uniformly without replacement, whatever
    their score: those with the smallest SHA-256 of "<seed>:<frame_id>:<index>" (reproducible
    from (seed, frame_id) in any language), in that order."""
    block = {**LEARNING_DEFAULTS, **block}
    n, want = len(scores), int(block["tiles"])
    if block["select"] == "random":
        return sorted(range(n), key=lambda i: _draw_key(block["seed"], frame_id, i))[:want]
    column = SCORES.index(block["score"])
    values = [float(s[column]) for s in scores]
    eligible = [i for i in range(n) if math.isfinite(values[i]) and values[i] >= block["min_score"]]
    return sorted(eligible, key=lambda i: (-values[i], i))[:want]


def classes_needing_components(policy: dict) -> list[str]:
    """The classes whose connected-component sizes `evaluate` will ask for (in rule order)."""
    out: list[str] = []
    for rule in policy.get("rules", []):
        cond = rule["if"]
        if any(CONDITIONS[k].needs_components for k in cond if k != "class"):
            if cond["class"] not in out:
                out.append(cond["class"])
    return out


def _check_stats(policy: dict, stats: Any) -> None:
    if not isinstance(stats, dict) or not isinstance(stats.get("fractions"), dict):
        raise PolicyError("stats.fractions", "missing or not an object {class: fraction}")
    for rule in policy.get("rules", []):
        cond = rule["if"]
        cls = cond["class"]
        for k in cond:
            if k == "class":
                continue
            if CONDITIONS[k].needs_components:
                comps = stats.get("components")
                if not isinstance(comps, dict) or cls not in comps:
                    raise PolicyError(f"stats.components.{cls}", "missing (a rule counts its components)")
                if not isinstance(comps[cls], (list, tuple)) or not all(
                        _is_number(s) and s >= 0 for s in comps[cls]):
                    raise PolicyError(f"stats.components.{cls}", "must be a list of sizes >= 0")
            else:
                if cls not in stats["fractions"]:
                    raise PolicyError(f"stats.fractions.{cls}", "missing")
                _fraction(stats["fractions"][cls], f"stats.fractions.{cls}")


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

def _decision(action: dict, rule: int | None, detail: str, default_priority: int) -> Decision:
    keep = action["then"] == "keep"
    priority = action.get("priority", default_priority) if keep else 0
    where = "default" if rule is None else f"rule {rule}"
    outcome = f"keep (priority {priority})" if keep else "discard"
    return Decision(keep, priority, rule, f"{where}: {detail} -> {outcome}")


def evaluate(policy: dict, stats: dict) -> Decision:
    """The decision for one frame or tile: the first rule whose conditions all hold, else default.

    Validates the policy (no class list) and that `stats` has what the rules read.
    """
    validate_policy(policy)
    _check_stats(policy, stats)
    default = policy.get("default", DEFAULT_POLICY["default"])
    # a keep rule without a priority takes the default's
    default_priority = default.get("priority", DEFAULT_PRIORITY)
    for i, rule in enumerate(policy.get("rules", [])):
        cond = rule["if"]
        details = []
        for k in cond:
            if k == "class":
                continue
            kind = CONDITIONS[k]
            ok, detail = kind.holds(kind.check(cond[k], k), cond["class"], stats)
            if not ok:
                break
            details.append(detail)
        else:
            return _decision(rule, i, " and ".join(details), default_priority)
    n = len(policy.get("rules", []))
    return _decision(default, None, f"no rule matched (of {n})", default_priority)
