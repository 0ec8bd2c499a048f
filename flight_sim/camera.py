"""The payload camera: a push-broom sensor that cuts scenes into along-track frames.

A push-broom imager records one line across the swath at a time; the satellite's motion sweeps
it along the track. A line takes `gsd / ground_speed` seconds (10 m at 7.5 km/s: 1.33 ms), so a
frame of `frame_lines` lines is complete `frame_lines * line_period` after its first line
(512 lines: 0.68 s). Frames are stamped with that mission time; scenes follow each other along
the track (`gap_s` apart). The camera quantises reflectance to the L1C digital numbers a
Sentinel-2 payload sends (uint16, reflectance = DN * 1e-4) or sends float32 reflectance.

A frame from a scene that knows where it lies (its source's `georef`: a GeoTIFF's tags, a SAFE
product's band files, a generated scene with `place = true`) carries its georeference on the bus:
the CRS, the frame's own affine transform (the scene's, moved down to the frame's first row), the
UTC time its last line was recorded (the source's `sensing_time`, a SAFE product's sensing start
or a placed generated scene's, + the frame's lines; else `epoch_utc` + its mission time,
the epoch being the camera's creation unless given) and the scene's name as `scene_id`. The daemon copies it into the frame's DECISION and PRODUCT.

The sending cadence is the scenario's business (`Cadence`): "realtime" sends each frame when it
is complete on the mission clock (scaled by `speedup`), "asap" as fast as the daemon takes them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Iterator, Sequence

import numpy as np

from flight_sim.errors import ScenarioError
from flight_sim.scenes import SceneSource
from shared.messages import parse_datetime
from shared.scene import Scene

DN_SCALE = 1e-4                   # L1C: reflectance = DN / 10000
GROUND_SPEED_M_S = 7500.0         # ground-track speed of a ~500-800 km LEO orbit
DTYPES = ("uint16", "float32")
MODES = ("realtime", "asap")


@dataclass(frozen=True)
class CameraConfig:
    frame_lines: int = 512
    gsd_m: float = 10.0
    ground_speed_m_s: float = GROUND_SPEED_M_S
    dtype: str = "uint16"
    bands: tuple[str, ...] | None = None    # None: every band the scene has
    gap_s: float = 0.0                      # mission time between consecutive scenes
    epoch_utc: str | None = None            # UTC at mission time 0 (ISO 8601); None: now

    def __post_init__(self):
        if not isinstance(self.frame_lines, int) or self.frame_lines < 1:
            raise ScenarioError(f"camera.frame_lines: an integer >= 1 expected, got {self.frame_lines!r}")
        for name in ("gsd_m", "ground_speed_m_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v <= 0:
                raise ScenarioError(f"camera.{name}: a number > 0 expected, got {v!r}")
        if self.dtype not in DTYPES:
            raise ScenarioError(f"camera.dtype: one of {', '.join(DTYPES)} expected, got {self.dtype!r}")
        if self.gap_s < 0:
            raise ScenarioError(f"camera.gap_s: must be >= 0, got {self.gap_s!r}")
        if self.epoch_utc is not None:
            epoch_datetime(self.epoch_utc)

    @property
    def line_period_s(self) -> float:
        return self.gsd_m / self.ground_speed_m_s

    @property
    def frame_period_s(self) -> float:
        return self.frame_lines * self.line_period_s


@dataclass
class CapturedFrame:
    """One frame as the payload holds it until its outcome arrives."""

    frame_id: str
    scene: str
    scene_index: int
    index: int                     # frame number within its scene
    row0: int
    row1: int
    acquired: float                # mission time (s) at which its last line was recorded
    data: np.ndarray               # (bands, rows, cols) uint16 DN or float32 reflectance
    bands: tuple[str, ...]
    scale: float                   # reflectance = value * scale
    truth: np.ndarray | None = None
    objects: np.ndarray | None = None
    truth_classes: tuple[str, ...] | None = None
    object_class: str | None = None
    kind: str = "frame"            # "frame", or the name of an injected malformation
    georef: dict | None = None     # {crs, transform, datetime, scene_id} when the scene knows it
    extra: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes) if self.data is not None else int(self.extra.get("nbytes", 0))

    def release_data(self) -> None:
        """Drop the pixels once the frame's outcome is in (the payload's memory is finite);
        a small true-colour preview stays for the report."""
        if self.data is not None:
            self.extra["nbytes"] = int(self.data.nbytes)
            self.extra.setdefault("preview", preview_rgb(self.data, self.bands, self.scale))
            self.data = None

    def body(self) -> dict:
        body = {"frame_id": self.frame_id, "bands": list(self.bands), "scale": self.scale,
                "scene": self.scene, "index": self.index, "acquired": self.acquired}
        if self.georef is not None:
            body["georef"] = self.georef
        return body


def epoch_datetime(text: str) -> datetime:
    """An ISO 8601 UTC time (`2026-12-02T10:00:00Z`) as an aware datetime."""
    try:
        value = parse_datetime(text) if isinstance(text, str) else None
    except ValueError:
        value = None
    if value is None or value.tzinfo is None:
        raise ScenarioError(f"camera.epoch_utc: an ISO 8601 time with its UTC offset expected "
                            f"(2026-12-02T10:00:00Z), got {text!r}")
    return value.astimezone(timezone.utc)


def frame_georef(source: SceneSource, row0: int, when: datetime) -> dict | None:
    """The georeference a frame starting at `row0` of `source`, recorded at `when`, carries on
    the bus, or None when the source does not know its CRS (a transform alone puts nothing on a
    map)."""
    georef = source.georef
    if georef is None or georef.crs is None:
        return None
    return {"crs": georef.crs, "transform": list(georef.shifted(row0, 0).transform),
            "datetime": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "scene_id": source.name[:256]}


def preview_rgb(data: np.ndarray, bands: Sequence[str], scale: float, max_side: int = 256) -> np.ndarray | None:
    """(h, w, 3) float32 true colour 0..1 (reflectance 0.3 = white), subsampled to max_side."""
    idx = [list(bands).index(b) for b in ("B04", "B03", "B02") if b in bands]
    if len(idx) < 3:
        return None
    step = max(1, -(-max(data.shape[1:]) // max_side))
    rgb = np.moveaxis(data[idx, ::step, ::step].astype(np.float32) * np.float32(scale), 0, -1)
    return np.clip(rgb / 0.3, 0, 1)


def safe_name(name: str) -> str:
    """A scene name usable in frame ids and file names."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "scene"


def quantise(reflectance: np.ndarray, dtype: str) -> tuple[np.ndarray, float]:
    """(values, scale) as the camera sends them."""
    if dtype == "float32":
        return np.ascontiguousarray(reflectance, np.float32), 1.0
    dn = np.rint(reflectance / DN_SCALE)
    np.clip(dn, 0, np.iinfo(np.uint16).max, out=dn)
    return dn.astype(np.uint16), DN_SCALE


class PushbroomCamera:
    """Frames of `sources`, in order, rendered strip by strip as they are asked for."""

    def __init__(self, sources: Sequence[SceneSource], config: CameraConfig = CameraConfig()):
        if not sources:
            raise ScenarioError("camera: at least one scene is needed")
        self.sources = list(sources)
        self.config = config
        self.epoch = (epoch_datetime(config.epoch_utc) if config.epoch_utc
                      else datetime.now(timezone.utc))
        self._starts = []                    # mission time of each scene's first line
        t = 0.0
        for src in self.sources:
            self._starts.append(t)
            t += src.rows * config.line_period_s + config.gap_s
        self.duration_s = t - config.gap_s

    def frame_count(self) -> int:
        n = self.config.frame_lines
        return sum(-(-src.rows // n) for src in self.sources)

    def bytes_per_frame(self, source: SceneSource) -> int:
        n_bands = len(self.config.bands or source.bands)
        itemsize = np.dtype(self.config.dtype).itemsize
        return n_bands * min(self.config.frame_lines, source.rows) * source.cols * itemsize

    def schedule(self) -> list[tuple[int, int, int, int, float]]:
        """(scene index, frame index, row0, row1, acquired mission time) of every frame."""
        out = []
        n, line = self.config.frame_lines, self.config.line_period_s
        for s, src in enumerate(self.sources):
            for i, r0 in enumerate(range(0, src.rows, n)):
                r1 = min(r0 + n, src.rows)
                out.append((s, i, r0, r1, self._starts[s] + r1 * line))
        return out

    def capture(self, scene_index: int, index: int, r0: int, r1: int, acquired: float) -> CapturedFrame:
        src = self.sources[scene_index]
        strip = src.read(r0, r1)
        data, bands = strip.reflectance, src.bands
        if self.config.bands:
            selected = Scene(data, bands, None, src.name).select(self.config.bands)
            data, bands = selected.data, selected.bands
        values, scale = quantise(data, self.config.dtype)
        name = safe_name(src.name)
        return CapturedFrame(frame_id=f"{scene_index:02d}-{name}-{index:04d}", scene=src.name,
                             scene_index=scene_index, index=index, row0=r0, row1=r1,
                             acquired=round(acquired, 6), data=values, bands=tuple(bands),
                             scale=scale, truth=strip.truth, objects=strip.objects,
                             truth_classes=src.truth_classes, object_class=src.object_class,
                             georef=frame_georef(src, r0, self._recorded_at(src, r1, acquired)))

    def _recorded_at(self, source: SceneSource, row1: int, acquired: float) -> datetime:
        """UTC of a frame's last line: the scene's own sensing time when it has one."""
        if source.sensing_time is not None:
            return source.sensing_time + timedelta(seconds=row1 * self.config.line_period_s)
        return self.epoch + timedelta(seconds=acquired)

    def frames(self) -> Iterator[CapturedFrame]:
        for item in self.schedule():
            yield self.capture(*item)
