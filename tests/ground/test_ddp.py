"""Distributed training for real: two processes started by torchrun on the CPU (gloo) train the
same weights as one process with the same global batch, and a DDP run killed mid-way (SIGKILL to
torchrun and both ranks) resumes from rank 0's checkpoint to the weights of an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ground.models.checkpoints import read_checkpoint
from test_ground_cli import CONFIG       # noqa: E402  (the tiny config of tests/ground/test_ground_cli.py)

WORKER = Path(__file__).with_name("ddp_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(cmd: list, timeout: float = 300) -> None:
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def _close(a: dict, b: dict, atol: float = 1e-5) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < atol, f"weights differ by {worst}"
    return worst


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """The reference: one process, global batch 8, 12 steps."""
    path = tmp_path_factory.mktemp("ddp") / "single.pt"
    _run([sys.executable, str(WORKER), str(path)])
    return read_checkpoint(path)


def test_two_ranks_reach_the_weights_of_one_process(single, tmp_path):
    path = tmp_path / "ddp.pt"
    _run(TORCHRUN + [str(WORKER), str(path)])
    state = read_checkpoint(path)
    assert state["step"] == single["step"] == 12
    _close(state["state_dict"], single["state_dict"])
    # weights really moved: the comparison is not between two untouched initialisations
    torch.manual_seed(0)
    init = torch.nn.Conv2d(3, 8, 3, padding=1).weight
    assert float((state["state_dict"]["0.weight"] - init).abs().max()) > 1e-3


def test_a_killed_ddp_run_resumes_where_it_stopped(single, tmp_path):
    path = tmp_path / "killed.pt"
    proc = subprocess.Popen(TORCHRUN + [str(WORKER), str(path), "--slow", "0.5"], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        step = 0
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists():
                step = read_checkpoint(path)["step"]
                if step >= 4:
                    break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        assert 4 <= step < 12, f"checkpoint at step {step}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)          # torchrun and both ranks, no clean-up
        proc.wait(timeout=30)
    stopped_at = read_checkpoint(path)["step"]
    assert stopped_at < 12
    _run(TORCHRUN + [str(WORKER), str(path), "--resume"])
    state = read_checkpoint(path)
    assert state["step"] == 12
    assert [h["step"] for h in state["history"]] == [2, 4, 6, 8, 10, 12]   # no step logged twice
    _close(state["state_dict"], single["state_dict"])


def test_the_distill_stage_under_torchrun(data_root, tmp_path):
    """`eoedge ground run` under torchrun (2 gloo ranks): one run folder, written by rank 0 alone
    (one report, one lineage record per student), the result printed once."""
    (tmp_path / "tiny.toml").write_text(textwrap.dedent(CONFIG).replace("batch = 2", "batch = 4"))
    done = subprocess.run(TORCHRUN + ["-m", "eoedge", "ground", "run", "tiny.toml", "--device", "cpu", "--json"],
                          cwd=tmp_path, env={**_env(), "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout)                 # one document: rank 1 prints nothing
    assert doc["deliver"] == "distilled" and [r["name"] for r in doc["rows"]] == ["teacher", "scratch", "distilled"]
    run = tmp_path / "runs" / "tiny"
    lineage = json.loads((run / "lineage.json").read_text())
    stages = [s["stage"] for s in lineage["stages"]]
    assert stages.count("student:scratch") == stages.count("student:distilled") == stages.count("distill") == 1
    assert read_checkpoint(run / "students" / "distilled.pt")["step"] == 3
