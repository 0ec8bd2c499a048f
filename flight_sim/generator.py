"""Procedural Sentinel-2 L1C scenes with ground truth: land, water, clouds, their shadows, ships.

`SceneGenerator(rows, cols, seed, ...)` describes a whole scene; `.window(r0, r1)` renders any
band of rows (13 bands of top-of-atmosphere reflectance, float32, and the truth), so a push-broom
camera can pull a 10980-row scene strip by strip without ever holding it all. `generate_scene`
renders it in one go.

How it is built (all fields are value noise: random lattices per octave, bilinearly
interpolated, evaluated at any coordinates, so a window or a shifted copy costs the same):

- water where a large-scale noise field is below the quantile giving `water_fraction`;
- land: a vegetation/soil mix from a second field, urban patches from a third, field-sized
  Voronoi parcels each with its own cover, canopy vigour and brightness, and a fine texture
  (a model trained on smooth land takes real, textured land for cloud);
- clouds: opacity from a fourth field against a threshold that follows the along-track
  `cloud_cover` profile (so one scene has clear and overcast frames); cloud (thin included)
  where opacity >= CLOUD_TRUTH_OPACITY, brightness textured at several scales as real clouds are;
- cloud shadows: the same opacity field displaced by the shadow vector (cloud height, sun
  elevation and azimuth), darkening the surface towards the atmospheric path reflectance;
- ships: oriented rectangles (4..30 px, 40..300 m at 10 m) on open water, each an instance.

Where and when (`place=True`): a scene drawn from its seed lies off a real port (SITES, in the
port's UTM zone: an EPSG code, a north-up transform at `gsd_m`, its corner on the 10 m grid within
+-10 km of the port) and was sensed on a day of ACQUISITION_YEAR at Sentinel-2's 10:30 mean local
solar time (a descending node), so its frames, products, COGs and STAC items have a place and a
time. The draws come from a stream of their own: placing a scene changes none of its pixels.

Reflectances: per-band typical L1C (top-of-atmosphere) spectra below, for the 13 bands, mixed
linearly. They follow published typical curves (vegetation red edge, water absorption in the NIR,
cloud flat in the visible and lower in the SWIR, B09/B10 absorption bands) and were checked against
the real chips in ../shared/data (tests/test_sim_generator.py compares class medians).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Sequence

import numpy as np

from flight_sim.errors import SceneSpecError
from shared.bands import S2_BANDS
from shared.scene import GeoRef, Scene

# Truth classes of generated scenes (uint8 values = index).
CLASSES: tuple[str, ...] = ("land", "water", "cloud", "shadow", "ship")
LAND, WATER, CLOUD, SHADOW, SHIP = range(len(CLASSES))

#                     B01    B02    B03    B04    B05    B06    B07    B08    B8A    B09    B10    B11    B12
SPECTRA: dict[str, tuple[float, ...]] = {
    # broadleaf/crop canopy: chlorophyll dip in B04, red edge B05..B07, NIR plateau, SWIR water dip
    "vegetation": (0.110, 0.082, 0.075, 0.045, 0.095, 0.260, 0.330, 0.360, 0.380, 0.100, 0.001, 0.170, 0.075),
    # dry bare soil: rising from blue to SWIR
    "soil":       (0.130, 0.115, 0.130, 0.150, 0.175, 0.195, 0.210, 0.225, 0.235, 0.085, 0.002, 0.300, 0.245),
    # built-up: flat and moderately bright
    "urban":      (0.135, 0.115, 0.115, 0.115, 0.130, 0.150, 0.160, 0.170, 0.175, 0.060, 0.002, 0.200, 0.170),
    # open water: path radiance in the blue, absorbed in NIR and SWIR
    "water":      (0.115, 0.088, 0.068, 0.045, 0.035, 0.028, 0.026, 0.022, 0.020, 0.008, 0.001, 0.010, 0.007),
    # thick water cloud: bright and flat in VNIR, lower in SWIR (absorption), some signal in B10;
    # close to the brightest decile of the human-labelled clouds of the ukis chip
    "cloud":      (0.560, 0.550, 0.540, 0.550, 0.560, 0.580, 0.600, 0.610, 0.620, 0.300, 0.050, 0.500, 0.380),
    # painted steel hull and deck
    "ship":       (0.170, 0.160, 0.160, 0.160, 0.170, 0.180, 0.185, 0.190, 0.190, 0.080, 0.003, 0.160, 0.130),
    # atmospheric path reflectance: what a shadowed surface tends to
    "path":       (0.090, 0.065, 0.038, 0.022, 0.018, 0.014, 0.012, 0.010, 0.010, 0.005, 0.000, 0.003, 0.002),
    # what a more vigorous canopy adds (red edge and NIR plateau up, a little SWIR): weighted by
    # a vigour field in -0.6..1.2, it spreads vegetation NIR over ~0.26..0.55 as real land does
    "vigour":     (0.000, 0.000, 0.000, -0.005, 0.015, 0.090, 0.140, 0.160, 0.170, 0.040, 0.000, 0.020, 0.000),
    # arid surfaces (surface="arid"). Desert sand: iron-stained quartz, rising steadily from the
    # blue to a SWIR-1 peak, SWIR-2 a little lower; B09 kept up by the dry air, B10 near zero
    # (after the TOA curves of the Libya-4 / Algeria calibration sites, a little darker)
    "sand":       (0.210, 0.205, 0.265, 0.345, 0.375, 0.395, 0.410, 0.420, 0.435, 0.215, 0.008, 0.500, 0.455),
    # dark gravel plains, desert varnish and basalt outcrops: dim and flat, rising a little
    "rock":       (0.120, 0.095, 0.105, 0.125, 0.140, 0.150, 0.160, 0.165, 0.175, 0.070, 0.002, 0.230, 0.205),
}
ENDMEMBERS = ("vegetation", "soil", "urban", "water", "ship", "path", "cloud", "vigour")
_ENDMEMBER_MATRIX = np.array([SPECTRA[e] for e in ENDMEMBERS], np.float32).T   # (13, 8)
# An arid scene mixes two more endmembers after the eight (kept apart so that a temperate scene's
# pixels are the same matrix product as before, bit for bit)
ARID_ENDMEMBERS = ENDMEMBERS + ("sand", "rock")
_ARID_MATRIX = np.array([SPECTRA[e] for e in ARID_ENDMEMBERS], np.float32).T   # (13, 10)
SURFACES = ("temperate", "arid")
# A haze of load 1 (a heavy dust or smog haze, aerosol optical depth ~1): a quarter of the signal
# lost on the way, twice the clear-sky path reflectance added plus 0.02 flat (mineral dust
# scatters at every wavelength). A student that only saw clear air takes it for something else.
HAZE = (0.25, 2.0)          # (signal lost, multiple of the clear-sky path added) at load 1
HAZE_MAX = 2.0
_HAZE_PATH = (HAZE[1] * np.array(SPECTRA["path"], np.float32) + np.float32(0.02))[:, None, None]
# water_fraction when a scene does not give one: arid land has little open water
DEFAULT_WATER_FRACTION = {"temperate": 0.35, "arid": 0.08}
DUNE_WAVELENGTH_PX = 24.0      # ~240 m crest to crest at 10 m: transverse dunes, seen as stripes
SHADOW_DIRECT_FRACTION = 0.28
_QUANTILE_GRID = np.linspace(0, 1, 201)
PARCEL_LEVELS = 97       # distinct (cover, vigour, brightness) draws the parcels cycle through
# Cloud structure down to ~6 px and a strong brightness texture: real clouds are anything but
# flat, and a flat bright field does not look like a cloud to a model trained on real ones (the
# ukis-csmask teacher calls a uniform cloud-spectrum tile "clear", and finds ~100% of these).
CLOUD_OCTAVES = 7
CLOUD_TEXTURE = (128, 5, 0.6, 0.7)     # (cell px, octaves, gain, amplitude) of cloud brightness
# Truth: a pixel is cloud from this opacity on (thin cloud counts: you cannot see the ground well)
CLOUD_TRUTH_OPACITY = 0.25   # share of the surface signal left in a full cloud shadow


# Ports a placed scene lies off: (name, UTM EPSG code, easting, northing) of open water nearby.
SITES: tuple[tuple[str, int, float, float], ...] = (
    ("genoa", 32632, 492_000, 4_914_000), ("rotterdam", 32631, 565_000, 5_759_000),
    ("busan", 32652, 504_500, 3_878_500), ("singapore", 32648, 372_000, 132_500),
    ("gibraltar", 32630, 284_000, 3_992_000), ("santos", 32723, 368_000, 7_343_000),
    ("durban", 32736, 312_000, 6_690_500), ("halifax", 32620, 456_500, 4_941_000))
ACQUISITION_YEAR = 2026
PLACE_STREAM = 0x6E0            # the seed sequence's second word for the placement draws
SITE_JITTER_M = 10_000.0


def spectrum(name: str, bands: Sequence[str] = S2_BANDS) -> np.ndarray:
    """The typical L1C spectrum `name` (see SPECTRA) for `bands`, float32."""
    table = dict(zip(S2_BANDS, SPECTRA[name]))
    return np.array([table[b] for b in bands], np.float32)


# ------------------------------------------------------------------------------- value noise

class ValueNoise:
    """Fractal value noise on an unbounded plane: octave o is a random lattice with spacing
    `cell / 2**o`, interpolated bilinearly with smoothstep weights, amplitudes `gain**o`.
    `sample(ys, xs)` evaluates it on the grid ys x xs (any float pixel coordinates), separably:
    one pass along x on the lattice rows that are needed, one along y."""

    def __init__(self, rng: np.random.Generator, height: int, width: int, cell: float,
                 octaves: int = 4, gain: float = 0.5, margin: float = 0.0):
        self.layers = []
        norm = sum(gain ** o for o in range(octaves))
        for o in range(octaves):
            spacing = max(cell / 2 ** o, 1.0)
            # the lattice covers the image plus `margin` pixels on every side (shifted lookups)
            origin = -margin
            n_y = int(math.ceil((height + 2 * margin) / spacing)) + 2
            n_x = int(math.ceil((width + 2 * margin) / spacing)) + 2
            lattice = rng.random((n_y, n_x), dtype=np.float32) * 2 - 1
            self.layers.append((spacing, origin, lattice, np.float32(gain ** o / norm)))

    @staticmethod
    def _weights(coords: np.ndarray, spacing: float, origin: float, n: int):
        u = (np.asarray(coords, np.float64) - origin) / spacing
        u = np.clip(u, 0, n - 1.000001)
        i0 = np.floor(u).astype(np.intp)
        t = (u - i0).astype(np.float32)
        t = t * t * (3 - 2 * t)                      # smoothstep: no creases at lattice lines
        return i0, t

    def sample(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """(len(ys), len(xs)) float32 in about [-1, 1]."""
        out = np.zeros((len(ys), len(xs)), np.float32)
        for spacing, origin, lattice, amp in self.layers:
            iy, ty = self._weights(ys, spacing, origin, lattice.shape[0])
            ix, tx = self._weights(xs, spacing, origin, lattice.shape[1])
            rows = np.unique(np.concatenate([iy, iy + 1]))
            sub = lattice[rows]                                  # only the lattice rows needed
            along_x = sub[:, ix] * (1 - tx) + sub[:, ix + 1] * tx  # (len(rows), len(xs))
            pos = np.searchsorted(rows, iy)
            out += amp * (along_x[pos] * (1 - ty)[:, None] + along_x[pos + 1] * ty[:, None])
        return out

    def at_points(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Values at individual points (ys[i], xs[i])."""
        out = np.zeros(len(ys), np.float32)
        for spacing, origin, lattice, amp in self.layers:
            iy, ty = self._weights(ys, spacing, origin, lattice.shape[0])
            ix, tx = self._weights(xs, spacing, origin, lattice.shape[1])
            top = lattice[iy, ix] * (1 - tx) + lattice[iy, ix + 1] * tx
            bottom = lattice[iy + 1, ix] * (1 - tx) + lattice[iy + 1, ix + 1] * tx
            out += amp * (top * (1 - ty) + bottom * ty)
        return out


class Parcels:
    """Voronoi cells around jittered grid points: straight-edged patches the size of fields.
    `ids(ys, xs)` gives each pixel's cell number on the grid ys x xs (any window, same answer)."""

    def __init__(self, rng: np.random.Generator, height: int, width: int, cell: float):
        self.cell = float(cell)
        self.ny, self.nx = int(height // cell) + 3, int(width // cell) + 3
        self.jitter = rng.random((2, self.ny, self.nx)).astype(np.float32) * np.float32(cell)

    def ids(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        c = self.cell
        iy = (np.asarray(ys) // c).astype(np.intp)[:, None]
        ix = (np.asarray(xs) // c).astype(np.intp)[None, :]
        y = np.asarray(ys, np.float32)[:, None]
        x = np.asarray(xs, np.float32)[None, :]
        best = np.full((len(ys), len(xs)), np.inf, np.float32)
        out = np.zeros((len(ys), len(xs)), np.intp)
        for dy in (-1, 0, 1):
            cy = np.clip(iy + dy, 0, self.ny - 1)
            for dx in (-1, 0, 1):
                cx = np.clip(ix + dx, 0, self.nx - 1)
                d = y - (cy * np.float32(c) + self.jitter[0][cy, cx])
                d *= d
                e = x - (cx * np.float32(c) + self.jitter[1][cy, cx])
                e *= e
                d += e
                closer = d < best
                np.copyto(best, d, where=closer)
                np.copyto(out, cy * self.nx + cx, where=closer)
        return out


def _coarse_quantiles(noise: ValueNoise, rows: int, cols: int, qs: Sequence[float],
                      n: int = 192) -> np.ndarray:
    """Quantiles of a noise field over the whole scene, estimated on an n x n grid (cheap, and
    the same whatever window is rendered later)."""
    sample = noise.sample(np.linspace(0, rows - 1, n), np.linspace(0, cols - 1, n))
    return np.quantile(sample, np.clip(qs, 0, 1))


# ------------------------------------------------------------------------------- ships

@dataclass(frozen=True)
class Ship:
    id: int
    row: float          # centre, pixels
    col: float
    length: float       # pixels
    width: float
    heading: float      # radians, 0 = along +col

    def bbox(self) -> tuple[int, int, int, int]:
        r = 0.5 * math.hypot(self.length, self.width) + 1
        return (int(math.floor(self.row - r)), int(math.ceil(self.row + r)) + 1,
                int(math.floor(self.col - r)), int(math.ceil(self.col + r)) + 1)

    def footprint(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Boolean mask of the ship over the window rows r0:r1, cols c0:c1 (pixel centres)."""
        yy = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5 - self.row
        xx = np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5 - self.col
        c, s = math.cos(self.heading), math.sin(self.heading)
        along = xx * c + yy * s
        across = -xx * s + yy * c
        return (np.abs(along) <= self.length / 2) & (np.abs(across) <= self.width / 2)


# ------------------------------------------------------------------------------- the scene

@dataclass
class GeneratedWindow:
    """Rows r0:r1 of a generated scene."""

    reflectance: np.ndarray      # (13, rows, cols) float32 TOA reflectance, S2_BANDS order
    truth: np.ndarray            # (rows, cols) uint8, values index CLASSES
    ships: np.ndarray            # (rows, cols) uint16 ship instance ids, 0 = none
    cloud_opacity: np.ndarray    # (rows, cols) float32 0..1
    row0: int
    bands: tuple[str, ...] = S2_BANDS


@dataclass
class SceneGenerator:
    """A procedural scene; nothing is rendered until `window` is called.

    `cloud_cover`: a fraction, or an along-track profile (fractions at evenly spaced rows,
    interpolated between), e.g. [0.0, 1.0, 0.2]. `ships`: how many ships to place on open water.
    """

    rows: int
    cols: int
    seed: int = 0
    cloud_cover: float | Sequence[float] = 0.3
    water_fraction: float | None = None  # None: DEFAULT_WATER_FRACTION of the surface
    ships: int = 10
    urban_fraction: float = 0.05
    cloud_height_m: float = 1500.0
    sun_elevation_deg: float = 40.0
    sun_azimuth_deg: float = 150.0
    gsd_m: float = 10.0
    noise_sigma: float = 0.004         # sensor noise, reflectance units
    feature_scale: float = 1.0         # >1: larger lakes, fields and clouds
    name: str = ""
    place: bool = False                # True: a georeference and a sensing time drawn from the seed
    surface: str = "temperate"         # the land: "temperate" (green) or "arid" (sand, soil, rock)
    haze: float = 0.0                  # aerosol load 0..HAZE_MAX (0: clear air; 1: a heavy dust haze)
    georef: GeoRef | None = field(init=False, default=None)
    sensing_time: datetime | None = field(init=False, default=None)   # UTC of row 0
    site: str | None = field(init=False, default=None)
    _ships: list[Ship] = field(init=False, repr=False)

    def __post_init__(self):
        for attr in ("rows", "cols"):
            v = getattr(self, attr)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise SceneSpecError(f"generator.{attr}: must be an integer >= 1, got {v!r}")
        if self.surface not in SURFACES:
            raise SceneSpecError(f"generator.surface: one of {', '.join(SURFACES)} expected, got {self.surface!r}")
        if isinstance(self.haze, bool) or not isinstance(self.haze, (int, float)) or not 0 <= self.haze <= HAZE_MAX:
            raise SceneSpecError(f"generator.haze: a number in 0..{HAZE_MAX} expected, got {self.haze!r}")
        if self.water_fraction is None:
            self.water_fraction = DEFAULT_WATER_FRACTION[self.surface]
        profile = np.atleast_1d(np.asarray(self.cloud_cover, np.float64))
        if profile.size == 0 or not np.all((profile >= 0) & (profile <= 1)):
            raise SceneSpecError(f"generator.cloud_cover: fractions in 0..1 expected, got {self.cloud_cover!r}")
        for attr in ("water_fraction", "urban_fraction"):
            v = getattr(self, attr)
            if not 0 <= v <= 1:
                raise SceneSpecError(f"generator.{attr}: must be in 0..1, got {v!r}")
        if not isinstance(self.place, bool):
            raise SceneSpecError(f"generator.place: true or false expected, got {self.place!r}")
        if self.ships < 0:
            raise SceneSpecError(f"generator.ships: must be >= 0, got {self.ships!r}")
        if not 0 < self.sun_elevation_deg <= 90:
            raise SceneSpecError(f"generator.sun_elevation_deg: must be in (0, 90], got {self.sun_elevation_deg!r}")
        self._profile = profile
        self.name = self.name or f"generated-{self.rows}x{self.cols}-s{self.seed}"
        rng = np.random.default_rng(self.seed)
        k = self.feature_scale
        # shadow vector: horizontal distance cloud -> its shadow, away from the sun
        d = self.cloud_height_m / math.tan(math.radians(self.sun_elevation_deg)) / self.gsd_m
        az = math.radians(self.sun_azimuth_deg)
        self.shadow_shift = (math.cos(az) * d, -math.sin(az) * d)    # (rows, cols), north-up
        margin = abs(self.shadow_shift[0]) + abs(self.shadow_shift[1]) + 2
        h, w = self.rows, self.cols
        self._water = ValueNoise(rng, h, w, 700 * k, octaves=5, gain=0.5)
        self._veg = ValueNoise(rng, h, w, 260 * k, octaves=4, gain=0.55)
        self._urban = ValueNoise(rng, h, w, 90 * k, octaves=3, gain=0.5)
        self._texture = ValueNoise(rng, h, w, 8, octaves=3, gain=0.6)
        self._cloud = ValueNoise(rng, h, w, 420 * k, octaves=CLOUD_OCTAVES, gain=0.55, margin=margin)
        cell, octaves, gain, _ = CLOUD_TEXTURE
        self._cloud_texture = ValueNoise(rng, h, w, cell, octaves=octaves, gain=gain)
        self._sensor_seed = int(rng.integers(2 ** 31))
        # land variety: canopy vigour and soil brightness (wet and dark to dry and bright)
        self._vigour = ValueNoise(rng, h, w, 180 * k, octaves=3, gain=0.5)
        self._soil_bright = ValueNoise(rng, h, w, 300 * k, octaves=3, gain=0.5)
        # parcels: Voronoi cells of ~400 m, sharp-edged patches (fields, woods, lots), each with
        # its own cover, vigour and brightness: real land is textured, not smooth
        self._parcels = Parcels(rng, h, w, 40 * k)
        self._parcel_veg = rng.uniform(-0.45, 0.45, PARCEL_LEVELS).astype(np.float32)
        self._parcel_vigour = rng.uniform(-0.6, 0.6, PARCEL_LEVELS).astype(np.float32)
        self._parcel_bright = rng.uniform(0.8, 1.2, PARCEL_LEVELS).astype(np.float32)
        qw, qu = _coarse_quantiles(self._water, h, w, [self.water_fraction, 1 - self.urban_fraction])
        # Python floats: a numpy float64 level would promote every float32 field it touches
        self._water_level = float(qw) if self.water_fraction > 0 else -np.inf
        self._urban_level = float(qu) if self.urban_fraction > 0 else np.inf
        # the cloud field's distribution, so a cover fraction maps to a threshold
        self._cloud_width = 0.08
        self._cloud_quantiles = _coarse_quantiles(self._cloud, h, w, _QUANTILE_GRID)
        self._ships = self._place_ships(rng)
        if self.place:
            self.site, self.georef, self.sensing_time = placement(self.seed, self.rows, self.cols, self.gsd_m)

    # ---------------------------------------------------------------- layout
    def cover_at(self, ys: np.ndarray) -> np.ndarray:
        """The requested cloud cover at each row (the along-track profile, interpolated)."""
        profile = self._profile
        if len(profile) == 1:
            return np.full(len(ys), profile[0])
        return np.interp(ys, np.linspace(0, self.rows - 1, len(profile)), profile)

    def _cloud_level(self, ys: np.ndarray) -> np.ndarray:
        """The threshold at each row above which opacity >= CLOUD_TRUTH_OPACITY covers `cover`
        of the pixels."""
        cover = self.cover_at(ys)
        level = (np.interp(1 - cover, _QUANTILE_GRID, self._cloud_quantiles)
                 - self._cloud_width * CLOUD_TRUTH_OPACITY)
        level[cover >= 0.999] = -10.0          # overcast: thick everywhere (noise is within +-1)
        level[cover <= 0.0] = 10.0             # clear: no cloud at all
        return level

    def _opacity(self, ys: np.ndarray, xs: np.ndarray, level_rows: np.ndarray) -> np.ndarray:
        c = self._cloud.sample(ys, xs)
        level = self._cloud_level(level_rows)[:, None].astype(np.float32)
        return np.clip((c - level) / self._cloud_width, 0, 1)

    def _place_ships(self, rng: np.random.Generator) -> list[Ship]:
        ships: list[Ship] = []
        if self.ships == 0 or self.water_fraction == 0:
            return ships
        tries = 0
        while len(ships) < self.ships and tries < self.ships * 200:
            tries += 1
            length = float(rng.uniform(4, 30))
            ship = Ship(len(ships) + 1, float(rng.uniform(20, self.rows - 20)) if self.rows > 40 else self.rows / 2,
                        float(rng.uniform(20, self.cols - 20)) if self.cols > 40 else self.cols / 2,
                        length, max(2.0, length / rng.uniform(4.5, 7.0)), float(rng.uniform(0, math.pi)))
            # open water around the whole hull (corners and centre), away from other ships
            r = 0.5 * ship.length + 8
            ys = np.array([ship.row, ship.row - r, ship.row + r, ship.row, ship.row])
            xs = np.array([ship.col, ship.col, ship.col, ship.col - r, ship.col + r])
            if np.any(self._water.at_points(ys, xs) >= self._water_level - 0.02):
                continue
            if any(math.hypot(o.row - ship.row, o.col - ship.col) < r + o.length for o in ships):
                continue
            ships.append(ship)
        return ships

    @property
    def ship_list(self) -> list[Ship]:
        return list(self._ships)

    # ---------------------------------------------------------------- rendering
    def window(self, r0: int = 0, r1: int | None = None) -> GeneratedWindow:
        """Render rows r0:r1 (all columns): per-pixel weights of the ENDMEMBERS (surface, ships,
        then shadow and cloud folded in), one matrix product for all 13 bands, sensor noise."""
        r1 = self.rows if r1 is None else r1
        if not 0 <= r0 < r1 <= self.rows:
            raise ValueError(f"window rows {r0}:{r1} outside the scene's 0:{self.rows}")
        ys = np.arange(r0, r1, dtype=np.float64) + 0.5
        xs = np.arange(self.cols, dtype=np.float64) + 0.5

        weights, water = self._surface_weights(ys, xs)
        truth = np.where(water, WATER, LAND).astype(np.uint8)
        ship_ids = self._paint_ships(weights, truth, r0, r1)
        shadow, opacity = self._shade_and_cloud(weights, ys, xs)
        matrix = _ARID_MATRIX if self.surface == "arid" else _ENDMEMBER_MATRIX
        toa = np.tensordot(matrix, weights, axes=1)             # (13, rows, cols)
        del weights
        if self.haze:
            self._add_haze(toa)
        self._add_sensor_noise(toa, r0)

        # a shadow on open water changes its reflectance by < 0.01 (water is already near the
        # path reflectance): the truth is what can be seen, so only shadows on land count
        truth[(shadow >= 0.5) & (opacity < CLOUD_TRUTH_OPACITY) & ~water] = SHADOW
        truth[opacity >= CLOUD_TRUTH_OPACITY] = CLOUD
        ship_ids[opacity >= CLOUD_TRUTH_OPACITY] = 0            # hidden under cloud: not a target
        return GeneratedWindow(toa, truth, ship_ids, opacity, r0)

    def _surface_weights(self, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(weights of the ENDMEMBERS (8, rows, cols), water mask) of the bare surface: land
        (vegetation, soil, vigour by parcel and texture), urban patches, slightly turbid water."""
        if self.surface == "arid":
            return self._arid_weights(ys, xs)
        water_field = self._water.sample(ys, xs)
        water = water_field < self._water_level
        parcel = self._parcels.ids(ys, xs) % PARCEL_LEVELS
        veg = np.clip(0.65 + 1.6 * self._veg.sample(ys, xs) + self._parcel_veg[parcel], 0, 1)  # mostly green
        fine = self._texture.sample(ys, xs)
        texture = (1 + 0.2 * fine) * self._parcel_bright[parcel]
        urban = (self._urban.sample(ys, xs) > self._urban_level) & ~water
        land = ~water & ~urban
        weights = np.zeros((len(ENDMEMBERS), len(ys), len(xs)), np.float32)
        weights[0] = np.where(land, veg * texture, 0)
        weights[1] = np.where(land, (1 - veg) * texture * (1 + 0.6 * self._soil_bright.sample(ys, xs)), 0)
        weights[7] = weights[0] * np.clip(0.5 + 1.6 * self._vigour.sample(ys, xs) + self._parcel_vigour[parcel],
                                          -0.6, 1.2)
        weights[2] = np.where(urban, texture, 0)
        # water: slightly turbid (a little soil signal) near the shore, where the field nears the level
        turbid = (np.clip(1 - (self._water_level - water_field) / 0.05, 0, 1) * 0.12
                  if np.isfinite(self._water_level) else np.zeros_like(veg))
        weights[3] = np.where(water, 1 + 0.03 * fine - turbid, 0)
        weights[1] += np.where(water, turbid, 0)
        return weights, water

    def _arid_weights(self, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(weights of the ARID_ENDMEMBERS (10, rows, cols), water mask) of a desert: sand seas
        with dune stripes, bare soil and dark gravel/rock plains, sparse dry scrub (greener on a
        few parcels: oases, irrigated fields), towns, little water. The same fields as a
        temperate scene of that seed, read differently: no new draws, so water, clouds and ships
        lie where they would on the temperate scene."""
        water_field = self._water.sample(ys, xs)
        water = water_field < self._water_level
        parcel = self._parcels.ids(ys, xs) % PARCEL_LEVELS
        fine = self._texture.sample(ys, xs)
        urban = (self._urban.sample(ys, xs) > self._urban_level) & ~water
        land = ~water & ~urban
        broad = self._veg.sample(ys, xs)
        # sand where the broad field is high; rock where the soil-brightness field is low
        sand = np.clip(0.75 + 2.0 * broad + 0.3 * self._parcel_veg[parcel], 0, 1)
        rock = np.clip(0.1 - 2.5 * self._soil_bright.sample(ys, xs), 0, 1)
        scrub = np.clip(0.04 + 0.3 * self._vigour.sample(ys, xs) + 0.3 * self._parcel_vigour[parcel], 0, 0.5)
        # dunes: stripes across the wind, their crests bent by the broad field
        phase = (xs[None, :] * 0.8 + ys[:, None] * 0.6) / DUNE_WAVELENGTH_PX + 3.0 * broad
        dunes = 1 + 0.12 * np.sin(2 * np.pi * phase).astype(np.float32)
        # a gentler parcel brightness than fields have: desert is less patchy
        texture = (1 + 0.12 * fine) * (1 + 0.5 * (self._parcel_bright[parcel] - 1))
        bare = np.where(land, (1 - scrub) * texture, 0)
        weights = np.zeros((len(ARID_ENDMEMBERS), len(ys), len(xs)), np.float32)
        weights[0] = np.where(land, scrub * texture, 0)
        weights[7] = weights[0] * -0.5                       # dry, thin scrub: a weak red edge
        weights[8] = bare * sand * dunes
        weights[1] = bare * (1 - sand) * (1 - rock)
        weights[9] = bare * (1 - sand) * rock
        weights[2] = np.where(urban, texture, 0)
        turbid = (np.clip(1 - (self._water_level - water_field) / 0.05, 0, 1) * 0.2
                  if np.isfinite(self._water_level) else np.zeros_like(fine))
        weights[3] = np.where(water, 1 + 0.03 * fine - turbid, 0)
        weights[1] += np.where(water, turbid, 0)
        return weights, water

    def _paint_ships(self, weights: np.ndarray, truth: np.ndarray, r0: int, r1: int) -> np.ndarray:
        """Ship hulls within rows r0:r1 replace the surface in `weights` and `truth`; returns
        their instance ids."""
        ship_ids = np.zeros((r1 - r0, self.cols), np.uint16)
        for ship in self._ships:
            a0, a1, b0, b1 = ship.bbox()
            a0, a1, b0, b1 = max(a0, r0), min(a1, r1), max(b0, 0), min(b1, self.cols)
            if a0 >= a1 or b0 >= b1:
                continue
            hull = ship.footprint(a0, a1, b0, b1)
            if not hull.any():
                continue
            sub = (slice(a0 - r0, a1 - r0), slice(b0, b1))
            ship_ids[sub][hull] = ship.id
            truth[sub][hull] = SHIP
            w = weights[:, sub[0], sub[1]]
            w[:, hull] = 0
            w[4][hull] = 1.0 + 0.4 * ((ship.id * 0.618) % 1)       # hulls differ a little
        return ship_ids

    def _shade_and_cloud(self, weights: np.ndarray, ys: np.ndarray,
                         xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fold shadow and cloud into `weights`; returns (shadow, cloud opacity).

        Both are linear mixes: in shadow the surface keeps `lit` of its signal and the rest
        tends to the path reflectance; a cloud of opacity a covers (1 - a) of what is below."""
        dr, dc = self.shadow_shift
        shadow = self._opacity(ys - dr, xs - dc, np.clip(ys - dr, 0, self.rows - 1))
        opacity = self._opacity(ys, xs, ys)
        lit = 1 - (1 - SHADOW_DIRECT_FRACTION) * shadow
        below = 1 - opacity
        weights[:5] *= (lit * below)[None]
        weights[7:] *= (lit * below)[None]           # vigour, and an arid scene's sand and rock
        weights[5] = (1 - lit) * below
        amp = CLOUD_TEXTURE[3]
        weights[6] = opacity * np.clip(1 + amp * self._cloud_texture.sample(ys, xs), 0.3, None)
        return shadow, opacity

    def _add_haze(self, toa: np.ndarray) -> None:
        """Aerosols in place: the surface (and cloud) signal is attenuated by the haze's
        transmittance and its own path reflectance is added, blue-heavy like the clear-sky path
        plus a flat dust component (HAZE). Not cloud: the truth is unchanged."""
        transmittance, path = HAZE
        h = np.float32(self.haze)
        toa *= 1 - h * np.float32(transmittance)
        toa += h * _HAZE_PATH

    def _add_sensor_noise(self, toa: np.ndarray, r0: int) -> None:
        """Sensor noise in place: uniform with the requested standard deviation (6x cheaper than
        normal), seeded by the window's first row so a window renders the same on its own."""
        rng = np.random.default_rng([self._sensor_seed, r0])
        noise = rng.random(toa.shape, dtype=np.float32)
        noise -= np.float32(0.5)
        noise *= np.float32(self.noise_sigma * math.sqrt(12))
        toa += noise
        del noise
        np.clip(toa, 0, None, out=toa)

    def scene(self) -> tuple[Scene, GeneratedWindow]:
        """The whole scene as a `Scene` (reflectance) and its truth."""
        win = self.window(0, self.rows)
        return Scene(win.reflectance, S2_BANDS, self.georef, self.name), win

    def bounds(self) -> tuple[float, float, float, float] | None:
        """(left, bottom, right, top) of the placed scene in its CRS (rasterio's order), or None."""
        if self.georef is None:
            return None
        a, _, c, _, e, f = self.georef.transform
        return (c, f + e * self.rows, c + a * self.cols, f)

    def describe(self) -> dict:
        out = {"kind": "generated", "name": self.name, "rows": self.rows, "cols": self.cols,
               "seed": self.seed, "cloud_cover": self._profile.tolist(),
               "surface": self.surface, "haze": self.haze, "water_fraction": self.water_fraction, "ships": len(self._ships),
               "shadow_shift_px": [round(v, 1) for v in self.shadow_shift]}
        if self.georef is not None:
            out.update(site=self.site, crs=self.georef.crs, transform=list(self.georef.transform),
                       sensing_time=self.sensing_time.isoformat().replace("+00:00", "Z"))
        return out


def placement(seed: int, rows: int, cols: int, gsd_m: float = 10.0) -> tuple[str, GeoRef, datetime]:
    """(site, GeoRef, UTC sensing time of row 0) of scene `seed`: a port of SITES, the scene's
    centre within SITE_JITTER_M of it, its corner on the gsd grid; a day of ACQUISITION_YEAR at
    10:30 mean local solar time at the zone's central meridian (Sentinel-2's descending node)."""
    rng = np.random.default_rng([int(seed), PLACE_STREAM])
    site, epsg, east, north = SITES[int(rng.integers(len(SITES)))]
    dx, dy = rng.uniform(-SITE_JITTER_M, SITE_JITTER_M, 2)
    x0 = gsd_m * round((east + dx - cols * gsd_m / 2) / gsd_m)
    y0 = gsd_m * round((north + dy + rows * gsd_m / 2) / gsd_m)
    central_meridian = (epsg % 100) * 6 - 183
    day = int(rng.integers(365))
    minutes = 10.5 * 60 - central_meridian * 4 + float(rng.uniform(-5, 5))   # 4 min of time per degree
    when = (datetime(ACQUISITION_YEAR, 1, 1, tzinfo=timezone.utc)
            + timedelta(days=day, minutes=minutes)).replace(microsecond=0)
    return site, GeoRef(f"EPSG:{epsg}", (gsd_m, 0.0, x0, 0.0, -gsd_m, y0)), when


def generate_scene(rows: int, cols: int, seed: int = 0, **kwargs) -> tuple[Scene, GeneratedWindow]:
    """A whole generated scene and its truth; keyword arguments as `SceneGenerator`."""
    return SceneGenerator(rows, cols, seed, **kwargs).scene()
