"""One TOML file drives a factory run. Every table is checked before any work starts, and an
unknown or malformed key is reported by its dotted name (e.g. `experiment[2].loss`).

Paths to inputs (data sources' `path`, `openvino:PATH` and `checkpoint:PATH` models) are resolved
against the config file's folder when relative; outputs (`run.out`, `run.cache`) against the
working directory. See configs/ukis_distill.toml for a complete, commented example.
"""
from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from shared.bands import canonical_band
from shared.manifest import FRAME_GSD_M, MAX_GSD_FACTOR
from ground.data.learning import parse_held_out
from ground.errors import ConfigError
from ground.training.config import TrainConfig
from ground.training.losses import LOSSES

MODES = ("labels", "distill", "feature")
MODEL_PREFIXES = ("openvino:", "checkpoint:")     # teacher names that carry a path


def _take(table: dict, where: str, allowed: dict) -> dict:
    """Check `table` holds only `allowed` keys (name -> default, or ... for required); fill defaults."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {type(table).__name__}")
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    out = {}
    for key, default in allowed.items():
        if key in table:
            out[key] = table[key]
        elif default is ...:
            raise ConfigError(f"{where}.{key}: required")
        else:
            out[key] = copy.deepcopy(default)
    return out


@dataclass
class Experiment:
    name: str
    mode: str = "distill"            # labels | distill | feature
    loss: str = "kl"                 # ground.losses registry name
    options: dict = field(default_factory=dict)   # loss options: temperature, ce_weight
    feature_weight: float = 1.0


@dataclass
class RunConfig:
    name: str
    out: Path
    seed: int
    cache: Path
    deliver: str | None
    bands: list
    classes: list
    class_weights: object
    unlabelled: list
    labelled: list
    eval_data: dict | None
    tile: int
    overlap: int
    opening_radius: int
    calibrate: str
    teacher: dict
    feature_teacher: dict | None
    student: dict
    train: TrainConfig
    experiments: list
    raw: dict
    source: Path | None = None
    gsd_m: float | None = None       # processing GSD: imagery and labels binned to it (None: 10 m)
    # regions no georeferenced training sample may touch (ground.data.learning.HeldOutRegion)
    held_out: list = field(default_factory=list)

    @property
    def gsd_factor(self) -> int:
        """Pixels of the 10 m imagery per processing pixel, along each axis."""
        return 1 if self.gsd_m is None else round(self.gsd_m / FRAME_GSD_M)

    @property
    def run_dir(self) -> Path:
        return self.out / self.name


def _experiments(exps, has_feature_teacher: bool) -> list[Experiment]:
    """The [[experiment]] tables, each checked by its index (`experiment[2].loss`)."""
    if not isinstance(exps, list) or not exps:
        raise ConfigError("experiment: at least one [[experiment]] table")
    experiments = []
    for i, e in enumerate(exps):
        where = f"experiment[{i}]"
        e = _take(e, where, {"name": ..., "mode": "distill", "loss": None, "temperature": None,
                             "ce_weight": None, "feature_weight": 1.0})
        if e["mode"] not in MODES:
            raise ConfigError(f"{where}.mode: one of {MODES}, got {e['mode']!r}")
        loss = e["loss"] or ("ce" if e["mode"] == "labels" else "kl")
        if loss not in LOSSES:
            raise ConfigError(f"{where}.loss: unknown {loss!r}; known: {sorted(LOSSES)}")
        opts = {k: e[k] for k in ("temperature", "ce_weight") if e[k] is not None}
        if "temperature" in opts and loss != "kl":
            raise ConfigError(f"{where}.temperature: only the 'kl' loss has a temperature")
        if e["mode"] == "feature" and not has_feature_teacher:
            raise ConfigError(f"{where}: mode 'feature' needs a [feature_teacher] table (a torch teacher and "
                              "the layers to match; name = \"teacher\" reuses an smp [teacher])")
        experiments.append(Experiment(e["name"], e["mode"], loss, opts, float(e["feature_weight"])))
    return experiments


def _feature_teacher(table) -> dict | None:
    if table is None:
        return None
    ft = _take(table, "feature_teacher", {"name": ..., "options": {}, "train": {}, "layers": ...,
                                          "student_layers": ...})
    if len(ft["layers"]) != len(ft["student_layers"]):
        raise ConfigError("feature_teacher: layers and student_layers pair one to one")
    return ft


def _gsd_m(value) -> float | None:
    """`data.gsd_m`: the ground sampling distance the student trains and flies at, a whole
    multiple of 10 m (the bundle's manifest declares it; the daemon bins frames to it)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 \
            or value % FRAME_GSD_M or value / FRAME_GSD_M > MAX_GSD_FACTOR:
        raise ConfigError(f"data.gsd_m: a whole multiple of {FRAME_GSD_M:g} m up to "
                          f"{MAX_GSD_FACTOR * FRAME_GSD_M:g} m, got {value!r}")
    return float(value)


def parse_config(raw: dict, source: Path | None = None) -> RunConfig:
    top = _take(raw, "config", {"run": ..., "data": ..., "eval": {}, "teacher": ..., "feature_teacher": None,
                                "student": ..., "train": {}, "experiment": ...})
    run = _take(top["run"], "run", {"name": ..., "out": "runs", "seed": 0, "cache": None, "deliver": None})
    data = _take(top["data"], "data", {"bands": ..., "classes": ..., "class_weights": "none",
                                       "unlabelled": [], "labelled": [], "gsd_m": None,
                                       "held_out": []})
    ev = _take(top["eval"], "eval", {"data": None, "tile": 256, "overlap": 128, "opening_radius": 2,
                                     "calibrate": "auto"})
    teacher = _take(top["teacher"], "teacher", {"name": ..., "options": {}, "train": {}})
    student = _take(top["student"], "student", {"name": "tiny-unet", "params": None, "widths": None,
                                                "separable": False, "upsample": "bilinear", "depth": None,
                                                "multiple_of": None, "kernels": None, "skip": None,
                                                "activation": None})   # the last three: search-unet
    for key in ("bands", "classes"):
        if not isinstance(data[key], list) or not data[key] or not all(isinstance(v, str) for v in data[key]):
            raise ConfigError(f"data.{key}: a non-empty list of names")
    for key in ("unlabelled", "labelled"):
        if not isinstance(data[key], list) or not all(isinstance(v, dict) and "source" in v for v in data[key]):
            raise ConfigError(f"data.{key}: a list of tables, each with a 'source'")
    try:       # one spelling everywhere downstream (manifest, cache keys): B02, not Blue
        data["bands"] = [canonical_band(b) for b in data["bands"]]
    except ValueError as exc:
        raise ConfigError(f"data.bands: {exc}") from None
    gsd_m = _gsd_m(data["gsd_m"])
    held_out = parse_held_out(data["held_out"])
    if ev["calibrate"] not in ("auto", "labels", "teacher", "none"):
        raise ConfigError(f"eval.calibrate: one of auto, labels, teacher, none; got {ev['calibrate']!r}")
    if ev["data"] is not None and (not isinstance(ev["data"], dict) or "source" not in ev["data"]):
        raise ConfigError("eval.data: a table with a 'source'")
    train = TrainConfig(**{**_take(top["train"], "train", {k: getattr(TrainConfig(), k) for k in
                                                             TrainConfig.__dataclass_fields__}),
                           "seed": int(run["seed"])})

    experiments = _experiments(top["experiment"], has_feature_teacher=top["feature_teacher"] is not None)
    names = [e.name for e in experiments]
    if len(set(names)) != len(names):
        raise ConfigError(f"experiment names must be unique: {names}")
    if run["deliver"] is not None and run["deliver"] not in names:
        raise ConfigError(f"run.deliver: {run['deliver']!r} is not an experiment name ({names})")
    train_specs = data["unlabelled"] + data["labelled"]
    lazy = [s for s in train_specs if s.get("source") == "scenes"]
    if lazy and len(lazy) != len(train_specs):
        raise ConfigError("data: 'scenes' sources (crops read lazily from scene files) cannot be mixed with "
                          "in-memory sources in one run")
    if any(e.mode == "labels" or e.options.get("ce_weight") for e in experiments) and not data["labelled"]:
        raise ConfigError("data.labelled: experiments use labels but no labelled data is configured")
    if any(e.mode != "labels" for e in experiments) and not (data["unlabelled"] or data["labelled"]):
        raise ConfigError("data.unlabelled: distillation needs imagery")

    ft = _feature_teacher(top["feature_teacher"])

    out = Path(run["out"])
    return RunConfig(
        name=str(run["name"]), out=out, seed=int(run["seed"]),
        cache=Path(run["cache"]) if run["cache"] else out / ".teacher-cache", deliver=run["deliver"],
        bands=data["bands"], classes=data["classes"], class_weights=data["class_weights"],
        unlabelled=data["unlabelled"], labelled=data["labelled"], eval_data=ev["data"],
        tile=int(ev["tile"]), overlap=int(ev["overlap"]), opening_radius=int(ev["opening_radius"]),
        calibrate=ev["calibrate"], teacher=teacher, feature_teacher=ft,
        student={k: v for k, v in student.items() if v is not None}, train=train,
        experiments=experiments, raw=raw, source=source, gsd_m=gsd_m, held_out=held_out)


def read_toml(path: str | Path) -> dict:
    """A TOML config file as a dict; a missing file or a syntax error is named."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config {path} not found")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Read a TOML file; `overrides` are dotted keys (e.g. {"train.steps": 50}) applied first."""
    path = Path(path)
    raw = read_toml(path)
    resolve_inputs(raw, path.resolve().parent)
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return parse_config(raw, path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _resolved(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base / p)


def resolve_inputs(raw: dict, base: Path) -> None:
    """Make the config's input paths absolute, relative ones taken from `base` (the config file's
    folder), in place: the run folder then records where its inputs really were."""
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    specs = [s for key in ("unlabelled", "labelled") for s in (data.get(key) or []) if isinstance(s, dict)]
    ev = raw.get("eval") if isinstance(raw.get("eval"), dict) else {}
    if isinstance(ev.get("data"), dict):
        specs.append(ev["data"])
    for spec in specs:
        if isinstance(spec.get("path"), str):
            spec["path"] = _resolved(spec["path"], base)
    for key in ("teacher", "feature_teacher"):
        table = raw.get(key)
        name = table.get("name") if isinstance(table, dict) else None
        if isinstance(name, str) and name.startswith(MODEL_PREFIXES):
            prefix, _, path = name.partition(":")
            table["name"] = f"{prefix}:{_resolved(path, base)}"
