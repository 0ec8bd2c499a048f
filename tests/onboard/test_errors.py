"""onboard.errors is the one registry: every class an EoedgeError with a code and its old builtin
base, importable where it was; every refused command's ACK carries a code (no process needed)."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest

from onboard import errors
from onboard.errors import CommandFailed, ConfigError, FrameError, ModelLoadError, StoreError
from onboard.telecommands import COMMANDS, Command, execute, find_command, read_command
from shared.errors import EoedgeError
from shared.messages import MAX_CODE_CHARS, Limits, Message, decode, encode


@pytest.mark.parametrize("cls, base, code", [
    (ConfigError, ValueError, "bad_config"),
    (ModelLoadError, RuntimeError, "load_failed"),
    (FrameError, ValueError, "invalid_frame"),
    (StoreError, RuntimeError, "store_error"),
    (errors.PrecisionUnsupported, RuntimeError, "precision_unsupported"),
    (CommandFailed, Exception, "command_failed"),
])
def test_every_error_is_an_eoedge_error_with_its_old_base(cls, base, code):
    assert issubclass(cls, EoedgeError) and issubclass(cls, base) and cls.code == code


def test_errors_stay_importable_where_they_were():
    from onboard.commands import CommandFailed as commands_failed
    from onboard.config import ConfigError as config_error
    from onboard.pipeline import FRAME_ERROR_CODES, FrameError as pipeline_frame_error
    from onboard.runtime import ModelLoadError as runtime_load_error
    from onboard.store import StoreError as store_error
    assert (commands_failed, config_error, pipeline_frame_error, runtime_load_error, store_error) == \
        (CommandFailed, ConfigError, FrameError, ModelLoadError, StoreError)
    assert FRAME_ERROR_CODES == errors.FRAME_ERROR_CODES


def test_instance_codes_and_messages():
    frame = FrameError(errors.NOT_FINITE, "band B02 holds NaN")
    assert frame.code == "not_finite" and str(frame) == "not_finite: band B02 holds NaN"
    assert frame.message == "band B02 holds NaN"
    store = StoreError(errors.SLOT_CORRUPT, "slot a failed its check")
    assert store.as_dict() == {"code": "slot_corrupt", "message": "slot a failed its check"}
    assert CommandFailed("args.size: missing", code=errors.BAD_ARGS).code == "bad_args"


def test_codes_are_snake_case_and_fit_the_wire():
    codes = [v for k, v in vars(errors).items() if k.isupper() and isinstance(v, str)]
    assert len(codes) == len(set(codes)) > 30
    for code in codes:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", code) and len(code) <= MAX_CODE_CHARS, code
    for group in (errors.FRAME_REFUSAL_CODES, errors.FRAME_ERROR_CODES, errors.COMMAND_ERROR_CODES,
                  errors.STORE_ERROR_CODES):
        assert set(group) <= set(codes)


# ------------------------------------------------------------------------------------ command ACKs
LIMITS = Limits(max_array_bytes=1024)


def _refused(parts) -> CommandFailed:
    with pytest.raises(CommandFailed) as info:
        find_command(read_command(parts, LIMITS).body["name"])
    return info.value


def test_unreadable_or_unknown_commands_are_refused_with_a_code():
    too_large = _refused([b"x" * (1024 + (1 << 20) + 1)])
    assert too_large.code == "too_large" and str(too_large).startswith("too_large: ")
    garbage = _refused([b"\x00\x01not msgpack"])
    assert garbage.code == "bad_message" and str(garbage).startswith("bad_message: ")
    wrong_type = _refused(encode(Message("error", {"code": "x", "message": "y"})))
    assert wrong_type.code == "bad_message" and "'error'" in str(wrong_type)
    unknown = _refused(encode(Message("command", {"name": "self_destruct"})))
    assert unknown.code == "unknown_command" and "self_destruct" in str(unknown)


class FakeDaemon:
    bus = SimpleNamespace(security=SimpleNamespace(status=lambda: {"mode": "insecure"}))
    uploads = SimpleNamespace(bundle_path=Path)   # install {path}: the real check is test_abuse's

    def status(self) -> dict:
        return {"rate": float("nan")}

    def install(self, path) -> dict:
        return {"ok": False, "code": "version_too_old", "reason": "v1 is not newer than v2"}


def _ack(name: str, args: dict | None = None) -> dict:
    """execute()'s body, checked as the peer would read it."""
    msg = Message("command", {"name": name, "args": args or {}})
    body = execute(FakeDaemon(), find_command(name), msg)
    assert decode(encode(msg.reply("ack", body))).body == body
    return body


def test_execute_answers_ok_or_the_refusals_code():
    assert _ack("status") == {"ok": True, "code": "ok",
                              "result": {"rate": None, "security": {"mode": "insecure"}}}
    assert _ack("install", {"path": "/b.tar"}) == {
        "ok": False, "code": "version_too_old", "error": "version_too_old: v1 is not newer than v2"}
    both = _ack("install", {"path": "/b.tar", "upload_id": "0" * 16})
    assert both["code"] == "bad_args" and both["error"].startswith("args:")
    assert _ack("set_policy", {})["code"] == "bad_args"
    assert _ack("set_policy", {"policy": [1]})["error"] == "args.policy: expected a map or null, got list"


def test_a_handler_bug_is_answered_internal(monkeypatch):
    def broken(daemon, args, arrays):
        raise KeyError("oops")
    monkeypatch.setitem(COMMANDS, "broken", Command("broken", broken, "raises"))
    body = _ack("broken")
    assert body["ok"] is False and body["code"] == "internal" and "KeyError" in body["error"]
    assert msgpack.packb(body)
