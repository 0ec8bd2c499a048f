"""`eoedge ground redistil [CONFIG] --bundle B --samples DIR --key K`: the flying student learns
from the downlinked learning samples and comes back as bundle v+1 (ground.stages.redistil)."""
from __future__ import annotations

from pathlib import Path

from shared.cliutil import emit
from ground.config import read_toml
from ground.errors import ConfigError
from ground.stages.redistil import redistil

KEYS = {"bundle": "path", "samples": "paths", "key": "path", "run": "path", "steps": int, "replay": float,
        "lr": float, "seed": int, "min_entropy": float, "selection": (str, list), "held_out": list, "out": "path",
        "max_bytes": (int, str), "threads": int, "name": str}
DEFAULTS = {"steps": 100, "replay": 0.5, "seed": 0}


def read_config(path: str | Path) -> dict:
    """The [redistil] table of a TOML file, its keys checked, relative paths made absolute."""
    path = Path(path)
    raw = read_toml(path)
    table = raw.get("redistil")
    if not isinstance(table, dict) or set(raw) - {"redistil"}:
        raise ConfigError(f"{path}: one [redistil] table expected, got {sorted(raw)}")
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise ConfigError(f"{path}: redistil: unknown key(s) {unknown}; allowed: {sorted(KEYS)}")
    base = path.resolve().parent
    out = {}
    for key, value in table.items():
        kind = KEYS[key]
        if kind in ("path", "paths"):
            values = value if kind == "paths" and isinstance(value, list) else [value]
            if not values or not all(isinstance(v, str) and v for v in values):
                raise ConfigError(f"{path}: redistil.{key}: a path{' or a list of paths' if kind == 'paths' else ''}, "
                                  f"got {value!r}")
            values = [str(base / Path(v).expanduser()) for v in values]
            out[key] = values if kind == "paths" else values[0]
        elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, kind) and not isinstance(value, bool):
            out[key] = value
        else:
            what = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise ConfigError(f"{path}: redistil.{key}: expected {what}, got {value!r}")
    return out


def options(args) -> dict:
    """The config file's [redistil] table, the flags over it, the defaults under both."""
    opts = dict(DEFAULTS, **(read_config(args.config) if args.config else {}))
    for key in KEYS:
        value = getattr(args, key, None)
        if value is not None:
            opts[key] = value
    missing = [k for k in ("bundle", "samples", "key") if not opts.get(k)]
    if missing:
        raise ConfigError(f"redistil needs {', '.join('--' + k for k in missing)} (or them in the config's "
                          "[redistil] table)")
    return opts


def _text(r: dict) -> str:
    s, a = r["samples"], r["agreement"]
    return "\n".join([
        f"{r['bundle']}: {r['model_id']} v{r['version']} (parent v{r['parent']['version']}), {r['bytes']:,} bytes, "
        f"signed by key {r['key_id']}, verified",
        f"samples: {s['kept']} of {s['read']} read (dropped {s['dropped']}); chosen by {s['models']}",
        f"{r['steps']} steps, replay {r['replay']:.0%}: agreement with the teacher on the samples "
        f"{a['before']['samples']:.4f} -> {a['after']['samples']:.4f}, on the run's imagery "
        f"{a['before']['replay']:.4f} -> {a['after']['replay']:.4f}",
        f"checkpoint: {r['run_dir']}/{r['checkpoint']} (training {r['seconds']['train']} s, "
        f"all {r['seconds']['total']} s)"])


def cmd_redistil(args) -> int:
    o = options(args)
    res = redistil(o["bundle"], o["samples"], o["key"], steps=o["steps"], replay=o["replay"], run_dir=o.get("run"),
                   lr=o.get("lr"), seed=o["seed"], held_out=o.get("held_out"), min_entropy=o.get("min_entropy"),
                   selection=o.get("selection"), out=o.get("out"), max_bytes=o.get("max_bytes"),
                   threads=o.get("threads"), name=o.get("name"), progress=not args.json)
    emit(res, args.json, _text)
    return 0
