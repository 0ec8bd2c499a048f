"""Who may speak to the daemon: CURVE on every socket, a ZAP handler per role, command anti-replay.

Every daemon socket is a CURVE server (ZeroMQ RFC 26: each connection encrypted and
authenticated with Curve25519 keys) with a ZAP domain named after the socket. ZeroMQ asks the
ZAP handler here (RFC 27) about each new connection; it answers 200 only for a public key that
`[security]` allows for that socket's role:

    frames     payload keys      FRAME in, ACK/DECISION/ERROR out
    products   downlink keys     PRODUCT out
    commands   operator keys     COMMAND in, ACK out
    telemetry  telemetry keys    TELEMETRY out

A connection without an allowed key never completes its handshake: it can send nothing and
receives nothing. A client without CURVE (the NULL mechanism), or with another daemon's public
key, is refused by libzmq itself before ZAP is asked; a socket monitor per socket reports those
handshake failures. Both are counted per socket (status, telemetry: `refused`,
`handshake_failed`) and logged at most once per LOG_EVERY_S per socket.

Why our own ZAP handler rather than `zmq.auth`'s Authenticator: its refusals can be neither
counted nor rate-limited, and it wants its own thread; the handshake is 7 frames in and 6 out,
and answering them in the daemon's poller keeps the rule that one thread touches the sockets.
Key files are read with zmq.auth's certificate loader (shared.curve).

Anti-replay (as CCSDS SDLS does for telecommands): a COMMAND carries `body.counter`, an integer
that must be greater than the last one this operator key sent; the last value per key persists in
`store.root/command_counters.json`, so a command recorded earlier cannot run again, not even
after a restart. CURVE already refuses replayed ciphertext; the counter also stops a command
replayed in clear by anyone holding an operator key, and one resent by a confused client.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import zmq
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from onboard.config import DaemonConfig
from onboard.errors import BAD_MESSAGE, DISK_FULL, REPLAYED, ConfigError
from shared.curve import ROLES, load_pair, load_public_keys
from shared.errors import KeyFileError

log = logging.getLogger("onboard.daemon")

ROLE_OF_SOCKET = {"frames": "payload", "products": "downlink", "commands": "operator",
                  "telemetry": "telemetry"}
ZAP_ENDPOINT = "inproc://zeromq.zap.01"     # where libzmq asks (RFC 27)
LOG_EVERY_S = 10.0                         # at most one refusal line per socket this often
HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
COUNTERS_FILE = "command_counters.json"
MAX_COUNTER = (1 << 63) - 1                # msgpack-safe; a nanosecond clock fits until 2262
PEEK_MAX_BYTES = 1 << 20


@dataclass
class ServerKeys:
    """The daemon's CURVE pair and the public keys allowed per role (Z85 bytes)."""

    public: bytes
    secret: bytes = field(repr=False)
    allowed: dict[str, frozenset[bytes]] = field(default_factory=dict)


def _config_key_error(where: str, exc: Exception) -> ConfigError:
    return ConfigError(f"{where}: {exc} (make keys with `eoedge onboard keys generate DIR "
                       "--role ROLE`)")


def load_server_keys(config: DaemonConfig) -> ServerKeys | None:
    """The keys `[security]` names, read now (None when it says `insecure = true`); a missing or
    malformed file is a ConfigError naming the field and the file."""
    if config.insecure:
        return None
    where = str(config.source_file or "<config>")
    try:
        public, secret = load_pair(config.secret_key)
    except (KeyFileError, FileNotFoundError) as exc:
        raise _config_key_error(f"{where}: security.secret_key", exc) from None
    allowed = {}
    for role in ROLES:
        keys: set[bytes] = set()
        for path in config.allowed_keys[role]:
            try:
                keys.update(load_public_keys(path))
            except (KeyFileError, FileNotFoundError) as exc:
                raise _config_key_error(f"{where}: security.{role}", exc) from None
        allowed[role] = frozenset(keys)
    return ServerKeys(public, secret, allowed)


class ReplayGuard:
    """The last command counter per operator key, persisted on every accepted command."""

    def __init__(self, path: Path):
        self.path = path
        self.last: dict[str, int] = {}
        self.refused = 0
        if path.exists():
            try:
                loaded = json.loads(path.read_text())
                self.last = {str(k): int(v) for k, v in loaded.items()}
            except (ValueError, AttributeError, TypeError) as exc:
                raise ConfigError(f"{path}: unreadable command counters ({exc}); a daemon that "
                                  "forgot them would accept replayed commands") from None

    def admit(self, key: str, counter) -> str | None:
        """None when `counter` is new for `key` (and remember it), else why it is refused."""
        if not isinstance(counter, int) or isinstance(counter, bool) or not 0 < counter <= MAX_COUNTER:
            return (f"body.counter: every command carries an integer counter in 1..2^63-1, greater "
                    f"than the last one its key sent (anti-replay), got {str(counter)[:40]!r}")
        last = self.last.get(key, 0)
        if counter <= last:
            self.refused += 1
            return f"replayed: counter {counter} is not above {last}, the last this operator key sent"
        self.last[key] = counter
        try:
            self._save()
        except OSError as exc:        # a full store: refuse the command rather than forget its counter
            self.last[key] = last
            return (f"{DISK_FULL}: the command counter could not be stored in {self.path} "
                    f"({exc.strerror or exc}); free space in the store")
        return None

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.last))
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise


class Security:
    """CURVE and ZAP on the daemon's sockets (a no-op where `[security] insecure = true`)."""

    def __init__(self, config: DaemonConfig):
        self.keys = load_server_keys(config)
        self.replay = ReplayGuard(config.store_root / COUNTERS_FILE) if self.keys else None
        self.refused = {name: 0 for name in ROLE_OF_SOCKET}            # by ZAP: key not allowed
        self.handshake_failed = {name: 0 for name in ROLE_OF_SOCKET}   # by libzmq: no CURVE, ...
        self._unlogged = dict(self.refused)
        self._next_log = dict.fromkeys(ROLE_OF_SOCKET, 0.0)
        self.zap: zmq.Socket | None = None
        self.monitors: dict[zmq.Socket, str] = {}                       # monitor socket -> name
        if self.keys is None:
            log.warning("[security] insecure = true: no CURVE, no ZAP; ANY local process may "
                        "command this daemon, take its products and read its telemetry")

    @property
    def enabled(self) -> bool:
        return self.keys is not None

    # ------------------------------------------------------------------ sockets
    def start(self, ctx: zmq.Context) -> zmq.Socket | None:
        """Bind the ZAP handler; before any server socket binds, so no handshake goes unasked."""
        if self.enabled:
            self.zap = ctx.socket(zmq.REP)
            self.zap.setsockopt(zmq.LINGER, 0)
            self.zap.bind(ZAP_ENDPOINT)
        return self.zap

    def secure(self, sock: zmq.Socket, name: str) -> None:
        """Make `sock` a CURVE server whose ZAP domain is its name (before bind)."""
        if self.enabled:
            sock.curve_server = True
            sock.curve_secretkey = self.keys.secret
            sock.curve_publickey = self.keys.public
            sock.zap_domain = name.encode()
            self.monitors[sock.get_monitor_socket(HANDSHAKE_FAILED)] = name

    def pollables(self) -> list[zmq.Socket]:
        """The sockets the poller watches for us: the ZAP handler and the monitors."""
        return [self.zap, *self.monitors] if self.enabled else []

    def serve(self, events: dict) -> None:
        """Handle what the poller saw ready: ZAP requests, handshake failures."""
        if self.zap is not None and self.zap in events:
            self.serve_zap()
        for monitor, name in self.monitors.items():
            if monitor in events:
                self._drain_monitor(monitor, name)

    def _drain_monitor(self, monitor: zmq.Socket, name: str) -> None:
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            self.handshake_failed[name] += 1
            detail = getattr(event.get("value"), "name", event.get("value"))
            self._log_refusal(name, f"handshake failed ({detail}: no CURVE, or not this daemon's key)")

    def serve_zap(self) -> None:
        """Answer every waiting ZAP request (the poller saw the ZAP socket readable)."""
        while True:
            try:
                request = self.zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.zap.send_multipart(self._answer(request))

    def _answer(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6:
            return [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"bad ZAP request", b"", b""]
        version, request_id, domain, _address, _identity, mechanism, *credentials = request
        name = domain.decode("ascii", "replace")
        role = ROLE_OF_SOCKET.get(name)
        key = credentials[0] if mechanism == b"CURVE" and credentials and len(credentials[0]) == 32 else None
        text = z85.encode(key) if key else b""
        if role and text in self.keys.allowed[role]:
            return [version, request_id, b"200", b"OK", text, b""]
        if role is not None:
            self.refused[name] += 1
            self._log_refusal(name, f"not a {role} key ({mechanism.decode('ascii', 'replace')[:8]} "
                                    f"{text[:8].decode() + '...' if text else '-'})")
        return [version, request_id, b"400", b"key not allowed for this socket", b"", b""]

    def _log_refusal(self, name: str, last: str) -> None:
        """One WARNING per socket per LOG_EVERY_S at most, with the count since the last one."""
        self._unlogged[name] += 1
        now = time.monotonic()
        if now >= self._next_log[name]:
            log.warning("refused %d connection(s) on %s in the last %g s; the last: %s",
                        self._unlogged[name], name, LOG_EVERY_S, last)
            self._unlogged[name] = 0
            self._next_log[name] = now + LOG_EVERY_S

    # ------------------------------------------------------------------ commands
    def admit_command(self, parts: list) -> dict | None:
        """None to pass a COMMAND on, else the body of its refusal ACK (replayed or no counter).
        A message whose header does not even decode passes: the daemon refuses it anyway."""
        if not self.enabled or not parts:
            return None
        counter = _peek_counter(parts[0])
        if counter is _UNREADABLE:
            return None
        key = parts[0].get("User-Id")
        refused = self.replay.admit(key, counter)
        if refused is None:
            return None
        code = REPLAYED if refused.startswith(REPLAYED) else \
            DISK_FULL if refused.startswith(DISK_FULL) else BAD_MESSAGE
        if code == REPLAYED and self.replay.refused % 100 == 1:
            log.warning("refused a replayed command (%d so far): %s", self.replay.refused, refused)
        return {"ok": False, "code": code, "error": refused}

    def status(self) -> dict:
        """What status and telemetry report: the mode, allowed keys per role, refusals."""
        if not self.enabled:
            return {"mode": "insecure", "refused": dict(self.refused),
                    "handshake_failed": dict(self.handshake_failed), "replayed": 0}
        return {"mode": "curve", "keys": {role: len(keys) for role, keys in self.keys.allowed.items()},
                "refused": dict(self.refused), "handshake_failed": dict(self.handshake_failed),
                "replayed": self.replay.refused}

    def close(self) -> None:
        for monitor in self.monitors:
            monitor.close(linger=0)
        self.monitors = {}
        if self.zap is not None:
            self.zap.close(linger=0)
            self.zap = None


_UNREADABLE = object()


def _peek_counter(frame) -> object:
    """`body.counter` of a command's header part (None if absent), or _UNREADABLE."""
    try:
        if len(frame) > PEEK_MAX_BYTES:
            return _UNREADABLE
        header = msgpack.unpackb(bytes(frame), raw=False)
        body = header.get("body")
        return body.get("counter") if isinstance(body, dict) else _UNREADABLE
    except Exception:
        return _UNREADABLE
