"""The error contract every package builds on, and the registry of `shared`'s own errors.

Every error a user can cause (a bad file, field, value, message or peer) is an `EoedgeError`
subclass with a stable snake_case `code` (what scripts, ACKs and ERROR events carry) and a
one-line message naming what was wrong. Each package keeps its error classes in one registry
module (`shared/errors.py`, `ground/errors.py`, `onboard/errors.py`, `flight_sim/errors.py`);
the CLIs (shared/cliutil.py) turn any of them into one line on stderr, or a JSON object under
`--json`, and the documented exit code.

`shared`'s errors (the modules that raise them re-export them, so `from shared.bundle import
BundleError` still works). Each keeps its old builtin base, so `except ValueError` still works:

| class | code | base | raised by |
|---|---|---|---|
| UsageError | usage (exit 2) | | a command line argparse refuses |
| MissingExtra | missing_extra (exit 3) | | a command whose optional extra is not installed |
| PeerUnreachable | unreachable (exit 4) | TimeoutError | shared.client: no answer from the daemon |
| CommandRejected | the daemon's code, else command_rejected | RuntimeError | shared.client: ACK {ok: false} |
| CommandError | invalid_input | | a CLI refusing its arguments |
| ByteSizeError | invalid_size | ValueError | shared.units.parse_bytes |
| UnknownBandError | unknown_band | ValueError | shared.bands |
| SceneError, MissingBandsError | invalid_scene, missing_bands | ValueError | shared.scene.Scene |
| SceneReadError, SceneFormatError | unreadable_scene, unknown_scene_format | ValueError | shared.scene.read_scene |
| PolicyError | invalid_policy | ValueError | shared.policy |
| ManifestError, BundleManifestError | invalid_manifest | ValueError | shared.manifest |
| UnknownProfile | unknown_profile | ValueError | shared.profiles |
| KeyFileError | invalid_key_file | ValueError | shared.keys |
| DataMissing | data_missing | FileNotFoundError | shared.datasets |
| BundleError and one subclass per reason | not_a_bundle, bad_signature, ... | | shared.bundle |
| ChainStepRefused | the step's own reason (wrong_key, checksum_mismatch, ...) | BundleError | shared.chain |
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

# Exit codes of every `eoedge` command (docs/cli.md repeats this table).
EXIT_OK = 0
EXIT_ERROR = 1          # refused: bad input, failed check, the peer said no
EXIT_USAGE = 2          # the command line itself (argparse)
EXIT_MISSING_EXTRA = 3  # the install lacks an optional extra the command needs
EXIT_UNREACHABLE = 4    # a peer (the daemon) did not answer in time


class EoedgeError(Exception):
    """A user-facing failure: `code` names the kind, the message names the file/field/value."""
    code = "error"
    exit_code = EXIT_ERROR

    def __init__(self, message: str = "", *, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    def as_dict(self) -> dict:
        return {"code": self.code, "message": str(self)}


# ------------------------------------------------------------------------ command lines, peers

class UsageError(EoedgeError):
    """A command line that cannot be parsed (argparse's refusal, the unknown group)."""
    code = "usage"
    exit_code = EXIT_USAGE


class MissingExtra(EoedgeError):
    """The command needs an optional extra that is not installed; the message names it."""
    code = "missing_extra"
    exit_code = EXIT_MISSING_EXTRA


class CommandError(EoedgeError):
    """A command refusing its input, in one line (no traceback)."""
    code = "invalid_input"


class CommandRejected(EoedgeError, RuntimeError):
    """The daemon answered ACK {ok: false}: its error is the message, its code the code."""
    code = "command_rejected"


class PeerUnreachable(EoedgeError, TimeoutError):
    """A peer did not answer in time; the message names the endpoint."""
    code = "unreachable"
    exit_code = EXIT_UNREACHABLE


# ------------------------------------------------------------------------ values and files

class ByteSizeError(EoedgeError, ValueError):
    """A byte size that is not in the grammar of shared.units (the message names the value)."""
    code = "invalid_size"


class UnknownBandError(EoedgeError, ValueError):
    """A name that is not one of the 13 Sentinel-2 bands nor an alias of one."""
    code = "unknown_band"

    def __init__(self, name: object):
        self.name = name
        super().__init__(
            f"unknown Sentinel-2 band {name!r}: expected one of B01..B12 or B8A "
            f"(or B2, b02, Blue, Green, Red, NIR, SWIR16, SWIR22, RedEdge1..3, Coastal, "
            f"WaterVapour, Cirrus)")


class SceneError(EoedgeError, ValueError):
    """A Scene built from inconsistent parts (shape, band names)."""
    code = "invalid_scene"


class MissingBandsError(SceneError):
    """Bands asked for that the scene (or file) does not have; names every one of them."""
    code = "missing_bands"

    def __init__(self, missing: Sequence[str], available: Sequence[str], where: str = ""):
        self.missing, self.available, self.where = tuple(missing), tuple(available), where
        place = f" in {where}" if where else ""
        super().__init__(f"missing band(s) {', '.join(self.missing)}{place}; "
                         f"available: {', '.join(self.available) or '(none)'}")


class SceneReadError(EoedgeError, ValueError):
    """A file that could not be read as a scene; the message starts with the file's path."""
    code = "unreadable_scene"


class SceneFormatError(SceneReadError):
    """A path whose format is not one `read_scene` knows."""
    code = "unknown_scene_format"


class PolicyError(EoedgeError, ValueError):
    """A policy (or statistics) that cannot be used; `.field` is the path of the offending field."""
    code = "invalid_policy"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class ManifestError(EoedgeError, ValueError):
    """An invalid manifest; `.field` is the path of the offending field (`input.tile_size`)."""
    code = "invalid_manifest"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class UnknownProfile(EoedgeError, ValueError):
    """A device profile name that shared.profiles does not know; the message lists the known ones."""
    code = "unknown_profile"


class KeyFileError(EoedgeError, ValueError):
    """A key file that cannot be used; the message names the file and what is wrong with it."""
    code = "invalid_key_file"


class DataMissing(EoedgeError, FileNotFoundError):
    """A data file that is not where it should be; `path` is where it was looked for."""
    code = "data_missing"

    def __init__(self, path: Path, hint: str = "", default_root: Path | str = "../shared/data"):
        self.path = Path(path)
        super().__init__(f"data not found: {self.path} (data root: $EOEDGE_DATA or {default_root})"
                         f"{': ' + hint if hint else ''}")


# ------------------------------------------------------------------------ bundles: one class per reason

class BundleError(EoedgeError):
    """A bundle refused; `code` (alias `reason`) is short (`bad_signature`), the message says why."""
    code = reason = "bundle_error"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.reason = cls.code       # the code's old name, still read by callers (on the class too)


class NotABundle(BundleError):
    """Missing file, not a tar archive, corrupt or truncated, or no manifest.json."""
    code = "not_a_bundle"


class MissingSignature(BundleError):
    code = "missing_signature"


class BadSignature(BundleError):
    """The signature does not match the manifest bytes (tampered manifest or signature)."""
    code = "bad_signature"


class WrongKey(BundleError):
    """Signed by a key other than the one we trust."""
    code = "wrong_key"


class ChecksumMismatch(BundleError):
    code = "checksum_mismatch"


class MissingFile(BundleError):
    code = "missing_file"


class UnexpectedFile(BundleError):
    code = "unexpected_file"


class UnsafePath(BundleError):
    """Absolute path, `..`, a link, a device, a directory, a duplicate name."""
    code = "unsafe_path"


class TooLarge(BundleError):
    code = "too_large"


class VersionTooOld(BundleError):
    code = "version_too_old"


class BundleManifestError(BundleError, ManifestError):
    """The signed manifest is not a valid manifest (catchable as either parent)."""
    code = "invalid_manifest"

    def __init__(self, exc: ManifestError):
        ManifestError.__init__(self, exc.field, str(exc).split(": ", 1)[1] if exc.field else str(exc))


class ChainStepRefused(BundleError):
    """One step of a chain bundle refused: `.step` names it, `code` is the step's own reason
    (wrong_key, checksum_mismatch, invalid_manifest, ...), the message names the step and file."""
    code = "chain_step_refused"

    def __init__(self, step: str, cause: BundleError | ManifestError):
        super().__init__(f"chain step {step!r}: {cause}", code=cause.code)
        self.reason = cause.code
        self.step = step
        self.cause = cause


class MessageError(EoedgeError, ValueError):
    """A message that cannot be encoded or decoded; `.field` names the part that was wrong."""
    code = "bad_message"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message
