"""shared.cliutil: a parser from a COMMANDS table and the one error policy of every CLI."""
import json

import pytest

from shared.cliutil import Command, CommandError, Group, build_parser, byte_size, in_context, run_cli
from shared.errors import (EXIT_MISSING_EXTRA, EXIT_UNREACHABLE, EXIT_USAGE, MissingExtra,
                           PeerUnreachable, TooLarge)

RAISES = {
    "refused": CommandError("--thing: 'x' is not a thing"),
    "too-large": TooLarge("b.tar: bundle would be 9 bytes, over max_bytes 5"),
    "unreachable": PeerUnreachable("no answer to 'status' from tcp://127.0.0.1:9"),
    "extra": MissingExtra("this command needs the 'ground' extra"),
    "nofile": FileNotFoundError(2, "No such file or directory", "/no/such.toml"),
    "bug": RuntimeError("a bug keeps its traceback"),
}


def cmd_ok(args):
    print(json.dumps({"size": args.size}) if args.json else f"size {args.size}")


def cmd_raise(args):
    raise RAISES[args.what]


COMMANDS = {
    "ok": Command(cmd_ok, "print a size", lambda p: p.add_argument("--size", type=byte_size, default=0)),
    "fail": (cmd_raise, "raise one of RAISES", lambda p: p.add_argument("what", choices=RAISES)),
    "nested": Group("a group", {"leaf": Command(cmd_ok, "a leaf", lambda p: p.add_argument(
        "--size", type=byte_size, default=0))}),
}


def run(capsys, *argv):
    code = run_cli(build_parser("tool", "a test tool", COMMANDS), list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_table_builds_the_parser_and_every_command_has_json(capsys):
    assert run(capsys, "ok", "--size", "5MB") == (0, "size 5000000\n", "")
    assert run(capsys, "ok", "--size", "5MiB", "--json") == (0, '{"size": 5242880}\n', "")
    assert run(capsys, "nested", "leaf", "--size", "1KiB")[:2] == (0, "size 1024\n")
    with pytest.raises(SystemExit) as exc:
        run(capsys, "fail", "--help")
    assert exc.value.code == 0 and "--json" in capsys.readouterr().out


@pytest.mark.parametrize("what, code, exit_code", [
    ("refused", "invalid_input", 1), ("too-large", "too_large", 1),
    ("unreachable", "unreachable", EXIT_UNREACHABLE), ("extra", "missing_extra", EXIT_MISSING_EXTRA),
    ("nofile", "file_not_found", 1),
])
def test_a_user_error_is_one_line_or_one_json_object(capsys, what, code, exit_code):
    status, out, err = run(capsys, "fail", what)
    assert status == exit_code and out == ""
    assert err == f"error: {RAISES[what]} [{code}]\n"
    status, out, err = run(capsys, "fail", what, "--json")
    assert status == exit_code and err == ""
    assert json.loads(out) == {"ok": False, "error": {"code": code, "message": str(RAISES[what])}}
    if what == "nofile":
        assert "/no/such.toml" in out


def test_a_bad_command_line_is_a_usage_error_exit_2(capsys):
    status, out, err = run(capsys, "ok", "--size", "5M")
    assert status == EXIT_USAGE and out == "" and err.count("\n") == 1
    assert err.startswith("error: tool ok: argument --size: size '5M': M is ambiguous; write 5MB")
    assert err.rstrip().endswith("[usage]")
    status, out, err = run(capsys, "nested", "--json")
    assert status == EXIT_USAGE and err == ""
    doc = json.loads(out)
    assert doc["error"]["code"] == "usage" and "tool nested" in doc["error"]["message"]
    status, _, err = run(capsys, "nope")
    assert status == EXIT_USAGE and "invalid choice: 'nope'" in err


def test_a_bug_keeps_its_traceback(capsys):
    with pytest.raises(RuntimeError, match="keeps its traceback"):
        run(capsys, "fail", "bug")


def test_in_context_names_the_input_and_keeps_code_and_exit_code():
    error = in_context(PeerUnreachable("no answer"), "s.toml")
    assert str(error) == "s.toml: no answer" and error.code == "unreachable"
    assert error.exit_code == EXIT_UNREACHABLE
    already = CommandError("s.toml: camera.dtype: int8?")
    assert in_context(already, "s.toml") is already
