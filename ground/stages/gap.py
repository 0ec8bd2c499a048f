"""The deployment-gap stage: one checkpoint at every precision a target may compute, in one table:
torch FP32, emulated FP16 (a Myriad X), and OpenVINO IRs at FP32, FP16, BF16 and INT8 (each
exported, scored and timed by the export stage at its precision): held-out mIoU, agreement of the
post-processed masks with torch FP32's, ms per tile on this CPU (interleaved rounds, speed-up over
the FP32 IR in the same round), the kernels OpenVINO ran (the ISA), and the bytes of a bundle at
that precision (signed with a throwaway key: the size an uplink would carry, 2 reference tiles)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from shared.keys import generate_keypair
from ground.errors import ConfigError, GroundError
from ground.lineage import StageRecord
from ground.openvino.runtime import capabilities, check_precision, conv_kernels, interleaved_latency
from ground.stages.bundle import bundle
from ground.stages.export import export
from ground.stages.run import Run, point_of

IRS = (("FP32 IR", "fp32", False), ("FP16 IR", "fp16", True), ("BF16 IR", "bf16", True), ("INT8 IR", "int8", False))


def _masks(run: Run, predict, point) -> list[np.ndarray]:
    return [point.apply(predict(s.image)) for s in run.evals]


def _agreement(masks: list[np.ndarray], reference: list[np.ndarray]) -> float:
    same = sum(int((m == r).sum()) for m, r in zip(masks, reference))
    return same / sum(r.size for r in reference)


def _ir_row(run: Run, checkpoint: str, name: str, precision: str, fp16: bool, norm, reference: list, key,
            **export_args) -> dict:
    """Export at `precision`, score, pack: one row of the table (timing comes after, for all)."""
    rec = export(run, checkpoint, name, fp16=fp16, precision=precision, **export_args)
    xml = Path(rec["out_dir"]) / "model.xml"
    packed = bundle(run, f"export/{name}", key, f"gap-{name}".lower(), 1,
                    out=str(run.run_dir / "gap" / f"{name}.tar"), max_bytes="1GB")
    masks = _masks(run, run.ir_predict(xml, norm, precision), point_of(rec["metrics"]["openvino"]))
    return {"key": precision, "miou": rec["metrics"]["openvino"]["miou"], "agreement_fp32": _agreement(masks, reference),
            "bytes": sum(rec["files"].values()), "bundle_bytes": packed["bytes"], "export": f"export/{name}",
            "kernels": conv_kernels(xml, precision), "int8": rec.get("int8")}


def deployment_gap(run: Run, checkpoint: str = "student.pt", name: str | None = None, threads: int = 1,
                   rounds: int = 3, max_drop: float = 0.01, qat_steps: int = 0) -> dict:
    if int(rounds) < 1 or int(threads) < 1:
        raise ConfigError(f"rounds and threads must be >= 1, got rounds={rounds}, threads={threads}")
    if not run.evals:
        raise GroundError("the deployment gap is scored on the held-out data: the run's config has no eval.data")
    name = name or Path(checkpoint).stem
    model, norm, _meta = run.load(checkpoint)
    fp32_row = run.evaluate(run.torch_predict(model, norm))
    reference = _masks(run, run.torch_predict(model, norm), point_of(fp32_row))
    emulated = run.evaluate(run.torch_predict(model, norm, fp16="round"), point_of(fp32_row))
    rows = [{"precision": "torch FP32", "miou": fp32_row["miou"], "agreement_fp32": 1.0},
            {"precision": "torch, emulated FP16", "miou": emulated["miou"],
             "agreement_fp32": _agreement(_masks(run, run.torch_predict(model, norm, fp16="round"),
                                                 point_of(fp32_row)), reference)}]
    have, irs = capabilities(), {}
    with tempfile.TemporaryDirectory(prefix="eoedge-gap-keys-") as keydir:
        throwaway, _ = generate_keypair(keydir, "gap")      # the bundles are measured, not flown
        for label, precision, fp16 in IRS:
            try:
                check_precision(precision)
            except GroundError as exc:
                rows.append({"precision": label, "skipped": str(exc)})
                continue
            row = _ir_row(run, checkpoint, f"{name}-{precision}", precision, fp16, norm, reference, throwaway,
                          threads=threads, max_drop=max_drop, qat_steps=qat_steps)
            irs[precision] = (run.run_dir / row["export"] / "model.xml", precision)
            rows.append({"precision": label, **row})
    timing, _ = interleaved_latency(irs, "fp32", run.cfg.tile, threads, rounds=rounds)
    for row in rows:
        if row.get("key") in timing:
            t = timing[row["key"]]
            row.update(ms_per_tile=t["ms_per_tile"], speedup_vs_fp32_ir=t["speedup"])
    report = {"checkpoint": checkpoint, "eval": run.eval_name, "tile": run.cfg.tile, "threads": threads,
              "rounds": rounds, "capabilities": have, "cpu_flags": _isa(), "load_avg": list(os.getloadavg()),
              "rows": rows}
    out = run.run_dir / "gap" / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "gap.json").write_text(json.dumps(report, indent=2))
    (out / "gap.md").write_text(gap_table(report))
    run.folder.add(StageRecord(f"gap:{name}", [out / "gap.json", out / "gap.md"], inputs={"checkpoint": checkpoint},
                               params={"threads": threads, "rounds": rounds, "max_drop": max_drop,
                                       "qat_steps": qat_steps},
                               metrics={r["precision"]: r.get("miou") for r in rows}, label_free=run.label_free))
    report["out_dir"] = str(out)
    return report


def _isa() -> list[str]:
    """The CPU's vector ISA flags that decide OpenVINO's kernels (Linux /proc/cpuinfo)."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
              "neon", "asimd", "fphp", "asimdhp")
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in wanted if f in flags]


def gap_table(report: dict) -> str:
    f = lambda v, d=4: "-" if v is None else f"{v:.{d}f}"
    lines = [f"Deployment gap of `{report['checkpoint']}` on `{report['eval']}`: OpenVINO CPU, "
             f"{report['threads']} thread(s), {report['tile']}x{report['tile']} tile, lowest of {report['rounds']} "
             f"rounds' medians; CPU flags {' '.join(report['cpu_flags']) or '?'}; OpenVINO capabilities "
             f"{' '.join(report['capabilities'])}; load average {report['load_avg'][0]:.2f}.", "",
             "| precision | mIoU | agreement with FP32 | ms/tile | speed-up vs FP32 IR | IR bytes | bundle bytes | conv kernels |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['precision']} | not on this CPU: {r['skipped']} | | | | | | |")
            continue
        kernels = ", ".join(f"{k} x{n}" for k, n in (r.get("kernels") or {}).items()) or "-"
        speed = "-" if r.get("speedup_vs_fp32_ir") is None else f"{r['speedup_vs_fp32_ir']:.2f}x"
        lines.append(f"| {r['precision']} | {f(r.get('miou'))} | {f(r.get('agreement_fp32'))} | "
                     f"{f(r.get('ms_per_tile'), 1)} | {speed} | {r['bytes']:,} | {r['bundle_bytes']:,} | {kernels} |"
                     if r.get("bytes") is not None else
                     f"| {r['precision']} | {f(r.get('miou'))} | {f(r.get('agreement_fp32'))} | - | - | - | - | - |")
    return "\n".join(lines) + "\n"
