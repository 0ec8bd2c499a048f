"""The policy's `learning` block (issue 17): validation naming the field, and the choice of
learning samples from a frame's tile scores (uncertainty, or a reproducible random draw)."""
from __future__ import annotations

import hashlib

import pytest

from shared.errors import ManifestError
from shared.manifest import make_manifest, validate_manifest
from shared.policy import (LEARNING_DEFAULTS, PolicyError, choose_samples, learning_block,
                           validate_policy)

BASE = {"rules": [], "default": {"then": "keep", "priority": 5}}
FULL = {"tiles": 2, "select": "uncertainty", "score": "entropy", "min_score": 0.0, "priority": 9, "seed": 0}


def with_learning(block) -> dict:
    return {**BASE, "learning": block}


def test_a_full_block_and_a_minimal_one_are_valid():
    assert validate_policy(with_learning(FULL))["learning"] == FULL
    assert learning_block(with_learning({"tiles": 1})) == {**LEARNING_DEFAULTS, "tiles": 1}
    assert learning_block(BASE) is None
    validate_policy(with_learning({**FULL, "select": "random", "score": "ambiguous", "min_score": 1}))


@pytest.mark.parametrize("block,field,words", [
    ([2], "policy.learning", "object"),
    ({}, "policy.learning.tiles", "missing"),
    ({"tiles": 0}, "policy.learning.tiles", ">= 1"),
    ({"tiles": 65}, "policy.learning.tiles", "<= 64"),
    ({"tiles": 2.0}, "policy.learning.tiles", "integer"),
    ({"tiles": True}, "policy.learning.tiles", "integer"),
    ({"tiles": 2, "select": "best"}, "policy.learning.select", "uncertainty, random"),
    ({"tiles": 2, "score": "margin"}, "policy.learning.score", "entropy, ambiguous"),
    ({"tiles": 2, "min_score": 1.5}, "policy.learning.min_score", "0..1"),
    ({"tiles": 2, "min_score": float("nan")}, "policy.learning.min_score", "0..1"),
    ({"tiles": 2, "priority": -1}, "policy.learning.priority", ">= 0"),
    ({"tiles": 2, "priority": 2 ** 31}, "policy.learning.priority", "<="),
    ({"tiles": 2, "seed": 2 ** 64}, "policy.learning.seed", "<="),
    ({"tiles": 2, "seed": "7"}, "policy.learning.seed", "integer"),
    ({"tiles": 2, "budget": 10}, "policy.learning.budget", "unknown field"),
])
def test_bad_blocks_are_refused_naming_the_field(block, field, words):
    with pytest.raises(PolicyError) as err:
        validate_policy(with_learning(block))
    assert err.value.field == field and words in str(err.value)


def test_a_manifest_policy_with_a_bad_learning_block_is_refused(tmp_path):
    files = {}
    for name in ("model.xml", "model.bin", "reference.npz"):
        files[name] = tmp_path / name
        files[name].write_bytes(name.encode())
    manifest = make_manifest(model_id="m", version=1, bands=["B02"], mean=[0.1], std=[0.1],
                             classes=["clear", "cloud"], tile_size=64, overlap=8,
                             policy=with_learning({"tiles": 2}), files=files)
    validate_manifest(manifest)
    manifest["policy"]["learning"]["select"] = "most"
    with pytest.raises(ManifestError, match=r"policy\.learning\.select"):
        validate_manifest(manifest)


SCORES = [[0.1, 0.9], [0.8, 0.0], [0.5, 0.5], [0.8, 0.2], [0.05, 0.7], [0.3, 0.1]]


def test_uncertainty_takes_the_highest_scores_above_min_score():
    assert choose_samples(SCORES, {"tiles": 3}, "f") == [1, 3, 2]           # tie: the earlier tile
    assert choose_samples(SCORES, {"tiles": 2, "score": "ambiguous"}, "f") == [0, 4]
    assert choose_samples(SCORES, {"tiles": 5, "min_score": 0.5}, "f") == [1, 3, 2]
    assert choose_samples(SCORES, {"tiles": 2, "min_score": 0.95}, "f") == []
    assert choose_samples(SCORES, {"tiles": 64}, "f") == [1, 3, 2, 5, 0, 4]
    assert choose_samples([], {"tiles": 2}, "f") == []


def test_random_is_reproducible_uniform_and_not_the_uncertainty_choice():
    block = {"tiles": 2, "select": "random", "seed": 7}
    first = choose_samples(SCORES, block, "frame-1")
    assert choose_samples(SCORES, block, "frame-1") == first and len(first) == 2 == len(set(first))
    # the documented draw: the smallest SHA-256 of "<seed>:<frame_id>:<index>"
    key = lambda i: hashlib.sha256(f"7:frame-1:{i}".encode()).digest()      # noqa: E731
    assert first == sorted(range(len(SCORES)), key=key)[:2]
    draws = [tuple(choose_samples(SCORES, block, f"frame-{i}")) for i in range(200)]
    assert len(set(draws)) > 10
    assert choose_samples(SCORES, {**block, "seed": 8}, "frame-1") != first or \
        choose_samples(SCORES, {**block, "seed": 9}, "frame-1") != first
    # every tile drawn about as often (uniform), whatever its score; unlike uncertainty's
    counts = [sum(i in d for d in draws) for i in range(len(SCORES))]
    assert min(counts) > 40 and max(counts) < 95, counts
    uncertain = tuple(choose_samples(SCORES, {"tiles": 2}, "frame-1"))
    assert sum(d == uncertain for d in draws) < 30
    # min_score does not limit a random draw
    assert len(choose_samples(SCORES, {**block, "min_score": 1.0}, "frame-1")) == 2
