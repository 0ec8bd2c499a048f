"""A training run for test_ddp, started as one process or under torchrun (gloo on the CPU):
`fit` on a small conv net (no BatchNorm: on the CPU each rank would normalise its own share) and
four generated 3-band images, global batch 8. Rank 0 writes `CHECKPOINT` as fit always does.

    python tests/ground/ddp_worker.py CHECKPOINT [--steps N] [--resume] [--slow S]
    torchrun --nproc_per_node 2 tests/ground/ddp_worker.py CHECKPOINT ...
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np      # noqa: E402
import torch            # noqa: E402
from torch import nn    # noqa: E402

from ground.data.normalization import Normalization     # noqa: E402
from ground.data.sample import Sample                   # noqa: E402
from ground.training.batches import BatchSampler        # noqa: E402
from ground.training.config import TrainConfig          # noqa: E402
from ground.training.loop import fit                    # noqa: E402
from ground.training.losses import build_objective      # noqa: E402


def samples() -> list[Sample]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(4):
        image = rng.uniform(0, 0.3, (3, 48, 48)).astype(np.float32)
        image[:, 10:30, 12:40] += 0.4
        out.append(Sample(image, (image[1] > 0.35).astype(np.uint8), f"s{i}"))
    return out


class Slow:
    """The sampler, `seconds` slower per batch: time for the test to kill the run mid-way."""

    def __init__(self, sampler, seconds: float):
        self.sampler, self.seconds = sampler, seconds

    def __getattr__(self, name):          # shard, sharded, seek: the sampler's own
        return getattr(self.sampler, name)

    def __call__(self):
        time.sleep(self.seconds)
        return self.sampler()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--slow", type=float, default=0.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = TrainConfig(steps=args.steps, batch=8, crop=32, lr=1e-2, augment=["flip", "crop"], seed=3,
                      checkpoint_every=2, log_every=2, device="cpu", precision="fp32")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    sampler = BatchSampler(samples(), cfg)
    sampler = Slow(sampler, args.slow) if args.slow else sampler
    norm = Normalization(("B02", "B03", "B04"), (0.3, 0.3, 0.3), (0.2, 0.2, 0.2))
    fit(model, sampler, build_objective("ce"), norm, cfg, checkpoint=args.checkpoint, arch={"name": "test"},
        resume=args.resume, progress=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
