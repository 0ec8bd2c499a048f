"""Data: MARIDA / MADOS / image+mask patch layouts, band selection by name, ignore labels, class
weights, normalisation, and the held-out rows guard."""
import numpy as np
import pytest
import tifffile

from ground.data.augment import D4, dihedral, random_crop, transforms_for
from ground.data.layouts import mados_band, map_labels
from ground.data.normalization import Normalization, class_weights
from ground.data.sample import IGNORE, Sample
from ground.data.sources import load_source

RNG = np.random.default_rng(0)


def _marida(root, n=3):
    """patches/S2_DATE_TILE/S2_DATE_TILE_CROP.tif (11 bands) + _cl.tif (0 unlabelled, 1..15); splits/."""
    names = []
    for i in range(n):
        folder = root / "patches" / "S2_1-12-19_48MYU"
        folder.mkdir(parents=True, exist_ok=True)
        img = (np.arange(11, dtype=np.float32)[:, None, None] / 100 + np.zeros((11, 16, 16), np.float32))
        img[0, 0, 0] = np.nan                      # MARIDA has NaNs where Acolite failed
        cl = RNG.integers(0, 16, (16, 16)).astype(np.uint8)
        tifffile.imwrite(folder / f"S2_1-12-19_48MYU_{i}.tif", img)
        tifffile.imwrite(folder / f"S2_1-12-19_48MYU_{i}_cl.tif", cl)
        tifffile.imwrite(folder / f"S2_1-12-19_48MYU_{i}_conf.tif", np.ones((16, 16), np.uint8))
        names.append(f"1-12-19_48MYU_{i}")
    (root / "splits").mkdir()
    (root / "splits" / "train_X.txt").write_text("\n".join(names[:2]) + "\n")
    (root / "splits" / "val_X.txt").write_text(names[2] + "\n")


def test_marida_layout_split_bands_and_labels(tmp_path):
    _marida(tmp_path)
    spec = {"source": "patches", "layout": "marida", "path": str(tmp_path), "split": "train"}
    samples = load_source(spec, ["B04", "B03", "B02", "B8A"], num_classes=15)
    assert len(samples) == 2                                    # the split file decides
    s = samples[0]
    assert s.image.shape == (4, 16, 16)
    # band selection by name reorders: B04 is the 4th MARIDA band (value 0.03), B8A the 9th
    np.testing.assert_allclose(s.image[:, 5, 5], [0.03, 0.02, 0.01, 0.08], atol=1e-6)
    assert np.isfinite(s.image).all()
    raw = tifffile.imread(tmp_path / "patches/S2_1-12-19_48MYU/S2_1-12-19_48MYU_0_cl.tif")
    assert (s.labels[raw == 0] == IGNORE).all()                 # 0 = unlabelled
    np.testing.assert_array_equal(s.labels[raw > 0], raw[raw > 0] - 1)
    assert len(load_source(dict(spec, split="val"), ["B02"])) == 1
    with pytest.raises(FileNotFoundError, match="test_X.txt"):
        load_source(dict(spec, split="test"), ["B02"])
    with pytest.raises(ValueError, match="B10"):               # MARIDA has no cirrus band
        load_source(spec, ["B02", "B10"])


def test_mados_layout_upsamples_coarse_bands(tmp_path):
    scene = tmp_path / "Scene_0"
    for res in ("10", "20", "60"):
        (scene / res).mkdir(parents=True)
    for wl, res, value in ((492, "10", 0.1), (560, "10", 0.2), (665, "10", 0.3), (833, "10", 0.4),
                           (1614, "20", 0.5), (2202, "20", 0.6), (443, "60", 0.7)):
        size = 24 * 10 // int(res)
        a = np.full((size, size), value, np.float32)
        a[0, 0] = value + 0.01                                  # marks the top-left coarse pixel
        tifffile.imwrite(scene / res / f"Scene_0_L2R_rhorc_{wl}_1.tif", a)
    cl = np.zeros((24, 24), np.uint8)
    cl[:4] = 7                                                  # marine water
    tifffile.imwrite(scene / "10" / "Scene_0_L2R_cl_1.tif", cl)
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train_X.txt").write_text("Scene_0_1\n")
    [s] = load_source({"source": "patches", "layout": "mados", "path": str(tmp_path), "split": "train"},
                      ["B02", "B03", "B04", "B08", "B11", "B12", "B01"], num_classes=15)
    assert s.image.shape == (7, 24, 24)
    np.testing.assert_allclose(s.image[:, 10, 10], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], atol=1e-6)
    assert s.image[4, 1, 1] == pytest.approx(0.51)             # a 20 m pixel covers 2x2 at 10 m
    assert s.image[6, 5, 5] == pytest.approx(0.71) and s.image[6, 6, 6] == pytest.approx(0.7)   # 60 m: 6x6
    assert (s.labels[:4] == 6).all() and (s.labels[4:] == IGNORE).all()
    assert mados_band(559) == "B03" and mados_band(2186) == "B12"


def test_pairs_layout_with_label_map_and_band_names(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    img = RNG.integers(0, 10000, (3, 8, 8)).astype(np.uint16)
    mask = np.array([[0, 1, 2, 9]] * 2 * 4).reshape(8, 4).repeat(2, 1).astype(np.uint8)
    tifffile.imwrite(tmp_path / "images" / "a.tif", img, photometric="minisblack")
    tifffile.imwrite(tmp_path / "masks" / "a.tif", mask)
    spec = {"source": "patches", "path": str(tmp_path), "band_names": ["Red", "Green", "Blue"], "scale": 1e-4,
            "label_map": {"0": 0, "1": 1, "2": 1}, "ignore_values": [9]}
    [s] = load_source(spec, ["B02", "B04"], num_classes=2)
    np.testing.assert_allclose(s.image, img[[2, 0]] / 10000, rtol=1e-6)
    assert set(np.unique(s.labels)) == {0, 1, IGNORE}
    assert (s.labels[mask == 9] == IGNORE).all()
    (tmp_path / "images" / "b.tif").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="b.tif has no mask"):
        load_source(spec, ["B02"])


def test_map_labels_rejects_out_of_range():
    with pytest.raises(ValueError, match="beyond num_classes=2"):
        map_labels(np.array([[0, 5]]), {"5": 3}, 0, [], "x.tif", 2)


def test_class_weights_and_normalisation():
    lab = np.zeros((10, 10), np.uint8)
    lab[:1] = 1                                                 # class 1 is rare
    lab[-1, -1] = IGNORE
    s = Sample(np.ones((2, 10, 10), np.float32), lab)
    inv = class_weights([s], 2, "inverse")
    assert inv[1] > 5 * inv[0]
    log = class_weights([s], 2, "log")
    assert log[1] > log[0]
    np.testing.assert_array_equal(class_weights([s], 2, "none"), [1, 1])
    with pytest.raises(ValueError, match="unknown method 'median'"):
        class_weights([s], 2, "median")
    a = Sample(np.stack([np.full((4, 4), 0.1), np.full((4, 4), 0.3)]).astype(np.float32))
    b = Sample(np.stack([np.full((2, 2), 0.5), np.full((2, 2), 0.3)]).astype(np.float32))
    n = Normalization.fit([a, b], ["B02", "B03"])
    assert n.mean[0] == pytest.approx((16 * 0.1 + 4 * 0.5) / 20)   # pixel-weighted, over all images
    assert n.std[1] == pytest.approx(1e-6)                      # a constant band does not divide by 0
    assert Normalization.from_dict(n.as_dict()) == n
    with pytest.raises(ValueError, match="missing field 'std'"):
        Normalization.from_dict({"bands": ["B02"], "mean": [0.1]})


def test_augmentations_keep_image_and_targets_aligned():
    x = np.arange(2 * 5 * 7, dtype=np.float32).reshape(2, 5, 7)
    views = {dihedral(x, k).tobytes() for k in D4}
    assert len(views) == 8                                     # all eight views differ
    assert transforms_for(["flip"]) == (0, 4, 6) and transforms_for([]) == (0,)
    with pytest.raises(ValueError, match="unknown augmentation"):
        transforms_for(["colour"])
    lab = (x[0] % 3).astype(np.uint8)
    img_c, lab_c = random_crop([x, lab], 4, np.random.default_rng(1))
    assert img_c.shape == (2, 4, 4)
    np.testing.assert_array_equal(lab_c, (img_c[0] % 3).astype(np.uint8))
    big_img, big_lab = random_crop([x, lab], 9, np.random.default_rng(1))   # smaller than the crop: mirrored
    assert big_img.shape == (2, 9, 9)
    np.testing.assert_array_equal(big_lab, (big_img[0] % 3).astype(np.uint8))


def test_real_chips_and_the_held_out_guard(data_root):
    bands = ["B02", "B03", "B04", "B08", "B11", "B12"]
    [top] = load_source({"source": "ukis", "rows": [0, 256]}, bands)
    assert top.image.shape == (6, 256, 512) and set(np.unique(top.labels)) <= {0, 1, 2}
    with pytest.raises(ValueError, match="held-out"):
        load_source({"source": "ukis", "rows": [200, 300]}, bands)
    [held] = load_source({"source": "ukis", "rows": [256, 512]}, bands, role="eval")
    assert held.labels.shape == (256, 512)
    [flood] = load_source({"source": "sen1floods11"}, bands)
    assert flood.labels is None and flood.image.shape == (6, 512, 512) and 0 < flood.image.mean() < 0.5
    eo = load_source({"source": "eolearn"}, bands)
    assert len(eo) == 5 and eo[0].image.shape == (6, 101, 100)
    with pytest.raises(ValueError, match="unknown"):
        load_source({"source": "landsat"}, bands)


UKIS_BANDS = ("B02", "B03", "B04", "B08", "B11", "B12")


def _scene_file(path, value, shape=(24, 40)):
    """A small .npz scene (6 named bands, constant per band: band i holds value + i / 100)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.stack([np.full(shape, value + i / 100, np.float32) for i in range(len(UKIS_BANDS))])
    np.savez(path, data=data, bands=np.array(UKIS_BANDS))
    return path


def test_scene_source_takes_an_absolute_glob(tmp_path):
    """`path = "/data/s2/*.npz"` once crashed in Path.glob (absolute patterns unsupported)."""
    _scene_file(tmp_path / "a.npz", 0.1)
    _scene_file(tmp_path / "b.npz", 0.2)
    (tmp_path / "notes.txt").write_text("not a scene")
    pattern = str(tmp_path / "*.npz")
    assert pattern.startswith("/")
    samples = load_source({"source": "scene", "path": pattern}, ["B04", "B02"])
    assert [s.name for s in samples] == ["a.npz", "b.npz"]
    assert samples[1].files == [str(tmp_path / "b.npz")] and samples[1].labels is None
    # bands chosen by name, in the run's order: B04 is the file's third band
    np.testing.assert_allclose(samples[1].image[:, 3, 3], [0.22, 0.20], atol=1e-6)
    one = load_source({"source": "scene", "path": str(tmp_path / "a.npz"), "scale": 2.0}, ["B02"])
    np.testing.assert_allclose(one[0].image, 0.2, atol=1e-6)
    with pytest.raises(FileNotFoundError, match=r"nothing matches .*\*\.tif"):
        load_source({"source": "scene", "path": str(tmp_path / "*.tif")}, ["B02"])


def test_relative_data_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    from ground.config import load_config
    folder = tmp_path / "sub"
    _scene_file(folder / "scenes" / "s0.npz", 0.1, (64, 64))
    (folder / "run.toml").write_text(
        '[run]\nname = "rel"\nout = "runs"\n'
        f'[data]\nbands = {list(UKIS_BANDS)!r}\nclasses = ["clear", "cloud", "shadow"]\n'
        'unlabelled = [{ source = "scene", path = "scenes/*.npz" }]\n'
        '[eval]\ndata = { source = "scene", path = "scenes/s0.npz" }\n'
        '[teacher]\nname = "checkpoint:models/teacher.pt"\n[student]\nparams = "20k"\n'
        '[[experiment]]\nname = "d"\n'.replace("'", '"'))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config("../sub/run.toml")
    [spec] = cfg.unlabelled
    assert spec["path"] == str(folder.resolve() / "scenes" / "*.npz")
    assert cfg.eval_data["path"] == str(folder.resolve() / "scenes" / "s0.npz")
    assert cfg.teacher["name"] == f"checkpoint:{folder.resolve() / 'models' / 'teacher.pt'}"
    assert cfg.out == type(cfg.out)("runs")                  # outputs stay relative to the working directory
    [s] = load_source(spec, cfg.bands)                       # and the glob finds the scene from here
    assert s.name == "s0.npz" and s.image.shape == (6, 64, 64)
