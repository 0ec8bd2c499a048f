"""Every error the factory raises on a user's input, one registry (NNCF keeps its errors in one
module too). Each is a shared.errors.EoedgeError with a stable `code`, so every CLI prints it in one
line (or as JSON) with the documented exit code; the builtin bases keep `except ValueError` working."""
from __future__ import annotations

from shared.errors import EoedgeError


class GroundError(EoedgeError, ValueError):
    """A factory input refused: the message names the file, field or value."""
    code = "ground_error"


class ConfigError(GroundError):
    """A run config (TOML) or a recorded one: the message names the dotted key."""
    code = "config_error"


class DataError(GroundError):
    """A data source: missing files, wrong shapes or bands, the held-out rows asked for training."""
    code = "data_error"


class CheckpointError(GroundError):
    """A checkpoint that is not one of ours, or whose architecture cannot be rebuilt."""
    code = "checkpoint_error"


class RunFolderError(GroundError):
    """A run folder without lineage, or an artifact missing from it."""
    code = "run_folder_error"


class StageError(GroundError):
    """A stage asked for something it cannot do (a size target out of reach, no evaluation data...)."""
    code = "stage_error"


class BudgetNotMet(StageError):
    """`build`: no candidate meets both the latency budget and the accuracy tolerance; the message
    names the closest one (`.closest`)."""
    code = "budget_not_met"

    def __init__(self, message: str, closest: dict | None = None):
        super().__init__(message)
        self.closest = closest


class IncompatibleIR(GroundError):
    """An IR the chosen device profile cannot run: the message names the layer, its op and why
    (`.problems`: one dict per layer); or an op that cannot be rewritten to a version it runs."""
    code = "incompatible_ir"

    def __init__(self, message: str, problems: list | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


class DeviceError(GroundError):
    """A device the config asks for that this machine does not have (or cannot run at that precision):
    the message names it and the devices there are."""
    code = "device_error"


class DeviceOutOfMemory(GroundError):
    """The device ran out of memory: the message names the batch size that failed (`.batch`)."""
    code = "device_out_of_memory"

    def __init__(self, message: str, batch: int | None = None):
        super().__init__(message)
        self.batch = batch
