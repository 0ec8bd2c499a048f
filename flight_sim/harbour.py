"""A real harbour under a generated sky: the cloudy scene of issue 16's chain demonstration.

A sen2ships harbour (`shared.datasets.load_ships_port`: real Sentinel-2 L2A reflectance, its
EPSG:3857 georeference, hand-drawn vessels) gets a cloud field and its shadows from
`flight_sim.generator`, the same fields the generated scenes use:

- the cloud opacity is a `SceneGenerator`'s own (rendered on the harbour's grid grown by the shadow
  vector on every side, so that shadows cast from outside the chip fall in), its `shadow_shift`
  moves that opacity onto the ground as the shadow, its `CLOUD_TEXTURE` value noise modulates the
  cloud's brightness and `spectrum("cloud")` gives the cloud's colour;
- mixing as in the generator: a shadowed surface keeps `SHADOW_DIRECT_FRACTION` of its signal and
  a cloud of opacity a covers (1 - a) of what is below. The imagery is bottom-of-atmosphere (L2A),
  so the shadow tends to 0, not to the generator's top-of-atmosphere path reflectance;
- truth in the generator's classes (land, water, cloud, shadow, ship): water where NDWI(B03, B08)
  > 0.2 or B08 < 0.04, ships from the human masks where they are not under cloud (hidden ships are not targets),
  cloud where the opacity >= CLOUD_TRUTH_OPACITY, shadow where the displaced opacity >= 0.5 on land.

`cloudy_harbour(port, seed, cloud_cover, ...) -> CloudyHarbour` builds it in memory;
`HarbourSource` flies it (scene kind `harbour`, flight_sim.scenes); `write_cloudy_harbour` writes
it as two GeoTIFFs (the image with its band names and georeference, the truth) for the factory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flight_sim.generator import (CLASSES, CLOUD, CLOUD_TEXTURE, CLOUD_TRUTH_OPACITY, LAND, SHADOW,
                                  SHADOW_DIRECT_FRACTION, SHIP, WATER, SceneGenerator, ValueNoise, spectrum)
from shared.datasets import load_ships_port
from shared.scene import Scene, write_geotiff

WATER_NDWI = 0.2          # SOURCE.md's water test on the harbours (B03, B08) ...
WATER_NIR = 0.04          # ... or a dark NIR: Genoa's rippled sea often has NDWI < 0.2 at B08 ~0.02
SKY_KEYS = ("seed", "cloud_cover", "cloud_height_m", "sun_elevation_deg", "sun_azimuth_deg")


@dataclass
class CloudyHarbour:
    scene: Scene                 # reflectance (5, H, W) float32, the harbour's bands and georeference
    truth: np.ndarray            # (H, W) uint8 indexing CLASSES
    ships: np.ndarray            # (H, W) int32 vessel ids (0 none; hidden under cloud: 0)
    cloud_opacity: np.ndarray    # (H, W) float32 0..1
    shadow: np.ndarray           # (H, W) float32 0..1


def sky(rows: int, cols: int, seed: int = 0, cloud_cover: float = 0.4, cloud_height_m: float = 1500.0,
        sun_elevation_deg: float = 40.0, sun_azimuth_deg: float = 150.0,
        gsd_m: float = 10.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cloud opacity, shadow, cloud brightness texture), each (rows, cols) float32, of a generated
    sky over a rows x cols grid."""
    probe = SceneGenerator(1, 1, seed, cloud_cover=cloud_cover, cloud_height_m=cloud_height_m,
                           sun_elevation_deg=sun_elevation_deg, sun_azimuth_deg=sun_azimuth_deg, gsd_m=gsd_m)
    dr, dc = probe.shadow_shift
    m = int(np.ceil(abs(dr) + abs(dc))) + 1
    gen = SceneGenerator(rows + 2 * m, cols + 2 * m, seed, cloud_cover=cloud_cover, water_fraction=0.0, ships=0,
                         urban_fraction=0.0, cloud_height_m=cloud_height_m, sun_elevation_deg=sun_elevation_deg,
                         sun_azimuth_deg=sun_azimuth_deg, gsd_m=gsd_m, noise_sigma=0.0)
    opacity = gen.window().cloud_opacity
    r, c = int(round(dr)), int(round(dc))
    shadow = opacity[m - r:m - r + rows, m - c:m - c + cols]       # the cloud at (y - dr, x - dc)
    cell, octaves, gain, amplitude = CLOUD_TEXTURE
    texture = ValueNoise(np.random.default_rng([seed, 1]), rows, cols, cell, octaves=octaves, gain=gain)
    bright = np.clip(1 + amplitude * texture.sample(np.arange(rows) + 0.5, np.arange(cols) + 0.5), 0.3, None)
    return (np.ascontiguousarray(opacity[m:m + rows, m:m + cols]), np.ascontiguousarray(shadow),
            bright.astype(np.float32))


def cloudy_harbour(port: str, seed: int = 0, cloud_cover: float = 0.4, root: Path | None = None,
                   **sun) -> CloudyHarbour:
    """The harbour `port` under a generated sky (keyword arguments: SKY_KEYS)."""
    clear, instances, _files = load_ships_port(port, root)
    a, shadow, bright = sky(clear.rows, clear.cols, seed, cloud_cover, **sun)
    lit = 1 - (1 - SHADOW_DIRECT_FRACTION) * shadow
    cloud = spectrum("cloud", clear.bands)[:, None, None]
    data = clear.data * (lit * (1 - a))[None] + cloud * (a * bright)[None]
    b03, b08 = clear.band("B03"), clear.band("B08")
    water = ((b03 - b08) / np.maximum(b03 + b08, 1e-6) > WATER_NDWI) | (b08 < WATER_NIR)
    ships = np.where(a < CLOUD_TRUTH_OPACITY, instances, 0).astype(np.int32)
    truth = np.where(water, WATER, LAND).astype(np.uint8)
    truth[(shadow >= 0.5) & ~water] = SHADOW
    truth[ships > 0] = SHIP
    truth[a >= CLOUD_TRUTH_OPACITY] = CLOUD
    scene = Scene(np.clip(data, 0, None).astype(np.float32), clear.bands, clear.georef, f"{port}-cloudy-s{seed}")
    return CloudyHarbour(scene, truth, ships, a, shadow)


def write_cloudy_harbour(port: str, out_dir: Path, seed: int = 0, cloud_cover: float = 0.4,
                         **sun) -> tuple[Path, Path]:
    """`out_dir/images/NAME.tif` (the bands, named, georeferenced) and `out_dir/masks/NAME.tif`
    (the truth in CLASSES): the image/mask pairs layout the factory reads (`patches`)."""
    h = cloudy_harbour(port, seed, cloud_cover, **sun)
    image = Path(out_dir) / "images" / f"{h.scene.name}.tif"
    mask = Path(out_dir) / "masks" / f"{h.scene.name}.tif"
    image.parent.mkdir(parents=True, exist_ok=True)
    mask.parent.mkdir(parents=True, exist_ok=True)
    write_geotiff(image, h.scene, compress="deflate")
    write_geotiff(mask, Scene(h.truth[None], ("truth",), h.scene.georef, h.scene.name), compress="deflate")
    return image, mask


__all__ = ["CLASSES", "CloudyHarbour", "sky", "cloudy_harbour", "write_cloudy_harbour", "SKY_KEYS"]
