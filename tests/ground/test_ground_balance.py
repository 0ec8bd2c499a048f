"""Rare-class help for label-free distillation: class-balanced crops, per-class weights of the
distillation term, and those weights counted on the teacher's masks (no human label)."""
import numpy as np
import pytest
import torch

from ground.data.augment import dihedral
from ground.data.normalization import class_weights
from ground.data.sample import Sample
from ground.training.batches import BatchSampler
from ground.training.config import TrainConfig
from ground.training.losses import build_objective, kl_divergence
from ground.training.sources import teacher_class_weights


def _rare_sample(h=96, w=96):
    """Class 2 is one 8x8 blob in a corner (<1% of pixels), class 1 the right half."""
    labels = np.zeros((h, w), np.uint8)
    labels[:, w // 2:] = 1
    labels[4:12, 4:12] = 2
    image = np.random.default_rng(0).random((3, h, w), dtype=np.float32)
    return Sample(image, labels, "rare")


class FakeCache:
    """Teacher probabilities = one-hot of a fixed mask (no teacher needed to test the plumbing)."""
    def __init__(self, mask, k=3):
        self.mask, self.k = mask, k

    def probs(self, sample, k=0):
        m = dihedral(self.mask, k)
        return np.eye(self.k, dtype=np.float16)[m].transpose(2, 0, 1)


def _share_with_rare(balance, n_batches=10):
    cfg = TrainConfig(batch=16, crop=32, balance=balance, augment=["flip", "rot90", "crop"], seed=3)
    sampler = BatchSampler([_rare_sample()], cfg)
    hits = 0
    for _ in range(n_batches):
        _x, _p, y = sampler()
        hits += int((y == 2).flatten(1).any(1).sum())
    return hits / (n_batches * cfg.batch)


def test_balanced_crops_show_the_rare_class_far_more_often():
    plain, balanced = _share_with_rare(0.0), _share_with_rare(1.0)
    # a 32-crop holds the 8x8 blob in ~3% of uniform windows; a class drawn uniformly 1/3 of the time
    assert plain < 0.15
    assert balanced > 0.3


def test_balanced_crops_follow_the_teacher_mask_when_there_are_no_labels():
    s = _rare_sample()
    unlabelled = Sample(s.image, None, "u")
    cfg = TrainConfig(batch=16, crop=32, balance=1.0, seed=1)
    sampler = BatchSampler([unlabelled], cfg, FakeCache(s.labels))
    np.testing.assert_array_equal(sampler.count_classes()[0], np.bincount(s.labels.ravel()))
    _x, p, _y = sampler()
    rare = p.argmax(1) == 2
    assert int(rare.flatten(1).any(1).sum()) >= 3


def test_balance_out_of_range_is_named():
    with pytest.raises(ValueError, match="balance"):
        TrainConfig(balance=1.5)


def test_kl_class_weights_make_the_rare_class_count_more():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(2, 3, 8, 8, generator=g), 1)
    logits = torch.randn(2, 3, 8, 8, generator=g)
    plain = kl_divergence(logits, p, 1.0)
    assert float(kl_divergence(logits, p, 1.0, torch.ones(3))) == pytest.approx(float(plain), rel=1e-6)
    # errors on pixels the teacher calls class 2 weigh 10x: the loss follows those pixels
    w = torch.tensor([1.0, 1.0, 10.0])
    weighted = kl_divergence(logits, p, 1.0, w)
    per_pixel = (p * (torch.log(p) - torch.log_softmax(logits, 1))).sum(1)
    expected = (per_pixel * (p * w.view(1, 3, 1, 1)).sum(1)).mean()
    assert float(weighted) == pytest.approx(float(expected), rel=1e-5)
    assert float(weighted) > float(plain)


@pytest.mark.parametrize("name", ["kl", "weighted-mse"])
def test_objectives_take_distill_weights(name):
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(3 * torch.randn(1, 3, 8, 8, generator=g), 1)
    logits = torch.zeros(1, 3, 8, 8)
    a, _ = build_objective(name)(logits, p, None)
    b, _ = build_objective(name, distill_weights=[1.0, 1.0, 5.0])(logits, p, None)
    assert float(b) > float(a)
    assert float(build_objective(name, distill_weights=[1.0, 1.0, 5.0])(torch.log(p), p, None)[0]) < 1e-5


def test_teacher_class_weights_are_counted_on_teacher_masks():
    s = _rare_sample()
    unlabelled = Sample(s.image, None, "u")
    w = teacher_class_weights([unlabelled], FakeCache(s.labels), 3, "log")
    assert w[2] > 5 * max(w[0], w[1])      # rarest on the teacher's mask weighs most
    np.testing.assert_allclose(w, class_weights([s], 3, "log"))    # as if the mask were labels
    assert teacher_class_weights([unlabelled], FakeCache(s.labels), 3, "none").tolist() == [1, 1, 1]
