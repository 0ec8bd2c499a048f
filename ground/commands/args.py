"""Every ground command's arguments, torch-free: `eoedge ground --help` builds them all without
loading the factory."""
from __future__ import annotations

import argparse

from shared.cliutil import byte_size
from shared.manifest import PRECISIONS
from shared.profiles import DEFAULT_PROFILE, PROFILES
from ground.training.config import FINETUNE_SOURCES

DEFAULT_MAX_BYTES = "5MB"                                      # CloudScout's uplink budget


def _whole(least: int):
    """argparse type: a whole number >= `least` (a step count, threads, tiles), named when not."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is below {least}")
        return value
    return parse


COUNT = _whole(0)          # steps: 0 means none
POSITIVE = _whole(1)       # threads, rounds, tiles, pruning steps


def add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="TOML run config (see configs/); relative input paths resolve against its folder")
    p.add_argument("--out", help="parent folder of the run folder (run.out)")
    p.add_argument("--name", help="run name (run.name)")


def add_device(p) -> None:
    p.add_argument("--device", help="override train.device: auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="override train.precision (auto: bf16/fp16 autocast on a GPU, fp32 on the CPU)")


def add_list(p) -> None:
    pass


def add_size(p) -> None:
    p.add_argument("--params", required=True, help="budget, e.g. 120000, 100k, 1.5M")
    p.add_argument("--in-channels", type=POSITIVE, default=6)
    p.add_argument("--classes", type=POSITIVE, default=3)
    p.add_argument("--depth", type=POSITIVE, default=4, help="levels (poolings + 1)")
    p.add_argument("--separable", action="store_true", help="depthwise-separable convolutions")
    p.add_argument("--multiple-of", type=POSITIVE, default=1, help="round widths to a multiple (e.g. 4)")
    p.add_argument("--tile", type=POSITIVE, default=256, help="tile size the MACs are counted on")


def add_run(p) -> None:
    add_config(p)
    p.add_argument("--steps", type=POSITIVE, help="override train.steps")
    p.add_argument("--params", help="override student.params (e.g. 100k)")
    p.add_argument("--only", nargs="+", metavar="EXPERIMENT", help="run only these experiments")
    add_device(p)


def add_train_teacher(p) -> None:
    add_config(p)
    p.add_argument("--steps", type=POSITIVE, help="override train.steps")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's teacher.pt")
    add_device(p)


def add_eval_teacher(p) -> None:
    add_config(p)
    p.add_argument("--teacher", help="another teacher name than the config's")


def _run_arg(p) -> None:
    p.add_argument("run", help="run folder (from `eoedge ground run`)")


def _finetune_args(p, default_steps: int) -> None:
    p.add_argument("--finetune-steps", type=COUNT, default=default_steps, help="fine-tuning steps (0: none)")
    p.add_argument("--finetune-with", choices=FINETUNE_SOURCES, default="teacher",
                   help="teacher: the run's teacher (pruning-aware distillation); self: the unpruned model "
                        "teaches; labels: the run's labelled data; none")


def _prune_common(p) -> None:
    p.add_argument("--by", choices=("params", "macs"), default="params", help="what the target counts")
    p.add_argument("--round-to", type=COUNT, default=8, help="keep channel counts multiples of this (SIMD); 0: any")
    p.add_argument("--scope", choices=("local", "global"), default="local",
                   help="rank channels within each layer, or across all layers")
    p.add_argument("--checkpoint", default="student.pt", help="checkpoint in the run folder")


def add_prune(p) -> None:
    _run_arg(p)
    p.add_argument("--criterion", default="lamp",
                   help="importance criterion: random, magnitude-l1, magnitude-l2, bn-scale, fpgm, taylor, lamp")
    p.add_argument("--target", type=float, default=0.4, help="share of parameters (or MACs) to remove, 0..1")
    p.add_argument("--steps", type=POSITIVE, default=1, help="iterative pruning steps (fine-tuning between them)")
    p.add_argument("--name", help="output name (pruned/NAME.pt)")
    _prune_common(p)
    _finetune_args(p, 200)
    add_device(p)


def add_lowrank(p) -> None:
    _run_arg(p)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--energy", type=float,
                     help="rank per layer: the fewest singular values holding this share of the squared ones (0..1]")
    how.add_argument("--macs-target", type=float,
                     help="share of the MACs to keep (0..1): one energy for every layer, chosen to meet it")
    p.add_argument("--round-to", type=COUNT, default=0,
                   help="round ranks up to a multiple of this (SIMD; 8 leaves a TinyUNet's 8-channel layers "
                        "whole); 0: any")
    p.add_argument("--checkpoint", default="student.pt", help="checkpoint in the run folder")
    p.add_argument("--name", help="output name (lowrank/NAME.pt)")
    _finetune_args(p, 200)
    add_device(p)


def add_sweep(p) -> None:
    _run_arg(p)
    p.add_argument("--criteria", nargs="+", metavar="NAME",
                   help="criteria by name (default: the six of the study: random magnitude-l1 bn-scale "
                        "fpgm taylor lamp; also magnitude-l2)")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7], help="targets, 0..1")
    _prune_common(p)
    _finetune_args(p, 100)
    p.add_argument("--threads", type=POSITIVE, default=1, help="OpenVINO inference threads for the latency")
    p.add_argument("--out", default="sweep", help="folder in the run folder for the table and plot")
    p.add_argument("--lowrank", action="store_true",
                   help="also low-rank (truncated SVD) at each ratio, at the MACs the pruned points keep")


def add_fp16(p) -> None:
    _run_arg(p)
    p.add_argument("--checkpoint", default="student.pt", help="checkpoint in the run folder (e.g. pruned/lamp-40.pt)")
    p.add_argument("--steps", type=COUNT, default=200, help="FP16-aware fine-tuning steps")
    p.add_argument("--finetune-with", choices=FINETUNE_SOURCES[:-1], default="teacher")
    p.add_argument("--mode", choices=("round", "half"), default="round",
                   help="FP16 emulation for the scores: round (fast) or half (torch float16 kernels)")
    p.add_argument("--lr", type=float, help="learning rate (default: a fifth of the run's)")
    p.add_argument("--name", help="output name (fp16/NAME.pt)")
    add_device(p)


def add_export(p) -> None:
    _run_arg(p)
    p.add_argument("--checkpoint", default="student.pt", help="checkpoint in the run folder")
    p.add_argument("--name", help="export/NAME/ (default: the checkpoint's name)")
    p.add_argument("--fp32", action="store_true", help="keep FP32 weights (default: FP16, what flies)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="what the target computes in: the IR is scored, timed and declared at it (int8: NNCF)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx")
    p.add_argument("--no-eval", action="store_true", help="skip scoring on the held-out image")
    p.add_argument("--threads", type=POSITIVE, default=1, help="OpenVINO threads for the latency figure")
    _profile_arg(p, DEFAULT_PROFILE, "the device the IR is for: op versions rewritten for its runtime, "
                                     "the IR checked against it")
    _precision_args(p)


def _profile_arg(p, default: str | None, what: str) -> None:
    p.add_argument("--profile", choices=list(PROFILES), default=default, help=f"{what} (shared.profiles)")


def add_check_ir(p) -> None:
    p.add_argument("ir", help="an OpenVINO IR .xml (e.g. RUN/export/student/model.xml)")
    p.add_argument("--profile", choices=list(PROFILES), required=True,
                   help="the device profile to check against (shared.profiles)")


def _precision_args(p) -> None:
    p.add_argument("--max-drop", type=float, default=0.01,
                   help="int8: the most agreement with the teacher (training tiles) quantisation may cost")
    p.add_argument("--qat-steps", type=COUNT, default=0,
                   help="int8: quantisation-aware fine-tuning steps instead of post-training quantisation")


def add_bundle(p) -> None:
    _run_arg(p)
    p.add_argument("--export", required=True, help="the export folder in the run (e.g. export/student)")
    p.add_argument("--key", required=True, help="Ed25519 private key (eoedge shared keygen)")
    p.add_argument("--model-id", required=True, help="model id ([a-z0-9._-])")
    p.add_argument("--version", type=COUNT, required=True, help="bundle version (grows with every bundle)")
    p.add_argument("--parent", help="MODEL_ID:VERSION of the bundle this one replaces")
    p.add_argument("--out", help="bundle path (default: RUN/bundles/MODEL_ID-vVERSION.tar)")
    p.add_argument("--max-bytes", type=byte_size, default=byte_size(DEFAULT_MAX_BYTES),
                   help="uplink budget: 5MB = 5,000,000 bytes, 5MiB = 5,242,880 (docs/cli.md)")
    p.add_argument("--policy", help="decision policy JSON file (default: keep everything)")
    p.add_argument("--reference-tiles", type=POSITIVE, default=2, help="tiles of the run's imagery for the daemon's self-test")
    p.add_argument("--reference-window", type=POSITIVE,
                   help="keep only a real WxW patch of each reference tile (the rest the mean): a smaller bundle")
    p.add_argument("--tile-size", type=POSITIVE, help="the daemon's tile (default: the evaluation tile)")
    p.add_argument("--overlap", type=COUNT, help="the daemon's tile overlap")
    _profile_arg(p, None, "the device the bundle is for (default: the export's); checked before signing")


def add_chain(p) -> None:
    p.add_argument("--step", action="append", required=True, metavar="NAME=BUNDLE",
                   help="a step's signed bundle, in chain order: the first is the gate (2..4 steps)")
    p.add_argument("--run-if", action="append", metavar="NAME=JSON",
                   help='where a later step runs: one policy `if` block on an earlier step\'s classes, per '
                        'cell, e.g. ship=\'{"class": "cloud", "fraction_below": 0.5}\'')
    p.add_argument("--policy", required=True,
                   help="the chain's keep/discard policy over every step's classes: a JSON file, or the JSON")
    p.add_argument("--key", required=True, help="Ed25519 private key (eoedge shared keygen); the steps must "
                                                "be signed with it too")
    p.add_argument("--model-id", required=True, help="the chain's model id ([a-z0-9._-])")
    p.add_argument("--version", type=POSITIVE, required=True, help="the chain's version (grows with every bundle)")
    p.add_argument("--parent", type=POSITIVE, help="the version of this chain that this one replaces")
    p.add_argument("--out", required=True, help="the chain bundle to write (.tar)")
    p.add_argument("--max-bytes", type=byte_size, help="uplink budget (5MB = 5,000,000 bytes); none by default")


def add_gap(p) -> None:
    _run_arg(p)
    p.add_argument("--checkpoint", default="student.pt", help="checkpoint in the run folder")
    p.add_argument("--name", help="gap/NAME/ and export/NAME-PRECISION/ (default: the checkpoint's name)")
    p.add_argument("--threads", type=POSITIVE, default=1, help="OpenVINO threads for the latency figures")
    p.add_argument("--rounds", type=POSITIVE, default=3, help="timing rounds (each IR in turn, lowest median kept)")
    _precision_args(p)


def _search_args(p, trials: int) -> None:
    p.add_argument("--trials", type=POSITIVE, default=trials, help="finished trials the study should hold")
    p.add_argument("--workers", type=POSITIVE, default=1, help="worker processes on this machine (one study)")
    p.add_argument("--device", default="CPU", help="OpenVINO device the candidates are timed on")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16", help="the deployed precision they are timed at")
    p.add_argument("--sampler", choices=("nsga2", "nsga3", "tpe", "gp", "random", "qmc"), default="nsga2",
                   help="Optuna sampler (NSGA-II: the evolutionary search)")
    p.add_argument("--population", type=POSITIVE, default=8, help="NSGA-II/III population size")
    p.add_argument("--steps", type=POSITIVE, help="distillation steps per candidate (default: the run's train.steps)")
    p.add_argument("--storage", help="Optuna storage: a journal file path (default RUN/search/NAME/study.journal) "
                                     "or an RDB URL (postgresql://...) shared by workers on many machines")
    p.add_argument("--study", default=None, help="study name (its folder RUN/search/NAME)")


def add_search(p) -> None:
    _run_arg(p)
    _search_args(p, 16)
    p.add_argument("--max-bytes", type=byte_size, default=byte_size(DEFAULT_MAX_BYTES),
                   help="IR bytes a candidate may have (the constraint)")
    p.add_argument("--pick", type=float, metavar="WITHIN",
                   help="copy the fastest front point within WITHIN mIoU of the teacher to search/NAME/picked.pt")


def add_build(p) -> None:
    add_config(p)
    p.add_argument("--latency-budget-ms", type=float, required=True, help="ms per tile on the device, at --precision")
    p.add_argument("--accuracy-tolerance", type=float, default=0.01, help="mIoU below the teacher's allowed")
    p.add_argument("--key", required=True, help="Ed25519 private key (eoedge shared keygen)")
    p.add_argument("--model-id", required=True, help="model id ([a-z0-9._-])")
    p.add_argument("--version", type=COUNT, required=True, help="bundle version")
    p.add_argument("--via", choices=("search", "prune"), default="search",
                   help="search the architecture, or prune the distilled student to the budget")
    p.add_argument("--fp16-steps", type=COUNT, help="FP16-aware fine-tuning steps (default: the search's steps)")
    p.add_argument("--max-bytes", type=byte_size, default=byte_size(DEFAULT_MAX_BYTES), help="uplink budget")
    _search_args(p, 12)


def add_redistil(p) -> None:
    p.add_argument("config", nargs="?",
                   help="TOML file with a [redistil] table holding any of the options below (flags override "
                        "it; relative paths resolve against its folder)")
    p.add_argument("--bundle", help="the bundle that flies (v): its manifest names the run and checkpoint")
    p.add_argument("--samples", nargs="+", metavar="DIR",
                   help="downlinked learning samples: folders (searched recursively) or .npz files")
    p.add_argument("--key", help="Ed25519 private key: verifies v and signs v+1 (eoedge shared keygen)")
    p.add_argument("--run", help="the run folder of v (default: the folder above the bundle, as the "
                                 "manifest's lineage names it)")
    p.add_argument("--steps", type=POSITIVE, help="fine-tuning steps from the checkpoint (default 100)")
    p.add_argument("--replay", type=float,
                   help="share of each batch from the run's own imagery, 0..1 (default 0.5): no forgetting")
    p.add_argument("--lr", type=float, help="learning rate (default: a fifth of the run's)")
    p.add_argument("--seed", type=COUNT, help="seed of the batches and of torch (default 0)")
    p.add_argument("--min-entropy", type=float, help="drop samples whose entropy score is below this")
    p.add_argument("--selection", choices=("uncertainty", "random"),
                   help="keep only samples chosen this way on board")
    p.add_argument("--name", help="names the run's artifacts: redistil/NAME.pt, export/NAME/, bundles/NAME.tar "
                                  "(default MODEL_ID-vN; two v+1 of one v need two names)")
    p.add_argument("--out", help="bundle path (default: RUN/bundles/NAME.tar)")
    p.add_argument("--max-bytes", type=byte_size, help="uplink budget (default: v's, else 5MB)")
    p.add_argument("--threads", type=POSITIVE, help="torch CPU threads while training (default: train.threads)")
