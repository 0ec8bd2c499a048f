import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real Sentinel-2 chips in ../shared/data (or $EOEDGE_DATA); skip when absent."""
    root = Path(os.environ.get("EOEDGE_DATA", REPO.parent / "shared" / "data"))
    if not (root / "ukis_csmask_s2" / "sentinel2.npz").exists():
        pytest.skip(f"real Sentinel-2 chips not found in {root} (set EOEDGE_DATA); a fresh clone has none")
    return root
