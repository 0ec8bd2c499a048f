"""`eoedge shared ...`: key pairs and signed bundles from the command line.

    eoedge shared keygen --out DIR [--name uplink]
    eoedge shared bundle build --manifest M.json --file model.xml=PATH ... --key PRIV --out B.tar
    eoedge shared bundle verify B.tar --key PUB [--min-version N]     (exit 1 when rejected)
    eoedge shared bundle inspect B.tar                                  (no key: unverified)

Every command takes --json (one JSON document on stdout).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from shared.cliutil import add_json_flag, emit

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """`1048576`, `512k`, `5M`, `5MiB`, `1G` (binary multiples) -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4000000, 512k, 5M)")
    unit = (match.group(2) or "b")[0].lower()
    return int(match.group(1)) * {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit]


def parse_file_arg(text: str) -> tuple[str, Path]:
    """`arcname=path` -> (arcname, path)."""
    arcname, sep, path = text.partition("=")
    if not sep or not arcname or not path:
        raise argparse.ArgumentTypeError(f"expected ARCNAME=PATH, got {text!r} "
                                         "(e.g. model.xml=runs/x/model.xml)")
    return arcname, Path(path)


def _size(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------------------------------
# Commands (heavy imports inside: `eoedge shared --help` stays instant)
# ---------------------------------------------------------------------------------------------

def cmd_keygen(args: argparse.Namespace) -> int:
    from shared.keys import generate_keypair, key_id, load_public_key
    private, public = generate_keypair(args.out, args.name, overwrite=args.force)
    result = {"private_key": str(private), "public_key": str(public),
              "key_id": key_id(load_public_key(public))}
    emit(result, args.json, lambda r: (
        f"private key: {r['private_key']} (mode 0600: keep it on the ground)\n"
        f"public key:  {r['public_key']} (this one flies)\n"
        f"key id:      {r['key_id']}"))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from shared.bundle import build_bundle, verify_bundle
    from shared.keys import load_private_key
    from shared.manifest import fill_defaults

    files: dict[str, Path] = {}
    for arcname, path in args.file:
        if arcname in files:
            raise ValueError(f"--file {arcname}=...: given twice")
        files[arcname] = path
    manifest_path = Path(args.manifest)
    try:
        partial = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--manifest {manifest_path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--manifest {manifest_path}: not valid JSON ({exc})") from None
    if not isinstance(partial, dict):
        raise ValueError(f"--manifest {manifest_path}: must hold a JSON object")
    key = load_private_key(args.key)
    out = build_bundle(args.out, files, fill_defaults(partial), key, max_bytes=args.max_bytes)
    # Read back what was written, as the satellite will: catches a bundle the daemon would refuse.
    v = verify_bundle(out, key.public_key())
    result = {"path": str(out), "bytes": out.stat().st_size, "model_id": v.model_id,
              "version": v.version, "key_id": v.key_id, "files": v.files,
              "sha256": v.manifest["files"]}
    emit(result, args.json, lambda r: "\n".join(
        [f"wrote {r['path']} ({_size(r['bytes'])}): {r['model_id']} version {r['version']}, "
         f"signed by key {r['key_id']}"]
        + [f"  {name:<20} {_size(size):>11}  sha256 {r['sha256'][name][:16]}"
           for name, size in r["files"].items()]))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from shared.bundle import BundleError, verify_bundle
    try:
        v = verify_bundle(args.path, args.key, min_version=args.min_version)
    except BundleError as exc:
        print(f"rejected ({exc.reason}): {exc}", file=sys.stderr)
        if args.json:
            emit({"verified": False, "path": str(args.path), "reason": exc.reason,
                  "error": str(exc)}, True)
        return 1
    result = {k: v for k, v in v.as_dict().items() if k != "root"}
    emit(result, args.json, lambda r: (
        f"OK {r['path']}: {r['model_id']} version {r['version']}, signature by key "
        f"{r['key_id']} valid, {len(r['files'])} files match their sha256 "
        f"({_size(sum(r['files'].values()))})"))
    return 0


def _inspect_text(r: dict) -> str:
    m = r["manifest"] if isinstance(r["manifest"], dict) else {}
    inp, out = m.get("input", {}) or {}, m.get("output", {}) or {}
    lines = [f"{r['path']}  ({_size(r['archive_bytes'])})  {r['note']}",
             f"model:    {m.get('model_id')} version {m.get('version')} (parent {m.get('parent')}),"
             f" created {m.get('created')}",
             f"input:    bands {' '.join(map(str, inp.get('bands', [])))}, tile {inp.get('tile_size')}"
             f" overlap {inp.get('overlap')}",
             f"output:   {', '.join(map(str, out.get('classes', [])))} ({out.get('activation')})",
             f"signed:   {'yes, claims key ' + str(r['claimed_key_id']) if r['signed'] else 'NO'}",
             f"manifest: {'valid' if r['manifest_error'] is None else 'INVALID: ' + r['manifest_error']}",
             "members:"]
    lines += [f"  {name:<20} {_size(size):>11}" for name, size in r["members"].items()]
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    from shared.bundle import inspect_bundle
    emit(inspect_bundle(args.path), args.json, _inspect_text)
    return 0


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eoedge shared",
        description="The contracts: Ed25519 key pairs and signed uplink bundles.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("keygen", help="write a new Ed25519 key pair (NAME.key 0600, NAME.pub)",
                       description="Write a new Ed25519 signing key pair into DIR.")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the key files")
    p.add_argument("--name", default="uplink", help="file name stem (default: uplink)")
    p.add_argument("--force", action="store_true", help="overwrite an existing key pair of that name")
    add_json_flag(p)
    p.set_defaults(func=cmd_keygen)

    bundle = sub.add_parser("bundle", help="build, verify or inspect a signed bundle",
                            description="Signed uplink bundles (tar: manifest.json, manifest.sig, "
                                        "model.xml, model.bin, reference.npz).")
    bsub = bundle.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = bsub.add_parser("build", help="hash, validate, sign and write a bundle",
                        description="Build a bundle: the manifest's missing fields get defaults "
                                    "(created, policy, reference...), `files` is computed from the "
                                    "--file arguments, then it is validated, signed and written.")
    p.add_argument("--manifest", required=True, metavar="JSON", help="manifest JSON file (partial is fine)")
    p.add_argument("--file", required=True, action="append", type=parse_file_arg,
                   metavar="ARCNAME=PATH", help="a file to include (repeat: model.xml, model.bin, "
                                               "reference.npz, ...)")
    p.add_argument("--key", required=True, type=Path, metavar="PRIV", help="private key (PEM)")
    p.add_argument("--out", required=True, type=Path, metavar="PATH", help="bundle to write")
    p.add_argument("--max-bytes", type=parse_size, default=None, metavar="N",
                   help="refuse a bundle larger than this (bytes, or 512k / 5M / 1G)")
    add_json_flag(p)
    p.set_defaults(func=cmd_build)

    p = bsub.add_parser("verify", help="check signature, checksums, version (exit 1 if rejected)",
                        description="Verify a bundle as the satellite does: safe archive, signature "
                                    "by the given key, manifest, version, every sha256. Exit 1 "
                                    "with the reason on stderr when rejected.")
    p.add_argument("path", type=Path, metavar="PATH", help="the bundle")
    p.add_argument("--key", required=True, type=Path, metavar="PUB", help="trusted public key (PEM)")
    p.add_argument("--min-version", type=int, default=None, metavar="N",
                   help="refuse versions <= N (the version running now)")
    add_json_flag(p)
    p.set_defaults(func=cmd_verify)

    p = bsub.add_parser("inspect", help="show manifest and sizes without a key (UNVERIFIED)",
                        description="Show what a bundle says about itself. No key needed; nothing "
                                    "is verified (the archive structure is still checked safely).")
    p.add_argument("path", type=Path, metavar="PATH", help="the bundle")
    add_json_flag(p)
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from shared.bundle import BundleError
    from shared.keys import KeyFileError
    from shared.manifest import ManifestError
    try:
        return int(args.func(args) or 0)
    except (BundleError, ManifestError, KeyFileError, FileNotFoundError, FileExistsError,
            ValueError) as exc:
        reason = getattr(exc, "reason", None)
        print(f"error{f' ({reason})' if reason else ''}: {exc}", file=sys.stderr)
        if getattr(args, "json", False):
            emit({"ok": False, "reason": reason, "error": str(exc)}, True)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
