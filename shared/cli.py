"""`eoedge shared ...`: key pairs and signed bundles from the command line.

    eoedge shared keygen --out DIR [--name uplink]
    eoedge shared bundle build --manifest M.json --file model.xml=PATH ... --key PRIV --out B.tar
    eoedge shared bundle verify B.tar --key PUB [--min-version N]     (exit 1 when rejected)
    eoedge shared bundle inspect B.tar                                  (no key: unverified)

Every command takes --json (one JSON document on stdout). Errors follow shared.cliutil's policy
(one line `error: <message> [<code>]`, exit code per docs/cli.md).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from shared.bundle import build_bundle, inspect_bundle, verify_bundle
from shared.cliutil import Command, CommandError, Group, build_parser, byte_size, emit, run_cli
from shared.keys import generate_keypair, key_id, load_private_key, load_public_key
from shared.manifest import fill_defaults
from shared.units import format_bytes


def parse_file_arg(text: str) -> tuple[str, Path]:
    """`arcname=path` -> (arcname, path)."""
    arcname, sep, path = text.partition("=")
    if not sep or not arcname or not path:
        raise argparse.ArgumentTypeError(f"expected ARCNAME=PATH, got {text!r} "
                                         "(e.g. model.xml=runs/x/model.xml)")
    return arcname, Path(path)


# ------------------------------------------------------------------------------------ keygen
def cmd_keygen(args: argparse.Namespace) -> int:
    private, public = generate_keypair(args.out, args.name, overwrite=args.force)
    result = {"private_key": str(private), "public_key": str(public),
              "key_id": key_id(load_public_key(public))}
    emit(result, args.json, lambda r: (
        f"private key: {r['private_key']} (mode 0600: keep it on the ground)\n"
        f"public key:  {r['public_key']} (this one flies)\n"
        f"key id:      {r['key_id']}"))
    return 0


def add_keygen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the key files")
    p.add_argument("--name", default="uplink", help="file name stem (default: uplink)")
    p.add_argument("--force", action="store_true", help="overwrite an existing key pair of that name")


# ------------------------------------------------------------------------------------ bundle build
def _partial_manifest(path: Path) -> dict:
    try:
        partial = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--manifest {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CommandError(f"--manifest {path}: not valid JSON ({exc})") from None
    if not isinstance(partial, dict):
        raise CommandError(f"--manifest {path}: must hold a JSON object")
    return partial


def cmd_build(args: argparse.Namespace) -> int:
    files: dict[str, Path] = {}
    for arcname, path in args.file:
        if arcname in files:
            raise CommandError(f"--file {arcname}=...: given twice")
        files[arcname] = path
    partial = _partial_manifest(Path(args.manifest))
    key = load_private_key(args.key)
    out = build_bundle(args.out, files, fill_defaults(partial), key, max_bytes=args.max_bytes)
    # Read back what was written, as the satellite will: catches a bundle the daemon would refuse.
    v = verify_bundle(out, key.public_key())
    result = {"path": str(out), "bytes": out.stat().st_size, "model_id": v.model_id,
              "version": v.version, "key_id": v.key_id, "files": v.files,
              "sha256": v.manifest["files"]}
    emit(result, args.json, lambda r: "\n".join(
        [f"wrote {r['path']} ({format_bytes(r['bytes'])}): {r['model_id']} version {r['version']}, "
         f"signed by key {r['key_id']}"]
        + [f"  {name:<20} {format_bytes(size):>11}  sha256 {r['sha256'][name][:16]}"
           for name, size in r["files"].items()]))
    return 0


def add_build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, metavar="JSON", help="manifest JSON file (partial is fine)")
    p.add_argument("--file", required=True, action="append", type=parse_file_arg,
                   metavar="ARCNAME=PATH", help="a file to include (repeat: model.xml, model.bin, "
                                               "reference.npz, ...)")
    p.add_argument("--key", required=True, type=Path, metavar="PRIV", help="private key (PEM)")
    p.add_argument("--out", required=True, type=Path, metavar="PATH", help="bundle to write")
    p.add_argument("--max-bytes", type=byte_size, default=None, metavar="SIZE",
                   help="refuse a bundle larger than this (5000000, 5MB = 5,000,000, "
                        "5MiB = 5,242,880; docs/cli.md)")


# ------------------------------------------------------------------------------------ verify, inspect
def cmd_verify(args: argparse.Namespace) -> int:
    v = verify_bundle(args.path, args.key, min_version=args.min_version)   # BundleError: exit 1
    result = {k: v for k, v in v.as_dict().items() if k != "root"}
    emit(result, args.json, lambda r: (
        f"OK {r['path']}: {r['model_id']} version {r['version']}, signature by key "
        f"{r['key_id']} valid, {len(r['files'])} files match their sha256 "
        f"({format_bytes(sum(r['files'].values()))})"))
    return 0


def add_verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, metavar="PATH", help="the bundle")
    p.add_argument("--key", required=True, type=Path, metavar="PUB", help="trusted public key (PEM)")
    p.add_argument("--min-version", type=int, default=None, metavar="N",
                   help="refuse versions <= N (the version running now)")


def _inspect_text(r: dict) -> str:
    m = r["manifest"] if isinstance(r["manifest"], dict) else {}
    inp, out = m.get("input", {}) or {}, m.get("output", {}) or {}
    lines = [f"{r['path']}  ({format_bytes(r['archive_bytes'])})  {r['note']}",
             f"model:    {m.get('model_id')} version {m.get('version')} (parent {m.get('parent')}),"
             f" created {m.get('created')}",
             *(["chain:    " + " -> ".join(f"{s.get('name')}" + (f" where {json.dumps(s['run_if'])}"
                                                                if s.get("run_if") else "")
                                          for s in (m["chain"].get("steps") or []) if isinstance(s, dict))
                + " (each step a bundle in steps/<name>/: eoedge ground chain)"]
              if isinstance(m.get("chain"), dict) else
              [f"input:    bands {' '.join(map(str, inp.get('bands', [])))}, tile {inp.get('tile_size')}"
               f" overlap {inp.get('overlap')}",
               f"output:   {', '.join(map(str, out.get('classes', [])))} ({out.get('activation')})"]),
             f"signed:   {'yes, claims key ' + str(r['claimed_key_id']) if r['signed'] else 'NO'}",
             f"manifest: {'valid' if r['manifest_error'] is None else 'INVALID: ' + r['manifest_error']}",
             "members:"]
    lines += [f"  {name:<20} {format_bytes(size):>11}" for name, size in r["members"].items()]
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    emit(inspect_bundle(args.path), args.json, _inspect_text)
    return 0


def add_inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, metavar="PATH", help="the bundle")


# ------------------------------------------------------------------------------------ the table
COMMANDS = {
    "keygen": Command(cmd_keygen, "write a new Ed25519 key pair (NAME.key 0600, NAME.pub)",
                      add_keygen_args, "Write a new Ed25519 signing key pair into DIR."),
    "bundle": Group("build, verify or inspect a signed bundle", {
        "build": Command(cmd_build, "hash, validate, sign and write a bundle", add_build_args,
                         "Build a bundle: the manifest's missing fields get defaults (created, "
                         "policy, reference...), `files` is computed from the --file arguments, "
                         "then it is validated, signed and written."),
        "verify": Command(cmd_verify, "check signature, checksums, version (exit 1 if rejected)",
                          add_verify_args,
                          "Verify a bundle as the satellite does: safe archive, signature by the "
                          "given key, manifest, version, every sha256. Exit 1 with the reason "
                          "(its code in brackets) on stderr when rejected."),
        "inspect": Command(cmd_inspect, "show manifest and sizes without a key (UNVERIFIED)",
                           add_inspect_args,
                           "Show what a bundle says about itself. No key needed; nothing is "
                           "verified (the archive structure is still checked safely)."),
    }, "Signed uplink bundles (tar: manifest.json, manifest.sig, model.xml, model.bin, "
       "reference.npz)."),
}


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser("eoedge shared", "The contracts: Ed25519 key pairs and signed "
                                "uplink bundles.", COMMANDS), argv)


if __name__ == "__main__":
    raise SystemExit(main())
