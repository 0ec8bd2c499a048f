"""The run folder and its lineage record, so every artifact can say what it came from.

    runs/<name>/
      lineage.json       config, input hashes, stages (what each wrote), metrics, versions
      config.toml        the config as given (when it came from a file)
      ...                each stage's artifacts

A later stage (pruning, FP16, export, bundle) opens the same folder with `RunFolder(path)` and
appends its own `StageRecord` (what went in, what came out with its sha256, the parameters, the
metrics, and whether any human label was used); earlier records are never rewritten.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata as md
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from shared.hashing import sha256_file
from ground.errors import RunFolderError

FORMAT = "eoedge-lineage/1"


@dataclass
class StageRecord:
    """One stage's entry in lineage.json.

    `inputs`: what it read (name -> a run-relative path, e.g. {"checkpoint": "student.pt"}, or a
    description such as where reference tiles came from); `outputs`: the files it wrote (their
    sha256 are recorded); `params`: how it was asked to run; `metrics`: what it measured;
    `label_free`: True when no human label was used on the way to its outputs (None: not a model).
    """
    stage: str
    outputs: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    label_free: bool | None = None


def _versions() -> dict:
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
                raise RunFolderError(f"{self.lineage_path}: not valid JSON ({exc})") from None
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

    def add(self, record: StageRecord) -> dict:
        """Append a stage record (outputs hashed); returns the entry as written."""
        outs = {}
        for o in record.outputs:
            p = Path(o)
            full = p if p.is_absolute() else self.path / p      # relative to the run folder ...
            if not full.exists() and p.exists():
                full = p                                          # ... or to the working directory
            resolved, root = full.resolve(), self.path.resolve()
            # an output written outside the run (`bundle --out /elsewhere`) keeps its absolute path
            name = resolved.relative_to(root) if resolved.is_relative_to(root) else resolved
            outs[str(name)] = sha256_file(full) if full.is_file() else None
        entry = {"stage": record.stage, "finished": _now(), "inputs": record.inputs, "outputs": outs,
                 "params": record.params, "label_free": record.label_free}
        self.record["stages"].append(entry)
        if record.metrics:
            self.record["metrics"][record.stage] = record.metrics
        self.save()
        return entry

    def stages(self) -> list[dict]:
        return list(self.record.get("stages") or [])

    def producer(self, output: str) -> dict | None:
        """The latest stage that wrote `output` (a run-relative path)."""
        return next((s for s in reversed(self.stages()) if output in (s.get("outputs") or {})), None)

    def save(self) -> None:
        tmp = self.lineage_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.record, indent=2, default=_json_default))
        tmp.replace(self.lineage_path)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _cpus() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()
