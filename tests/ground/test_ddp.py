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
from ground.training.batches import BatchSampler
from ground.training.config import TrainConfig
from ddp_worker import samples as worker_samples      # noqa: E402
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


def test_in_memory_batches_shard_by_rank_without_drawing_twice():
    """Each of two ranks draws only its half of every global batch (crop j of batch n is seeded by
    (seed, n, j)), the halves together are the single process's batch, and seek(step) on a resumed
    rank gives the batch it would have drawn."""
    cfg = TrainConfig(steps=4, batch=8, crop=16, augment=["flip", "rot90", "crop"], seed=3, balance=0.5)
    one = BatchSampler(worker_samples(), cfg)
    ranks = [BatchSampler(worker_samples(), cfg) for _ in range(2)]
    for r, s in enumerate(ranks):
        s.shard(r, 2)
    for _ in range(3):
        x, _p, y = one()
        halves = [s() for s in ranks]
        assert all(h[0].shape[0] == 4 for h in halves)            # a rank cuts 4 crops, not 8
        assert torch.equal(torch.cat([h[0] for h in halves]), x)
        assert torch.equal(torch.cat([h[2] for h in halves]), y)
    assert not torch.equal(halves[0][0], halves[1][0])            # the ranks' shares differ
    resumed = BatchSampler(worker_samples(), cfg)
    resumed.shard(1, 2)
    resumed.seek(2)
    assert torch.equal(resumed()[0], halves[1][0])


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
    (one report, one lineage record per student), the result printed once; then the prune and the
    FP16 fine-tune stages on that run under torchrun: one checkpoint, one record, one result each."""
    # eval.tile 64: the stages take reference tiles of that size from the 64-row training strip
    (tmp_path / "tiny.toml").write_text(textwrap.dedent(CONFIG).replace("batch = 2", "batch = 4")
                                        .replace("overlap = 64", "tile = 64\noverlap = 16"))
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
    env = {**_env(), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for stage, record, out in ((["prune", "runs/tiny", "--criterion", "magnitude-l1", "--target", "0.3",
                                 "--finetune-steps", "2", "--name", "p30"], "prune:p30", "pruned/p30.pt"),
                               (["fp16-finetune", "runs/tiny", "--steps", "2", "--name", "f16"],
                                "fp16-finetune:f16", "fp16/f16-gap.json")):
        done = subprocess.run(TORCHRUN + ["-m", "eoedge", "ground", *stage, "--device", "cpu", "--json"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        json.loads(done.stdout)                   # one document: rank 1 prints nothing
        stages = [s["stage"] for s in json.loads((run / "lineage.json").read_text())["stages"]]
        assert stages.count(record) == 1 and (run / out).exists()
