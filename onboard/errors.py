"""Every error the on-board daemon raises or reports, with its code (shared/errors.py's contract).

| class | code | builtin base | raised when |
|---|---|---|---|
| `ConfigError` | `bad_config` | ValueError | a daemon config file or value cannot be used (file and field named) |
| `ModelLoadError` | `load_failed` | RuntimeError | an IR cannot be read, reshaped or compiled, or does not match its manifest |
| `FrameRefused` | one of FRAME_REFUSAL_CODES | | admission turns a frame away at the door (its ERROR is its outcome) |
| `FrameError` | one of FRAME_ERROR_CODES | ValueError | the pipeline refuses a frame's array or values |
| `PrecisionUnsupported` | `precision_unsupported` | RuntimeError | a bundle's precision (or the configured override) is not one the device can run |
| `StoreError` | one of STORE_ERROR_CODES | RuntimeError | the model store cannot do what was asked (busy, corrupt slot, ...) |
| `CommandFailed` | one of COMMAND_ERROR_CODES, an install's refusal code, else `command_failed` | | an operator command refused; its ACK carries the code |

The classes stay importable from the modules that defined them before (config, runtime,
pipeline, store, commands), and keep their builtin bases so `except ValueError` still works.

The codes below are what travel: a frame's ERROR event and a refused command's ACK carry one in
`code` (an accepted frame's and a done command's ACK carry `OK`). Scripts match on them, so they
never change; add new ones here.
"""
from __future__ import annotations

import errno

from shared.errors import EoedgeError
from shared.messages import ACK_OK as OK   # the `code` of an ACK that accepts or reports success

# A frame's ERROR: refused at the door (its only outcome), or failed after its ACK.
BAD_MESSAGE = "bad_message"          # not a decodable envelope, or the wrong message type
INVALID_FRAME = "invalid_frame"      # a decodable frame whose array or bands are wrong
TOO_LARGE = "too_large"              # over limits.max_message_bytes, checked before decoding
NO_MODEL = "no_model"                # no active model yet
QUEUE_FULL = "queue_full"            # queue.max_frames pending, or max_pending_products waiting
SHUTDOWN = "shutdown"                # the daemon is draining (or the drain timed out)
TIMEOUT = "timeout"                  # an accepted frame passed its deadline (supervision)
DISK_FULL = "disk_full"              # a write (product spill, upload, state) found no room: path named
SPILL_FAILED = "spill_failed"        # a kept frame's product could not be written (not for room)
INTERNAL = "internal"                # our bug: the message names the exception
FRAME_REFUSAL_CODES = (BAD_MESSAGE, INVALID_FRAME, TOO_LARGE, NO_MODEL, QUEUE_FULL, SHUTDOWN)

# The pipeline's verdict on an accepted frame (FrameError.code; the ERROR event carries it).
WRONG_DTYPE = "wrong_dtype"
WRONG_SHAPE = "wrong_shape"
BAND_MISMATCH = "band_mismatch"
EMPTY_FRAME = "empty_frame"
BAD_SCALE = "bad_scale"
UNKNOWN_BAND = "unknown_band"
DUPLICATE_BAND = "duplicate_band"
MISSING_BANDS = "missing_bands"
NOT_FINITE = "not_finite"
# An accepted frame's ERROR from the daemon itself (not the pipeline): TIMEOUT, DISK_FULL above.
FRAME_ERROR_CODES = (WRONG_DTYPE, WRONG_SHAPE, BAND_MISMATCH, EMPTY_FRAME, BAD_SCALE, UNKNOWN_BAND,
                     DUPLICATE_BAND, MISSING_BANDS, NOT_FINITE)

# A refused command's ACK (beside too_large, bad_message and internal above).
UNKNOWN_COMMAND = "unknown_command"
BUSY = "busy"                        # an install or rollback is already running
BAD_ARGS = "bad_args"                # an argument missing or of the wrong type (args.<field> named)
UNKNOWN_UPLOAD = "unknown_upload"
UPLOAD_INCOMPLETE = "upload_incomplete"
UPLOAD_COMPLETE = "upload_complete"  # a chunk for an upload already finished
BAD_CHUNK = "bad_chunk"              # a chunk of the wrong length
CHECKSUM_MISMATCH = "checksum_mismatch"   # a chunk's or the whole file's sha256
POLICY_NOT_STORED = "policy_not_stored"
TOO_MANY_UPLOADS = "too_many_uploads"     # store.max_uploads incomplete, or their announced bytes
REPLAYED = "replayed"                # body.counter not above the last its operator key sent
COMMAND_ERROR_CODES = (TOO_LARGE, BAD_MESSAGE, INTERNAL, UNKNOWN_COMMAND, BUSY, BAD_ARGS,
                       UNKNOWN_UPLOAD, UPLOAD_INCOMPLETE, UPLOAD_COMPLETE, BAD_CHUNK,
                       CHECKSUM_MISMATCH, POLICY_NOT_STORED, NO_MODEL, DISK_FULL, TOO_MANY_UPLOADS,
                       REPLAYED)

# The model store: an InstallResult's code (install and rollback refusals pass it on to the
# command's ACK), or StoreError.code. Bundle checks add shared.bundle's codes (bad_signature, ...).
INSTALLED = "installed"
ROLLED_BACK = "rolled_back"
NOT_FOUND = "not_found"              # no bundle file at that path (or a path install may not read)
EXTRACT_FAILED = "extract_failed"    # disk full, permissions: the bundle may be fine
LOAD_FAILED = "load_failed"
PRECISION_UNSUPPORTED = "precision_unsupported"   # the device cannot run the bundle's precision
SELF_TEST_FAILED = "self_test_failed"
ACTIVATION_FAILED = "activation_failed"   # state.json could not be written: the old model stays
NO_PREVIOUS = "no_previous"
SLOT_CORRUPT = "slot_corrupt"        # a slot's files no longer match their signed manifest
SLOT_UNREADABLE = "slot_unreadable"
BAD_STATE = "bad_state"              # state.json unreadable or of another schema
STORE_IN_USE = "store_in_use"        # another process (a running daemon) holds the store
STORE_ERROR_CODES = (BUSY, NOT_FOUND, EXTRACT_FAILED, LOAD_FAILED, PRECISION_UNSUPPORTED,
                     SELF_TEST_FAILED, ACTIVATION_FAILED, NO_PREVIOUS, NO_MODEL, SLOT_CORRUPT,
                     SLOT_UNREADABLE, BAD_STATE, STORE_IN_USE)


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """An OSError saying the filesystem (or the user's quota) has no room left."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


class OnboardError(EoedgeError):
    """Base of the daemon's errors."""
    code = "onboard_error"


class ConfigError(OnboardError, ValueError):
    """A bad configuration file or value; the message names the file and the field."""
    code = "bad_config"


class ModelLoadError(OnboardError, RuntimeError):
    """The IR cannot be read or does not look like a segmentation model we can run."""
    code = LOAD_FAILED


class PrecisionUnsupported(OnboardError, RuntimeError):
    """The precision a bundle asks for (or the config forces) is not among the device's
    capabilities; the message names both."""
    code = PRECISION_UNSUPPORTED


class FrameRefused(OnboardError):
    """A frame turned away at the door; `.field` names what was wrong (`arrays.data.shape`)."""
    code = INVALID_FRAME

    def __init__(self, code: str, message: str, field: str | None = None,
                 details: dict | None = None):
        super().__init__(message, code=code)
        self.field = field
        self.details = details


class FrameError(OnboardError, ValueError):
    """A frame the pipeline cannot take; `.code` is one of FRAME_ERROR_CODES."""
    code = INVALID_FRAME

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}", code=code)
        self.message = message


class StoreError(OnboardError, RuntimeError):
    """The store cannot do what was asked (no previous model, store busy, broken state)."""
    code = "store_error"

    def __init__(self, code: str, message: str):
        super().__init__(message, code=code)


class CommandFailed(OnboardError):
    """A command that cannot be done; its ACK is {ok: false, code, error: the message}."""
    code = "command_failed"
