"""Learning samples: what the satellite sends down for the ground to learn from.

On board, the frame graph scores every model tile it runs (onboard.runtime): the mean normalised
entropy of the class probabilities, and the share of pixels whose two likeliest classes lie
within AMBIGUOUS_MARGIN of each other (for sigmoid outputs: a class within half of it from its
threshold). The policy's `learning` block (shared.policy) picks a few tiles per frame (the most
uncertain, or drawn at random as a control) and the daemon sends their raw values, in the
model's bands, as a SAMPLE message (shared.messages), whatever it decides for the frame.

On the ground each sample is one `.npz` file (`write_sample`, `read_sample`): the tile's values
(`data`, (C, size, size), the frame's dtype, reflectance = value * scale) and a JSON record
(`meta`) with where it lies (the frame's id, the window, the tile's own georeference), the model
that chose it (id and version) and its scores. The factory's `learning` data source reads these.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

SCORES = ("entropy", "ambiguous")
SELECTIONS = ("uncertainty", "random")
AMBIGUOUS_MARGIN = 0.2
SAMPLE_SUFFIX = ".npz"
FORMAT = "eoedge-learning-sample/1"


class SampleError(ValueError):
    """A learning sample (message or file) that cannot be used; the text names what is wrong."""


@dataclass
class LearningSample:
    data: np.ndarray                    # (C, size, size) raw values in `bands` order
    bands: list[str]
    scale: float                        # reflectance = value * scale
    frame_id: str
    row: int                            # the window's top-left pixel in the frame
    col: int
    size: int
    model_id: str
    model_version: int
    entropy: float
    ambiguous: float
    selection: str                      # "uncertainty" or "random"
    georef: dict | None = None          # the tile's own {crs, transform}: its top-left pixel
    scene: str | None = None
    acquired: float | None = None

    def meta(self) -> dict:
        out = asdict(self)
        out.pop("data")
        return {"format": FORMAT, **out}

    @property
    def reflectance(self) -> np.ndarray:
        return self.data.astype(np.float32) * np.float32(self.scale)


def window_georef(georef: Mapping | None, row: int, col: int) -> dict | None:
    """The georeference of a window whose top-left pixel is (row, col) of a raster georeferenced
    by `georef` ({crs, transform (a, b, c, d, e, f)}, rasterio order): the same pixel size, the
    origin moved. None stays None."""
    if georef is None:
        return None
    a, b, c, d, e, f = (float(v) for v in georef["transform"])
    out = {k: v for k, v in georef.items() if k != "transform"}
    out["transform"] = [a, b, c + a * col + b * row, d, e, f + d * col + e * row]
    return out


def samples_from_message(body: Mapping[str, Any], tiles: np.ndarray) -> list[LearningSample]:
    """The samples of a SAMPLE message (body already validated by shared.messages) and its
    `tiles` array; raises SampleError when the array does not match the body."""
    entries = body["samples"]
    if tiles.ndim != 4 or len(tiles) != len(entries) or tiles.shape[1] != len(body["bands"]):
        raise SampleError(f"sample {body['frame_id']}: tiles {tiles.shape} do not hold {len(entries)} "
                          f"samples of {len(body['bands'])} bands")
    if body["selection"] not in SELECTIONS:
        raise SampleError(f"sample {body['frame_id']}: selection {body['selection']!r} is not one of "
                          f"{', '.join(SELECTIONS)}")
    out = []
    for i, entry in enumerate(entries):
        size = int(entry["size"])
        if tiles.shape[2:] != (size, size):
            raise SampleError(f"sample {body['frame_id']}: samples[{i}].size {size} but its tile is "
                              f"{tiles.shape[2]} x {tiles.shape[3]}")
        out.append(LearningSample(
            data=np.array(tiles[i]), bands=list(body["bands"]), scale=float(body["scale"]),
            frame_id=body["frame_id"], row=int(entry["row"]), col=int(entry["col"]), size=size,
            model_id=body["model"]["model_id"], model_version=int(body["model"]["version"]),
            entropy=float(entry["entropy"]), ambiguous=float(entry["ambiguous"]),
            selection=body["selection"], georef=window_georef(body.get("georef"), entry["row"], entry["col"]),
            scene=body.get("scene"), acquired=body.get("acquired")))
    return out


def sample_name(sample: LearningSample) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", sample.frame_id)[:100] or "frame"
    return f"{safe}-r{sample.row}-c{sample.col}{SAMPLE_SUFFIX}"


def write_sample(folder: str | Path, sample: LearningSample) -> Path:
    """One sample as `folder/<frame>-r<row>-c<col>.npz` (data + meta JSON); its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / sample_name(sample)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, data=sample.data, meta=np.array(json.dumps(sample.meta())))
    tmp.replace(path)
    return path


_FIELDS = {"bands": list, "scale": (int, float), "frame_id": str, "row": int, "col": int, "size": int,
           "model_id": str, "model_version": int, "entropy": (int, float), "ambiguous": (int, float),
           "selection": str}


def read_sample(path: str | Path) -> LearningSample:
    """A sample written by `write_sample`; raises SampleError naming the file and the field."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "data" not in npz.files or "meta" not in npz.files:
                raise SampleError(f"{path}: not a learning sample (needs arrays 'data' and 'meta', "
                                  f"has {', '.join(npz.files) or 'none'})")
            data, meta = npz["data"], json.loads(str(npz["meta"]))
    except SampleError:
        raise
    except FileNotFoundError:
        raise SampleError(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError) as exc:
        raise SampleError(f"{path}: unreadable learning sample: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SampleError(f"{path}: meta.format must be {FORMAT!r}, got "
                          f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
    for name, kind in _FIELDS.items():
        if not isinstance(meta.get(name), kind) or isinstance(meta.get(name), bool):
            raise SampleError(f"{path}: meta.{name} missing or not {getattr(kind, '__name__', 'a number')}")
    size = meta["size"]
    if data.shape != (len(meta["bands"]), size, size):
        raise SampleError(f"{path}: data {data.shape} is not ({len(meta['bands'])}, {size}, {size}) "
                          "as meta says")
    known = set(_FIELDS) | {"format", "georef", "scene", "acquired"}
    unknown = sorted(set(meta) - known)
    if unknown:
        raise SampleError(f"{path}: meta has unknown fields {', '.join(unknown)}")
    meta = {k: v for k, v in meta.items() if k != "format"}
    return LearningSample(data=data, **meta)


def read_samples(paths: str | Path | Sequence[str | Path]) -> list[LearningSample]:
    """Every sample in a folder (recursively) or in the given files, in name order."""
    if isinstance(paths, (str, Path)):
        root = Path(paths)
        if not root.exists():
            raise SampleError(f"{root}: no such folder or file")
        paths = (sorted(p for p in root.rglob(f"*{SAMPLE_SUFFIX}") if not p.name.endswith(".tmp.npz"))
                 if root.is_dir() else [root])
    return [read_sample(p) for p in paths]
