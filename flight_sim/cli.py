"""`eoedge sim ...`: fly scenarios, make scenes, look at scenes.

    run SCENARIO.toml [--out DIR]     start the daemon, uplink, replay, inject faults, report
    generate --rows R --cols C ...    write a procedural scene with its truth (.npz or .tif)
    scene PATH | --dataset NAME       what a scene source holds (bands, size, truth)

Every command has --json; errors follow shared.cliutil's policy (one line, exit code per
docs/cli.md). Heavy imports (zmq, rasterio, matplotlib) happen inside commands.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.cliutil import Command, CommandError, build_parser, emit, in_context, run_cli
from shared.errors import EoedgeError


# ------------------------------------------------------------------------------------ run
def cmd_run(args) -> int:
    from flight_sim.report import build_report, headline, write_report
    from flight_sim.runner import run_scenario
    from flight_sim.scenario import load_scenario
    scenario = load_scenario(args.scenario)
    out = Path(args.out) if args.out else Path("runs") / "sim" / scenario.name
    try:
        record = run_scenario(scenario, out, progress=not args.no_progress)
    except EoedgeError as exc:      # a scene, the daemon, the uplink: say which scenario
        raise in_context(exc, args.scenario) from None
    report = build_report(record)
    paths = write_report(report, record)
    result = {k: v for k, v in report.items() if not k.startswith("_")}
    result["files"] = {k: str(p) for k, p in paths.items()}
    emit(result, args.json, lambda r: headline(r) + "\n" + "\n".join(
        f"  {'pass' if c['ok'] else 'FAIL'}  {c['name']}: {c['detail']}" for c in r["checks"])
        + f"\nreport: {r['files']['markdown']}")
    return 0 if report["ok"] else 1


# ------------------------------------------------------------------------------------ generate
def cmd_generate(args) -> int:
    import numpy as np
    from flight_sim.generator import CLASSES, SceneGenerator
    from shared.bands import S2_BANDS
    out = Path(args.out)
    suffix = out.suffix.lower()
    if suffix not in (".npz", ".tif", ".tiff"):
        raise CommandError(f"--out: {out} must end in .npz or .tif")
    try:
        cover = [float(x) for x in args.cloud_cover.split(",")]
    except ValueError:
        raise CommandError(f"--cloud-cover: {args.cloud_cover!r} is not a fraction or a "
                           "comma-separated profile like 0,1,0.2") from None
    gen = SceneGenerator(args.rows, args.cols, args.seed, cloud_cover=cover if len(cover) > 1 else cover[0],
                         water_fraction=args.water, ships=args.ships, surface=args.surface)
    import time
    from tqdm import tqdm
    from flight_sim.camera import quantise
    # rendered strip by strip and kept only as uint16 DN: a 10980 x 10980 tile stays at 3 GB
    dn = np.empty((13, args.rows, args.cols), np.uint16)
    truth = np.empty((args.rows, args.cols), np.uint8)
    ships = np.empty((args.rows, args.cols), np.uint16)
    step = 512
    t0 = time.perf_counter()
    for r0 in tqdm(range(0, args.rows, step), desc="generate", unit="strip", file=sys.stderr,
                   disable=args.json or None):
        win = gen.window(r0, min(r0 + step, args.rows))
        dn[:, r0:r0 + step] = quantise(win.reflectance, "uint16")[0]
        truth[r0:r0 + step], ships[r0:r0 + step] = win.truth, win.ships
    render_s = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    files = {"scene": str(out)}
    if suffix == ".npz":
        np.savez_compressed(out, data=dn, bands=np.array(S2_BANDS), truth=truth, ships=ships,
                            classes=np.array(CLASSES))
    else:
        from shared.scene import Scene, write_geotiff
        write_geotiff(out, Scene(dn, S2_BANDS, None, gen.name), compress="deflate")
        truth_path = out.with_name(out.stem + "_truth.npy")
        np.save(truth_path, truth)
        files["truth"] = str(truth_path)
    counts = np.bincount(truth.ravel(), minlength=len(CLASSES))
    result = {**gen.describe(), "files": files, "dtype": "uint16", "scale": 1e-4,
              "classes": list(CLASSES),
              "fractions": {c: round(float(n) / truth.size, 4) for c, n in zip(CLASSES, counts)},
              "ships_visible": int(len(np.unique(ships)) - 1), "render_seconds": round(render_s, 2)}
    emit(result, args.json, lambda r: f"wrote {r['files']['scene']} ({r['rows']}x{r['cols']}, 13 bands "
                                      f"uint16 DN, reflectance = DN * 1e-4); truth fractions "
                                      + ", ".join(f"{k} {v:.1%}" for k, v in r["fractions"].items())
                                      + f"; {r['ships_visible']} ships visible; rendered in "
                                      f"{r['render_seconds']} s")
    return 0


# ------------------------------------------------------------------------------------ scene
def cmd_scene(args) -> int:
    from flight_sim.scenes import open_source
    if bool(args.path) == bool(args.dataset):
        raise CommandError("give a PATH or --dataset NAME")
    spec = {"kind": "dataset", "name": args.dataset} if args.dataset else {"kind": "file", "path": args.path}
    if args.bands:
        spec["bands"] = args.bands.split(",")
    src = open_source(spec, Path.cwd(), "scene")
    info = src.describe()
    strip = src.read(0, min(src.rows, 64))
    info["first_rows_reflectance_mean"] = [round(float(v), 4) for v in strip.reflectance.mean(axis=(1, 2))]
    emit(info, args.json, lambda r: f"{r['name']}: {r['rows']} x {r['cols']}, bands {' '.join(r['bands'])}; "
                                    f"truth {r['truth_classes'] or 'none'}")
    return 0


# ------------------------------------------------------------------------------------ the table
def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", help="scenario TOML (see scenarios/)")
    p.add_argument("--out", help="run folder (default runs/sim/<scenario name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--cols", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cloud-cover", default="0.3",
                   help="a fraction, or an along-track profile like 0,1,0.2 (default 0.3)")
    p.add_argument("--water", type=float, default=None,
                   help="water fraction (default 0.35 temperate, 0.08 arid)")
    p.add_argument("--surface", choices=("temperate", "arid"), default="temperate",
                   help="the land: temperate (green) or arid (sand, soil, rock); default temperate")
    p.add_argument("--ships", type=int, default=10, help="ships on open water (default 10)")
    p.add_argument("--out", required=True, help="output .npz or .tif")


def add_scene_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", help="GeoTIFF, band folder, .npz, .npy, SAFE folder or .zip")
    p.add_argument("--dataset", help="ukis, sen1floods11 or eolearn:N (../shared/data)")
    p.add_argument("--bands", help="comma-separated bands to read")


COMMANDS = {
    "run": Command(cmd_run, "fly a scenario and write its report", add_run_args,
                   "Start the on-board daemon as a separate process, uplink the scenario's bundle, "
                   "replay its scenes through the push-broom camera, inject its faults, play the "
                   "ground-station passes and write report.md, report.json, timeline.png and "
                   "masks.png. Exit 0 when every check passes, 1 otherwise."),
    "generate": Command(cmd_generate, "write a procedural scene with truth", add_generate_args,
                        "A procedural 13-band L1C scene (land, water, clouds, shadows, ships) as "
                        "uint16 DN: .npz (data, bands, truth, ships, classes) or a GeoTIFF plus "
                        "<name>_truth.npy."),
    "scene": Command(cmd_scene, "describe a scene source (file, SAFE, dataset chip)", add_scene_args,
                     "Open a scene as a scenario would and say what it holds."),
}


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser("eoedge sim", "the flight simulator", COMMANDS), argv)
