"""TinyUNet: sizing to a budget, shapes, separable convolutions, clean OpenVINO export, pruning."""
import numpy as np
import pytest
import torch

from ground.students import TinyUNet, build_student, count_params, count_tiny_unet_params, parse_count


@pytest.mark.parametrize("budget", ["50k", "100k", "120k", 300_000])
def test_for_budget_is_the_widest_net_under_the_budget(budget):
    n = parse_count(budget)
    m = TinyUNet.for_budget(6, 3, budget)
    assert count_params(m) <= n
    # one notch wider would not fit: the budget is used, not just respected
    wider = tuple(w + max(1, w // 8) for w in m.config["widths"])
    assert count_tiny_unet_params(6, 3, wider) > n * 0.97
    assert count_params(m) > 0.85 * n


def test_separable_fits_wider_widths_in_the_same_budget():
    plain = TinyUNet.for_budget(6, 3, "100k")
    sep = TinyUNet.for_budget(6, 3, "100k", separable=True)
    assert count_params(sep) <= 100_000
    assert sep.config["widths"][0] > plain.config["widths"][0]
    assert any(m.groups > 1 for m in sep.modules() if isinstance(m, torch.nn.Conv2d))


def test_widths_and_depth_shape_the_network():
    m = TinyUNet(13, 15, widths=(8, 16, 32, 64))
    assert m(torch.zeros(2, 13, 64, 64)).shape == (2, 15, 64, 64)
    m3 = TinyUNet(6, 3, widths=(4, 8, 16))
    assert m3(torch.zeros(1, 6, 32, 32)).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="multiple of 4"):
        m3(torch.zeros(1, 6, 30, 32))


def test_bad_budget_and_names_are_named():
    with pytest.raises(ValueError, match="not a parameter count"):
        parse_count("lots")
    with pytest.raises(ValueError, match="no TinyUNet"):
        TinyUNet.for_budget(6, 3, 500)
    with pytest.raises(ValueError, match="unknown student"):
        build_student("big-unet", 6, 3)
    assert parse_count("1.5M") == 1_500_000 and parse_count("100k") == 100_000


@pytest.mark.parametrize("upsample", ["bilinear", "transpose"])
def test_exports_to_openvino_and_infers_the_same(upsample):
    import openvino as ov
    torch.manual_seed(0)
    m = TinyUNet(6, 3, widths=(8, 16, 32), upsample=upsample).eval()
    x = torch.randn(1, 6, 64, 64)
    ir = ov.convert_model(m, example_input=x)
    ops = {op.get_type_name() for op in ir.get_ops()}
    assert "Concat" in ops and "MaxPool" in ops
    out = ov.Core().compile_model(ir, "CPU")(x.numpy())[0]
    with torch.no_grad():
        ref = m(x).numpy()
    # different convolution kernels (OpenVINO may use Winograd): float32 round-off only
    np.testing.assert_allclose(out, ref, atol=5e-3 * float(np.abs(ref).max()), rtol=1e-3)


def test_torch_pruning_follows_the_concatenated_skips():
    import torch_pruning as tp
    m = TinyUNet(6, 3, widths=(8, 16, 32, 64)).eval()
    x = torch.randn(1, 6, 64, 64)
    before = count_params(m)
    pruner = tp.pruner.BasePruner(m, x, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=0.3, ignored_layers=[m.head])
    pruner.step()
    assert count_params(m) < 0.75 * before
    assert m(x).shape == (1, 3, 64, 64)
