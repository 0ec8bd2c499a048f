"""CURVE key files for the bus: who may speak to the daemon, and how a client proves it.

ZeroMQ's CURVE (RFC 26) encrypts and authenticates every connection with Curve25519 key pairs;
the daemon is a CURVE server with its own pair, and each peer connects with its role's pair and
the daemon's public key. Keys are files in ZeroMQ's certificate format (the one
`zmq.auth.create_certificates` and CZMQ's zcert write: `NAME.key` holds the public key,
`NAME.key_secret` the pair), so the stock loaders read them; we write them ourselves only to
create the secret file with mode 0600 from the start (pyzmq's writer uses the umask).

A key set folder, as `eoedge onboard keys generate DIR --role ...` writes it:

    daemon.key, daemon.key_secret         the daemon's pair (the secret stays on board)
    operator.key, operator.key_secret     one pair per peer role (payload, downlink, operator,
    ...                                   telemetry); the daemon's config lists the public files

A client needs its role's secret file and the daemon's public file: `client_keys(DIR, role)`.

pyzmq is imported at the top: only the `onboard` and `sim` extras, which install pyzmq, import
this module (as shared.client).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from shared.errors import KeyFileError
from shared.keys import key_file_paths, write_private_file

ROLES = ("payload", "downlink", "operator", "telemetry")
DAEMON = "daemon"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
Z85_KEY_LEN = 40                    # a 32-byte Curve25519 key in Z85 text


@dataclass(frozen=True)
class ClientKeys:
    """A peer's CURVE pair and the daemon's public key, all Z85 bytes."""

    role: str
    public: bytes
    secret: bytes = field(repr=False)     # a secret key never lands in a log or a traceback
    server_public: bytes

    def apply(self, sock: zmq.Socket) -> zmq.Socket:
        """Make `sock` a CURVE client of the daemon (before `connect`)."""
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server_public
        return sock


def _checked_key(key: bytes | None, path: Path, what: str) -> bytes:
    try:
        if key is None or len(key) != Z85_KEY_LEN or len(z85.decode(key)) != 32:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise KeyFileError(f"{path}: no valid CURVE {what} key in it (expected a ZeroMQ "
                           f"certificate with a 40-character Z85 {what}-key)") from None
    return bytes(key)


def _load(path: str | os.PathLike) -> tuple[bytes | None, bytes | None]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: CURVE key file not found")
    if not path.is_file():
        raise KeyFileError(f"{path}: not a file")
    try:
        return zmq.auth.load_certificate(path)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: unreadable CURVE key file ({exc})") from None


def load_public(path: str | os.PathLike) -> bytes:
    """The Z85 public key of a `.key` file (or of a `.key_secret` file, which holds it too)."""
    public, _ = _load(path)
    return _checked_key(public, Path(path), "public")


def load_pair(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys of a `.key_secret` file."""
    public, secret = _load(path)
    if secret is None:
        raise KeyFileError(f"{path}: holds no secret key (a public `{PUBLIC_SUFFIX}` file? the "
                           f"pair is the `{SECRET_SUFFIX}` file)")
    return _checked_key(public, Path(path), "public"), _checked_key(secret, Path(path), "secret")


def load_public_keys(path: str | os.PathLike) -> list[bytes]:
    """The public keys a config entry names: one `.key` file, or every `*.key` in a folder."""
    path = Path(path)
    if path.is_dir():
        return [load_public(p) for p in sorted(path.glob(f"*{PUBLIC_SUFFIX}"))]
    return [load_public(path)]


def _certificate(name: str, public: bytes, secret: bytes | None) -> str:
    kind = "Secret (keep it on its machine, mode 0600)" if secret else "Public"
    lines = [f"#   ****  Generated on {datetime.datetime.now():%Y-%m-%d %H:%M:%S} by eoedge  ****",
             f"#   ZeroMQ CURVE {kind} Certificate: {name}", "", "metadata", "curve",
             f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def generate_keypair(out_dir: str | os.PathLike, name: str,
                     overwrite: bool = False) -> tuple[Path, Path]:
    """Write `NAME.key` (public, 0644) and `NAME.key_secret` (0600) in `out_dir`; return both.
    Refuses to overwrite an existing pair unless asked (peers may already trust it)."""
    public_path, secret_path = key_file_paths(out_dir, name, (PUBLIC_SUFFIX, SECRET_SUFFIX), overwrite)
    public, secret = zmq.curve_keypair()
    write_private_file(secret_path, _certificate(name, public, secret).encode())
    public_path.write_text(_certificate(name, public, None))
    public_path.chmod(0o644)               # whatever the umask: peers must read it
    return public_path, secret_path


def generate_key_set(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """The daemon's pair and one pair per role in `out_dir` (a bench, a simulator run)."""
    for name in (DAEMON, *ROLES):
        generate_keypair(out_dir, name, overwrite=overwrite)
    return Path(out_dir)


def client_keys(key_dir: str | os.PathLike, role: str) -> ClientKeys:
    """A `role` client's keys from a key set folder: `ROLE.key_secret` and `daemon.key`."""
    key_dir = Path(key_dir)
    public, secret = load_pair(key_dir / f"{role}{SECRET_SUFFIX}")
    return ClientKeys(role, public, secret, load_public(key_dir / f"{DAEMON}{PUBLIC_SUFFIX}"))
