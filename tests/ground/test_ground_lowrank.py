"""ground.compression.lowrank and the lowrank stage: at full rank the factorised model computes what
the original does, energy and MACs targets shrink it as asked, the head and depthwise/1x1 convs stay,
a checkpoint round trip through the one load_model (pruned first, too) gives the same outputs, the
model exports to OpenVINO, bad arguments are named; the stage writes lowrank/NAME.pt with lineage
on a small generated run (no ../shared/data)."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from shared.errors import EoedgeError
from ground.cli import main
from ground.compression.lowrank import LowRankConv, apply_ranks, candidates, factorise
from ground.compression.pruning.plan import prune_to_target
from ground.data.normalization import Normalization
from ground.errors import CheckpointError, ConfigError, StageError
from ground.models.checkpoints import build_arch, load_model, save_checkpoint
from ground.models.size import measure
from ground.models.tiny_unet import TinyUNet
from ground.openvino.export import export_openvino
from ground.stages.export import export
from ground.stages.lowrank import lowrank
from ground.stages.run import Run
from mini_run import make_run  # noqa: E402  (tests/ground/mini_run.py)

warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BANDS = ["B02", "B03", "B04", "B08", "B11", "B12"]
ARCH = {"name": "tiny-unet", "in_channels": 6, "num_classes": 3, "options": {"widths": [8, 16, 32, 64]}}
NORM = Normalization(tuple(BANDS), (0.2,) * 6, (0.15,) * 6)


def _trained_like(model: nn.Module) -> nn.Module:
    """BatchNorm statistics and affines away from their init, so BN is not the identity."""
    torch.manual_seed(0)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return _trained_like(build_arch(ARCH))


@pytest.fixture(scope="module")
def example():
    return torch.randn(1, 6, 32, 32, generator=torch.Generator().manual_seed(1))


def test_full_rank_computes_what_the_original_does(student, example):
    convs, _ = candidates(student, example)
    full = {n: min(c.out_channels, c.weight[0].numel()) for n, c in convs.items()}
    model = apply_ranks(copy.deepcopy(student), full, weights=True).eval()
    assert sum(isinstance(m, LowRankConv) for m in model.modules()) == len(full) == 14
    with torch.no_grad():
        assert (model(example) - student(example)).abs().max() < 1e-4
    # an empty factorisation changes nothing
    assert str(apply_ranks(copy.deepcopy(student), {})) == str(student)


def test_energy_reduces_the_macs(student, example):
    before = {k: v.clone() for k, v in student.state_dict().items()}
    res = factorise(student, example, energy=0.5)
    assert res.after.macs < 0.8 * res.before.macs and res.after.params < res.before.params
    assert res.after == measure(res.model, example)                     # the one counter
    assert res.ranks and all(1 <= r < res.layers[n]["full_rank"] for n, r in res.ranks.items())
    assert all(res.layers[n]["energy_kept"] >= 0.5 for n in res.ranks)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())     # a copy
    with torch.no_grad():
        assert res.model(example).shape == (1, 3, 32, 32)
    # more energy, more rank
    more = factorise(student, example, energy=0.8)
    assert all(more.ranks.get(n, 10 ** 6) >= r for n, r in res.ranks.items())


def test_round_to_rounds_ranks_up_and_keeps_the_energy(student, example):
    res = factorise(student, example, energy=0.5, round_to=8)
    assert res.ranks and all(r % 8 == 0 for r in res.ranks.values())
    assert all(res.layers[n]["energy_kept"] >= 0.5 for n in res.ranks)
    # a rank rounded up to the full rank saves nothing: that layer is left whole and says why
    assert any("saves no MACs" in why for why in res.skipped.values())
    met = factorise(student, example, macs_target=0.5, round_to=4)
    assert met.after.macs <= 0.5 * met.before.macs and all(r % 4 == 0 for r in met.ranks.values())
    # multiples of 8 leave the 8-channel full-resolution layers whole: half the MACs is out of reach
    with pytest.raises(StageError, match="out of reach: the lowest ranks \\(multiples of round_to=8\\)"):
        factorise(student, example, macs_target=0.5, round_to=8)


def test_a_macs_target_is_met(student, example):
    for target in (0.5, 0.3):
        res = factorise(student, example, macs_target=target)
        assert res.after.macs <= target * res.before.macs
        assert measure(res.model, example).macs == res.after.macs
        # the energy chosen is the largest that meets it: a little more breaks the budget
        assert factorise(student, example, energy=res.energy + 1e-9).after.macs > target * res.before.macs
    with pytest.raises(StageError, match="macs_target out of reach"):
        factorise(student, example, macs_target=0.001)


def test_head_depthwise_and_1x1_convs_are_never_factorised(example):
    torch.manual_seed(0)
    model = _trained_like(TinyUNet(6, 3, (8, 16, 32, 64), separable=True))
    res = factorise(model, example, energy=0.3)
    assert "head" not in res.ranks and res.skipped["head"] == "output head"
    convs = dict(model.named_modules())
    for name in res.ranks:
        assert convs[name].groups == 1 and convs[name].kernel_size == (3, 3)
    depthwise = [n for n, m in convs.items() if isinstance(m, nn.Conv2d) and m.groups > 1]
    pointwise = [n for n, m in convs.items() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and n != "head"]
    assert depthwise and pointwise
    assert all(res.skipped[n] == "grouped/depthwise" for n in depthwise)
    assert all(res.skipped[n] == "1x1" for n in pointwise)
    assert set(res.ranks) == {"stem.0"}                  # the one full 3x3 conv of a separable TinyUNet
    assert isinstance(res.model.head, nn.Conv2d) and torch.equal(res.model.head.weight, model.head.weight)
    # the plain student's head is kept too
    plain = factorise(_trained_like(build_arch(ARCH)), example, energy=0.3)
    assert isinstance(plain.model.head, nn.Conv2d) and "head" not in plain.ranks


def test_checkpoint_round_trip_through_load_model(student, example, tmp_path):
    res = factorise(student, example, energy=0.6)
    path = save_checkpoint(tmp_path / "lr.pt", res.model, dict(ARCH, lowrank=res.ranks), NORM)
    model, _, meta = load_model(path)
    assert meta["arch"]["lowrank"] == res.ranks
    with torch.no_grad():
        assert torch.equal(model(example), res.model(example))
    # pruned first, then factorised: build_arch factorises, fit_to_state_dict shrinks the pruned widths
    pruned = prune_to_target(student, example, "lamp", 0.3, by="params", round_to=8).model
    both = factorise(pruned, example, energy=0.6)
    path = save_checkpoint(tmp_path / "both.pt", both.model, dict(ARCH, lowrank=both.ranks), NORM)
    model, _, _ = load_model(path)
    with torch.no_grad():
        assert torch.equal(model(example), both.model(example))
    # a checkpoint naming a layer the architecture lacks is refused, naming it
    bad = save_checkpoint(tmp_path / "bad.pt", res.model, dict(ARCH, lowrank={"nowhere.0": 3}), NORM)
    with pytest.raises(CheckpointError, match="'lowrank'.*'nowhere.0'"):
        load_model(bad)


def test_the_factorised_model_exports_to_openvino(student, example, tmp_path):
    res = factorise(student, example, macs_target=0.5)
    tiles = torch.randn(2, 6, 32, 32, generator=torch.Generator().manual_seed(2)).numpy()
    fp32 = export_openvino(res.model, tmp_path / "fp32", tiles=tiles, fp16=False, tile=32)
    assert fp32.parity["max_abs_diff"] < 1e-4 and fp32.parity["mask_agreement"] > 0.999
    fp16 = export_openvino(res.model, tmp_path / "fp16", tiles=tiles, tile=32)
    assert fp16.parity["max_abs_diff"] < 1e-2


@pytest.mark.parametrize("kwargs, match", [
    ({"energy": 1.5}, "energy must be in \\(0, 1\\], got 1.5"),
    ({"energy": 0.0}, "energy must be in \\(0, 1\\], got 0.0"),
    ({"energy": 0.9, "macs_target": 0.5}, "give one of energy or macs_target"),
    ({}, "give one of energy or macs_target"),
    ({"macs_target": 1.5}, "macs_target .* got 1.5"),
    ({"energy": 0.5, "round_to": 0}, "round_to must be a positive integer or None, got 0"),
])
def test_bad_arguments_are_named(student, example, kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        factorise(student, example, **kwargs)
    assert isinstance(err.value, EoedgeError) and err.value.code == "config_error"


# ---- the stage, on a small generated run ---------------------------------------------------------

@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    """A run folder as distillation leaves it, on generated imagery (tests/ground/mini_run.py)."""
    return make_run(tmp_path_factory.mktemp("lowrank-run"))


def test_stage_writes_a_factorised_checkpoint_with_lineage(mini_run):
    res = lowrank(Run.open(mini_run, progress=False), energy=0.5, finetune_steps=2)
    assert res["checkpoint"] == "lowrank/energy-50.pt" and res["macs_reduction"] > 0
    model, _, meta = load_model(mini_run / res["checkpoint"])
    assert meta["arch"]["lowrank"] == res["ranks"] and meta["lowrank"]["source"] == "student.pt"
    assert sum(p.numel() for p in model.parameters()) == res["after"]["params"]
    assert set(res["metrics"]) == {"original", "factorised", "fine_tuned"}
    assert all(0 <= v["miou"] <= 1 for v in res["metrics"].values())
    stages = json.loads((mini_run / "lineage.json").read_text())["stages"]
    rec = next(s for s in stages if s["stage"] == "lowrank:energy-50")
    assert rec["label_free"] is True and rec["inputs"] == {"checkpoint": "student.pt"}
    assert res["checkpoint"] in rec["outputs"] and rec["params"]["ranks"] == res["ranks"]
    # the next stages rebuild it from the checkpoint alone: export (IR parity on the run's imagery)
    exported = export(Run.open(mini_run, progress=False), res["checkpoint"], name="lr", evaluate=False)
    assert exported["parity"]["max_abs_diff"] < 1e-2


def test_cli_row_help_json_and_errors(mini_run, capsys):
    with pytest.raises(SystemExit) as e:
        main(["lowrank", "--help"])
    assert e.value.code == 0 and "--macs-target" in capsys.readouterr().out
    assert main(["lowrank", str(mini_run), "--macs-target", "0.5", "--finetune-steps", "0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["checkpoint"] == "lowrank/macs-50.pt" and res["after"]["macs"] <= 0.5 * res["before"]["macs"]
    assert main(["lowrank", str(mini_run), "--energy", "1.5", "--finetune-steps", "0"]) == 1
    assert "energy must be in (0, 1], got 1.5" in capsys.readouterr().err
    # one of the two, not both: a usage error
    assert main(["lowrank", str(mini_run), "--energy", "0.5", "--macs-target", "0.5"]) == 2
    assert "--macs-target: not allowed with argument --energy" in capsys.readouterr().err
