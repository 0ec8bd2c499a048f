"""ground.compression.pruning: every criterion reaches its size target, the result runs and exports, the head
and the input stay as they were, round_to holds, iterative schedules and reloading work."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from ground.compression.pruning.criteria import CRITERIA, SWEEP_CRITERIA, get_criterion
from ground.compression.pruning.plan import conv_widths, prune_to_target, self_distillation_loss
from ground.compression.pruning.protection import protected_layers
from ground.data.normalization import Normalization
from ground.models.checkpoints import fit_to_state_dict, load_model, save_checkpoint
from ground.models.size import measure
from ground.models.tiny_unet import TinyUNet
from ground.openvino.export import export_openvino

warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)

WIDTHS = (8, 16, 32, 64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    m = TinyUNet(6, 3, WIDTHS).eval()
    # BN scales all equal 1 at init: give them a spread so bn-scale has something to rank
    with torch.no_grad():
        for bn in (x for x in m.modules() if isinstance(x, nn.BatchNorm2d)):
            bn.weight.uniform_(0.2, 1.5)
    return m


@pytest.fixture(scope="module")
def example():
    return torch.randn(1, 6, 32, 32, generator=torch.Generator().manual_seed(1))


def test_registry_has_the_six_criteria_of_the_study():
    assert {"random", "magnitude-l1", "magnitude-l2", "bn-scale", "fpgm", "taylor", "lamp"} <= set(CRITERIA)
    assert len(SWEEP_CRITERIA) == 6 and set(SWEEP_CRITERIA) <= set(CRITERIA)
    assert get_criterion("taylor").needs_gradients and not get_criterion("lamp").needs_gradients
    with pytest.raises(ValueError, match="unknown pruning criterion 'l3'.*magnitude-l1"):
        get_criterion("l3")


def test_head_is_found_without_being_named(student, example):
    assert protected_layers(student, example) == ["head"]


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_each_criterion_reaches_the_target_runs_and_exports(name, student, example, tmp_path):
    before_state = {k: v.clone() for k, v in student.state_dict().items()}
    res = prune_to_target(student, example, name, 0.4, by="params", round_to=8,
                          loss_fn=self_distillation_loss(example))
    assert res.reduction >= 0.4
    assert res.after.params == sum(p.numel() for p in res.model.parameters())
    assert res.after.params < 0.6 * res.before.params
    # the pruned model runs and keeps the output shape
    with torch.no_grad():
        out = res.model(example)
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    # the head is untouched: same weights, same classes
    assert torch.equal(res.model.head.weight, student.head.weight)
    assert torch.equal(res.model.head.bias, student.head.bias)
    # round_to: every pruned convolution keeps a multiple of 8 channels
    for layer, width in res.widths_after.items():
        if layer != "head":
            assert width % 8 == 0 and width >= 8, (layer, width)
    # the input is not modified
    assert all(torch.equal(v, before_state[k]) for k, v in student.state_dict().items())
    # and it exports to OpenVINO, which computes what torch does
    tiles = torch.randn(1, 6, 32, 32).numpy()
    exported = export_openvino(res.model, tmp_path, tiles=tiles, tile=32)
    assert exported.parity["max_abs_diff"] < 1e-2


def test_criteria_disagree_on_which_channels_to_keep(student, example):
    """Same target, different criteria: the surviving weights differ (the criterion matters)."""
    kept = {}
    for name in ("random", "magnitude-l1", "bn-scale"):
        res = prune_to_target(student, example, name, 0.4, round_to=8)
        kept[name] = res.model.down[2][0].weight.detach()
    assert kept["random"].shape == kept["magnitude-l1"].shape
    assert not torch.equal(kept["random"], kept["magnitude-l1"])
    assert not torch.equal(kept["magnitude-l1"], kept["bn-scale"])


def test_magnitude_drops_the_dead_channels_first(student, example):
    """Zero 32 of the 64 channels of one group (filter, BN, and the next layer's inputs): a
    magnitude criterion must prune those before any live channel."""
    import copy
    m = copy.deepcopy(student)
    dead = torch.arange(0, 64, 2)
    with torch.no_grad():
        m.down[2][0].weight[dead] = 0
        m.down[2][1].weight[dead] = 0
        m.down[2][1].bias[dead] = 0
        m.down[2][3].weight[:, dead] = 0
    res = prune_to_target(m, example, "magnitude-l1", 0.3, round_to=8)
    w = res.model.down[2][0].weight.detach()
    zero_filters = int((w.flatten(1).abs().sum(1) == 0).sum())
    assert w.shape[0] < 64
    assert zero_filters == max(0, w.shape[0] - 32)


def test_macs_target_and_round_to_4(student, example):
    res = prune_to_target(student, example, "lamp", 0.5, by="macs", round_to=4)
    assert res.as_dict()["macs_reduction"] >= 0.5
    assert all(w % 4 == 0 for n, w in res.widths_after.items() if n != "head")
    assert measure(res.model, example) == res.after


def test_global_scope_prunes_layers_unevenly(student, example):
    local = prune_to_target(student, example, "lamp", 0.5, scope="local", round_to=None)
    glob = prune_to_target(student, example, "lamp", 0.5, scope="global", round_to=None)
    share = lambda r: {n: r.widths_after[n] / r.widths_before[n] for n in r.widths_after if n != "head"}
    assert max(share(local).values()) - min(share(local).values()) < 0.1
    assert max(share(glob).values()) - min(share(glob).values()) > 0.1
    assert glob.reduction >= 0.5 and local.reduction >= 0.5


def test_iterative_schedule_fine_tunes_between_steps(student, example):
    calls = []

    def between(model, step):
        calls.append((step, sum(p.numel() for p in model.parameters())))

    res = prune_to_target(student, example, "magnitude-l2", 0.6, steps=3, between_steps=between, round_to=4)
    assert [c[0] for c in calls] == [1, 2]
    assert [s.target_reduction for s in res.steps] == pytest.approx([0.2, 0.4, 0.6])
    sizes = [s.size.params for s in res.steps]
    assert sizes[0] > sizes[1] > sizes[2] and calls[0][1] == sizes[0]
    assert res.reduction >= 0.6


def test_unreachable_target_and_bad_arguments_are_named(student, example):
    with pytest.raises(ValueError, match="cannot reach 99% fewer params.*at most"):
        prune_to_target(student, example, "magnitude-l1", 0.99, round_to=8)
    with pytest.raises(ValueError, match="target reduction"):
        prune_to_target(student, example, "magnitude-l1", 1.5)
    with pytest.raises(ValueError, match="by must be one of"):
        prune_to_target(student, example, "magnitude-l1", 0.3, by="flops")
    with pytest.raises(ValueError, match="round_to"):
        prune_to_target(student, example, "magnitude-l1", 0.3, round_to=0)
    with pytest.raises(ValueError, match="'taylor' needs a loss"):
        prune_to_target(student, example, "taylor", 0.3)


def test_pruned_weights_reload_into_a_fresh_architecture(student, example, tmp_path):
    res = prune_to_target(student, example, "fpgm", 0.4)
    rebuilt = fit_to_state_dict(TinyUNet(6, 3, WIDTHS), res.model.state_dict()).eval()
    assert conv_widths(rebuilt) == res.widths_after
    with torch.no_grad():
        assert torch.equal(rebuilt(example), res.model(example))
    norm = Normalization(("B02", "B03", "B04", "B08", "B11", "B12"), (0.1,) * 6, (0.2,) * 6)
    arch = {"name": "tiny-unet", "in_channels": 6, "num_classes": 3, "options": {"widths": list(WIDTHS)}}
    path = save_checkpoint(tmp_path / "pruned.pt", res.model, arch, norm)
    loaded, norm2, _ = load_model(path)
    with torch.no_grad():
        assert torch.equal(loaded(example), res.model(example))
    assert norm2.bands == norm.bands


def test_separable_student_with_depthwise_convs_prunes(example):
    torch.manual_seed(0)
    m = TinyUNet(6, 3, (16, 32, 64), separable=True).eval()
    res = prune_to_target(m, example, "magnitude-l1", 0.4)
    assert res.reduction >= 0.4
    with torch.no_grad():
        assert res.model(example).shape == (1, 3, 32, 32)
    # the head keeps its classes and bias; only inputs from pruned channels are gone
    head, orig = res.model.head, m.head
    assert head.out_channels == 3 and torch.equal(head.bias, orig.bias)
    assert head.in_channels < orig.in_channels
    for j in range(head.in_channels):
        assert any(torch.equal(head.weight[:, j], orig.weight[:, i]) for i in range(orig.in_channels))


def test_smp_teacher_head_is_protected():
    import segmentation_models_pytorch as smp
    torch.manual_seed(0)
    m = smp.Unet("mobilenet_v2", encoder_weights=None, decoder_channels=(32, 16, 16, 8, 8),
                 in_channels=6, classes=3).eval()
    x = torch.randn(1, 6, 32, 32)
    assert protected_layers(m, x) == ["segmentation_head.0"]
    res = prune_to_target(m, x, "lamp", 0.4, scope="global")
    assert res.reduction >= 0.4
    with torch.no_grad():
        assert res.model(x).shape == (1, 3, 32, 32)
    assert torch.equal(res.model.segmentation_head[0].weight, m.segmentation_head[0].weight)
