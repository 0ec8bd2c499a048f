"""TinyUNet: sizing to a budget, shapes, separable convolutions, clean OpenVINO export, pruning."""
import numpy as np
import pytest
import torch

from ground.models.registry import build_student
from ground.models.size import count_params
from ground.models.tiny_unet import TinyUNet, count_tiny_unet_params, parse_count


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


def _conv_macs_by_hand(model, x) -> int:
    """Multiply-accumulates of every convolution on `x`, counted from the layers' shapes."""
    total = []

    def hook(m, inputs, out):
        if isinstance(m, torch.nn.ConvTranspose2d):     # every input pixel meets the whole kernel
            n, cin = inputs[0].shape[0], inputs[0].shape[1]
            total.append(n * cin * inputs[0].shape[2] * inputs[0].shape[3] * m.out_channels // m.groups
                         * m.kernel_size[0] * m.kernel_size[1])
        else:
            total.append(out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1])
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    was = model.training
    with torch.no_grad():
        model.eval()(x)
    model.train(was)
    for h in handles:
        h.remove()
    return sum(total)


@pytest.mark.parametrize("upsample,separable", [("bilinear", False), ("transpose", False), ("bilinear", True)])
def test_one_counter_for_params_and_macs(upsample, separable):
    """measure() (what pruning and export record) and count_params/count_macs (what the size
    command and the report show) are one counter: they agree, and the MACs are the convolutions'."""
    from ground.models.size import ModelSize, count_macs, describe, measure
    m = TinyUNet(6, 3, widths=(8, 16, 32, 64), upsample=upsample, separable=separable)
    size = measure(m, torch.zeros(1, 6, 64, 64))
    assert size == ModelSize(count_params(m), count_macs(m, 6, 64))
    assert size.params == count_tiny_unet_params(6, 3, (8, 16, 32, 64), separable, upsample)
    assert size.macs == _conv_macs_by_hand(m, torch.zeros(1, 6, 64, 64))
    assert describe(m, 6, 64) == {"params": size.params, "macs": size.macs, "tile": 64}
    # MACs per tile scale with the tile's area (no per-tile constant hides in the count)
    assert count_macs(m, 6, 128) == 4 * size.macs
    assert m.training                                   # counting leaves the mode as it was
