"""The procedural scene generator: truth consistent with the pixels, seeded, windowable."""
import numpy as np
import pytest

from flight_sim.generator import (CLASSES, CLOUD, LAND, SHADOW, SHIP, WATER, SceneGenerator,
                                  generate_scene, spectrum)
from shared.bands import S2_BANDS

B = {b: i for i, b in enumerate(S2_BANDS)}


@pytest.fixture(scope="module")
def mixed():
    gen = SceneGenerator(512, 384, seed=3, cloud_cover=0.25, water_fraction=0.4, ships=12)
    return gen, gen.window()


def test_every_class_present_and_shapes(mixed):
    gen, win = mixed
    assert win.reflectance.shape == (13, 512, 384) and win.reflectance.dtype == np.float32
    assert win.truth.shape == (512, 384) and win.truth.dtype == np.uint8
    present = set(np.unique(win.truth).tolist())
    assert {LAND, WATER, CLOUD, SHADOW} <= present
    assert np.all(win.reflectance >= 0)


def test_pixels_look_like_their_truth(mixed):
    """Water is dark in NIR, vegetation/land bright in NIR, clouds bright in the visible,
    shadows darker than lit land: the spectral signatures a model keys on."""
    _, win = mixed
    r, t = win.reflectance, win.truth
    med = {k: np.median(r[:, t == k], axis=1) for k in (LAND, WATER, CLOUD, SHADOW)}
    assert med[WATER][B["B08"]] < 0.05 < med[LAND][B["B08"]]
    assert med[CLOUD][B["B02"]] > 0.3 > med[LAND][B["B02"]]
    assert med[SHADOW][B["B08"]] < 0.6 * med[LAND][B["B08"]]
    # cloud: bright in the visible, lower in the SWIR (absorption)
    assert med[CLOUD][B["B12"]] < med[CLOUD][B["B04"]]


def test_ships_on_water_and_labelled(mixed):
    gen, win = mixed
    assert len(gen.ship_list) > 0
    visible = np.unique(win.ships[win.ships > 0])
    assert visible.size > 0
    assert np.all(win.truth[win.ships > 0] == SHIP)
    # each ship is surrounded by water (or cloud/shadow over water), never land
    for sid in visible:
        rows, cols = np.nonzero(win.ships == sid)
        r0, r1 = max(rows.min() - 3, 0), min(rows.max() + 4, win.truth.shape[0])
        c0, c1 = max(cols.min() - 3, 0), min(cols.max() + 4, win.truth.shape[1])
        assert not np.any(win.truth[r0:r1, c0:c1] == LAND)


def test_seeded_and_different_seeds_differ():
    a, ta = generate_scene(128, 128, seed=5)
    b, tb = generate_scene(128, 128, seed=5)
    c, _ = generate_scene(128, 128, seed=6)
    assert np.array_equal(a.data, b.data) and np.array_equal(ta.truth, tb.truth)
    assert not np.array_equal(a.data, c.data)
    assert a.bands == S2_BANDS


def test_windows_match_the_whole_scene():
    """A push-broom camera renders strips: truth and (noise aside) reflectance of a window are
    those of the same rows of the whole scene."""
    gen = SceneGenerator(300, 200, seed=11, cloud_cover=0.4, ships=5, noise_sigma=0.0)
    whole = gen.window()
    part = gen.window(120, 250)
    assert np.array_equal(part.truth, whole.truth[120:250])
    assert np.array_equal(part.ships, whole.ships[120:250])
    np.testing.assert_allclose(part.reflectance, whole.reflectance[:, 120:250], atol=1e-6)


def test_cloud_cover_profile_along_track():
    """[0, 1]: clear at the start of the track, overcast at its end."""
    gen = SceneGenerator(1024, 256, seed=2, cloud_cover=[0.0, 0.0, 1.0, 1.0])
    win = gen.window()
    first = (win.truth[:200] == CLOUD).mean()
    last = (win.truth[-200:] == CLOUD).mean()
    assert first == 0.0
    assert last == 1.0
    assert np.all(win.reflectance[B["B02"], -200:] > 0.2)


@pytest.mark.parametrize("cover", [0.1, 0.5])
def test_cloud_cover_fraction_roughly_as_asked(cover):
    gen = SceneGenerator(768, 768, seed=1, cloud_cover=cover, water_fraction=0.0, ships=0)
    frac = (gen.window().truth == CLOUD).mean()
    assert abs(frac - cover) < 0.15


def test_spectrum_table_is_complete():
    for name in ("vegetation", "soil", "urban", "water", "cloud", "ship", "path"):
        s = spectrum(name)
        assert s.shape == (13,) and np.all(s >= 0)
    assert spectrum("water", ["B08", "B02"]).tolist() == [spectrum("water")[B["B08"]],
                                                          spectrum("water")[B["B02"]]]


@pytest.mark.parametrize("bad", [dict(rows=0, cols=5), dict(rows=5, cols=5, cloud_cover=1.5),
                                 dict(rows=5, cols=5, water_fraction=-0.1),
                                 dict(rows=5, cols=5, sun_elevation_deg=0)])
def test_bad_parameters_name_the_field(bad):
    with pytest.raises(ValueError, match="generator\\."):
        SceneGenerator(**bad)


def test_spectra_close_to_real_chip_classes(data_root):
    """The generated clear-land, cloud and shadow medians sit within the spread of the
    human-labelled ukis chip (6 bands) classes: between its 10th and 90th percentiles."""
    from shared.datasets import UKIS_BANDS, load_ukis_chip
    scene, labels = load_ukis_chip(data_root)
    idx = [B[b] for b in UKIS_BANDS]
    wins = [SceneGenerator(512, 512, seed=s, cloud_cover=0.3, water_fraction=0.0, ships=0).window()
            for s in (4, 5, 6)]                   # pooled: shadows of one scene are few parcels
    for gen_cls, real_cls in ((LAND, 0), (CLOUD, 1), (SHADOW, 2)):
        ours = np.median(np.concatenate([w.reflectance[idx][:, w.truth == gen_cls] for w in wins], axis=1),
                         axis=1)
        real = scene.data[:, labels == real_cls]
        lo, hi = np.percentile(real, 10, axis=1), np.percentile(real, 90, axis=1)
        assert np.all((ours >= lo - 0.02) & (ours <= hi + 0.02)), (CLASSES[gen_cls], ours, lo, hi)


def test_clouds_are_textured_not_flat():
    """A flat bright field is not what a cloud looks like to models trained on real imagery:
    thick cloud brightness varies by tens of percent across a cloud, at several scales."""
    gen = SceneGenerator(512, 512, seed=9, cloud_cover=1.0, water_fraction=0.0, ships=0)
    blue = gen.window().reflectance[B["B02"]]
    assert blue.std() / blue.mean() > 0.15
    # variation at a fine scale too (8-pixel blocks differ from their neighbours)
    blocks = blue.reshape(64, 8, 64, 8).mean(axis=(1, 3))
    assert np.abs(np.diff(blocks, axis=1)).mean() > 0.01


# ------------------------------------------------------------------------------- arid scenes

@pytest.fixture(scope="module")
def arid_pair():
    """The same seed on both surfaces: 0.3 cloud, water as each surface's default."""
    kw = dict(rows=384, cols=384, seed=21, cloud_cover=0.3, ships=4)
    return SceneGenerator(**kw).window(), SceneGenerator(surface="arid", **kw).window()


def test_arid_land_is_bright_sand_not_vegetation(arid_pair):
    """Arid land: brighter in the visible and SWIR than temperate land, no strong red edge
    (NIR/red well below a canopy's), rising from blue to SWIR as sand does; still darker than
    cloud in the blue (the key a cloud model uses), and water stays dark in the NIR."""
    temperate, arid = arid_pair
    lt = np.median(temperate.reflectance[:, temperate.truth == LAND], axis=1)
    la = np.median(arid.reflectance[:, arid.truth == LAND], axis=1)
    assert la[B["B04"]] > lt[B["B04"]] + 0.05 and la[B["B11"]] > lt[B["B11"]] + 0.05
    assert la[B["B08"]] / la[B["B04"]] < 1.6 < lt[B["B08"]] / lt[B["B04"]]
    assert la[B["B02"]] < la[B["B04"]] < la[B["B08"]] < la[B["B11"]]
    cloud = np.median(arid.reflectance[:, arid.truth == CLOUD], axis=1)
    assert cloud[B["B02"]] > la[B["B02"]] + 0.15
    lake = SceneGenerator(256, 256, seed=21, cloud_cover=0.0, water_fraction=0.4, surface="arid").window()
    water = np.median(lake.reflectance[:, lake.truth == WATER], axis=1)
    assert water[B["B08"]] < 0.05
    shadow = np.median(arid.reflectance[:, arid.truth == SHADOW], axis=1)
    assert shadow[B["B08"]] < 0.6 * la[B["B08"]]


def test_arid_keeps_the_sky_and_has_less_water(arid_pair):
    """Same seed: the same clouds (the sky does not depend on the ground), the same truth
    classes, less open water (each surface's default water fraction)."""
    temperate, arid = arid_pair
    assert np.array_equal(temperate.truth == CLOUD, arid.truth == CLOUD)
    assert set(np.unique(arid.truth).tolist()) <= set(range(len(CLASSES)))
    assert (arid.truth == WATER).mean() < 0.5 * (temperate.truth == WATER).mean() + 1e-9
    assert (arid.truth == LAND).mean() > (temperate.truth == LAND).mean()


def test_sand_spectrum_and_describe():
    sand = spectrum("sand")
    assert 0.15 < sand[B["B02"]] < 0.25 and 0.4 < sand[B["B11"]] < 0.55
    assert np.all(np.diff(sand[[B[b] for b in ("B02", "B03", "B04", "B08", "B11")]]) > 0)
    gen = SceneGenerator(64, 64, seed=1, surface="arid")
    assert gen.describe()["surface"] == "arid" and gen.water_fraction == 0.08
    assert SceneGenerator(64, 64, seed=1).describe()["surface"] == "temperate"
    with pytest.raises(ValueError, match="generator.surface"):
        SceneGenerator(64, 64, surface="lunar")


def test_arid_windows_match_the_whole_scene():
    gen = SceneGenerator(200, 160, seed=4, cloud_cover=0.4, ships=3, noise_sigma=0.0, surface="arid")
    whole, part = gen.window(), gen.window(70, 190)
    assert np.array_equal(part.truth, whole.truth[70:190])
    np.testing.assert_allclose(part.reflectance, whole.reflectance[:, 70:190], atol=1e-6)


def test_temperate_pixels_unchanged_by_the_surface_option():
    """surface="temperate" (the default) renders what the generator rendered before arid scenes
    existed (checked bit for bit against the previous module when they were added; here: a
    fingerprint of a small scene taken before the change)."""
    win = SceneGenerator(96, 80, seed=3, cloud_cover=0.3, ships=3).window()
    explicit = SceneGenerator(96, 80, seed=3, cloud_cover=0.3, ships=3, surface="temperate",
                              water_fraction=0.35).window()
    assert np.array_equal(win.reflectance, explicit.reflectance)
    # (a sum, not a hash: BLAS may round the last bit differently on another CPU)
    assert float(win.reflectance.astype(np.float64).sum()) == pytest.approx(21844.665, abs=0.05)


def test_haze_brightens_the_blue_dims_the_contrast_and_keeps_the_truth():
    """A dust haze (issue 17's second kind of scene, with an arid surface): the blue gains more than
    the SWIR (path reflectance), land and cloud come closer (transmittance), nothing becomes cloud."""
    clear = SceneGenerator(160, 160, seed=5, cloud_cover=0.3, surface="arid", noise_sigma=0.0).window()
    hazy = SceneGenerator(160, 160, seed=5, cloud_cover=0.3, surface="arid", noise_sigma=0.0, haze=1.0).window()
    assert np.array_equal(clear.truth, hazy.truth)
    land = clear.truth == LAND
    gain = np.median(hazy.reflectance[:, land] - clear.reflectance[:, land], axis=1)
    assert gain[B["B02"]] > 0.05 > gain[B["B11"]]
    cloud = clear.truth == CLOUD
    contrast = lambda w: np.median(w.reflectance[B["B02"], cloud]) - np.median(w.reflectance[B["B02"], land])  # noqa
    assert contrast(hazy) < 0.8 * contrast(clear)
    same = SceneGenerator(160, 160, seed=5, cloud_cover=0.3, surface="arid", noise_sigma=0.0, haze=0.0).window()
    assert np.array_equal(same.reflectance, clear.reflectance)
    assert SceneGenerator(8, 8, seed=1, haze=0.5).describe()["haze"] == 0.5


@pytest.mark.parametrize("haze", [-0.1, 2.5, "1", True, float("nan")])
def test_bad_haze_is_refused_naming_it(haze):
    from flight_sim.errors import SceneSpecError
    with pytest.raises(SceneSpecError, match="generator.haze"):
        SceneGenerator(8, 8, seed=1, haze=haze)
