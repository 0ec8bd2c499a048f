"""ground.compression.fp16: FP16 emulation rounds and overflows where float16 does and FP32 does not; BN
folding is exact in FP32; FP16-aware training sees FP16 numbers and updates FP32 masters."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from ground.compression.fp16 import (FP16_MAX, emulate_fp16, fp16_aware, fp16_overflows, fuse_batchnorm, round_fp16,
                         round_fp16_ste)
from ground.models.tiny_unet import TinyUNet


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _identity_conv(scale: float = 1.0) -> nn.Sequential:
    conv = nn.Conv2d(1, 1, 1, bias=True)
    with torch.no_grad():
        conv.weight.fill_(scale)
        conv.bias.zero_()
    return nn.Sequential(conv)


def test_round_fp16_matches_ieee_half():
    x = torch.tensor([1.0, 1 + 2 ** -12, 2049.0, 70000.0, -70000.0, 1e-8, 0.1])
    y = round_fp16(x)
    assert y[0] == 1.0 and y[1] == 1.0                    # below half precision's resolution
    assert y[2] == 2048.0                                  # integers above 2048 are not all representable
    assert torch.isinf(y[3]) and y[3] > 0 and torch.isinf(y[4]) and y[4] < 0
    assert y[5] == 0.0                                     # underflow
    assert torch.equal(y, torch.from_numpy(x.numpy().astype(np.float16).astype(np.float32)))
    assert FP16_MAX == 65504.0


def test_emulation_overflows_where_fp32_does_not():
    model = _identity_conv(300.0).eval()
    x = torch.full((1, 1, 2, 2), 300.0)                   # 300 * 300 = 90000 > 65504
    with torch.no_grad():
        assert torch.isfinite(model(x)).all() and float(model(x)[0, 0, 0, 0]) == 90000.0
        assert torch.isinf(emulate_fp16(model)(x)).all()
        assert torch.isinf(emulate_fp16(model, "half")(x)).all()
    assert fp16_overflows(model, x) == {"0": 90000.0}
    assert fp16_overflows(model, x / 10) == {}


def test_emulation_rounds_activations_and_weights():
    model = _identity_conv(1.0).eval()
    x = torch.full((1, 1, 1, 1), 2049.0)
    with torch.no_grad():
        assert float(model(x)) == 2049.0
        assert float(emulate_fp16(model)(x)) == 2048.0
    # a weight below FP16 resolution is lost: 1 + 2^-12 acts as 1
    model = _identity_conv(1 + 2 ** -12).eval()
    x = torch.full((1, 1, 1, 1), 1024.0)
    with torch.no_grad():
        assert float(model(x)) == pytest.approx(1024.25)
        assert float(emulate_fp16(model)(x)) == 1024.0


def test_batchnorm_folding_is_exact_in_fp32_and_leaves_no_bn():
    torch.manual_seed(0)
    m = TinyUNet(6, 3, (8, 16, 32))
    m.train()
    with torch.no_grad():                                 # non-trivial running statistics
        for _ in range(3):
            m(torch.randn(2, 6, 32, 32) * 3 + 1)
    m.eval()
    fused = fuse_batchnorm(m)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in fused.modules())
    assert any(isinstance(x, nn.BatchNorm2d) for x in m.modules())     # original untouched
    x = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fused(x), m(x), atol=1e-4)


def test_emulated_fp16_differs_from_fp32_slightly_and_both_modes_agree():
    torch.manual_seed(0)
    m = TinyUNet(6, 3, (8, 16, 32)).eval()
    state = copy.deepcopy(m.state_dict())
    x = torch.randn(1, 6, 32, 32)
    with torch.no_grad():
        ref = m(x)
        rnd = emulate_fp16(m, "round")(x)
        half = emulate_fp16(m, "half")(x)
    d_round = float((rnd - ref).abs().max())
    assert 0 < d_round < 2e-2                   # rounding noise, not a different model
    assert float((half - rnd).abs().max()) < 2e-2
    # every output of the round emulation is a float16 number
    assert torch.equal(round_fp16(rnd), rnd)
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    with pytest.raises(ValueError, match="emulation mode"):
        emulate_fp16(m, "bf16")


def test_straight_through_rounding_passes_gradients():
    w = torch.tensor([1 + 2 ** -12, 3.0], requires_grad=True)
    y = round_fp16_ste(w)
    assert y[0].item() == 1.0
    (y * torch.tensor([2.0, 5.0])).sum().backward()
    assert torch.equal(w.grad, torch.tensor([2.0, 5.0]))


def test_fp16_aware_training_updates_fp32_masters_and_restores_the_model():
    torch.manual_seed(0)
    m = TinyUNet(6, 3, (8, 16))
    keys = list(m.state_dict())
    ids = sorted(id(p) for p in m.parameters())
    x = torch.randn(4, 6, 16, 16)
    target = (x[:, 0] > 0).long()                       # a learnable toy task
    start = copy.deepcopy(m.state_dict())
    losses = []
    with fp16_aware(m) as model:
        assert sorted(id(p) for p in model.parameters()) == ids   # an outside optimiser still works
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(15):
            out = model(x)
            assert torch.equal(round_fp16(out.detach()), out.detach())   # the forward is FP16
            loss = nn.functional.cross_entropy(out, target)
            opt.zero_grad()
            loss.backward()
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
            opt.step()
            losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert list(m.state_dict()) == keys                 # no parametrization keys left behind
    assert sorted(id(p) for p in m.parameters()) == ids
    changed = [k for k, v in m.state_dict().items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert changed
    # the masters stay FP32: small updates below FP16 resolution accumulate instead of vanishing
    w = m.stem[0].weight.detach()
    assert not torch.equal(round_fp16(w), w)
    m.eval()
    with torch.no_grad():
        y = m(x)                                        # outside the block: plain FP32 again
    assert not torch.equal(round_fp16(y), y)


def test_fp16_aware_with_the_ground_training_loop():
    """D's training loop (ground.training.loop.fit) runs unchanged inside the FP16-aware block."""
    from ground.data.normalization import Normalization
    from ground.data.sample import Sample
    from ground.training.batches import BatchSampler
    from ground.training.config import TrainConfig
    from ground.training.loop import fit
    from ground.training.losses import build_objective
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 0.5, (6, 32, 32)).astype(np.float32)
    labels = (image[0] > 0.25).astype(np.uint8)
    cfg = TrainConfig(steps=4, batch=2, crop=16, lr=1e-2, log_every=1, checkpoint_every=100)
    norm = Normalization(tuple("B02 B03 B04 B08 B11 B12".split()), (0.25,) * 6, (0.15,) * 6)
    torch.manual_seed(0)
    m = TinyUNet(6, 3, (8, 16))
    before = copy.deepcopy(m.state_dict())
    with fp16_aware(m):
        history = fit(m, BatchSampler([Sample(image, labels)], cfg), build_objective("ce"), norm, cfg,
                      progress=False)
    assert len(history) == 4 and all(np.isfinite(h["loss"]) for h in history)
    assert any(not torch.equal(v, before[k]) for k, v in m.state_dict().items() if v.is_floating_point())
    assert list(m.state_dict()) == list(before)
