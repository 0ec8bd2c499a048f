"""Names kept importable from here, as before. The client of the daemon's commands is
shared.client.CommandClient (the onboard CLI, the flight simulator and the tests share it).

The commands themselves (the registry the daemon dispatches on) live in onboard.telecommands,
chunked uploads in onboard.uploads, CommandFailed in onboard.errors.
"""
from __future__ import annotations

from onboard.errors import CommandFailed  # noqa: F401  (importable from here, as before)
from onboard.uploads import Uploads  # noqa: F401  (importable from here, as before)
