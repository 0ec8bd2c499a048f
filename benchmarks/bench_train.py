"""Distillation throughput: samples/s and peak memory of the 116k student (TinyUNet, 6 bands,
3 classes, KL on teacher probabilities) through ground.training.loop.fit, for one process and two
DDP processes (torchrun, gloo) on the CPU, and on the GPU when there is one (one process at
bf16 and fp32; two DDP processes with nccl when there are two GPUs). Every figure is printed with
the device, its ISA (CPU flags) or name (GPU), and the precision.

    nice .venv/bin/python benchmarks/bench_train.py [--steps 30] [--batch 16] [--crop 128] [--json]

Samples/s counts the global batch (all ranks) over the timed steps (the first `--warmup` steps
excluded); peak memory is each process's peak RSS (CPU) or torch's peak allocation (GPU), summed
over ranks. Not a test: figures depend on the machine and its load (printed).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np      # noqa: E402
import torch            # noqa: E402

from ground.data.augment import dihedral                      # noqa: E402
from ground.data.normalization import Normalization          # noqa: E402
from ground.data.sample import Sample                        # noqa: E402
from ground.models.registry import build_student             # noqa: E402
from ground.training.batches import BatchSampler             # noqa: E402
from ground.training.config import TrainConfig               # noqa: E402
from ground.training.distributed import Distributed          # noqa: E402
from ground.training.loop import fit                         # noqa: E402
from ground.training.losses import build_objective           # noqa: E402

BANDS = ("B02", "B03", "B04", "B08", "B11", "B12")


class FixedTeacherCache:
    """Teacher probabilities already on hand (as a warm TeacherCache serves them): the benchmark times
    the student's training, not the teacher."""

    def __init__(self, samples, k: int = 3):
        rng = np.random.default_rng(1)
        self.probs_of = {s.name: rng.dirichlet(np.ones(k), size=s.image.shape[1:]).transpose(2, 0, 1)
                         .astype(np.float16) for s in samples}

    def probs(self, s, k=0):
        return dihedral(self.probs_of[s.name], k)


def cpu_isa() -> str:
    flags = ""
    if Path("/proc/cpuinfo").exists():
        flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    have = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16"),
                                    ("avx2", "AVX2")) if f" {flag}" in flags]
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?") \
        if Path("/proc/cpuinfo").exists() else "?"
    return f"{model} ({', '.join(have) or 'no AVX2'})"


def worker(args) -> None:
    """One process of a measurement (alone, or one rank under torchrun)."""
    rng = np.random.default_rng(0)
    samples = [Sample(rng.uniform(0, 0.5, (6, 512, 512)).astype(np.float32), None, f"chip{i}") for i in range(3)]
    cfg = TrainConfig(steps=args.steps, batch=args.batch, crop=args.crop, lr=5e-3, log_every=1,
                      checkpoint_every=args.steps, device=args.device, precision=args.precision)
    torch.manual_seed(0)
    model = build_student("tiny-unet", 6, 3, params="116k")
    norm = Normalization(BANDS, (0.25,) * 6, (0.14,) * 6)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    history = fit(model, BatchSampler(samples, cfg, FixedTeacherCache(samples)), build_objective("kl", temperature=1.0),
                  norm, cfg, progress=False)
    ctx = Distributed.from_env()
    timed = [h for h in history if "loss" in h]
    t0, t1 = timed[args.warmup - 1]["s"], timed[-1]["s"]
    steps = timed[-1]["step"] - timed[args.warmup - 1]["step"]
    gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    peak = (torch.cuda.max_memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    peak_total = ctx.mean(peak) * ctx.world_size
    if ctx.is_main:
        Path(args.worker).write_text(json.dumps({
            "samples_per_s": round(steps * args.batch / (t1 - t0), 2), "peak_mb": round(peak_total / 2**20, 1),
            "processes": ctx.world_size, "params": sum(p.numel() for p in model.parameters()),
            "threads": torch.get_num_threads()}))


def measure(args, label: str, device: str, precision: str, nproc: int, threads: int | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        script = [str(Path(__file__).resolve()), "--worker", str(out), "--steps", str(args.steps), "--batch",
                  str(args.batch), "--crop", str(args.crop), "--warmup", str(args.warmup), "--device", device,
                  "--precision", precision]
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
               if nproc > 1 else [sys.executable]) + script
        env = {**os.environ}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        elif nproc > 1 and device == "cpu":
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // nproc))   # the cores shared, not oversubscribed
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            return {"label": label, "error": done.stderr[-1500:]}
        result = json.loads(out.read_text())
    where = torch.cuda.get_device_name(0) if device.startswith("cuda") else cpu_isa()
    return {"label": label, "device": device, "hardware": where, "precision": precision, **result}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="steps not timed (allocation, first-call costs)")
    ap.add_argument("--batch", type=int, default=16, help="global batch (split over DDP processes)")
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cpu-bf16", action="store_true", help="also time bf16 autocast on the CPU (AMX/AVX512-BF16)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    load = [round(v, 2) for v in os.getloadavg()]
    runs = [("CPU, 1 process", "cpu", "fp32", 1), ("CPU, 1 process, 1 thread", "cpu", "fp32", 1, 1),
            ("CPU, 2 DDP processes (gloo)", "cpu", "fp32", 2)]
    if args.cpu_bf16:
        runs.append(("CPU, 1 process, bf16 autocast", "cpu", "bf16", 1))
    if torch.cuda.is_available():
        runs += [("GPU, 1 process", "cuda", "bf16", 1), ("GPU, 1 process", "cuda", "fp32", 1)]
        if torch.cuda.device_count() > 1:
            runs.append(("2 GPUs, 2 DDP processes (nccl)", "cuda", "bf16", 2))
    rows = [measure(args, *r) for r in runs]
    cpu = next((r for r in rows if r.get("device") == "cpu" and r.get("processes") == 1), None)
    for r in rows:
        if cpu and "samples_per_s" in r and r is not cpu:
            r["x_cpu_1_process"] = round(r["samples_per_s"] / cpu["samples_per_s"], 2)
    doc = {"rows": rows, "load_before": load, "load_after": [round(v, 2) for v in os.getloadavg()],
           "cpus": os.cpu_count(), "batch": args.batch, "crop": args.crop, "steps": args.steps,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"distillation of the 116k student, global batch {args.batch} x {args.crop}x{args.crop}, "
          f"{args.steps - args.warmup} timed steps; {os.cpu_count()} CPUs, load {load}")
    print("| run | hardware (ISA) | precision | threads/process | samples/s | x CPU 1 proc | peak memory (MB, all ranks) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['label']} | failed: {r['error'].splitlines()[-1] if r['error'] else '?'} |")
            continue
        print(f"| {r['label']} | {r['hardware']} | {r['precision']} | {r['threads']} | {r['samples_per_s']} | "
              f"{r.get('x_cpu_1_process', 1.0)} | {r['peak_mb']} |")
    if not torch.cuda.is_available():
        print("no CUDA device here: the GPU rows are printed only where one is present")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
