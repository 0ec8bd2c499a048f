"""Band names, the Scene type, and the scene readers / GeoTIFF writer."""
import numpy as np
import pytest
import tifffile

from shared.bands import (RESOLUTION_M, S2_BANDS, UnknownBandError, band_from_filename,
                          canonical_band, canonical_bands)
from shared.scene import (GeoRef, MissingBandsError, Scene, SceneError, SceneFormatError,
                          SceneReadError, read_scene, write_geotiff)

UTM = GeoRef("EPSG:32633", (10.0, 0.0, 465180.0, 0.0, -10.0, 5080260.0))


# ------------------------------------------------------------------------------------- bands

def test_band_table():
    assert S2_BANDS == ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09",
                        "B10", "B11", "B12")
    by_res = {r: sorted(b for b, v in RESOLUTION_M.items() if v == r) for r in (10, 20, 60)}
    assert by_res == {10: ["B02", "B03", "B04", "B08"],
                      20: ["B05", "B06", "B07", "B11", "B12", "B8A"],
                      60: ["B01", "B09", "B10"]}


@pytest.mark.parametrize("alias, canon", [
    ("B2", "B02"), ("b02", "B02"), ("B02", "B02"), ("Blue", "B02"), ("green", "B03"),
    ("Red", "B04"), ("NIR", "B08"), ("B8", "B08"), ("b8a", "B8A"), ("B8A", "B8A"),
    ("SWIR16", "B11"), ("SWIR22", "B12"), ("RedEdge1", "B05"), ("red_edge_2", "B06"),
    ("Red Edge 3", "B07"), ("Coastal", "B01"), ("WaterVapour", "B09"), ("Cirrus", "B10"),
    ("B1", "B01"), ("B12", "B12"), (" b11 ", "B11"),
])
def test_canonical_band_aliases(alias, canon):
    assert canonical_band(alias) == canon


@pytest.mark.parametrize("bad", ["B13", "B0", "B9A", "Purple", "", "NIRR", 4, None])
def test_unknown_band_names_it(bad):
    with pytest.raises(UnknownBandError) as err:
        canonical_band(bad)
    assert repr(bad) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_canonical_bands_refuses_a_bare_string():
    assert canonical_bands(["Blue", "b8a"]) == ("B02", "B8A")
    with pytest.raises(TypeError, match="B02"):
        canonical_bands("B02")


@pytest.mark.parametrize("stem, band", [
    ("T33UVP_20200101T100031_B04", "B04"), ("B8A", "B8A"), ("T33UVP_20200101_B04_10m", "B04"),
    ("scene-b11", "B11"), ("B2", "B02"), ("preview", None), ("T33UVP_B13", None),
    ("BLUEPRINT_B03", "B03"),
])
def test_band_from_filename(stem, band):
    assert band_from_filename(stem) == band


# ------------------------------------------------------------------------------------- Scene

def _scene(n=3, rows=4, cols=5, bands=("B02", "B03", "B04"), georef=None, dtype=np.float32):
    data = np.arange(n * rows * cols, dtype=dtype).reshape(n, rows, cols)
    return Scene(data, bands, georef, "test")


def test_scene_canonicalises_names_and_keeps_custom_channels():
    s = Scene(np.zeros((3, 2, 2)), ["Blue", "b8a", "VV"])
    assert s.bands == ("B02", "B8A", "VV")
    assert s.shape == (3, 2, 2) and (s.rows, s.cols) == (2, 2)


@pytest.mark.parametrize("data, bands, message", [
    (np.zeros((4, 4)), ["B02"], r"3-D \(bands, rows, cols\), got shape \(4, 4\)"),
    (np.zeros((2, 4, 4)), ["B02"], r"2 band plane\(s\) .* but 1 band name"),
    (np.zeros((2, 4, 4)), ["B2", "B02"], "duplicate band 'B02' \\(given as 'B2' and 'B02'\\)"),
    (np.zeros((1, 4, 4)), [""], "non-empty strings"),
    (np.zeros((1, 4, 4)), "B02", "sequence of names"),
    ([[[0]]], ["B02"], "numpy array"),
])
def test_scene_constructor_errors(data, bands, message):
    with pytest.raises(SceneError, match=message):
        Scene(data, bands)


def test_scene_band_shaped_typo_is_an_unknown_band():
    with pytest.raises(UnknownBandError, match="B13"):
        Scene(np.zeros((1, 2, 2)), ["B13"])


def test_select_reorders_by_any_name():
    s = _scene()
    r = s.select(["Red", "B2"])
    assert r.bands == ("B04", "B02")
    np.testing.assert_array_equal(r.data, s.data[[2, 0]])
    same = s.select(["B02", "B03", "B04"])
    assert np.shares_memory(same.data, s.data)            # no copy when nothing moves
    np.testing.assert_array_equal(s.band("green"), s.data[1])


def test_select_names_every_missing_band_and_what_is_available():
    with pytest.raises(MissingBandsError) as err:
        _scene().select(["B02", "NIR", "SWIR16", "B04"])
    e = err.value
    assert e.missing == ("B08", "B11") and e.available == ("B02", "B03", "B04")
    assert "B08, B11" in str(e) and "available: B02, B03, B04" in str(e) and "'test'" in str(e)


def test_crop_moves_the_georef():
    s = _scene(rows=6, cols=8, georef=UTM)
    c = s.crop(slice(2, 5), (3, 8))
    np.testing.assert_array_equal(c.data, s.data[:, 2:5, 3:8])
    assert c.georef.xy(0, 0) == UTM.xy(2, 3) == (465180.0 + 30, 5080260.0 - 20)
    for bad, message in [((slice(0, 4, 2), slice(None)), "step"),
                         ((slice(3, 3), slice(None)), "empty"),
                         ((slice(0, 7), slice(None)), "outside"),
                         (([0, 1], slice(None)), "slice")]:
        with pytest.raises(ValueError, match=message):
            s.crop(*bad)


def test_georef_validation_and_conversions():
    assert GeoRef.from_gdal(UTM.to_gdal(), UTM.crs) == UTM
    assert UTM.epsg == 32633 and UTM.pixel_size == (10.0, 10.0)
    assert UTM.xy(0.5, 0.5) == (465185.0, 5080255.0)      # centre of the top-left pixel
    assert GeoRef.from_dict(UTM.as_dict()) == UTM
    assert UTM.scaled(2).pixel_size == (5.0, 5.0)
    with pytest.raises(ValueError, match="6 finite numbers"):
        GeoRef("EPSG:4326", (1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="singular"):
        GeoRef(None, (0.0, 0.0, 1.0, 0.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="crs"):
        GeoRef("", (1.0, 0.0, 0.0, 0.0, -1.0, 0.0))


# --------------------------------------------------------------------------- GeoTIFF writer

@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.int16, np.uint8])
@pytest.mark.parametrize("georef", [
    UTM,
    GeoRef("EPSG:4326", (8.983e-05, 0.0, -0.78, 0.0, -8.983e-05, 38.12)),
    GeoRef("EPSG:32633", (10.0, 1.5, 465180.0, -2.0, -10.0, 5080260.0)),   # rotated
    GeoRef(None, (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)),
    None,
])
def test_geotiff_round_trip(tmp_path, dtype, georef):
    s = _scene(n=4, rows=7, cols=9, bands=("B02", "B8A", "B11", "B04"), georef=georef, dtype=dtype)
    path = write_geotiff(tmp_path / "s.tif", s, compress="deflate")
    back = read_scene(path)
    assert back.bands == s.bands and back.data.dtype == s.data.dtype
    np.testing.assert_array_equal(back.data, s.data)
    assert back.georef == georef
    assert back.name == "s"


def test_geotiff_single_band_and_selection(tmp_path):
    s = _scene(georef=UTM)
    write_geotiff(tmp_path / "one.tif", s.select(["B03"]))
    one = read_scene(tmp_path / "one.tif")
    assert one.bands == ("B03",) and one.georef == UTM
    write_geotiff(tmp_path / "three.tif", s)
    picked = read_scene(tmp_path / "three.tif", bands=["Red", "Blue"])
    np.testing.assert_array_equal(picked.data, s.data[[2, 0]])
    with pytest.raises(MissingBandsError, match=r"B08.*three\.tif"):
        read_scene(tmp_path / "three.tif", bands=["B08"])


def test_written_tags_read_by_tifffile_own_geotiff_parser(tmp_path):
    write_geotiff(tmp_path / "utm.tif", _scene(georef=UTM))
    with tifffile.TiffFile(tmp_path / "utm.tif") as tif:
        geo = tif.geotiff_metadata
    assert int(geo["ProjectedCSTypeGeoKey"]) == 32633
    assert int(geo["GTModelTypeGeoKey"]) == 1 and int(geo["GTRasterTypeGeoKey"]) == 1
    assert list(geo["ModelPixelScale"][:2]) == [10.0, 10.0]
    assert list(geo["ModelTiepoint"]) == [0, 0, 0, 465180.0, 5080260.0, 0]


def test_written_geotiff_opens_in_gdal(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    s = _scene(georef=GeoRef("EPSG:32633", (10.0, 1.5, 465180.0, -2.0, -10.0, 5080260.0)))
    write_geotiff(tmp_path / "g.tif", s, compress="deflate")
    with rasterio.open(tmp_path / "g.tif") as ds:
        assert ds.crs.to_epsg() == 32633
        assert tuple(ds.transform)[:6] == s.georef.transform
        assert ds.descriptions == ("B02", "B03", "B04")
        np.testing.assert_array_equal(ds.read(), s.data)


def test_pixel_is_point_geotiff_is_shifted_to_corners(tmp_path):
    # a tie point at the centre of pixel (0, 0): the corner is half a pixel up-left
    keys = (1, 1, 0, 2, 1025, 0, 1, 2, 3072, 0, 1, 32633)
    tifffile.imwrite(tmp_path / "p.tif", np.zeros((3, 4), np.uint8), extratags=[
        (33550, "d", 3, (10.0, 10.0, 0.0), True),
        (33922, "d", 6, (0.0, 0.0, 0.0, 1005.0, 2995.0, 0.0), True),
        (34735, "H", len(keys), keys, True)])
    s = read_scene(tmp_path / "p.tif", bands=["B04"])
    assert s.georef == GeoRef("EPSG:32633", (10.0, 0.0, 1000.0, 0.0, -10.0, 3000.0))


def test_write_errors(tmp_path):
    s = _scene(georef=GeoRef("+proj=utm +zone=33", (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)))
    with pytest.raises(ValueError, match=r"\+proj=utm"):
        write_geotiff(tmp_path / "x.tif", s)
    with pytest.raises(ValueError, match="compress='nonsense'"):
        write_geotiff(tmp_path / "y.tif", _scene(), compress="nonsense")
    with pytest.raises(ValueError, match=r"\.tif"):
        write_geotiff(tmp_path / "z.png", _scene())


# ------------------------------------------------------------------------- other readers

def test_real_sen1floods11_chip_reads_with_georef(data_root):
    path = data_root / "sen1floods11_sample" / "Spain_7370579_S2Hand.tif"
    s = read_scene(path)
    assert s.shape == (13, 512, 512) and s.data.dtype == np.int16
    assert s.bands == S2_BANDS                  # from GDAL's band descriptions B1 .. B12
    assert s.georef.crs == "EPSG:4326"
    assert s.georef.transform == pytest.approx(
        (8.983152841195215e-05, 0.0, -0.7818936232976315, 0.0, -8.983152841195215e-05,
         38.12881257139627))
    raw = tifffile.imread(path)
    sub = read_scene(path, bands=["NIR", "B8A", "Blue"])
    np.testing.assert_array_equal(sub.data, raw[[7, 8, 1]])


def _band_file(path, data, georef):
    write_geotiff(path, Scene(data[None], ["X"], georef))


def test_band_folder(tmp_path):
    rng = np.random.default_rng(0)
    b04 = rng.integers(0, 9999, (6, 8), dtype=np.uint16)
    b02 = rng.integers(0, 9999, (6, 8), dtype=np.uint16)
    b8a = rng.integers(0, 9999, (3, 4), dtype=np.uint16)                 # 20 m grid
    _band_file(tmp_path / "T33UVP_20200101_B04.tif", b04, UTM)
    _band_file(tmp_path / "T33UVP_20200101_B02.tif", b02, UTM)
    _band_file(tmp_path / "B8A.tif", b8a, UTM.scaled(0.5))                 # 20 m pixels
    _band_file(tmp_path / "preview.tif", b02, UTM)                         # no band: ignored
    (tmp_path / "notes.txt").write_text("not a band")
    s = read_scene(tmp_path)
    assert s.bands == ("B02", "B04", "B8A") and s.shape == (3, 6, 8)
    np.testing.assert_array_equal(s.data[0], b02)
    np.testing.assert_array_equal(s.data[2], np.kron(b8a, np.ones((2, 2), np.uint16)))
    assert s.georef == UTM
    only = read_scene(tmp_path, bands=["B8A"])
    assert only.shape == (1, 6, 8) and only.georef == UTM                  # 10 m grid, upsampled
    with pytest.raises(MissingBandsError) as err:
        read_scene(tmp_path, bands=["B02", "B03", "B12"])
    assert err.value.missing == ("B03", "B12") and str(tmp_path) in str(err.value)


def test_band_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SceneReadError, match="no band files"):
        read_scene(empty)
    dup = tmp_path / "dup"
    dup.mkdir()
    _band_file(dup / "a_B04.tif", np.zeros((4, 4), np.uint8), None)
    _band_file(dup / "b_B4.tif", np.zeros((4, 4), np.uint8), None)
    with pytest.raises(SceneReadError, match="B04 appears twice: a_B04.tif and b_B4.tif"):
        read_scene(dup)
    odd = tmp_path / "odd"
    odd.mkdir()
    _band_file(odd / "B02.tif", np.zeros((6, 6), np.uint8), None)
    _band_file(odd / "B05.tif", np.zeros((4, 4), np.uint8), None)
    with pytest.raises(SceneReadError, match=r"B05\.tif.*integer fraction"):
        read_scene(odd)


def test_npz_channels_last_and_first(tmp_path):
    cube = np.random.default_rng(1).random((6, 20, 24)).astype(np.float32)
    names = ["B02", "B03", "B04", "B08", "B11", "B12"]
    np.savez(tmp_path / "last.npz", img=np.moveaxis(cube, 0, 2), bands=np.array(names))
    np.savez(tmp_path / "first.npz", data=cube, bands=np.array(names))
    for f in ("last.npz", "first.npz"):
        s = read_scene(tmp_path / f, bands=["SWIR22", "Blue"])
        np.testing.assert_array_equal(s.data, cube[[5, 0]])
    # no names in the file: bands= names the file's bands in order
    np.savez(tmp_path / "anon.npz", img=np.moveaxis(cube, 0, 2))
    s = read_scene(tmp_path / "anon.npz", bands=names)
    assert s.bands == tuple(names)
    with pytest.raises(SceneReadError, match=r"anon\.npz: 6 band\(s\) and no band names"):
        read_scene(tmp_path / "anon.npz")
    np.savez(tmp_path / "nokey.npz", msk=cube)
    with pytest.raises(SceneReadError, match=r"nokey\.npz: no 'data' or 'img'.*keys: msk"):
        read_scene(tmp_path / "nokey.npz")


def test_npy_13_bands_default_to_s2_order(tmp_path):
    cube = np.random.default_rng(2).random((5, 7, 13)).astype(np.float32)  # channels last
    np.save(tmp_path / "c.npy", cube)
    s = read_scene(tmp_path / "c.npy", bands=["B10", "B01"])
    np.testing.assert_array_equal(s.data, np.moveaxis(cube, 2, 0)[[10, 0]])


@pytest.mark.parametrize("shape, message", [
    ((8, 8), r"wrong dimensions.*\(8, 8\)"),
    ((2, 3, 8, 8), r"wrong dimensions.*\(2, 3, 8, 8\)"),
    ((5, 8, 7), "cannot tell channels-first from channels-last"),
])
def test_npy_shape_errors_name_the_file(tmp_path, shape, message):
    np.save(tmp_path / "bad.npy", np.zeros(shape, np.float32))
    with pytest.raises(SceneReadError, match=message) as err:
        read_scene(tmp_path / "bad.npy")
    assert str(tmp_path / "bad.npy") in str(err.value)


def test_read_scene_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.tif"):
        read_scene(tmp_path / "nowhere.tif")
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(SceneFormatError, match=r"x\.jpg: unknown scene format '\.jpg'"):
        read_scene(tmp_path / "x.jpg")
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(SceneReadError, match=r"broken\.tif: cannot read"):
        read_scene(tmp_path / "broken.tif")
    (tmp_path / "broken.npy").write_bytes(b"nope")
    with pytest.raises(SceneReadError, match=r"broken\.npy: cannot read"):
        read_scene(tmp_path / "broken.npy")
