"""`eoedge GROUP COMMAND ...`: one entry point, one group per package.

A group's module is imported only when that group is asked for, so an install with only
the `onboard` extra runs `eoedge onboard ...` without torch, and a command whose extra is
missing says which one instead of printing a traceback. Errors follow shared.cliutil's policy
(one line, or a JSON object under --json; exit 2 for an unknown group, 3 for a missing extra).
"""
from __future__ import annotations

import importlib
import sys

from shared.cliutil import report_error
from shared.errors import EXIT_USAGE, MissingExtra, UsageError

# group -> (module with `main(argv) -> int`, one-line summary)
GROUPS = {
    "shared": ("shared.cli", "contracts: key pairs, bundles (build, verify, inspect), tiling, data"),
    "ground": ("ground.cli", "the factory: teachers, distillation, pruning, FP16, export, bundles"),
    "onboard": ("onboard.cli", "the on-board daemon: run, install, status"),
    "sim": ("flight_sim.cli", "the flight simulator: scenes, scenarios, reports"),
}
# top-level shortcuts: name -> (module, summary)
SHORTCUTS = {
    "demo": ("eoedge.demo", "the main job on the embedded default: build a cloud -> ship model chain, fly it, report"),
    "loop": ("eoedge.loop", "the closed loop: fly, downlink uncertain tiles, re-distil, uplink v+1, fly again"),
}
# a missing top-level module -> the extra that brings it
EXTRA_FOR_MODULE = {
    "torch": "ground", "torchvision": "ground", "segmentation_models_pytorch": "ground",
    "torch_pruning": "ground", "timm": "ground", "ukis_csmask": "ground", "onnx": "ground",
    "matplotlib": "ground", "tqdm": "ground",
    "openvino": "onboard", "zmq": "onboard", "cv2": "onboard",
    "rasterio": "sim",
}


def _usage() -> str:
    lines = ["usage: eoedge GROUP COMMAND [options]   (eoedge GROUP --help for its commands)", ""]
    lines.append("groups:")
    lines += [f"  {name:<9} {summary}" for name, (_, summary) in GROUPS.items()]
    lines.append("shortcuts:")
    lines += [f"  {name:<9} {summary}" for name, (_, summary) in SHORTCUTS.items()]
    return "\n".join(lines)


def missing_extra(exc: ModuleNotFoundError) -> MissingExtra | None:
    """The missing module as the extra that brings it, or None when no extra does (a bug)."""
    top = (exc.name or "").split(".")[0]
    extra = EXTRA_FOR_MODULE.get(top)
    if extra is None:
        return None
    return MissingExtra(f"this command needs the '{extra}' extra ({top!r} is not installed): "
                        f"pip install 'eoedge[{extra}]'")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else EXIT_USAGE
    name, rest = argv[0], argv[1:]
    target = GROUPS.get(name) or SHORTCUTS.get(name)
    if target is None:
        known = ", ".join([*GROUPS, *SHORTCUTS])
        return report_error(UsageError(f"eoedge: unknown group {name!r} (one of {known}; "
                                       f"eoedge --help)"), "--json" in rest)
    try:
        module = importlib.import_module(target[0])
        return int(module.main(rest) or 0)
    except ModuleNotFoundError as exc:
        error = missing_extra(exc)
        if error is None:
            raise
        return report_error(error, "--json" in rest)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
