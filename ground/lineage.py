"""The run folder and its lineage record, so every artifact can say what it came from.

    runs/<name>/
      lineage.json       config, input hashes, stages (what each wrote), metrics, versions
      config.toml        the config as given (when it came from a file)
      ...                each stage's artifacts

A later stage (pruning, FP16, export, bundle) opens the same folder with `RunFolder(path)` and
appends its own stage record; earlier records are never rewritten.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import subprocess
from pathlib import Path

FORMAT = "eoedge-lineage/1"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("torch", "segmentation-models-pytorch", "openvino", "numpy", "ukis-csmask", "torch-pruning"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.lineage_path = self.path / "lineage.json"
        if self.lineage_path.exists():
            try:
                self.record = json.loads(self.lineage_path.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{self.lineage_path}: not valid JSON ({exc})") from None
        else:
            self.record = {"format": FORMAT, "created": _now(), "git_commit": _git_commit(),
                           "machine": {"platform": platform.platform(), "cpus": _cpus()},
                           "versions": _versions(), "config": None, "inputs": {}, "stages": [], "metrics": {}}

    def file(self, name: str) -> Path:
        p = self.path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def set_config(self, config: dict) -> None:
        self.record["config"] = config
        self.save()

    def add_inputs(self, inputs: dict[str, str]) -> None:
        """name -> sha256 of what went in (files, arrays, teacher weights)."""
        self.record["inputs"].update(inputs)
        self.save()

    def add_stage(self, stage: str, outputs: list[str | Path], metrics: dict | None = None, **info) -> None:
        outs = {}
        for o in outputs:
            p = Path(o)
            full = p if p.is_absolute() else self.path / p      # relative to the run folder ...
            if not full.exists() and p.exists():
                full = p                                          # ... or to the working directory
            name = full.resolve().relative_to(self.path.resolve())
            outs[str(name)] = file_sha256(full) if full.is_file() else None
        self.record["stages"].append({"stage": stage, "finished": _now(), "outputs": outs, **info})
        if metrics:
            self.record["metrics"][stage] = metrics
        self.save()

    def save(self) -> None:
        tmp = self.lineage_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.record, indent=2, default=_json_default))
        tmp.replace(self.lineage_path)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _cpus() -> int | None:
    import os
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()
