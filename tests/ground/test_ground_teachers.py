"""Teachers: the real ukis-csmask model through OpenVINO on real crops; smp teachers trained here from
labels (loss falls, checkpoints, exact resume)."""
import numpy as np
import pytest
import torch

from ground.data.dataset import Data
from ground.data.normalization import Normalization
from ground.data.sample import Sample
from ground.data.sources import load_source
from ground.evaluation.scores import scores
from ground.models.checkpoints import load_model, read_checkpoint, save_checkpoint
from ground.teachers.registry import build_teacher
from ground.training.teacher import train_smp_teacher

BANDS = ["B02", "B03", "B04", "B08", "B11", "B12"]


@pytest.fixture(scope="module")
def ukis():
    return build_teacher("ukis-csmask-6b-l1c")


def test_ukis_teacher_reads_its_json(ukis):
    assert ukis.bands == tuple(BANDS) and ukis.num_classes == 3 and ukis.tile == 256
    assert ukis.mean.ravel()[0] == pytest.approx(0.2755, abs=1e-4)
    with pytest.raises(ValueError, match="takes 6 bands"):
        ukis.predict_proba(np.zeros((4, 256, 256), np.float32))
    with pytest.raises(ValueError, match="unknown teacher 'cloudnet'"):
        build_teacher("cloudnet")
    with pytest.raises(ValueError, match=r"needs \['bands', 'mean', 'std', 'num_classes'\]"):
        build_teacher("openvino:model.onnx")


def test_ukis_teacher_agrees_with_human_labels_on_a_small_real_crop(ukis, data_root):
    [s] = load_source({"source": "ukis", "rows": [0, 128]}, BANDS)
    image, labels = s.image[:, :, :160], s.labels[:, :160]        # smaller than its 256 tile: padded
    probs = ukis.predict_proba(image)
    assert probs.shape == (3, 128, 160)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    pred = probs.argmax(0)
    assert (pred == labels).mean() > 0.8                           # clouds and shadows found, not noise
    assert len(np.unique(pred)) >= 2


def test_ukis_teacher_reproduces_its_published_score(ukis, data_root):
    """mIoU 0.776 / accuracy 0.910 on the held-out rows 256..511, tiled with overlap."""
    [held] = load_source({"source": "ukis", "rows": [256, 512]}, BANDS, role="eval")
    s = scores(ukis.predict_proba(held.image).argmax(0).astype(np.uint8), held.labels, 3)
    assert s["miou"] == pytest.approx(0.776, abs=0.005)
    assert s["accuracy"] == pytest.approx(0.910, abs=0.005)


def _tiny_data(data_root):
    [s] = load_source({"source": "ukis", "rows": [0, 96]}, BANDS)
    s = Sample(s.image[:, :, 150:310], s.labels[:, 150:310], "crop")   # clouds, shadows and clear
    return Data([], [s], None, Normalization.fit([s], BANDS))


def _cfg(tmp_path):
    from ground.config import parse_config
    return parse_config({
        "run": {"name": "t", "out": str(tmp_path)},
        "data": {"bands": BANDS, "classes": ["clear", "cloud", "shadow"], "class_weights": "inverse",
                 "labelled": [{"source": "ukis", "rows": [0, 96]}]},
        "teacher": {"name": "smp:Unet/resnet18"},
        "student": {"params": "30k"},
        "train": {"steps": 10, "batch": 4, "crop": 64, "lr": 3e-3, "checkpoint_every": 5, "log_every": 1},
        "experiment": [{"name": "x", "mode": "labels"}]})


def test_smp_teacher_trains_from_labels_and_resumes_exactly(data_root, tmp_path, monkeypatch):
    cfg, data = _cfg(tmp_path), _tiny_data(data_root)
    # a real smp Unet + ResNet-18 encoder, cut to 3 stages so the test stays quick
    spec, opts = "smp:Unet/resnet18", {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}
    full, hist = train_smp_teacher(cfg, data, tmp_path / "full.pt", spec, {}, opts, progress=False)
    first, last = np.mean([h["loss"] for h in hist[:3]]), np.mean([h["loss"] for h in hist[-3:]])
    assert last < first                                           # it learns
    assert read_checkpoint(tmp_path / "full.pt")["step"] == 10

    # stop after 5 steps, then resume to 10: the same weights as the uninterrupted run
    _interrupt_after(monkeypatch, cfg, data, tmp_path / "part.pt", spec, opts, stop=5)
    assert read_checkpoint(tmp_path / "part.pt")["step"] == 5
    resumed, hist2 = train_smp_teacher(cfg, data, tmp_path / "part.pt", spec, {}, opts, progress=False)
    assert read_checkpoint(tmp_path / "part.pt")["step"] == 10 and len(hist2) == 10
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    model, norm, meta = load_model(tmp_path / "full.pt")          # rebuildable from the file alone
    assert meta["arch"]["name"] == spec and norm.bands == tuple(BANDS)
    teacher = build_teacher(f"checkpoint:{tmp_path / 'full.pt'}")
    assert teacher.predict_proba(data.labelled[0].image).shape == (3, 96, 160)


def _interrupt_after(monkeypatch, cfg, data, path, spec, opts, stop):
    """Run the real loop but kill it (KeyboardInterrupt) right after the checkpoint at `stop`."""
    import ground.training.loop as loop          # the training loop saves through its own import

    def save_then_stop(*a, **kw):
        save_checkpoint(*a, **kw)
        if kw.get("step") == stop:
            raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(loop, "save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            train_smp_teacher(cfg, data, path, spec, {}, opts, progress=False)


def test_a_pruned_checkpoint_loads_as_a_teacher(tmp_path):
    """A pruned student is a teacher like any checkpoint (this failed with a size mismatch while
    two load_model disagreed): probabilities of the right shape, summing to one, equal to what
    the pruned model itself computes."""
    from ground.compression.pruning.plan import prune_to_target
    from ground.models.tiny_unet import TinyUNet
    from ground.teachers.torch_teacher import TorchTeacher
    torch.manual_seed(0)
    student = TinyUNet(6, 3, (8, 16, 32)).eval()
    example = torch.randn(1, 6, 32, 32, generator=torch.Generator().manual_seed(1))
    res = prune_to_target(student, example, "magnitude-l1", 0.4, round_to=4)
    assert res.widths_after != res.widths_before                  # really pruned: the shapes differ
    norm = Normalization(tuple(BANDS), (0.2,) * 6, (0.1,) * 6)
    arch = {"name": "tiny-unet", "in_channels": 6, "num_classes": 3, "options": {"widths": [8, 16, 32]}}
    path = save_checkpoint(tmp_path / "pruned.pt", res.model, arch, norm, meta={"name": "pruned-student"})
    image = np.random.default_rng(0).uniform(0, 0.5, (6, 40, 72)).astype(np.float32)
    teacher = build_teacher(f"checkpoint:{path}", tile=32, overlap=8)
    assert isinstance(teacher, TorchTeacher) and teacher.name == "pruned-student"
    assert teacher.bands == tuple(BANDS) and teacher.num_classes == 3
    probs = teacher.predict_proba(image)
    assert probs.shape == (3, 40, 72)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    crop = image[:, :32, :32]                                     # one whole tile: no blending
    with torch.no_grad():
        ref = torch.softmax(res.model(torch.from_numpy(norm.apply(crop)[None])), 1)[0].numpy()
    np.testing.assert_allclose(TorchTeacher.from_checkpoint(path, tile=32, overlap=0).predict_proba(crop), ref,
                               atol=1e-5)
