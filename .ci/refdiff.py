"""Reference outputs across runtimes and CPUs: what a bundle's model gives on its own reference
tiles here, against what the x86 host computed at f32 (CI only; .ci/aarch64.sh, .ci/myriad.sh).

    python .ci/refdiff.py write BUNDLE_DIR OUT.npz        # on the host: exact f32 probabilities
    python .ci/refdiff.py compare BUNDLE_DIR OUT.npz      # elsewhere: max |p - p_host| at f32, f16

BUNDLE_DIR is an extracted bundle (manifest.json, model.xml, reference.npz). The model runs
through the daemon's own runtime (onboard.runtime.OpenVinoModel, onboard.ov), as a self-test does;
the bundle's stored reference is on a 2^-10 grid, too coarse to show f32 differences.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from onboard import ov
from onboard.errors import ModelLoadError
from onboard.runtime import OpenVinoModel, device_capabilities
from shared.bundle import load_reference


def run(folder: Path, precision: str) -> np.ndarray:
    manifest = json.loads((folder / "manifest.json").read_text())
    tiles, _ = load_reference(folder / "reference.npz", manifest)
    mean = np.asarray(manifest["input"]["scaling"]["mean"], np.float32)
    std = np.asarray(manifest["input"]["scaling"]["std"], np.float32)
    model = OpenVinoModel(folder / "model.xml", "CPU", tile=manifest["input"]["tile_size"],
                          activation=manifest["output"]["activation"], precision=precision)
    return model.infer(tiles, gain=1.0 / std, offset=-mean / std)


def main(argv: list[str]) -> int:
    action, folder, out = argv[0], Path(argv[1]), Path(argv[2])
    if action == "write":
        np.savez(out, probabilities=run(folder, "fp32"))
        return 0
    host = np.load(out)["probabilities"]
    caps = device_capabilities("CPU")
    where = os.environ.get("QEMU_CPU") or "x86-64"
    for precision in ("fp32", "fp16"):
        if precision == "fp16" and "FP16" not in caps:
            print(f"REFDIFF {where} OpenVINO {ov.VERSION}: fp16 not run (CPU capabilities: {', '.join(caps)})")
            continue
        try:
            d = float(np.abs(run(folder, precision) - host).max())
        except ModelLoadError as exc:      # 2022.3's x86 CPU plugin takes only bf16 and f32 hints
            print(f"REFDIFF {where} OpenVINO {ov.VERSION}: {precision} not run: {str(exc).split(': ', 1)[1]}")
            continue
        print(f"REFDIFF {where} OpenVINO {ov.VERSION}: {precision} max |p - p_host_f32| = {d:.3e} "
              f"({folder.name}, {host.shape[0]} tiles)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
