"""Feature distillation: hooks read named layers, adapters map student to teacher channels, the loss trains."""
import pytest
import torch

from ground.models.tiny_unet import TinyUNet
from ground.training.features import FeatureAdapters, FeatureHooks


def test_hooks_record_named_layers_and_detach():
    m = TinyUNet(6, 3, widths=(4, 8, 16))
    with FeatureHooks(m, ["up.0", "down.1"]) as h:
        m(torch.zeros(2, 6, 32, 32))
        assert h.features["up.0"].shape == (2, 8, 16, 16)      # decoder level at stride 2
        assert h.features["down.1"].shape == (2, 16, 8, 8)     # bottleneck at stride 4
    h.features.clear()
    m(torch.zeros(1, 6, 32, 32))
    assert h.features == {}                                   # removed on exit


def test_unknown_layer_is_named():
    with pytest.raises(ValueError, match=r"\['decoder.blocks.9'\] not found"):
        FeatureHooks(TinyUNet(6, 3, widths=(4, 8)), ["decoder.blocks.9"])


def test_adapters_size_themselves_and_train_the_student():
    torch.manual_seed(0)
    student = TinyUNet(6, 3, widths=(4, 8, 16))
    teacher = TinyUNet(6, 3, widths=(16, 32, 64)).eval().requires_grad_(False)
    x = torch.randn(2, 6, 32, 32)
    pairs_s, pairs_t = ["up.0", "up.1"], ["up.1", "up.0"]     # up.1 (stride 1) vs teacher up.0 (stride 2)
    adapters = FeatureAdapters.probe(student, pairs_s, teacher, pairs_t, x)
    assert [a.in_channels for a in adapters.adapters] == [8, 4]
    assert [a.out_channels for a in adapters.adapters] == [16, 32]
    hs, ht = FeatureHooks(student, pairs_s), FeatureHooks(teacher, pairs_t)
    opt = torch.optim.Adam(list(student.parameters()) + list(adapters.parameters()), lr=1e-2)
    losses = []
    for _ in range(15):
        student(x)
        with torch.no_grad():
            teacher(x)
        loss = adapters.loss(hs.features, ht.features)    # resolutions differ: compared at the teacher's
        opt.zero_grad()
        loss.backward()
        assert student.stem[0].weight.grad is not None and float(student.stem[0].weight.grad.abs().sum()) > 0
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_zero_when_adapted_student_features_equal_the_teacher():
    m = TinyUNet(6, 3, widths=(4, 8))
    x = torch.randn(1, 6, 16, 16)
    adapters = FeatureAdapters.probe(m, ["up.0"], m, ["up.0"], x)
    with torch.no_grad():                                   # identity 1x1 adapter
        adapters.adapters[0].weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        adapters.adapters[0].bias.zero_()
    with FeatureHooks(m, ["up.0"]) as h:
        m.eval()
        m(x)
        assert float(adapters.loss(h.features, h.features)) == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="pair one to one"):
        FeatureAdapters.probe(m, ["up.0"], m, ["up.0", "stem"], x)
