"""Loaders of the three real chips: shapes, band names, label conventions, georeference."""
from pathlib import Path

import numpy as np
import pytest

from shared import datasets as ds
from shared.bands import S2_BANDS


@pytest.fixture
def use_data(data_root, monkeypatch):
    """Point the loaders at the fixture's data root (the same folder, or $EOEDGE_DATA)."""
    monkeypatch.setenv("EOEDGE_DATA", str(data_root))
    return data_root


def test_data_root_follows_env_then_repo_sibling(monkeypatch, tmp_path):
    monkeypatch.setenv("EOEDGE_DATA", str(tmp_path))
    assert ds.data_root() == tmp_path
    monkeypatch.delenv("EOEDGE_DATA")
    assert ds.data_root() == Path(ds.__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize("loader, missing", [
    (ds.load_ukis_chip, "ukis_csmask_s2/sentinel2.npz"),
    (ds.load_sen1floods11, "sen1floods11_sample/Spain_7370579_S2Hand.tif"),
    (ds.load_eolearn, "eolearn_testeopatch/REFERENCE_SCENES.npy"),
])
def test_missing_data_names_the_path(monkeypatch, tmp_path, loader, missing):
    monkeypatch.setenv("EOEDGE_DATA", str(tmp_path))
    with pytest.raises(ds.DataMissing) as err:
        loader()
    assert err.value.path == tmp_path / missing
    assert str(tmp_path / missing) in str(err.value)
    assert isinstance(err.value, FileNotFoundError)     # CLIs report it in one line


def test_ukis_chip(use_data):
    scene, labels = ds.load_ukis_chip()
    assert scene.shape == (6, 512, 512) and scene.data.dtype == np.float32
    assert scene.bands == ("B02", "B03", "B04", "B08", "B11", "B12")
    assert 0 <= scene.data.min() and 1.0 < scene.data.max() < 1.3     # reflectance, not DN
    assert labels.shape == (512, 512) and labels.dtype == np.uint8
    # SOURCE.md counts {0: 28583, 1: 840, 3: 183124, 4: 49597}; 0 -> shadow, 1/3 -> clear, 4 -> cloud
    counts = dict(zip(*np.unique(labels, return_counts=True)))
    assert counts == {0: 840 + 183124, 1: 49597, 2: 28583}
    # the same pixel, raw vs mapped: first raw-shadow pixel must now be class 2
    raw = np.load(use_data / "ukis_csmask_s2" / "sentinel2.npz")["msk"][..., 0]
    r, c = np.argwhere(raw == 0)[0]
    assert labels[r, c] == 2
    img = np.load(use_data / "ukis_csmask_s2" / "sentinel2.npz")["img"]
    np.testing.assert_array_equal(scene.data[:, r, c], img[r, c])


def test_ukis_split_constants_cover_the_chip_without_overlap():
    assert ds.UKIS_TRAIN_ROWS == slice(0, 256)
    assert ds.UKIS_HELD_OUT_ROWS == slice(256, 512)
    rows = np.arange(512)
    train, held = rows[ds.UKIS_TRAIN_ROWS], rows[ds.UKIS_HELD_OUT_ROWS]
    assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == 512


def test_ukis_held_out_crop(use_data):
    scene, labels = ds.load_ukis_chip()
    held = scene.crop(ds.UKIS_HELD_OUT_ROWS, slice(None))
    assert held.shape == (6, 256, 512)
    np.testing.assert_array_equal(held.data, scene.data[:, 256:])


def test_sen1floods11(use_data):
    scene, labels = ds.load_sen1floods11()
    assert scene.shape == (13, 512, 512) and scene.bands == S2_BANDS
    assert scene.data.dtype == np.float32
    # stored x10000, values 7..6060 per SOURCE.md
    assert scene.data.min() == pytest.approx(0.0007) and scene.data.max() == pytest.approx(0.606)
    assert scene.georef.crs == "EPSG:4326"
    a, b, c, d, e, f = scene.georef.transform
    assert a == pytest.approx(8.983152841195215e-05) and e == pytest.approx(-a)
    assert (c, f) == pytest.approx((-0.7818936232976315, 38.12881257139627))
    assert labels.dtype == np.int16 and labels.shape == (512, 512)
    assert dict(zip(*np.unique(labels, return_counts=True))) == {-1: 99, 0: 192010, 1: 70035}


def test_eolearn(use_data):
    scenes, lulc = ds.load_eolearn()
    assert len(scenes) == 5
    for s in scenes:
        assert s.shape == (13, 101, 100) and s.bands == S2_BANDS and s.data.dtype == np.float32
        assert 0.0 < s.data.min() and s.data.max() < 1.0
        assert s.georef.crs == "EPSG:32633"
    # the bbox polygon's corners: top-left and bottom-right pixel corners
    g = scenes[0].georef
    assert g.xy(0, 0) == pytest.approx((465181.0522318204, 5080254.63349641))
    assert g.xy(101, 100) == pytest.approx((466180.53145382757, 5079244.8912012065))
    assert g.pixel_size == pytest.approx((10.0, 10.0), abs=0.01)
    raw = np.load(use_data / "eolearn_testeopatch" / "REFERENCE_SCENES.npy")
    np.testing.assert_array_equal(scenes[3].data, np.moveaxis(raw[3], 2, 0))
    assert lulc.shape == (101, 100)
    counts = dict(zip(*np.unique(lulc, return_counts=True)))
    assert counts == {0: 155, 1: 11, 2: 7601, 3: 1777, 4: 358, 8: 198}
    assert set(counts) <= set(ds.EOLEARN_LULC_CLASSES)
    # the cloudy scenes are brighter in the blue band than the clear ones
    blue = [s.band("Blue").mean() for s in scenes]
    assert min(blue[i] for i in ds.EOLEARN_CLOUDY_SCENES) > max(blue[2:])
