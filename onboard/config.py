"""The daemon's configuration: one TOML file names every endpoint, path and limit.

`load_config(path)` reads it over the defaults in `onboard/default.toml` (the documented
example), checks every value's type and range, resolves relative paths against the file's
folder, and raises `ConfigError` naming the file and the field (`queue.max_frames: ...`).
Unknown sections or keys are errors too: a typo must not silently fall back to a default.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onboard.errors import ConfigError
from onboard.precision import AUTO
from shared.curve import ROLES
from shared.manifest import PRECISIONS

if sys.version_info >= (3, 11):
    import tomllib
else:                                # the Myriad daemon runs on 3.10 (OpenVINO 2022.3)
    import tomli as tomllib

DEFAULT_TOML = Path(__file__).with_name("default.toml")
ENDPOINT_NAMES = ("frames", "products", "commands", "telemetry")


@dataclass(frozen=True)
class DaemonConfig:
    """Everything the daemon process needs, already checked. Paths are absolute."""

    name: str
    device: str
    num_requests: int
    log_level: str
    endpoints: dict[str, str]
    store_root: Path
    public_key: Path
    uploads: Path
    max_upload_bytes: int
    max_chunk_bytes: int
    max_frames: int
    max_pending_products: int
    max_message_bytes: int
    socket_limit_factor: float
    telemetry_interval_s: float
    telemetry_window: int
    drain_timeout_s: float
    precision: str = AUTO                       # "auto" (each manifest's) or one forced for all
    capabilities: tuple[str, ...] | None = None   # None: ask OpenVINO
    frame_deadline_s: float = 10.0              # [supervision]: a frame's deadline is this
    frame_deadline_s_per_mpix: float = 10.0     # ... plus this per megapixel
    stall_exit_s: float = 30.0                  # unwatched: exit this long into a stall (0: never)
    spill_dir: Path | None = None               # kept frames' products also written here
    test_block_prefix: str = ""                 # TEST HOOK: frames with this id prefix block
    test_block_s: float = 0.0
    insecure: bool = False                      # [security]: no CURVE (a bench only)
    secret_key: Path | None = None              # the daemon's CURVE pair (.key_secret)
    allowed_keys: dict[str, tuple[Path, ...]] = field(default_factory=dict)   # role -> key files/folders
    max_uploads: int = 4                        # [store]: incomplete uploads at once
    max_upload_total_bytes: int = 512 << 20     # ... and the bytes they announce together
    upload_max_age_s: float = 86400.0           # an upload untouched this long is removed
    install_dirs: tuple[Path, ...] = ()         # `install {path}` reads these besides uploads
    outbox_peer_bytes: int = 16 << 20           # [limits]: replies waiting for one peer
    outbox_bytes: int = 64 << 20                # ... for every peer together
    outbox_max_age_s: float = 300.0             # an away peer's reply older than this is dropped
    max_pending_product_bytes: int = 256 << 20  # [queue]: products held in memory for the downlink
    source_file: Path | None = None
    raw: dict = field(default_factory=dict, repr=False)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _non_empty_str(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _capabilities(value: Any) -> bool:
    return value == AUTO or (isinstance(value, list) and value != []
                             and all(_non_empty_str(v) for v in value))


def _paths(value: Any) -> bool:
    return _non_empty_str(value) or (isinstance(value, list) and all(_non_empty_str(v) for v in value))


def _endpoint(value: Any) -> bool:
    return isinstance(value, str) and value.split("://", 1)[0] in ("tcp", "ipc", "inproc") \
        and "://" in value and value.split("://", 1)[1] != ""


# section -> key -> (check, what the check means, attribute name on DaemonConfig)
SCHEMA: dict[str, dict[str, tuple]] = {
    "daemon": {
        "name": (_non_empty_str, "a non-empty string", "name"),
        "device": (_non_empty_str, "an OpenVINO device name such as \"CPU\"", "device"),
        "num_requests": (_non_negative_int, "an integer >= 0 (0 = let OpenVINO choose)", "num_requests"),
        "log_level": (lambda v: v in ("DEBUG", "INFO", "WARNING", "ERROR"),
                      "one of DEBUG, INFO, WARNING, ERROR", "log_level"),
    },
    "endpoints": {name: (_endpoint, "a ZeroMQ endpoint tcp://..., ipc://... or inproc://...", None)
                  for name in ENDPOINT_NAMES},
    "runtime": {
        "precision": (lambda v: v == AUTO or v in PRECISIONS,
                      f"\"auto\" or one of {', '.join(PRECISIONS)}", "precision"),
        "capabilities": (_capabilities, "\"auto\" or a non-empty list of OpenVINO capability "
                         "names such as [\"FP32\", \"INT8\"]", "capabilities"),
    },
    "store": {
        "root": (_non_empty_str, "a folder path", "store_root"),
        "public_key": (_non_empty_str, "a PEM public key file path", "public_key"),
        "uploads": (_non_empty_str, "a folder path", "uploads"),
        "max_upload_bytes": (_positive_int, "an integer >= 1", "max_upload_bytes"),
        "max_chunk_bytes": (_positive_int, "an integer >= 1", "max_chunk_bytes"),
        "max_uploads": (_positive_int, "an integer >= 1", "max_uploads"),
        "max_upload_total_bytes": (_positive_int, "an integer >= 1", "max_upload_total_bytes"),
        "upload_max_age_s": (_positive_number, "a number of seconds > 0", "upload_max_age_s"),
        "install_dirs": (lambda v: isinstance(v, list) and all(_non_empty_str(d) for d in v),
                         "a list of folder paths ([] for the uploads folder only)", "install_dirs"),
    },
    "queue": {
        "max_frames": (_positive_int, "an integer >= 1", "max_frames"),
        "max_pending_products": (_positive_int, "an integer >= 1", "max_pending_products"),
        "max_pending_product_bytes": (_positive_int, "an integer >= 1 (bytes)",
                                      "max_pending_product_bytes"),
    },
    "limits": {
        "max_message_bytes": (_positive_int, "an integer >= 1", "max_message_bytes"),
        "socket_limit_factor": (lambda v: _positive_number(v) and v >= 1, "a number >= 1",
                                "socket_limit_factor"),
        "outbox_peer_bytes": (_positive_int, "an integer >= 1", "outbox_peer_bytes"),
        "outbox_bytes": (_positive_int, "an integer >= 1", "outbox_bytes"),
        "outbox_max_age_s": (_positive_number, "a number of seconds > 0", "outbox_max_age_s"),
    },
    "telemetry": {
        "interval_s": (_positive_number, "a number of seconds > 0", "telemetry_interval_s"),
        "window": (_positive_int, "an integer >= 1", "telemetry_window"),
    },
    "shutdown": {
        "drain_timeout_s": (lambda v: _positive_number(v) or v == 0, "a number of seconds >= 0",
                            "drain_timeout_s"),
    },
    "supervision": {
        "frame_deadline_s": (_positive_number, "a number of seconds > 0", "frame_deadline_s"),
        "frame_deadline_s_per_mpix": (lambda v: _positive_number(v) or v == 0,
                                      "a number of seconds >= 0", "frame_deadline_s_per_mpix"),
        "stall_exit_s": (lambda v: _positive_number(v) or v == 0, "a number of seconds >= 0",
                         "stall_exit_s"),
        "spill_dir": (lambda v: isinstance(v, str), "a folder path, or \"\" for none", "spill_dir"),
        "test_block_prefix": (lambda v: isinstance(v, str), "a string (tests only)",
                              "test_block_prefix"),
        "test_block_s": (lambda v: _positive_number(v) or v == 0, "a number of seconds >= 0",
                         "test_block_s"),
    },
}
# [security] (onboard.security): checked here, its key files read when the daemon starts.
SECURITY_SCHEMA: dict[str, tuple] = {
    "insecure": (lambda v: isinstance(v, bool), "true or false"),
    "secret_key": (_non_empty_str, "the daemon's CURVE secret key file (NAME.key_secret)"),
    **{role: (_paths, "a public key file or folder of *.key files, or a list of them ([] for none)")
       for role in ROLES},
}
FLOAT_ATTRS = {"socket_limit_factor", "telemetry_interval_s", "drain_timeout_s", "frame_deadline_s",
               "frame_deadline_s_per_mpix", "stall_exit_s", "test_block_s",
               "upload_max_age_s", "outbox_max_age_s"}
PATH_KEYS = {("store", "root"), ("store", "public_key"), ("store", "uploads"),
             ("supervision", "spill_dir")}


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _merge(defaults: dict, given: dict, where: str) -> dict:
    merged = {section: dict(values) for section, values in defaults.items()}
    known = {**SCHEMA, "security": SECURITY_SCHEMA}
    for section, values in given.items():
        if section not in known:
            raise ConfigError(f"{where}: unknown section [{section}] (known: {', '.join(known)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: {section}: must be a table [{section}]")
        for key, value in values.items():
            if key not in known[section]:
                raise ConfigError(f"{where}: {section}.{key}: unknown key "
                                  f"(known: {', '.join(known[section])})")
            merged[section][key] = value
    return merged


def config_from_dict(given: dict, base_dir: Path | None = None, where: str = "<config>") -> DaemonConfig:
    """Check `given` (sections as in default.toml, any subset) over the defaults."""
    merged = _merge(_read_toml(DEFAULT_TOML), given, where)
    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    values: dict[str, Any] = {"endpoints": {}}
    for section, keys in SCHEMA.items():
        for key, (check, meaning, attr) in keys.items():
            value = merged[section].get(key)
            if not check(value):
                raise ConfigError(f"{where}: {section}.{key}: must be {meaning}, got {value!r}")
            if (section, key) in PATH_KEYS and value != "":
                value = (base_dir / Path(value).expanduser()).resolve()
            elif (section, key) in PATH_KEYS:
                value = None                  # an optional folder left empty
            if attr == "capabilities":
                value = None if value == AUTO else tuple(v.strip().upper() for v in value)
            if section == "endpoints":
                values["endpoints"][key] = value
            else:
                values[attr] = float(value) if attr in FLOAT_ATTRS else value
    values["install_dirs"] = tuple((base_dir / Path(d).expanduser()).resolve()
                                   for d in values["install_dirs"])
    if values["max_upload_bytes"] > values["max_upload_total_bytes"]:
        raise ConfigError(f"{where}: store.max_upload_total_bytes: must be >= store.max_upload_bytes")
    if values["max_chunk_bytes"] > values["max_upload_bytes"]:
        raise ConfigError(f"{where}: store.max_chunk_bytes: must be <= store.max_upload_bytes")
    bound = [ep for ep in values["endpoints"].values()]
    if len(set(bound)) != len(bound):
        raise ConfigError(f"{where}: endpoints: every endpoint must be different, got {bound}")
    values.update(_security(merged["security"], "security" in given, base_dir, where))
    return DaemonConfig(**values, raw=merged)


def _security(section: dict, given: bool, base_dir: Path, where: str) -> dict:
    """DaemonConfig's security fields. Secure by default: a config without a [security] section
    is refused; `insecure = true` must be said outright (a bench, logged and reported)."""
    if not given:
        raise ConfigError(f"{where}: [security]: missing. The daemon authenticates every peer with "
                          "CURVE keys (make a set with `eoedge onboard keys generate DIR --role all` "
                          "and name them as in onboard/default.toml), or, on a bench only, say "
                          "`[security] insecure = true`")
    for key, (check, meaning) in SECURITY_SCHEMA.items():
        if not check(section.get(key)):
            raise ConfigError(f"{where}: security.{key}: must be {meaning}, got {section.get(key)!r}")
    if section["insecure"]:
        return {"insecure": True}

    def path(value: str) -> Path:
        return (base_dir / Path(value).expanduser()).resolve()
    allowed = {role: tuple(path(v) for v in ([section[role]] if isinstance(section[role], str)
                                             else section[role])) for role in ROLES}
    return {"insecure": False, "secret_key": path(section["secret_key"]), "allowed_keys": allowed}


def load_config(path: str | Path) -> DaemonConfig:
    """Read a daemon TOML config file; errors name the file and the field."""
    path = Path(path).expanduser().resolve()
    config = config_from_dict(_read_toml(path), base_dir=path.parent, where=str(path))
    return DaemonConfig(**{**config.__dict__, "source_file": path})


def connect_address(endpoint: str) -> str:
    """The address a client connects to for a bound endpoint (`tcp://*:5552` -> 127.0.0.1)."""
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        if host in ("*", "0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "[::]":
            host = "[::1]"
        return f"tcp://{host}:{port}"
    return endpoint
