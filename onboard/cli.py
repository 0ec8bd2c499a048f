"""`eoedge onboard ...` (also `python -m onboard ...`): run the daemon, install offline, talk to it.

    run --config FILE                       foreground daemon; logs on stderr, bound endpoints on stdout
    install BUNDLE --store DIR --key PUB    offline install (the same path as the install command)
    upload BUNDLE --config FILE [--install] chunked, resumable upload to a running daemon
    status --config FILE                    asks the running daemon
    rollback (--config FILE | --store DIR --key PUB)
    command NAME [--args JSON] --config FILE   any command, raw ACK printed

Heavy imports (zmq, OpenVINO) happen inside the command functions.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from shared.cliutil import CommandError, add_json_flag, emit, run_command


def _client(args):
    from onboard.commands import CommandClient
    from onboard.config import connect_address, load_config
    if args.endpoint:
        endpoint = args.endpoint
    elif args.config:
        endpoint = connect_address(load_config(args.config).endpoints["commands"])
    else:
        raise CommandError("give --config FILE (the daemon's config) or --endpoint ENDPOINT")
    return CommandClient(endpoint, timeout_s=args.timeout)


def _ask(args, name: str, cmd_args: dict | None = None) -> dict:
    """One command to the running daemon; its error becomes a CommandError (exit 1)."""
    from onboard.commands import CommandFailed
    with _client(args) as client:
        try:
            return client.call(name, cmd_args)
        except CommandFailed as exc:
            raise CommandError(f"{name}: {exc}") from None
        except TimeoutError as exc:
            raise CommandError(str(exc)) from None


# ------------------------------------------------------------------------------------ run
def cmd_run(args) -> int:
    import logging
    from onboard.config import ConfigError, load_config
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    logging.basicConfig(stream=sys.stderr, level=args.log_level or config.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from onboard.daemon import Daemon
    from onboard.store import StoreError
    try:
        daemon = Daemon(config)
    except (StoreError, ValueError) as exc:   # a bad key file or store state: say which
        raise CommandError(str(exc)) from None
    daemon.install_signal_handlers()
    daemon.load_model()
    try:
        endpoints = daemon.bind()
    except OSError as exc:
        raise CommandError(str(exc)) from None
    ready = {"pid": os.getpid(), "endpoints": endpoints, "model": daemon.model_info(),
             "device": config.device, "config": str(config.source_file)}
    if args.json:
        print(json.dumps(ready), flush=True)          # one line: a parent process reads it
    else:
        model = ready["model"]
        print(f"eoedge onboard daemon pid {ready['pid']}, model "
              f"{model['id'] + ' v' + str(model['version']) if model else '(none)'} on {config.device}")
        for name, endpoint in endpoints.items():
            print(f"  {name:<10} {endpoint}")
        sys.stdout.flush()
    code = daemon.run()
    if not daemon.threads_finished:      # a worker is still inside OpenVINO: don't unwind under it
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


# ------------------------------------------------------------------------------------ install
def _human_install(r: dict) -> str:
    if r["ok"]:
        st = r.get("self_test") or {}
        return (f"{r['reason']} (slot {r['slot']}); self-test max |diff| "
                f"{st.get('max_abs_diff', float('nan')):.2e}, mask agreement "
                f"{st.get('mask_agreement', float('nan')):.4f}; previous: "
                f"{(r.get('previous') or {}).get('model_id', '-')} v{(r.get('previous') or {}).get('version', '-')}")
    return f"refused ({r['code']}): {r['reason']}"


def _offline_store(args):
    from onboard.store import ModelStore, StoreError
    if not args.store or not args.key:
        raise CommandError("offline use needs --store DIR and --key PUB (or --config FILE for a running daemon)")
    try:
        return ModelStore(args.store, args.key, device=args.device, exclusive=True)
    except (StoreError, ValueError) as exc:
        raise CommandError(str(exc)) from None


def cmd_install(args) -> int:
    store = _offline_store(args)
    result = store.install(args.bundle).as_dict()
    emit(result, args.json, _human_install)
    if not result["ok"]:
        print(f"error: install refused ({result['code']}): {result['reason']}", file=sys.stderr)
        return 1
    return 0


def cmd_upload(args) -> int:
    from tqdm import tqdm
    from onboard.commands import CommandFailed
    bundle = Path(args.bundle)
    if not bundle.is_file():
        raise CommandError(f"{bundle}: no such bundle file")
    with _client(args) as client:
        try:
            with tqdm(total=bundle.stat().st_size, unit="B", unit_scale=True, desc="upload",
                      file=sys.stderr, disable=None) as bar:
                done = client.upload(bundle, chunk_size=args.chunk_size, progress=bar.update)
            result = {"upload": done}
            if args.install:
                result["install"] = client.call("install", {"upload_id": done["upload_id"]},
                                                timeout_s=max(args.timeout, 120))
        except CommandFailed as exc:
            raise CommandError(str(exc)) from None
        except TimeoutError as exc:
            raise CommandError(str(exc)) from None
    emit(result, args.json, lambda r: f"uploaded {r['upload']['path']} ({r['upload']['size']} bytes, "
                                      f"id {r['upload']['upload_id']})"
                                      + (f"; {_human_install({'ok': True, **r['install']})}"
                                         if "install" in r else ""))
    return 0


# ------------------------------------------------------------------------------------ status
def _human_status(s: dict) -> str:
    model = s.get("model")
    lines = [f"state {s['state']}, up {s['uptime']:.0f} s, pid {s['pid']}, device {s['device']}",
             f"model {model['id']} v{model['version']}" if model else f"model: none ({s.get('model_error')})",
             f"queue {s['queue_depth']}/{s['max_frames']}, products waiting {s['pending_products']}",
             "frames " + ", ".join(f"{k} {v}" for k, v in s["frames"].items()),
             f"rss {s['rss_mb']:.1f} MB"]
    for stage, lat in s.get("latency_ms", {}).items():
        lines.append(f"  {stage:<12} last {lat['last']:8.1f} ms  p50 {lat['p50']:8.1f}  p95 {lat['p95']:8.1f}")
    prev = (s.get("store") or {}).get("previous")
    lines.append(f"previous: {prev['model_id']} v{prev['version']}" if prev else "previous: none")
    return "\n".join(lines)


def cmd_status(args) -> int:
    emit(_ask(args, "status"), args.json, _human_status)
    return 0


def cmd_rollback(args) -> int:
    if args.store:
        result = _offline_store(args).rollback().as_dict()
        if not result["ok"]:
            print(f"error: rollback refused ({result['code']}): {result['reason']}", file=sys.stderr)
            return 1
    else:
        result = _ask(args, "rollback")
    emit(result, args.json, lambda r: r["reason"])
    return 0


def cmd_command(args) -> int:
    try:
        cmd_args = json.loads(args.args) if args.args else {}
    except json.JSONDecodeError as exc:
        raise CommandError(f"--args: not valid JSON ({exc})") from None
    if not isinstance(cmd_args, dict):
        raise CommandError("--args: must be a JSON object")
    with _client(args) as client:
        try:
            body = client.request(args.name, cmd_args)
        except TimeoutError as exc:
            raise CommandError(str(exc)) from None
    emit(body, True)
    return 0 if body.get("ok") else 1


# ------------------------------------------------------------------------------------ parser
def _add_daemon_target(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", help="the daemon's TOML config (its commands endpoint is used)")
    p.add_argument("--endpoint", help="the commands endpoint, instead of --config")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an answer (default 30)")


def _add_offline_store(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="model store folder (offline, no daemon running on it)")
    p.add_argument("--key", help="uplink Ed25519 public key (PEM)")
    p.add_argument("--device", default="CPU", help="OpenVINO device for the self-test (default CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eoedge onboard", description="the on-board daemon")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the daemon in the foreground (SIGTERM drains and exits 0)")
    p.add_argument("--config", required=True, help="TOML config (see onboard/default.toml)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="override [daemon].log_level")
    add_json_flag(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("install", help="install a bundle into a store offline: verify, self-test, activate")
    p.add_argument("bundle", help="the signed bundle (.tar)")
    _add_offline_store(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("upload", help="upload a bundle to a running daemon in checked chunks")
    p.add_argument("bundle", help="the signed bundle (.tar)")
    _add_daemon_target(p)
    p.add_argument("--chunk-size", type=int, default=1 << 20, help="bytes per chunk (default 1 MiB)")
    p.add_argument("--install", action="store_true", help="install it once uploaded")
    add_json_flag(p)
    p.set_defaults(func=cmd_upload)

    p = sub.add_parser("status", help="ask a running daemon for its status")
    _add_daemon_target(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("rollback", help="make the previous model active again "
                                        "(running daemon via --config, or offline via --store/--key)")
    _add_daemon_target(p)
    _add_offline_store(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("command", help="send any command; prints the daemon's ACK as JSON")
    p.add_argument("name", help="command name (`help` lists them)")
    p.add_argument("--args", help="command arguments as a JSON object")
    _add_daemon_target(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)
