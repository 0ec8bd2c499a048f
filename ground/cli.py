"""`eoedge ground COMMAND`: the factory's commands, one row each. Handlers live in
ground.commands and are imported when their command runs (they load torch); the arguments come
from ground.commands.args, which does not, so `--help` is fast."""
from __future__ import annotations

import importlib

from shared.cliutil import Command, build_parser, run_cli
from ground.commands import args as a


def _lazy(module: str, func: str):
    """The handler `func` of ground.commands.`module`, imported when the command runs."""
    def call(namespace):
        return getattr(importlib.import_module(f"ground.commands.{module}"), func)(namespace)
    return call


COMMANDS = {
    "list": Command(_lazy("distill", "cmd_list"), "the registries: teachers, students, losses, data sources", a.add_list),
    "size": Command(_lazy("distill", "cmd_size"), "the TinyUNet widths for a parameter budget (--params 100k)",
                    a.add_size),
    "run": Command(_lazy("distill", "cmd_run"), "a whole config: data, teacher, students, evaluation, report, lineage",
                   a.add_run),
    "train-teacher": Command(_lazy("distill", "cmd_train_teacher"),
                             "train the config's smp teacher from its labelled data", a.add_train_teacher),
    "eval-teacher": Command(_lazy("distill", "cmd_eval_teacher"), "score the teacher on the config's evaluation image",
                            a.add_eval_teacher),
    "prune": Command(_lazy("compress", "cmd_prune"), "prune a run's student to a size target, then fine-tune it",
                     a.add_prune),
    "sweep": Command(_lazy("compress", "cmd_sweep"), "criteria x ratios: metric, size and OpenVINO latency",
                     a.add_sweep),
    "lowrank": Command(_lazy("compress", "cmd_lowrank"),
                       "factorise a run's convolutions by truncated SVD, then fine-tune", a.add_lowrank),
    "fp16-finetune": Command(_lazy("compress", "cmd_fp16_finetune"),
                             "FP16-aware fine-tuning and the deployment-gap table", a.add_fp16),
    "export": Command(_lazy("deploy", "cmd_export"), "OpenVINO IR (FP16), parity on the run's imagery, scores, latency",
                      a.add_export),
    "gap": Command(_lazy("deploy", "cmd_gap"), "one checkpoint at FP32, FP16, BF16 and INT8: mIoU, agreement, "
                                              "latency, bytes", a.add_gap),
    "bundle": Command(_lazy("deploy", "cmd_bundle"), "sign an uplink bundle from an export, within a budget",
                      a.add_bundle),
    "redistil": Command(_lazy("redistil", "cmd_redistil"), "the flying student (bundle v) re-distilled on "
                                                           "downlinked learning samples plus its own imagery: "
                                                           "bundle v+1, parent v", a.add_redistil),
    "chain": Command(_lazy("chain", "cmd_chain"), "a signed model chain from step bundles: a gate, then models "
                                                  "that run only where it allows", a.add_chain),
    "search": Command(_lazy("search", "cmd_search"), "architecture search on the device's own clock: the Pareto "
                                                    "front of mIoU against ms per tile", a.add_search),
    "build": Command(_lazy("search", "cmd_build"), "config -> the smallest signed bundle within a latency budget and "
                                                  "an accuracy tolerance", a.add_build),
    "check-ir": Command(_lazy("profiles", "cmd_check_ir"), "can a device profile (cpu-x86, rpi4, rpi5, myriadx) "
                                                          "run this IR? each refused layer named", a.add_check_ir),
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("eoedge ground", "The factory: teachers, distillation, pruning, FP16, export, bundles "
                                           "(one run folder per run).", COMMANDS)
    return run_cli(parser, argv)
