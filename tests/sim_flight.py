"""What the simulator's flight tests share: a small signed test bundle, and a flight of the real
`eoedge sim run` in a subprocess with its JSON report."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from onboard_models import BANDS_6, make_test_manifest, make_test_model_files

REPO = Path(__file__).resolve().parents[1]


def make_flight_bundle(root: Path, *, overlap: int = 8, policy: dict | None = None) -> Path:
    """root/bundle.tar (6 bands, 64 x 64 tiles) signed with root/keys/uplink.key (`policy`:
    the manifest's, default make_test_manifest's)."""
    from shared.bundle import build_bundle
    from shared.keys import generate_keypair
    sk, _ = generate_keypair(root / "keys")
    files = make_test_model_files(root / "model", bands=BANDS_6, tile=64)
    return build_bundle(root / "bundle.tar", files,
                        make_test_manifest(files, tile=64, overlap=overlap, policy=policy), sk)


def fly(scenario: Path, out: Path, timeout: float = 300) -> tuple[subprocess.CompletedProcess, dict]:
    """`eoedge sim run SCENARIO --out OUT --json`: the process and its report."""
    proc = subprocess.run([sys.executable, "-m", "eoedge", "sim", "run", str(scenario), "--out", str(out),
                           "--json", "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return proc, json.loads(proc.stdout)


def fly_text(root: Path, scenario_text: str) -> tuple[subprocess.CompletedProcess, dict, Path]:
    """ROOT/scenario.toml written from `scenario_text` and flown into ROOT/run: (process, report, run)."""
    (root / "scenario.toml").write_text(scenario_text)
    proc, report = fly(root / "scenario.toml", root / "run")
    return proc, report, root / "run"


def assert_checks_pass(proc: subprocess.CompletedProcess, report: dict) -> None:
    """Every check of the report passed and the exit code says so."""
    failed = [c for c in report["checks"] if not c["ok"]]
    assert not failed, failed
    assert report["ok"] and proc.returncode == 0, proc.stderr[-2000:]
