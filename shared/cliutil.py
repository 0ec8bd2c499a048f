"""What every eoedge command shares: a `--json` flag and one way to print a result."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable


class CommandError(Exception):
    """A failure to report in one line (no traceback), with exit code 1."""


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document on stdout instead of the human summary")


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):          # numpy scalars and arrays
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def emit(result: dict, as_json: bool, human: Callable[[dict], str] | None = None) -> None:
    """Print `result` as JSON (machine) or through `human` (people); JSON if no `human`."""
    if as_json or human is None:
        print(json.dumps(result, indent=2, default=_default))
    else:
        print(human(result))


def run_command(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Call a command; a CommandError or a bad-input ValueError becomes one line on stderr."""
    try:
        return int(func(args) or 0)
    except (CommandError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
