"""`eoedge onboard ...` (also `python -m onboard ...`): run the daemon, install offline, talk to it.

    run --config FILE                       foreground daemon; logs on stderr, bound endpoints on stdout
    install BUNDLE --store DIR --key PUB    offline install (the same path as the install command)
    upload BUNDLE --config FILE [--install] chunked, resumable upload to a running daemon
    status --config FILE                    asks the running daemon
    rollback (--config FILE | --store DIR --key PUB)
    command NAME [--args JSON] --config FILE   any command, raw ACK printed
    service install --config FILE           systemd unit (Type=notify, watchdog) + next commands
    keys generate DIR --role ROLE           a CURVE key pair (NAME.key, NAME.key_secret 0600)

Commands to a running daemon use the operator's CURVE keys: `--keys DIR` (DIR/operator.key_secret
and DIR/daemon.key), or, with --config, those beside the daemon's `[security] secret_key`.

A running daemon is asked through shared.client.CommandClient: `--timeout` per try and, for the
commands that are safe to send twice (status, upload), `--retries` fresh tries after a
timeout. Errors follow shared.cliutil's policy: one line `error: <message> [<code>]` (or a JSON
object under --json); exit 1 when refused, 4 when the daemon does not answer.
Heavy imports (zmq, OpenVINO) happen inside the command functions.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from shared.cliutil import Command, CommandError, Group, build_parser, emit, run_cli
from shared.manifest import PRECISIONS


def _client(args, retries: int | None = None):
    from onboard.config import connect_address, load_config
    from shared.client import CommandClient
    config = load_config(args.config) if args.config else None
    if args.endpoint:
        endpoint = args.endpoint
    elif config:
        endpoint = connect_address(config.endpoints["commands"])
    else:
        raise CommandError("give --config FILE (the daemon's config) or --endpoint ENDPOINT")
    return CommandClient(endpoint, timeout_s=args.timeout, keys=_operator_keys(args, config),
                         retries=args.retries if retries is None else retries)


def _operator_keys(args, config):
    """The operator's CURVE keys: --keys DIR, else the key set beside the daemon's secret key;
    None (plain) for a daemon configured `insecure` and no --keys."""
    from shared.curve import client_keys
    if args.keys:
        key_dir = Path(args.keys)
    elif config is not None and not config.insecure:
        key_dir = config.secret_key.parent
    else:
        return None
    try:
        return client_keys(key_dir, "operator")
    except FileNotFoundError as exc:
        raise CommandError(f"{exc}; give --keys DIR with operator.key_secret and daemon.key",
                           code="invalid_key_file") from None


def _once_timeout(args, at_least: float = 0.0) -> float:
    """The wait for a command sent only once: as long as every try of a repeatable one."""
    return max(args.timeout * (args.retries + 1), at_least)


# ------------------------------------------------------------------------------------ run
def cmd_run(args) -> int:
    import logging
    from onboard.config import load_config
    from onboard.daemon import Daemon
    config = load_config(args.config)
    logging.basicConfig(stream=sys.stderr, level=args.log_level or config.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    daemon = Daemon(config)
    daemon.install_signal_handlers()
    daemon.load_model()
    try:
        endpoints = daemon.bind()
    except OSError as exc:          # an endpoint in use or not bindable: name it
        raise CommandError(str(exc), code="bind_failed") from None
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


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="TOML config (see onboard/default.toml)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="override [daemon].log_level")


# ------------------------------------------------------------------------------------ install
def _human_install(r: dict) -> str:
    st = r.get("self_test") or {}
    previous = r.get("previous") or {}
    return (f"{r['reason']} (slot {r['slot']}); self-test max |diff| "
            f"{st.get('max_abs_diff', float('nan')):.2e}, mask agreement "
            f"{st.get('mask_agreement', float('nan')):.4f}; previous: "
            f"{previous.get('model_id', '-')} v{previous.get('version', '-')}")


def _offline_store(args):
    from onboard.store import ModelStore
    if not args.store or not args.key:
        raise CommandError("offline use needs --store DIR and --key PUB (or --config FILE for a running daemon)")
    capabilities = tuple(c.strip().upper() for c in args.capabilities.split(",")) \
        if args.capabilities else None
    return ModelStore(args.store, args.key, device=args.device, exclusive=True,
                      precision=args.precision, capabilities=capabilities)


def _refused(what: str, result: dict) -> CommandError:
    """A store's refusal (install, rollback) as an error carrying the store's code."""
    return CommandError(f"{what} refused: {result['reason']}", code=result["code"])


def cmd_install(args) -> int:
    result = _offline_store(args).install(args.bundle).as_dict()
    if not result["ok"]:
        raise _refused("install", result)
    emit(result, args.json, _human_install)
    return 0


def cmd_upload(args) -> int:
    from tqdm import tqdm
    bundle = Path(args.bundle)
    if not bundle.is_file():
        raise FileNotFoundError(f"{bundle}: no such bundle file")
    with _client(args) as client:
        with tqdm(total=bundle.stat().st_size, unit="B", unit_scale=True, desc="upload",
                  file=sys.stderr, disable=None) as bar:
            done = client.upload(bundle, chunk_size=args.chunk_size, progress=bar.update)
        result = {"upload": done}
        if args.install:            # not safe to send twice: one try, waited for long enough
            result["install"] = client.call("install", {"upload_id": done["upload_id"]},
                                            timeout_s=_once_timeout(args, 120), retries=0)
    emit(result, args.json, lambda r: f"uploaded {r['upload']['path']} ({r['upload']['size']} bytes, "
                                      f"id {r['upload']['upload_id']})"
                                      + (f"; {_human_install(r['install'])}" if "install" in r else ""))
    return 0


# ------------------------------------------------------------------------------------ status
def _human_model(model: dict) -> str:
    p = model.get("precision") or {}
    if "chain" in model:                # a model chain: each step's precision and cells run
        steps = ", ".join(f"{s['name']} at {p.get(s['name'], {}).get('running', '?')} on {s['cells_run']}/"
                          f"{s['cells_total']} cells" for s in model["chain"])
        return f"model chain {model['id']} v{model['version']}: {steps}"
    forced = f" (forced; bundle validated at {p.get('declared')})" if p.get("overridden") else ""
    return f"model {model['id']} v{model['version']} at {p.get('running', '?')}{forced}"


def _human_status(s: dict) -> str:
    model = s.get("model")
    lines = [f"state {s['state']}, up {s['uptime']:.0f} s, pid {s['pid']}, device {s['device']}",
             _human_model(model) if model else f"model: none ({s.get('model_error')})",
             f"queue {s['queue_depth']}/{s['max_frames']}, products waiting {s['pending_products']}",
             "frames " + ", ".join(f"{k} {v}" for k, v in s["frames"].items()),
             f"rss {s['rss_mb']:.1f} MB"]
    for stage, lat in s.get("latency_ms", {}).items():
        lines.append(f"  {stage:<12} last {lat['last']:8.1f} ms  p50 {lat['p50']:8.1f}  p95 {lat['p95']:8.1f}")
    prev = (s.get("store") or {}).get("previous")
    lines.append(f"previous: {prev['model_id']} v{prev['version']}" if prev else "previous: none")
    return "\n".join(lines)


def cmd_status(args) -> int:
    with _client(args) as client:
        emit(client.call("status"), args.json, _human_status)
    return 0


def cmd_rollback(args) -> int:
    if args.store:
        result = _offline_store(args).rollback().as_dict()
        if not result["ok"]:
            raise _refused("rollback", result)
    else:
        with _client(args, retries=0) as client:      # a rollback sent twice rolls back twice
            result = client.call("rollback", timeout_s=_once_timeout(args))
    emit(result, args.json, lambda r: r["reason"])
    return 0


def cmd_command(args) -> int:
    try:
        cmd_args = json.loads(args.args) if args.args else {}
    except json.JSONDecodeError as exc:
        raise CommandError(f"--args: not valid JSON ({exc})") from None
    if not isinstance(cmd_args, dict):
        raise CommandError("--args: must be a JSON object")
    with _client(args, retries=0) as client:          # any command: maybe not safe to repeat
        body = client.request(args.name, cmd_args, timeout_s=_once_timeout(args))
    emit(body, True)                                  # the raw ACK is this command's output
    return 0 if body.get("ok") else 1


# ------------------------------------------------------------------------------------ keys
def cmd_keys_generate(args) -> int:
    from shared.curve import DAEMON, ROLES, generate_keypair, load_public
    names = [DAEMON, *ROLES] if args.role == "all" else [args.name or args.role]
    written = []
    for name in names:
        public, secret = generate_keypair(args.dir, name, overwrite=args.force)
        written.append({"name": name, "public_key_file": str(public), "secret_key_file": str(secret),
                        "public_key": load_public(public).decode()})
    emit({"role": args.role, "keys": written}, args.json, lambda r: "\n".join(
        f"{k['name']}: public {k['public_key_file']}, secret {k['secret_key_file']} (mode 0600: it "
        "stays on its machine)" for k in r["keys"]))
    return 0


def add_keys_generate_args(p: argparse.ArgumentParser) -> None:
    from shared.curve import DAEMON, ROLES
    p.add_argument("dir", type=Path, metavar="DIR", help="folder for the key files")
    p.add_argument("--role", required=True, choices=(DAEMON, *ROLES, "all"),
                   help="whose pair: the daemon's, a peer role's, or all five (a bench, a simulator)")
    p.add_argument("--name", help="file name stem (default: the role); e.g. one per operator")
    p.add_argument("--force", action="store_true", help="overwrite an existing pair of that name")


# ------------------------------------------------------------------------------------ service
def cmd_service(args) -> int:
    from onboard.config import load_config
    from onboard.service import ServiceOptions, install_unit
    config = load_config(args.config)
    opts = ServiceOptions(name=args.name, user=args.user, watchdog_s=args.watchdog_s,
                          memory_max=args.memory_max, python=args.python or sys.executable)
    if opts.watchdog_s < 1:
        raise CommandError("--watchdog-s: must be >= 1 (seconds)")
    try:
        result = install_unit(config, opts, root=args.root, output=args.output)
    except OSError as exc:
        raise CommandError(f"cannot write the unit file: {exc} (run as root, or use --root DIR / "
                           "--output FILE)", code="unit_not_written") from None
    emit(result, args.json, lambda r: f"wrote {r['path']}\nthen run:\n" + "\n".join(
        f"  {c}" for c in r["commands"]))
    return 0


def add_service_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the daemon's TOML config (its store, uploads "
                                                   "and spill folders become the only writable paths)")
    p.add_argument("--root", type=Path, help="write under this folder instead of / (for testing "
                                             "or an image being built)")
    p.add_argument("--output", type=Path, help="write the unit to this file instead")
    p.add_argument("--name", default="eoedge-onboard", help="unit name (default eoedge-onboard)")
    p.add_argument("--user", default="eoedge", help="the dedicated system user (default eoedge)")
    p.add_argument("--watchdog-s", type=int, default=30, help="WatchdogSec (default 30)")
    p.add_argument("--memory-max", default="2G", help="MemoryMax (default 2G)")
    p.add_argument("--python", help="the interpreter ExecStart uses (default: this one)")


# ------------------------------------------------------------------------------------ arguments
def add_daemon_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="the daemon's TOML config (its commands endpoint is used)")
    p.add_argument("--endpoint", help="the commands endpoint, instead of --config")
    p.add_argument("--keys", metavar="DIR", help="the operator's CURVE keys: DIR/operator.key_secret "
                                                 "and DIR/daemon.key (default: beside the daemon's "
                                                 "[security] secret_key, with --config)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for an answer, per try (default 10)")
    p.add_argument("--retries", type=int, default=2,
                   help="tries again with a fresh connection after a timeout, for commands safe "
                        "to repeat (status, upload; default 2)")


def add_offline_store(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="model store folder (offline, no daemon running on it)")
    p.add_argument("--key", help="uplink Ed25519 public key (PEM)")
    p.add_argument("--device", default="CPU", help="OpenVINO device for the self-test (default CPU)")
    p.add_argument("--precision", default="auto", choices=("auto", *PRECISIONS),
                   help="compile at this precision whatever the bundle says (default auto: the "
                        "bundle's), as the daemon's [runtime] precision")
    p.add_argument("--capabilities", help="the device's precisions, comma-separated (FP32,INT8); "
                                          "default: ask OpenVINO")


def add_install_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="the signed bundle (.tar)")
    add_offline_store(p)


def add_upload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="the signed bundle (.tar)")
    add_daemon_target(p)
    p.add_argument("--chunk-size", type=int, default=1 << 20, help="bytes per chunk (default 1 MiB)")
    p.add_argument("--install", action="store_true", help="install it once uploaded")


def add_rollback_args(p: argparse.ArgumentParser) -> None:
    add_daemon_target(p)
    add_offline_store(p)


def add_command_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="command name (`help` lists them)")
    p.add_argument("--args", help="command arguments as a JSON object")
    add_daemon_target(p)


COMMANDS = {
    "run": Command(cmd_run, "run the daemon in the foreground (SIGTERM drains and exits 0)", add_run_args),
    "install": Command(cmd_install, "install a bundle into a store offline: verify, self-test, activate",
                       add_install_args),
    "upload": Command(cmd_upload, "upload a bundle to a running daemon in checked chunks", add_upload_args),
    "status": Command(cmd_status, "ask a running daemon for its status", add_daemon_target),
    "rollback": Command(cmd_rollback, "make the previous model active again (running daemon via "
                                      "--config, or offline via --store/--key)", add_rollback_args),
    "command": Command(cmd_command, "send any command; prints the daemon's ACK as JSON", add_command_args),
    "keys": Group("CURVE keys of the daemon and its peers (docs/onboard.md, Security)", {
        "generate": Command(cmd_keys_generate, "write a CURVE key pair: DIR/NAME.key (public) and "
                                               "DIR/NAME.key_secret (mode 0600)", add_keys_generate_args),
    }),
    "service": Group("the daemon as a systemd service (docs/onboard.md, Supervision)", {
        "install": Command(cmd_service, "write the systemd unit (Type=notify, watchdog, hardening) "
                                        "and print the commands that enable it", add_service_args),
    }),
}


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser("eoedge onboard", "the on-board daemon", COMMANDS), argv)
