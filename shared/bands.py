"""The 13 Sentinel-2 MSI bands: canonical names, native resolutions and the aliases people use.

Every band name that enters the system (a manifest, a file name, a user's `--bands`) goes through
`canonical_band`, so `B2`, `b02`, `Blue` and `B02` all mean the same band and a typo fails early
with the name it could not place.
"""
from __future__ import annotations

import re
from typing import Iterable

from shared.errors import UnknownBandError

# The usual 13-band order (L1C products, sen1floods11, eo-learn): B8A sits after B08.
S2_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12",
)

RESOLUTION_M: dict[str, int] = {
    "B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20,
    "B08": 10, "B8A": 20, "B09": 60, "B10": 60, "B11": 20, "B12": 20,
}

# Common names (ESA / STAC eo:common_name / band-math conventions). Keys are compared after
# `_key` (lower case, no spaces, "_" or "-"), so "Red Edge 1", "red_edge_1" and "RedEdge1" match.
_ALIASES: dict[str, str] = {
    "coastal": "B01", "coastalaerosol": "B01", "aerosol": "B01",
    "blue": "B02", "green": "B03", "red": "B04",
    "rededge1": "B05", "rededge2": "B06", "rededge3": "B07",
    "nir": "B08", "nir08": "B08", "broadnir": "B08",
    "nir2": "B8A", "nirnarrow": "B8A", "narrownir": "B8A", "nir09": "B8A", "rededge4": "B8A",
    "watervapour": "B09", "watervapor": "B09", "wv": "B09",
    "cirrus": "B10", "swircirrus": "B10",
    "swir16": "B11", "swir1": "B11",
    "swir22": "B12", "swir2": "B12",
}

# "B2", "b02", "B002", "B8A", "b8a", "B08A"
_CODE = re.compile(r"^b0*(\d{1,2})(a?)$")


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).lower()


def canonical_band(name: str) -> str:
    """The canonical name (`B01`..`B12`, `B8A`) of a band code or common name; raises
    `UnknownBandError` naming `name` when it is neither."""
    if not isinstance(name, str):
        raise UnknownBandError(name)
    key = _key(name)
    match = _CODE.match(key)
    if match:
        number, suffix = int(match.group(1)), match.group(2)
        canon = "B8A" if (number, suffix) == (8, "a") else f"B{number:02d}{suffix.upper()}"
        if canon in RESOLUTION_M:
            return canon
        raise UnknownBandError(name)
    if key in _ALIASES:
        return _ALIASES[key]
    raise UnknownBandError(name)


def canonical_bands(names: Iterable[str]) -> tuple[str, ...]:
    """`canonical_band` over a sequence; raises on the first unknown name (a bare string is
    refused: `"B02"` would otherwise be read as the bands `B`, `0`, `2`)."""
    if isinstance(names, str):
        raise TypeError(f"expected a sequence of band names, got the string {names!r}")
    return tuple(canonical_band(n) for n in names)


def is_band(name: str) -> bool:
    """True when `name` is a Sentinel-2 band code or alias."""
    try:
        canonical_band(name)
    except UnknownBandError:
        return False
    return True


def looks_like_band_code(name: str) -> bool:
    """True for strings shaped like a band code (`B13`, `b7`), known or not: such a name is a
    typo to report, not a custom channel to keep."""
    return isinstance(name, str) and bool(_CODE.match(_key(name)))


# A band token inside a file name: `T33UVP_20200101T100000_B04_10m.tif`, `B8A.tif`, `x-b11.tiff`.
_FILE_TOKEN = re.compile(r"(?:^|[_\-.\s])(B\d{1,2}A?)(?=$|[_\-.\s])", re.IGNORECASE)


def band_from_filename(stem: str) -> str | None:
    """The canonical band named in a file stem (the last band-shaped token), or None."""
    tokens = _FILE_TOKEN.findall(stem)
    for token in reversed(tokens):
        if is_band(token):
            return canonical_band(token)
    return None
