"""Devices and precision (ground.training.device): the device comes from config (auto = CUDA when
present, else the CPU), a device this machine lacks is refused naming the ones it has, bf16
autocast trains on the CPU, fp16 gets a grad scaler, out-of-memory names the batch size, and the
CLI says so in one line. Everything here runs without a GPU; what needs one is marked."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ground.config import parse_config
from ground.data.normalization import Normalization
from ground.data.sample import Sample
from ground.errors import ConfigError, DeviceError, DeviceOutOfMemory
from ground.teachers.torch_teacher import TorchTeacher
from ground.training.batches import BatchSampler
from ground.training.config import TrainConfig
from ground.training.device import Placement, out_of_memory, resolve_device, resolve_precision
from ground.training.loop import fit
from ground.training.losses import build_objective

REPO = Path(__file__).resolve().parents[2]
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


def test_auto_is_cuda_when_present_else_cpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_missing_gpu_is_refused_naming_what_there_is():
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match=r"no CUDA device.*here: cpu") as err:
            resolve_device(spec)
        assert err.value.code == "device_error" and err.value.exit_code == 1


def test_a_gpu_index_past_the_last_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceError, match=r"'cuda:5': this machine has 2 CUDA device\(s\) \(cuda:0, cuda:1\)"):
        resolve_device("cuda:5")


@pytest.mark.parametrize("spec", ["tpu", "gpu!", "mps"])
def test_unknown_device_names(spec):
    with pytest.raises(DeviceError, match=repr(spec)):
        resolve_device(spec)


def test_precision_names_and_fp16_on_cpu():
    with pytest.raises(DeviceError, match="fp8"):
        resolve_precision("fp8", torch.device("cpu"))
    with pytest.raises(DeviceError, match="fp16.*CUDA only"):
        resolve_precision("fp16", torch.device("cpu"))
    assert not Placement.of("cpu", "bf16").scaler().is_enabled()     # bf16 needs no scaler
    assert Placement.of("cpu", "fp32").batch(torch.ones(2), None)[1] is None


def test_config_keys_checked_before_work():
    raw = {"run": {"name": "x"}, "data": {"bands": ["B02"], "classes": ["a", "b"],
                                          "unlabelled": [{"source": "ukis"}]},
           "teacher": {"name": "ukis-csmask-6b-l1c"}, "student": {}, "experiment": [{"name": "e"}]}
    cfg = parse_config({**raw, "train": {"device": "cuda:1", "precision": "bf16", "workers": 4,
                                         "val_every": 50, "patience": 3, "validation": 0.2}})
    assert (cfg.train.device, cfg.train.precision, cfg.train.workers, cfg.train.patience) == ("cuda:1", "bf16", 4, 3)
    with pytest.raises(ConfigError, match="precision"):
        parse_config({**raw, "train": {"precision": "half"}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['devices'\]"):
        parse_config({**raw, "train": {"devices": "cpu"}})
    with pytest.raises(ConfigError, match="workers"):
        parse_config({**raw, "train": {"workers": -1}})


def _sampler(cfg):
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 0.5, (3, 64, 64)).astype(np.float32)
    return BatchSampler([Sample(image, (image[0] > 0.25).astype(np.uint8), "s")], cfg)


NORM = Normalization(("B02", "B03", "B04"), (0.25,) * 3, (0.15,) * 3)


def test_bf16_autocast_trains_on_the_cpu_and_returns_fp32_weights():
    cfg = TrainConfig(steps=8, batch=4, crop=32, lr=1e-2, device="cpu", precision="bf16", log_every=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    before = model[0].weight.detach().clone()
    history = fit(model, _sampler(cfg), build_objective("ce"), NORM, cfg, progress=False)
    assert all(np.isfinite(h["loss"]) for h in history) and history[-1]["loss"] < history[0]["loss"]
    assert model[0].weight.dtype == torch.float32 and not torch.equal(model[0].weight, before)


class Exploding(nn.Module):
    def forward(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_names_the_batch_size():
    with pytest.raises(DeviceOutOfMemory, match="batch size 64") as err:
        with out_of_memory(64, "teacher"):
            raise torch.OutOfMemoryError("CUDA out of memory")
    assert err.value.batch == 64 and err.value.code == "device_out_of_memory"
    with pytest.raises(RuntimeError, match="shape"):          # other errors pass through untouched
        with out_of_memory(64):
            raise RuntimeError("shape mismatch")
    cfg = TrainConfig(steps=2, batch=4, crop=32, device="cpu", precision="fp32")
    model = nn.Sequential(nn.Conv2d(3, 2, 1), Exploding())
    with pytest.raises(DeviceOutOfMemory, match="at batch size 4"):
        fit(model, _sampler(cfg), build_objective("ce"), NORM, cfg, progress=False)


def test_torch_teacher_labels_batched_on_its_device():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1))
    model.classes = 2
    image = np.random.default_rng(1).uniform(0, 0.5, (3, 80, 96)).astype(np.float32)
    a = TorchTeacher(model, NORM, "t", tile=32, overlap=8).predict_proba(image)
    b = TorchTeacher(model, NORM, "t", tile=32, overlap=8, device="auto", batch=32).predict_proba(image)
    assert a.shape == (2, 80, 96)
    np.testing.assert_allclose(a, b, atol=1e-3)


def test_cli_refuses_a_device_in_one_line(tmp_path):
    cfg = REPO / "configs" / "ukis_distill.toml"
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    done = subprocess.run([sys.executable, "-m", "eoedge", "ground", "run", str(cfg), "--device", "cuda:7",
                           "--out", str(tmp_path), "--json"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    doc = json.loads(done.stdout or done.stderr.strip().splitlines()[-1])
    assert doc["error"]["code"] == "device_error" and "cuda:7" in doc["error"]["message"]


@GPU
def test_cuda_autocast_step_and_channels_last():
    place = Placement.of("cuda", "auto")
    model = place.model(nn.Conv2d(3, 4, 3, padding=1))
    assert model.weight.is_contiguous(memory_format=torch.channels_last)
    (x,) = place.batch(torch.ones(2, 3, 16, 16))
    with place.autocast():
        y = model(x)
    assert y.dtype in (torch.bfloat16, torch.float16)
