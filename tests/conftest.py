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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine two threads mostly spin against each other."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ctx():
    """A ZeroMQ context of the test's own, destroyed after it (no socket outlives a test)."""
    zmq = pytest.importorskip("zmq")
    c = zmq.Context()
    yield c
    c.destroy(linger=0)
