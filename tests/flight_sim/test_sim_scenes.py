"""Scene sources: SAFE/JPEG 2000 through rasterio (strips, resampling, radiometric offset),
files through shared.scene, the real chips, generated scenes, and specs that name their errors."""
import zipfile
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
from affine import Affine  # noqa: E402

from flight_sim.scenes import (ArraySource, SceneSpecError, find_safe_band_files, open_safe,  # noqa: E402
                               open_source)
from flight_sim.generator import CLASSES  # noqa: E402
from shared.bands import RESOLUTION_M, S2_BANDS  # noqa: E402
from shared.scene import MissingBandsError, Scene, SceneReadError, write_geotiff  # noqa: E402

SIDE_10M = 60      # a 600 m x 600 m tile: 60 px at 10 m, 30 at 20 m, 10 at 60 m

MTD = """<?xml version="1.0" encoding="UTF-8"?>
<n1:Level-1C_User_Product xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-1C.xsd">
 <n1:General_Info><Product_Image_Characteristics>
  <QUANTIFICATION_VALUE unit="none">10000</QUANTIFICATION_VALUE>
  <Radiometric_Offset_List>{offsets}</Radiometric_Offset_List>
 </Product_Image_Characteristics></n1:General_Info>
</n1:Level-1C_User_Product>"""


def band_values(band: str, n: int) -> np.ndarray:
    """Distinct DN per pixel and per band, so resampling and band order are checkable."""
    base = 1000 + 100 * S2_BANDS.index(band)
    return (base + np.arange(n * n).reshape(n, n) % 97).astype(np.uint16)


def make_safe(root: Path, offset: int | None = -1000) -> Path:
    safe = root / "S2B_MSIL1C_20230601T101559_N0509_R065_T32TMT_20230601T122311.SAFE"
    img = safe / "GRANULE" / "L1C_T32TMT_A032660_20230601T101559" / "IMG_DATA"
    img.mkdir(parents=True)
    for band in S2_BANDS:
        res = RESOLUTION_M[band]
        n = SIDE_10M * 10 // res
        with rasterio.open(img / f"T32TMT_20230601T101559_{band}.jp2", "w", driver="JP2OpenJPEG",
                           height=n, width=n, count=1, dtype="uint16", crs="EPSG:32632",
                           transform=Affine(res, 0, 500000, 0, -res, 5100000),
                           QUALITY=100, REVERSIBLE="YES") as ds:
            ds.write(band_values(band, n), 1)
    # a true-colour image sits beside the bands in real products: not a band
    (img / "T32TMT_20230601T101559_TCI.jp2").write_bytes(b"\0")
    offsets = "" if offset is None else "".join(
        f'<RADIO_ADD_OFFSET band_id="{i}">{offset}</RADIO_ADD_OFFSET>' for i in range(13))
    (safe / "MTD_MSIL1C.xml").write_text(MTD.format(offsets=offsets))
    return safe


@pytest.fixture(scope="module")
def safe(tmp_path_factory):
    return make_safe(tmp_path_factory.mktemp("safe"))


def test_safe_bands_found_and_grid_is_10m(safe):
    src = open_safe(safe)
    assert src.bands == S2_BANDS
    assert (src.rows, src.cols) == (SIDE_10M, SIDE_10M)
    assert src.crs == "EPSG:32632"
    assert src.factors["B05"] == 2 and src.factors["B01"] == 6 and src.factors["B02"] == 1


def test_safe_strip_resamples_and_applies_offset(safe):
    src = open_safe(safe, bands=["B04", "B11", "B09"])
    strip = src.read(12, 30)
    assert strip.reflectance.shape == (3, 18, SIDE_10M) and strip.reflectance.dtype == np.float32
    dn = np.rint(strip.reflectance * 10000).astype(int)
    # B04 at 10 m: the file's own rows; reflectance = (DN - 1000) / 10000
    np.testing.assert_array_equal(dn[0], band_values("B04", 60)[12:30].astype(int) - 1000)
    # B11 at 20 m: each value repeated over 2 x 2 pixels (nearest), rows 12:30 = 20 m rows 6:15
    b11 = band_values("B11", 30).astype(int) - 1000
    np.testing.assert_array_equal(dn[1], np.repeat(np.repeat(b11, 2, 0), 2, 1)[12:30])
    # B09 at 60 m: 6 x 6 blocks
    b09 = band_values("B09", 10).astype(int) - 1000
    np.testing.assert_array_equal(dn[2], np.repeat(np.repeat(b09, 6, 0), 6, 1)[12:30])


def test_safe_without_offset_and_inside_a_zip(tmp_path):
    safe = make_safe(tmp_path, offset=None)
    zpath = tmp_path / (safe.name + ".zip")
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in safe.rglob("*"):
            if p.is_file():
                zf.write(p, p.relative_to(tmp_path))
    for src in (open_safe(safe, ["B02"]), open_source({"kind": "file", "path": str(zpath),
                                                       "bands": ["B02"]})):
        dn = np.rint(src.read(0, 4).reflectance * 10000).astype(int)
        np.testing.assert_array_equal(dn[0], band_values("B02", 60)[:4])


def test_safe_bilinear_resampling_is_smooth(safe):
    src = open_safe(safe, bands=["B05"], resampling="bilinear")
    plane = src.read(0, SIDE_10M).reflectance[0]
    nearest = open_safe(safe, bands=["B05"]).read(0, SIDE_10M).reflectance[0]
    assert not np.array_equal(plane, nearest)
    assert abs(plane.mean() - nearest.mean()) < 0.001


def test_safe_errors_name_what_is_wrong(safe, tmp_path):
    with pytest.raises(ValueError, match="B13"):
        open_safe(safe, bands=["B13"])
    # a folder holding only some band files: the missing band is named, and what there is
    partial = tmp_path / "partial"
    partial.mkdir()
    for p in sorted(safe.glob("GRANULE/*/IMG_DATA/*_B0[24].jp2")):
        (partial / p.name).write_bytes(p.read_bytes())
    with pytest.raises(MissingBandsError, match="B08.*available: B02, B04"):
        open_safe(partial, bands=["B02", "B08"])
    empty = tmp_path / "EMPTY.SAFE"
    (empty / "GRANULE").mkdir(parents=True)
    with pytest.raises(SceneReadError, match="EMPTY.SAFE: no band files"):
        find_safe_band_files(empty)
    with pytest.raises(SceneSpecError, match="resampling"):
        open_safe(safe, resampling="magic")


def test_file_source_geotiff_scales_integers(tmp_path):
    data = (np.arange(2 * 8 * 8).reshape(2, 8, 8) * 10).astype(np.uint16)
    path = write_geotiff(tmp_path / "s.tif", Scene(data, ("B04", "B08")))
    src = open_source({"kind": "file", "path": "s.tif"}, base_dir=tmp_path)
    assert src.bands == ("B04", "B08")
    np.testing.assert_allclose(src.read(2, 5).reflectance, data[:, 2:5] / 10000, rtol=1e-6)
    assert path.exists()


def test_file_source_with_truth(tmp_path):
    data = np.random.default_rng(0).random((13, 16, 16)).astype(np.float32)
    np.save(tmp_path / "scene.npy", data)
    truth = (np.arange(256).reshape(16, 16) % 3).astype(np.uint8)
    np.save(tmp_path / "truth.npy", truth)
    src = open_source({"kind": "file", "path": "scene.npy", "truth": "truth.npy",
                       "truth_classes": ["clear", "cloud", "shadow"]}, base_dir=tmp_path)
    strip = src.read(4, 8)
    np.testing.assert_array_equal(strip.truth, truth[4:8])
    np.testing.assert_array_equal(strip.reflectance, data[:, 4:8])
    assert src.truth_classes == ("clear", "cloud", "shadow")


@pytest.mark.parametrize("spec, field", [
    ({"kind": "satellite"}, "scenes[0].kind"),
    ({"kind": "generated", "rows": 10}, "scenes[0].cols"),
    ({"kind": "generated", "rows": 10, "cols": 10, "clouds": 1}, "scenes[0].clouds"),
    ({"kind": "generated", "rows": 10, "cols": 10, "cloud_cover": 3}, "cloud_cover"),
    ({"kind": "generated", "rows": 10, "cols": 10, "crop_rows": [5, 50]}, "scenes[0].crop_rows"),
    ({"kind": "file"}, "scenes[0].path"),
    ({"kind": "file", "path": "x.tif", "colour": 1}, "scenes[0].colour"),
    ({"kind": "dataset", "name": "mars"}, "dataset"),
    ({"kind": "generated", "rows": 10, "cols": 10, "surface": "lunar"}, "generator.surface"),
    ({"kind": "generated", "rows": 10, "cols": 10, "soil": "arid"}, "scenes[0].soil"),
])
def test_bad_specs_name_the_field(spec, field):
    with pytest.raises(SceneSpecError, match=field.replace("[", r"\[").replace("]", r"\]")):
        open_source(spec)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.tif"):
        open_source({"kind": "file", "path": "nothere.tif"}, base_dir=tmp_path)


def test_generated_source_and_crop():
    src = open_source({"kind": "generated", "rows": 200, "cols": 64, "seed": 1, "ships": 2,
                       "crop_rows": [50, 150]})
    assert (src.rows, src.cols) == (100, 64)
    strip = src.read(0, 10)
    assert strip.reflectance.shape == (13, 10, 64) and strip.truth.shape == (10, 64)
    assert src.truth_classes[:2] == ("land", "water") and src.object_class == "ship"


def test_dataset_sources(data_root):
    ukis = open_source({"kind": "dataset", "name": "ukis", "crop_rows": [256, 512]})
    assert ukis.rows == 256 and ukis.truth_classes == ("clear", "cloud", "shadow")
    assert ukis.read(0, 8).truth.shape == (8, 512)
    floods = open_source({"kind": "dataset", "name": "sen1floods11"})
    assert len(floods.bands) == 13 and floods.truth_classes == ("land", "water")
    assert isinstance(open_source({"kind": "dataset", "name": "eolearn:3"}), ArraySource)


def test_generated_arid_source_describes_its_surface():
    src = open_source({"kind": "generated", "rows": 64, "cols": 64, "seed": 2, "surface": "arid"})
    assert src.describe()["surface"] == "arid" and src.truth_classes == CLASSES
    assert src.read(0, 8).reflectance.shape == (13, 8, 64)
