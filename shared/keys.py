"""Ed25519 key pairs for signing uplink bundles.

The ground keeps the private key (PEM, PKCS#8, mode 0600); the satellite carries only the public
key (PEM, SubjectPublicKeyInfo). A key is named on the wire by its *key id*: the first 16 hex
digits of sha256(raw 32-byte public key), so a signature can say which key made it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Union

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import KeyFileError

PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"

PrivateKeyLike = Union[Ed25519PrivateKey, str, os.PathLike]
PublicKeyLike = Union[Ed25519PublicKey, Ed25519PrivateKey, str, os.PathLike]


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """First 16 hex digits of sha256 of the raw public key (a private key gives its public id)."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(out_dir: str | os.PathLike, name: str = "uplink",
                     overwrite: bool = False) -> tuple[Path, Path]:
    """Write `<name>.key` (private, 0600) and `<name>.pub` in `out_dir`; return both paths.

    Refuses to overwrite an existing key unless asked: losing the ground key means no bundle
    can ever be signed for the satellites that trust it.
    """
    private_path, public_path = key_file_paths(out_dir, name, (PRIVATE_SUFFIX, PUBLIC_SUFFIX),
                                               overwrite)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    write_private_file(private_path, private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def key_file_paths(out_dir: str | os.PathLike, name: str, suffixes: tuple[str, ...],
                   overwrite: bool = False) -> tuple[Path, ...]:
    """`out_dir/<name><suffix>` for each suffix, the folder made; FileExistsError for an
    existing one unless `overwrite` (a key others trust must not vanish by accident)."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise KeyFileError(f"key name {name!r}: must be a plain file name")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = tuple(out / f"{name}{suffix}" for suffix in suffixes)
    if not overwrite:
        for p in paths:
            if p.exists():
                raise FileExistsError(f"{p}: key file exists (refusing to overwrite it; --force)")
    return paths


def write_private_file(path: Path, data: bytes) -> None:
    """Write a secret key file created with mode 0600: no window where others could read it."""
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)   # in case the umask was stricter than asked / file existed


def _read_key_file(path: Path, what: str) -> bytes:
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} key file not found")
    if not path.is_file():
        raise KeyFileError(f"{path}: not a file")
    data = path.read_bytes()
    if b"-----BEGIN" not in data:
        raise KeyFileError(f"{path}: not a PEM key file (expected a '-----BEGIN ...' line)")
    return data


def load_private_key(key: PrivateKeyLike) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (or the key itself, passed through)."""
    if isinstance(key, Ed25519PrivateKey):
        return key
    path = Path(key)
    data = _read_key_file(path, "private")
    if b"PUBLIC KEY" in data and b"PRIVATE KEY" not in data:
        raise KeyFileError(f"{path}: this is a public key; signing needs the private key "
                           f"(the {PRIVATE_SUFFIX} file)")
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(f"{path}: the private key is password-protected; "
                           "give an unencrypted PKCS#8 key") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path}: unreadable private key ({exc})") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key ({type(loaded).__name__})")
    return loaded


def load_public_key(key: PublicKeyLike) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (or a key object; a private key gives its public)."""
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()
    path = Path(key)
    data = _read_key_file(path, "public")
    if b"PRIVATE KEY" in data:
        raise KeyFileError(f"{path}: this is a private key; verification takes the public key "
                           f"(the {PUBLIC_SUFFIX} file), and private keys never fly")
    try:
        loaded = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path}: unreadable public key ({exc})") from None
    if not isinstance(loaded, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 key ({type(loaded).__name__})")
    return loaded


def sign(private_key: Ed25519PrivateKey, data: bytes) -> bytes:
    """The 64-byte Ed25519 signature of `data` (deterministic: same key and data, same bytes)."""
    return private_key.sign(data)


def signature_valid(public_key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        return False
    return True
