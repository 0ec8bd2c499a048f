"""Distillation objectives: zero when the student equals the teacher, gradients flow, labels mix in."""
import pytest
import torch

from ground.data.sample import IGNORE
from ground.training.losses import LOSSES, build_objective, cross_entropy, kl_divergence, weighted_mse


def _teacher(n=2, k=3, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(n, k, h, w, generator=g), 1)


@pytest.mark.parametrize("name,opts", [("kl", {"temperature": 1.0}), ("kl", {"temperature": 4.0}),
                                       ("weighted-mse", {"class_weights": [0.5, 1.0, 4.0]})])
def test_zero_when_student_matches_teacher(name, opts):
    p = _teacher()
    logits = torch.log(p)              # softmax(log p) == p
    loss, parts = build_objective(name, **opts)(logits, p, None)
    assert abs(float(loss)) < 1e-5
    assert parts["distill"] == pytest.approx(float(loss), abs=1e-6)


@pytest.mark.parametrize("name", ["kl", "weighted-mse"])
def test_positive_and_gradients_flow_when_they_differ(name):
    p = _teacher()
    logits = torch.zeros_like(p, requires_grad=True)
    loss, _ = build_objective(name)(logits, p, None)
    assert float(loss.detach()) > 1e-3
    loss.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0
    # a gradient step moves the student towards the teacher
    with torch.no_grad():
        moved = logits - 5.0 * logits.grad
    assert float(build_objective(name)(moved, p, None)[0]) < float(loss)


def test_temperature_scales_as_hinton():
    p = _teacher()
    logits = torch.randn_like(p)
    # T^2 KL at T: softer targets, but the T^2 factor keeps the gradient scale comparable
    assert float(kl_divergence(logits, p, 1.0)) != pytest.approx(float(kl_divergence(logits, p, 3.0)))
    assert float(kl_divergence(logits, p, 3.0)) >= 0


def test_class_weights_weigh_the_error():
    p = _teacher()
    logits = torch.zeros_like(p)
    base = float(weighted_mse(logits, p))
    heavy = float(weighted_mse(logits, p, torch.tensor([1.0, 1.0, 10.0])))
    assert heavy > base


def test_ce_mixing_uses_labels_where_they_exist():
    p = _teacher()
    logits = torch.log(p).clone().requires_grad_(True)
    labels = torch.full(p.shape[:1] + p.shape[2:], IGNORE, dtype=torch.long)
    obj = build_objective("kl", ce_weight=0.5)
    loss_unlabelled, parts = obj(logits, p, labels)
    assert float(loss_unlabelled) == pytest.approx(0.0, abs=1e-5) and parts["ce"] == 0.0
    labels[:, :4] = 2                  # label half the pixels "shadow"
    loss, parts = obj(logits, p, labels)
    assert parts["ce"] > 0 and float(loss) == pytest.approx(0.5 * parts["ce"], rel=1e-4)
    loss.backward()
    assert float(logits.grad.abs().sum()) > 0


def test_cross_entropy_from_scratch_and_errors():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    labels = torch.randint(0, 3, (1, 4, 4))
    loss, parts = build_objective("ce")(logits, None, labels)
    assert parts["ce"] > 0
    assert float(cross_entropy(logits, torch.full_like(labels, IGNORE))) == 0.0
    with pytest.raises(ValueError, match="unknown distillation loss 'l2'"):
        build_objective("l2")
    with pytest.raises(ValueError, match="ce_weight"):
        build_objective("kl", ce_weight=2)
    with pytest.raises(ValueError, match="weighted-mse"):
        build_objective("weighted-mse", temperature=2)
    with pytest.raises(ValueError, match="needs teacher outputs"):
        build_objective("kl")(logits, None, labels)
    assert set(LOSSES) >= {"kl", "weighted-mse", "ce"}
