"""`eoedge ground chain`: a signed chain bundle (a gate model, then models that run only where
the earlier ones allow) from single-model bundles built and signed as usual. The work is
shared.chain.build_chain_bundle; this module reads the command line and prints the result."""
from __future__ import annotations

import json
from pathlib import Path

from shared.chain import build_chain_bundle, verify_chain_bundle
from shared.cliutil import CommandError, emit
from shared.keys import load_private_key


def _json_value(text: str, what: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandError(f"{what}: not valid JSON ({exc.msg} at character {exc.pos})") from None


def parse_steps(step_args: list[str], run_if_args: list[str]) -> list[tuple[str, Path, dict | None]]:
    """[(name, bundle, run_if)] from `--step NAME=BUNDLE ...` (in chain order) and
    `--run-if NAME=JSON ...`; CommandError naming the option and its value."""
    steps: dict[str, Path] = {}
    for text in step_args:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise CommandError(f"--step {text!r}: expected NAME=BUNDLE.tar")
        if name in steps:
            raise CommandError(f"--step {name}: given twice")
        steps[name] = Path(path)
        if not steps[name].is_file():
            raise FileNotFoundError(f"--step {name}: bundle {path} not found")
    run_if: dict[str, dict] = {}
    for text in run_if_args:
        name, sep, value = text.partition("=")
        if not sep or not name:
            raise CommandError(f"--run-if {text!r}: expected NAME=JSON (one policy `if` block)")
        if name not in steps:
            raise CommandError(f"--run-if {name}: no --step named {name!r} (steps: {', '.join(steps)})")
        if name in run_if:
            raise CommandError(f"--run-if {name}: given twice")
        block = _json_value(value, f"--run-if {name}")
        if not isinstance(block, dict):
            raise CommandError(f"--run-if {name}: must be a JSON object such as "
                               '{"class": "cloud", "fraction_below": 0.5}')
        run_if[name] = block
    return [(name, path, run_if.get(name)) for name, path in steps.items()]


def read_policy_arg(text: str) -> dict:
    """--policy: a JSON file, or the JSON itself when it starts with `{`."""
    if text.lstrip().startswith("{"):
        return _json_value(text, "--policy")
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"--policy: policy file {path} not found")
    policy = _json_value(path.read_text(encoding="utf-8"), f"--policy {path}")
    if not isinstance(policy, dict):
        raise CommandError(f"--policy {path}: must hold a JSON object (rules, default)")
    return policy


def _text(r: dict) -> str:
    lines = [f"{r['bundle']}: {r['bytes']:,} bytes, chain {r['model_id']} v{r['version']}, signed by key "
             f"{r['key_id']}, verified (each step with the same key)"]
    for s in r["steps"]:
        where = "everywhere (the gate)" if s["run_if"] is None else f"where {json.dumps(s['run_if'])}"
        lines.append(f"  {s['name']}: {s['model_id']} v{s['version']} ({', '.join(s['classes'])}; "
                     f"tile {s['tile_size']}, {s['precision']}) runs {where}")
    lines.append(f"  frame bands: {', '.join(r['bands'])}")
    return "\n".join(lines)


def cmd_chain(args) -> int:
    steps = parse_steps(args.step, args.run_if or [])
    key = load_private_key(args.key)
    out = Path(args.out)
    build_chain_bundle(out, steps, read_policy_arg(args.policy), key, args.model_id, args.version,
                       parent=args.parent, max_bytes=args.max_bytes)
    emit(verify_chain_bundle(out, key.public_key()), args.json, _text)
    return 0
