"""The error contract every package builds on.

Every error a user can cause (a bad file, field, value, message or peer) is an `EoedgeError`
subclass with a stable snake_case `code` (what scripts, ACKs and ERROR events carry) and a
one-line message naming what was wrong. Each package keeps its error classes in one registry
module (`shared/errors.py`, `ground/errors.py`, `onboard/errors.py`, `flight_sim/errors.py`);
the CLIs (shared/cliutil.py) turn any of them into one line on stderr, or a JSON object under
`--json`, and the documented exit code.
"""
from __future__ import annotations

# Exit codes of every `eoedge` command (docs/architecture.md repeats this table).
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
