"""The teacher cache: the teacher runs once per (image, augmentation); the second pass reads disk."""
import numpy as np
import torch

from ground.data.augment import dihedral
from ground.data.normalization import Normalization
from ground.data.sample import Sample
from ground.models.tiny_unet import TinyUNet
from ground.teachers.cache import TeacherCache
from ground.teachers.torch_teacher import TorchTeacher


class Counting(TorchTeacher):
    calls = 0

    def predict_proba(self, image):
        type(self).calls += 1
        return super().predict_proba(image)


def _teacher():
    torch.manual_seed(0)
    norm = Normalization(("B02", "B03", "B04"), (0.1, 0.1, 0.1), (0.05, 0.05, 0.05))
    return Counting(TinyUNet(3, 3, widths=(4, 8)), norm, "tiny", tile=32, overlap=8)


def test_second_pass_hits_and_returns_the_same_views(tmp_path):
    teacher = _teacher()
    rng = np.random.default_rng(0)
    samples = [Sample(rng.random((3, 40, 36), dtype=np.float32) * 0.3, name=f"s{i}") for i in range(2)]
    cache = TeacherCache(tmp_path, teacher)
    first = {(i, k): cache.probs(s, k) for i, s in enumerate(samples) for k in (0, 1, 5)}
    assert cache.misses == 6 and cache.hits == 0 and Counting.calls == 6
    again = TeacherCache(tmp_path, teacher)             # a new run, same teacher: all from disk
    for (i, k), p in first.items():
        np.testing.assert_array_equal(again.probs(samples[i], k), p)
    assert again.hits == 6 and again.misses == 0 and Counting.calls == 6
    # each entry is the teacher's output for that augmented view, in that view's frame
    p = first[(0, 1)]
    assert p.shape == (3, 36, 40) and p.dtype == np.float16
    np.testing.assert_allclose(p, teacher.predict_proba(dihedral(samples[0].image, 1)), atol=1e-3)


def test_another_teacher_or_image_misses(tmp_path):
    teacher = _teacher()
    s = Sample(np.full((3, 32, 32), 0.2, np.float32))
    cache = TeacherCache(tmp_path, teacher)
    cache.probs(s, 0)
    other = Sample(np.full((3, 32, 32), 0.3, np.float32))
    cache.probs(other, 0)
    assert cache.misses == 2
    torch.manual_seed(1)
    retrained = TorchTeacher(TinyUNet(3, 3, widths=(4, 8)), teacher.norm, "tiny", tile=32, overlap=8)
    assert TeacherCache(tmp_path, retrained).path_for(s, 0) != cache.path_for(s, 0)
