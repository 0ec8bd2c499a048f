"""The one SHA-256 helper every package uses for files (bundles, uploads, lineage)."""
from __future__ import annotations

import hashlib
import os
from typing import Iterable

CHUNK = 1 << 20     # read 1 MiB at a time: a bundle or a checkpoint never sits whole in memory


def sha256_blocks(blocks: Iterable[bytes]) -> str:
    """Hex SHA-256 of the concatenation of `blocks` (a stream read piece by piece)."""
    h = hashlib.sha256()
    for block in blocks:
        h.update(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = CHUNK) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    with open(path, "rb") as f:
        return sha256_blocks(iter(lambda: f.read(chunk), b""))
