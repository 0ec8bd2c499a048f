"""A processing ground sampling distance on the ground side (`data.gsd_m`): imagery and labels
binned as the daemon bins frames, the run config checked, the manifest told."""
from __future__ import annotations

import numpy as np
import pytest

from ground.config import parse_config
from ground.data.dataset import load_data
from ground.data.sample import IGNORE, Sample, bin_sample
from ground.errors import ConfigError

BANDS = ["B02", "B03", "B04", "B08", "B11", "B12"]


def config(tmp_path, **data) -> dict:
    return {"run": {"name": "gsd", "out": str(tmp_path)},
            "data": {"bands": BANDS, "classes": ["clear", "cloud", "shadow"], **data},
            "teacher": {"name": "ukis-csmask-6b-l1c"}, "student": {"name": "tiny-unet", "params": "10k"},
            "experiment": [{"name": "d", "mode": "distill"}]}


def test_gsd_m_is_a_whole_multiple_of_10_m(tmp_path):
    scene = [{"source": "scene", "path": "x.npz"}]
    assert parse_config(config(tmp_path, unlabelled=scene)).gsd_factor == 1
    cfg = parse_config(config(tmp_path, unlabelled=scene, gsd_m=20))
    assert cfg.gsd_m == 20.0 and cfg.gsd_factor == 2
    for bad in (15, 0, -10, "20", True, 200):
        with pytest.raises(ConfigError, match="data.gsd_m"):
            parse_config(config(tmp_path, unlabelled=scene, gsd_m=bad))


def test_bin_sample_means_the_image_and_takes_the_majority_label():
    image = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
    labels = np.array([[0, 1, 2, 2, 0],
                       [1, 1, 2, IGNORE, 0],
                       [IGNORE, IGNORE, 0, 0, 1],
                       [IGNORE, IGNORE, 0, 2, 1]], np.uint8)
    out = bin_sample(Sample(image, labels, "s"), 2)
    assert out.image.shape == (2, 2, 2) and out.image.dtype == np.float32
    assert np.allclose(out.image, image[:, :4, :4].reshape(2, 2, 2, 2, 2).mean(axis=(2, 4)))
    assert out.labels.tolist() == [[1, 2], [IGNORE, 0]]
    assert bin_sample(Sample(image, None, "s"), 2).labels is None
    assert bin_sample(Sample(image, labels, "s"), 1).image is image


def test_load_data_bins_every_source_before_normalising(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(500, 4000, (len(BANDS), 64, 48)).astype(np.uint16)
    np.savez(tmp_path / "scene.npz", data=data, bands=np.array(BANDS))
    spec = [{"source": "scene", "path": str(tmp_path / "scene.npz"), "scale": 1e-4}]
    full = load_data(parse_config(config(tmp_path, unlabelled=spec)))
    binned = load_data(parse_config(config(tmp_path, unlabelled=spec, gsd_m=20)))
    assert full.unlabelled[0].image.shape == (6, 64, 48)
    assert binned.unlabelled[0].image.shape == (6, 32, 24)
    assert np.allclose(binned.unlabelled[0].image, bin_sample(full.unlabelled[0], 2).image)
    # block means keep the band means (the normalisation) and shrink the spread of the noise
    assert np.allclose(binned.norm.mean, full.norm.mean, atol=1e-4)
    assert all(b < f for b, f in zip(binned.norm.std, full.norm.std))
