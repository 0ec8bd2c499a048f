"""Bundles a careless or hostile ground could sign: a valid bundle re-signed after its manifest
was changed without validation (build_bundle itself refuses these), for the checks that verify
and install must make on their own."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Callable

from shared.bundle import signature_document
from shared.keys import load_private_key
from shared.manifest import MANIFEST_NAME, SIGNATURE_NAME, manifest_bytes


def resigned(bundle: Path, out: Path, private_key, change: Callable[[dict], None]) -> Path:
    """`bundle` with `change(manifest)` applied, signed again with `private_key` (not validated)."""
    with tarfile.open(bundle) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    manifest = json.loads(dict((m.name, d) for m, d in members)[MANIFEST_NAME])
    change(manifest)
    raw = manifest_bytes(manifest)
    replaced = {MANIFEST_NAME: raw, SIGNATURE_NAME: signature_document(load_private_key(private_key), raw)}
    with tarfile.open(out, "w:", format=tarfile.PAX_FORMAT) as dst:
        for member, data in members:
            data = replaced.get(member.name, data)
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    return out


def set_version(version: int) -> Callable[[dict], None]:
    def change(manifest: dict) -> None:
        manifest["version"] = version
    return change


def set_default_priority(priority: int) -> Callable[[dict], None]:
    def change(manifest: dict) -> None:
        manifest["policy"]["default"] = {"then": "keep", "priority": priority}
    return change
