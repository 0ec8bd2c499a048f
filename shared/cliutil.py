"""What every eoedge command line shares: a parser built from a COMMANDS table, `--json`, one way
to print a result and one error policy.

A CLI module is a table and two lines::

    COMMANDS = {
        "keygen": Command(cmd_keygen, "write a new key pair", add_keygen_args),
        "bundle": Group("build, verify or inspect a bundle", {
            "build": Command(cmd_build, "hash, validate, sign and write a bundle", add_build_args),
        }),
    }

    def main(argv=None) -> int:
        return run_cli(build_parser("eoedge shared", "The contracts ...", COMMANDS), argv)

Every command gets `--json`. A handler takes the parsed arguments and returns an exit code (or
None for 0); it prints its result with `emit` and raises an `EoedgeError` for anything the user
can fix. The error policy (`report_error`): an `EoedgeError`, or a FileNotFoundError /
PermissionError / IsADirectoryError / FileExistsError (they name the file), prints one line
`error: <message> [<code>]` on stderr, or under `--json` one JSON object
`{"ok": false, "error": {"code": ..., "message": ...}}` on stdout, and the command exits with
the error's `exit_code` (docs/cli.md). A usage error is exit 2 the same way. Anything else is a
bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Mapping, NamedTuple, Sequence, Union

from shared.errors import EXIT_OK, ByteSizeError, EoedgeError, UsageError
from shared.errors import CommandError  # noqa: F401  (the handlers' error, importable from here)
from shared.units import parse_bytes

Handler = Callable[[argparse.Namespace], Union[int, None]]

# OS errors whose message names the file: a user's mistake, reported like an EoedgeError.
FILE_ERRORS = {FileNotFoundError: "file_not_found", PermissionError: "permission_denied",
               IsADirectoryError: "is_a_directory", NotADirectoryError: "not_a_directory",
               FileExistsError: "file_exists"}


def _no_args(parser: argparse.ArgumentParser) -> None:
    pass


class Command(NamedTuple):
    """One row of a COMMANDS table (ground's `(func, help, adder)` tuples are the same shape)."""
    func: Handler
    help: str
    add_args: Callable[[argparse.ArgumentParser], Any] = _no_args
    description: str = ""           # the --help text; the help line when empty


class Group(NamedTuple):
    """A row whose commands sit one level down (`eoedge shared bundle build`)."""
    help: str
    commands: Mapping[str, Union[Command, "Group", tuple]]
    description: str = ""


class _Parser(argparse.ArgumentParser):
    """argparse, but a refused command line raises UsageError (the error policy prints it)."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# ------------------------------------------------------------------------------------ parser
def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document on stdout instead of the human summary")


def byte_size(text: str) -> int:
    """argparse type for a byte size in the grammar of shared.units (5MB, 5MiB, 5000000)."""
    try:
        return parse_bytes(text)
    except ByteSizeError as exc:    # argparse keeps only an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser(prog: str, description: str,
                 commands: Mapping[str, Union[Command, Group, tuple]]) -> argparse.ArgumentParser:
    """An argparse parser with one sub-command per row of `commands` (nested for a Group)."""
    parser = _Parser(prog=prog, description=description)
    _add_commands(parser, commands, "command")
    return parser


def _add_commands(parser: argparse.ArgumentParser, commands: Mapping, dest: str) -> None:
    sub = parser.add_subparsers(dest=dest, required=True, metavar=dest.upper())
    for name, row in commands.items():
        if isinstance(row, Group):
            p = sub.add_parser(name, help=row.help, description=row.description or row.help)
            _add_commands(p, row.commands, "action")
            continue
        row = Command(*row)
        p = sub.add_parser(name, help=row.help, description=row.description or row.help)
        row.add_args(p)
        add_json_flag(p)
        p.set_defaults(func=row.func)


# ------------------------------------------------------------------------------------ output
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


def as_eoedge_error(exc: BaseException) -> EoedgeError | None:
    """`exc` as the error policy sees it: itself, a file error given a code, or None (a bug)."""
    if isinstance(exc, EoedgeError):
        return exc
    for kind, code in FILE_ERRORS.items():
        if isinstance(exc, kind):
            return EoedgeError(str(exc), code=code)
    return None


def in_context(error: EoedgeError, where: object) -> EoedgeError:
    """`error` with `where: ` before its message (same code, same exit code), for a command
    whose input file the deeper error does not name."""
    if str(error).startswith(str(where)):
        return error
    wrapped = EoedgeError(f"{where}: {error}", code=error.code)
    wrapped.exit_code = error.exit_code
    return wrapped


def report_error(error: EoedgeError, as_json: bool) -> int:
    """Print `error` by the policy (one stderr line, or a JSON object on stdout); its exit code."""
    if as_json:
        print(json.dumps({"ok": False, "error": error.as_dict()}))
    else:
        print(f"error: {error} [{error.code}]", file=sys.stderr)
    return error.exit_code


# ------------------------------------------------------------------------------------ running
def run_command(func: Handler, args: argparse.Namespace) -> int:
    """Call one handler under the error policy; its exit code."""
    try:
        return int(func(args) or EXIT_OK)
    except Exception as exc:
        error = as_eoedge_error(exc)
        if error is None:
            raise
        return report_error(error, bool(getattr(args, "json", False)))


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]) and run the chosen handler, both under the policy."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        return report_error(exc, "--json" in argv)
    return run_command(args.func, args)
