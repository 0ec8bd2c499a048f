"""Every error the flight simulator raises on purpose, with its code (shared/errors.py's contract).

| class | code | builtin base | raised when |
|---|---|---|---|
| `ScenarioError` | `bad_scenario` | ValueError | a scenario file, section or value cannot be used (file and field named) |
| `SceneSpecError` | `bad_scene` | ValueError | a `[[scenes]]` entry or a generator argument cannot be used (field named) |
| `ScenarioFailed` | `scenario_failed` | RuntimeError | the run cannot go on: the bundle does not verify, the daemon refuses it |
| `DaemonStartError` | `daemon_start_failed` | RuntimeError | the daemon process exited or stayed silent instead of reporting ready |
| `UplinkInterrupted` | `uplink_interrupted` | RuntimeError | the link was lost mid-upload (a scenario fault; the uplink resumes) |

The builtin bases stay so that `except ValueError` / `except RuntimeError` keep working; the
classes stay importable from the modules that defined them before (scenario, scenes, runner,
daemon_proc, uplink).
"""
from __future__ import annotations

from shared.errors import EoedgeError


class FlightSimError(EoedgeError):
    """Base of the flight simulator's errors."""
    code = "flight_sim_error"


class ScenarioError(FlightSimError, ValueError):
    """A scenario file or value that cannot be used; names the file and the field."""
    code = "bad_scenario"


class SceneSpecError(FlightSimError, ValueError):
    """A `[[scenes]]` entry that cannot be used; the message names the field."""
    code = "bad_scene"


class ScenarioFailed(FlightSimError, RuntimeError):
    """The scenario could not go on (no model could be installed, the daemon would not start)."""
    code = "scenario_failed"


class DaemonStartError(FlightSimError, RuntimeError):
    """The daemon process exited or stayed silent instead of reporting its endpoints."""
    code = "daemon_start_failed"


class UplinkInterrupted(FlightSimError, RuntimeError):
    """The link was lost mid-upload (a scenario fault); `status` says what the daemon holds."""
    code = "uplink_interrupted"

    def __init__(self, upload_id: str, sent: int):
        super().__init__(f"uplink of {upload_id} interrupted after {sent} chunks")
        self.upload_id, self.sent = upload_id, sent
