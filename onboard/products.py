"""What goes down for a kept frame: the class mask (PNG), a quicklook (JPEG), the kept tiles.

    mask_png      bytes   the class mask (H, W), one class index per pixel, lossless PNG
    quicklook_jpg bytes   true colour (B04, B03, B02) or the first band, at most `max_side` px
    tile_boxes    (N, 4) int32: row, col, height, width of each kept tile in the frame
    tiles         (N, C, t, t) the frame's own values (all its bands, its dtype) of the kept
                  tiles, zero-padded where a tile runs past the frame's edge; or, when every
    frame         tile is kept, the frame itself (C, H, W) instead: no copy (the bus sends the
                  very buffer it received), no padding, and the same pixels
"""
from __future__ import annotations

import os
import re
import struct
import zlib
from pathlib import Path
from typing import Sequence

import cv2
import msgpack
import numpy as np

from shared.bands import UnknownBandError, canonical_band

QUICKLOOK_BANDS = ("B04", "B03", "B02")
QUICKLOOK_MAX_REFLECTANCE = 0.3     # reflectance shown as white: keeps land readable, clouds clip
# Class masks are long runs of one value: zlib's RLE strategy at level 1 without PNG row filters
# is ~8x faster than OpenCV's PNG defaults on a 2048 x 2048 mask and gives a smaller file.
JPEG_QUALITY = 85
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_ROWS_PER_CALL = 256         # rows filtered and compressed at a time (bounded scratch memory)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


class MaskPng:
    """A class mask (H, W) uint8 as an 8-bit greyscale PNG, encoded band by band as its rows
    become final (the pipeline feeds it while later tiles still infer): `add(rows)` top to
    bottom, then `finish()` -> the PNG's bytes. zlib (the standard library's) does the
    compression, RLE strategy, level 1, filter type 0 on every row; any PNG reader decodes it
    (OpenCV's encoder cannot be fed row by row)."""

    def __init__(self, height: int, width: int):
        self.height, self.width, self.rows = int(height), int(width), 0
        self._zlib = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
        self._parts = [PNG_SIGNATURE, _png_chunk(b"IHDR", struct.pack(">IIBBBBB", self.width, self.height,
                                                                      8, 0, 0, 0, 0))]

    def add(self, rows: np.ndarray) -> None:
        if rows.ndim != 2 or rows.dtype != np.uint8 or rows.shape[1] != self.width \
                or self.rows + len(rows) > self.height:
            raise ValueError(f"rows {rows.dtype} {rows.shape} do not continue a {self.height} x {self.width} "
                             f"uint8 mask at row {self.rows}")
        for start in range(0, len(rows), PNG_ROWS_PER_CALL):
            part = rows[start:start + PNG_ROWS_PER_CALL]
            filtered = np.empty((len(part), self.width + 1), np.uint8)
            filtered[:, 0] = 0                  # each row's filter type: none
            filtered[:, 1:] = part
            data = self._zlib.compress(filtered)
            if data:
                self._parts.append(_png_chunk(b"IDAT", data))
        self.rows += len(rows)

    def finish(self) -> bytes:
        if self.rows != self.height:
            raise ValueError(f"{self.rows} of the mask's {self.height} rows added")
        self._parts += [_png_chunk(b"IDAT", self._zlib.flush()), _png_chunk(b"IEND", b"")]
        return b"".join(self._parts)


def mask_png(mask: np.ndarray) -> bytes:
    """The class mask (H, W) uint8 as a lossless PNG (MaskPng, all rows at once)."""
    png = MaskPng(*mask.shape)
    png.add(mask)
    return png.finish()


def decode_mask_png(data: bytes) -> np.ndarray:
    """The inverse of `mask_png` (for the ground side and tests)."""
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise ValueError("not a PNG image")
    return mask


def _band_index(bands: Sequence[str]) -> dict[str, int]:
    out = {}
    for i, name in enumerate(bands):
        try:
            out.setdefault(canonical_band(name), i)
        except UnknownBandError:
            pass
    return out


def quicklook_jpg(data: np.ndarray, bands: Sequence[str], scale: float, max_side: int = 512) -> bytes:
    """A small true-colour JPEG of the frame (data (C, H, W), reflectance = value * scale)."""
    index = _band_index(bands)
    picks = [index[b] for b in QUICKLOOK_BANDS] if all(b in index for b in QUICKLOOK_BANDS) else [0]
    h, w = data.shape[1:]
    f = max(1, -(-max(h, w) // max_side))            # integer shrink factor
    size = (max(1, w // f), max(1, h // f))
    layers = []
    for b in reversed(picks):                         # OpenCV wants BGR
        band = data[b] if data.dtype != np.int16 else data[b].astype(np.float32)   # (cv2 has no int16 resize)
        small = cv2.resize(band, size, interpolation=cv2.INTER_AREA) if f > 1 else band
        with np.errstate(over="ignore", invalid="ignore"):     # absurd values just saturate
            layers.append(np.clip(small * (scale * 255.0 / QUICKLOOK_MAX_REFLECTANCE), 0, 255).astype(np.uint8))
    image = layers[0] if len(layers) == 1 else np.dstack(layers)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("OpenCV could not encode the quicklook as JPEG")
    return buf.tobytes()


def kept_tiles(data: np.ndarray, boxes: Sequence[tuple[int, int, int, int]], tile: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """The frame's values under each box (row, col, height, width), as (N, C, tile, tile)."""
    out = np.empty((len(boxes), data.shape[0], tile, tile), dtype=data.dtype)
    for n, (r, c, h, w) in enumerate(boxes):
        out[n, :, :h, :w] = data[:, r:r + h, c:c + w]
        if h < tile or w < tile:          # zero only the padding of an edge tile
            out[n, :, h:, :] = 0
            out[n, :, :h, w:] = 0
    return out, np.asarray(boxes, dtype=np.int32).reshape(len(boxes), 4)


def frame_products(data: np.ndarray, bands: Sequence[str], scale: float, mask: np.ndarray,
                   tile_boxes: Sequence[tuple[int, int, int, int]], tile: int, all_kept: bool = False,
                   *, png: bytes | None = None, quicklook: bytes | None = None) -> dict:
    """The products of a kept frame (the module's table). `png` / `quicklook`: the mask's PNG
    and the quicklook when already made (the pipeline makes them while tiles still infer)."""
    out = {"mask_png": mask_png(mask) if png is None else png,
           "quicklook_jpg": quicklook_jpg(data, bands, scale) if quicklook is None else quicklook,
           "tile_boxes": np.asarray(tile_boxes, dtype=np.int32).reshape(len(tile_boxes), 4)}
    if all_kept:
        out["frame"] = data            # a copy into tiles would only rearrange the same pixels
    else:
        out["tiles"] = kept_tiles(data, tile_boxes, tile)[0]
    return out


SPILL_SUFFIX = ".product"


def spill_path(folder: Path, frame_id: str) -> Path:
    """Where `spill_product` keeps a frame's product: `folder/<frame_id>.product`."""
    return Path(folder) / (re.sub(r"[^A-Za-z0-9_.-]", "_", frame_id)[:200] + SPILL_SUFFIX)


def spill_product(folder: Path, frame_id: str, parts: Sequence) -> Path:
    """Write a kept frame's encoded PRODUCT message (its parts, as a msgpack list) to
    `spill_path(folder, frame_id)`: temp file, fsync of the file and of the folder, rename, so a
    full disk or a crash leaves no half-written product under the final name, and a product
    spilled before its DECISION left survives kill -9 and power loss. Raises OSError (disk
    full: onboard.errors.is_disk_full)."""
    folder.mkdir(parents=True, exist_ok=True)
    final = spill_path(folder, frame_id)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            _write_msgpack_parts(fh, parts)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_folder(folder)          # the rename itself is on disk
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return final


def _write_msgpack_parts(fh, parts: Sequence) -> None:
    """`msgpack.packb([bytes(p) for p in parts])`, streamed: headers packed, each part's buffer
    written as it is, so a kept frame's pixels are never copied on their way to disk."""
    views = [_byte_view(p) for p in parts]
    fh.write(msgpack.Packer().pack_array_header(len(views)))
    for view in views:
        n = view.nbytes          # msgpack's bin 8/16/32 header (the Packer has none for bin)
        fh.write(struct.pack(">BB", 0xC4, n) if n < 1 << 8 else
                 struct.pack(">BH", 0xC5, n) if n < 1 << 16 else struct.pack(">BI", 0xC6, n))
        fh.write(view)


def _byte_view(part) -> memoryview:
    view = memoryview(part)
    return view.cast("B") if view.c_contiguous else memoryview(view.tobytes())


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def spilled_products(folder: Path | None) -> list[Path]:
    """The products spilled to `folder` and not yet acknowledged by the ground, oldest first
    (what a restarted daemon sends again)."""
    if folder is None or not Path(folder).is_dir():
        return []
    found = []
    for path in Path(folder).glob(f"*{SPILL_SUFFIX}"):
        try:
            found.append((path.stat().st_mtime_ns, path.name, path))
        except FileNotFoundError:       # acknowledged meanwhile
            pass
    return [path for _, _, path in sorted(found)]


def remove_spilled(folder: Path, frame_ids: Sequence[str]) -> tuple[int, int]:
    """The ground has these frames' products: their spilled copies go. (removed, not held)."""
    removed = 0
    for frame_id in frame_ids:
        try:
            spill_path(folder, frame_id).unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed, len(frame_ids) - removed


def read_spilled(path: Path) -> list[memoryview]:
    """The message parts `spill_product` wrote (decode them with shared.messages.decode), as
    views of one buffer the file is read into: a product read back for the downlink costs its
    bytes once (msgpack.unpackb would copy every part). Raises OSError, or ValueError when the
    file is not a msgpack array of bin parts."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        buf = bytearray(size)
        if fh.readinto(buf) != size:
            raise ValueError(f"{path}: shorter than its size ({size} bytes)")
    view = memoryview(buf)
    count, pos = _msgpack_header(view, 0, _ARRAY_HEADERS, "array")
    parts = []
    for _ in range(count):
        n, pos = _msgpack_header(view, pos, _BIN_HEADERS, "bin")
        if pos + n > size:
            raise ValueError(f"{path}: a part of {n} bytes runs past the end of the file")
        parts.append(view[pos:pos + n])
        pos += n
    if pos != size:
        raise ValueError(f"{path}: {size - pos} bytes after the last part")
    return parts


# msgpack's array and bin headers: first byte -> (length bytes, big-endian format); fixarray
# (0x90..0x9f) holds its count in the low nibble
_ARRAY_HEADERS = {0xDC: ">H", 0xDD: ">I"}
_BIN_HEADERS = {0xC4: ">B", 0xC5: ">H", 0xC6: ">I"}


def _msgpack_header(view: memoryview, pos: int, formats: dict, what: str) -> tuple[int, int]:
    """(the count or length a msgpack `what` header at `pos` gives, the position after it)."""
    if pos >= len(view):
        raise ValueError(f"truncated: a msgpack {what} header expected at byte {pos}")
    first = view[pos]
    if what == "array" and 0x90 <= first <= 0x9F:
        return first & 0x0F, pos + 1
    if first not in formats:
        raise ValueError(f"byte {pos}: 0x{first:02x} is not a msgpack {what} header")
    fmt = formats[first]
    end = pos + 1 + struct.calcsize(fmt)
    if end > len(view):
        raise ValueError(f"truncated: a msgpack {what} header at byte {pos}")
    return struct.unpack(fmt, view[pos + 1:end])[0], end
