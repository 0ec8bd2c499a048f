"""Re-distil stage: the flying student (bundle v) learns from what the satellite sent down, and
goes back up as bundle v+1 with `parent = v`.

    bundle v (manifest: model_id, version, lineage.run / checkpoint / export)
      -> its run folder (the lineage must record this very bundle: its sha256) and checkpoint
      -> learning samples (ground.data.learning: georeferenced, filtered, held-out regions dropped)
      -> fine-tune from the checkpoint (Run.finetune: the run's loss recipe and class weights, the
         run's teacher labelling the samples), each batch `replay` run imagery (never the held-out
         rows: the run's own data sources refuse them), the rest downlinked samples
      -> redistil/MODEL-vN.pt -> export (the precision and profile of v's export) -> bundle v+1
         (v's model_id, policy with its `learning` block, tile and overlap, reference tiles)

The run's lineage gains `redistil:MODEL-vN` (every sample used: file, sha256, frame, window,
georeference, the model version that chose it; drops), and the manifest's lineage a `redistil`
section (the counts, a digest of the sample hashes, the model versions that chose them, the drops).
"""
from __future__ import annotations

import hashlib
import re
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from shared.bundle import verify_bundle
from shared.hashing import sha256_file
from shared.keys import load_private_key
from shared.manifest import is_chain
from ground.data.learning import LearningRead, parse_held_out, read_learning
from ground.data.sample import bin_sample
from ground.errors import RunFolderError, StageError
from ground.lineage import StageRecord
from ground.models.checkpoints import save_checkpoint
from ground.stages.bundle import DEFAULT_MAX_BYTES, read_export
from ground.stages.bundle import bundle as make_bundle
from ground.stages.export import export
from ground.stages.run import Run
from ground.teachers.cache import TeacherCache
from ground.training.loop import cpu_threads
from ground.training.validation import agreement

MANIFEST_HASHES = 1024       # the manifest lists the samples' sha256 up to this many (the run's lineage: all)


def _bundle_stage(run: Run, model_id: str, version: int, sha: str) -> dict | None:
    """The run's `bundle:MODEL-vN` record that wrote a file with this sha256."""
    name = f"bundle:{model_id}-v{version}"
    return next((s for s in reversed(run.folder.stages())
                 if s.get("stage") == name and sha in (s.get("outputs") or {}).values()), None)


def flying(bundle_path: str | Path, key, run_dir: str | Path | None = None, progress: bool = True,
           public_key=None) -> tuple[Run, dict, str, dict]:
    """(the run, the manifest, the bundle's sha256, its bundle stage record) of the bundle that flies,
    verified with `public_key` (default: `key`'s public half). The run is `run_dir`, or the folder
    the manifest's lineage names above the bundle (RUN/bundles/MODEL-vN.tar); either way its
    lineage must record this bundle (its sha256), else RunFolderError."""
    path = Path(bundle_path)
    if not path.is_file():
        raise FileNotFoundError(f"bundle {path}: no such file")
    manifest = verify_bundle(path, public_key if public_key is not None
                             else load_private_key(key).public_key()).manifest
    if is_chain(manifest):
        raise StageError(f"{path}: a chain bundle; re-distil one of its step bundles")
    lineage = manifest.get("lineage") or {}
    if not isinstance(lineage.get("run"), str) or not isinstance(lineage.get("checkpoint"), str):
        raise RunFolderError(f"{path}: its manifest's lineage names no run and checkpoint (not built by "
                             "`eoedge ground bundle`)")
    if run_dir is None:
        beside = path.resolve().parent.parent
        if beside.name != lineage["run"] or not (beside / "lineage.json").is_file():
            raise RunFolderError(f"{path}: built in run {lineage['run']!r}, which is not the folder above it; "
                                 "pass the run folder (--run RUN_DIR)")
        run_dir = beside
    run = Run.open(run_dir, progress)
    sha = sha256_file(path)
    record = _bundle_stage(run, manifest["model_id"], manifest["version"], sha)
    if record is None:
        raise RunFolderError(f"{path} is not a bundle of run {run.run_dir}: its lineage records no "
                             f"bundle:{manifest['model_id']}-v{manifest['version']} with sha256 {sha[:16]}... "
                             f"(the bundle says run {lineage['run']!r})")
    run.path(lineage["checkpoint"])          # RunFolderError when the checkpoint is gone
    return run, manifest, sha, record


def learning_samples(run: Run, paths, held_out=None, min_entropy: float | None = None,
                     selection=None) -> LearningRead:
    """The downlinked samples in the run's bands at its processing GSD; the config's data.held_out
    and `held_out` regions both apply."""
    spec = {"source": "learning", "path": [str(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]}
    if min_entropy is not None:
        spec["min_entropy"] = min_entropy
    if selection is not None:
        spec["selection"] = selection
    regions = list(run.cfg.held_out) + parse_held_out(held_out, "held_out")
    got = read_learning(spec, run.cfg.bands, regions)
    if not got.samples:
        raise StageError(f"learning samples {spec['path']}: none left to learn from ({got.read} read, "
                         f"dropped {got.dropped})")
    got.samples = [bin_sample(s, run.cfg.gsd_factor) for s in got.samples]
    return got


def _records(got: LearningRead) -> list[dict]:
    keys = ("file", "sha256", "frame_id", "row", "col", "size", "georef", "scene", "acquired", "model_id",
            "model_version", "selection", "entropy", "ambiguous")
    return [{k: s.origin.get(k) for k in keys} for s in got.samples]


def _manifest_section(got: LearningRead, source: dict, checkpoint: str, params: dict, stage: str) -> dict:
    hashes = sorted(s.origin["sha256"] for s in got.samples)
    samples = {**got.summary(), "sha256_of_sorted_hashes": hashlib.sha256("\n".join(hashes).encode()).hexdigest(),
               "held_out_regions": got.regions}
    if len(hashes) <= MANIFEST_HASHES:
        samples["sha256"] = hashes
    return {"redistil": {"from": source, "checkpoint": checkpoint, **params, "samples": samples,
                         "replay_from": "the run's training imagery (its data sources; never the held-out rows)",
                         "run_stage": stage}}


def redistil(bundle: str | Path, samples, key, steps: int = 100, replay: float = 0.5,
             run_dir: str | Path | None = None, lr: float | None = None, seed: int = 0, held_out=None,
             min_entropy: float | None = None, selection=None, out: str | Path | None = None,
             max_bytes: int | str | None = None, threads: int | None = None, name: str | None = None,
             public_key=None, progress: bool = True) -> dict:
    """Re-distil the student of `bundle` (v) on the learning samples in `samples` (folders or
    files) with `replay` of each batch from its run's own imagery, for `steps` steps from its
    checkpoint, then export and bundle it as v+1 (parent v), signed with `key` (a PEM path or the
    key); v is verified with `public_key` (default: the key's public half). Deterministic for a
    `seed`; `threads` overrides train.threads. `name` names the run's artifacts (redistil/NAME.pt,
    export/NAME/, stage redistil:NAME; default MODEL-vN+1): two v+1 of one v need two names.
    Returns the result (bundle path, version, samples used and dropped, the student's agreement
    with the teacher before and after)."""
    t0 = time.perf_counter()
    bundle_path = bundle
    run, manifest, sha, bundle_record = flying(bundle_path, key, run_dir, progress, public_key)
    if threads is not None:
        run.cfg = replace(run.cfg, train=replace(run.cfg.train, threads=int(threads)))
    model_id, version = manifest["model_id"], int(manifest["version"])
    new = version + 1
    lin = manifest["lineage"]
    checkpoint = lin["checkpoint"]
    record, _, _ = read_export(run, lin["export"])
    got = learning_samples(run, samples, held_out, min_entropy, selection)
    run.log(f"learning samples: {len(got.samples)} kept of {got.read} (dropped {got.dropped}); "
            f"replay {replay:.0%} of each batch from the run's imagery")
    model, norm, meta = run.load(checkpoint)
    # a checkpoint the run trained FP16-aware keeps training that way
    producer = run.folder.producer(checkpoint) or {}
    fp16 = str(producer.get("stage", "")).startswith("fp16")
    with cpu_threads(int(run.cfg.train.threads)) if run.cfg.train.threads else nullcontext():
        cache = TeacherCache(run.cfg.cache, run.teacher)
        replay_samples = run.data.distill_samples(with_labels=False)

        def agreements() -> dict:
            return {"samples": round(agreement(model, got.samples, norm, cache, run.cfg.tile, run.cfg.overlap), 5),
                    "replay": round(agreement(model, replay_samples, norm, cache, run.cfg.tile, run.cfg.overlap), 5)}

        before = agreements()
        t_train = time.perf_counter()
        history = run.finetune(model, steps, "teacher", fp16=fp16, lr=lr, norm=norm, seed=seed,
                               desc=f"re-distil v{new}", mix=(got.samples, replay))
        train_s = time.perf_counter() - t_train
        after = agreements()
    run.log(f"agreement with the teacher: samples {before['samples']:.4f} -> {after['samples']:.4f}, "
            f"run imagery {before['replay']:.4f} -> {after['replay']:.4f}")
    name = name or f"{model_id}-v{new}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise StageError(f"name {name!r}: letters, digits, '.', '_' and '-' only (it names files in the run)")
    ckpt = Path("redistil") / f"{name}.pt"
    params = {"steps": int(steps), "replay": float(replay), "seed": int(seed),
              "lr": float(lr or run.cfg.train.lr * 0.2), "fp16_aware": fp16}
    save_checkpoint(run.run_dir / ckpt, model, meta["arch"], norm,
                    meta={"name": name, "role": "redistil", "redistil": {"from": checkpoint, **params}})
    stage = f"redistil:{name}"
    source = {"model_id": model_id, "version": version, "sha256": sha}
    run.folder.add(StageRecord(stage, [ckpt], inputs={"checkpoint": checkpoint, "bundle": str(bundle_path),
                                                      "bundle_sha256": sha, "samples": _records(got)},
                               params={**params, "held_out_regions": got.regions, "min_entropy": min_entropy,
                                       "selection": selection, "samples": got.summary()},
                               metrics={"agreement_before": before, "agreement_after": after,
                                        "final_loss": history[-1]["loss"] if history else None},
                               label_free=True))        # the teacher labels; no human label
    int8 = record.get("int8") or {}
    exported = export(run, str(ckpt), name, fp16=bool(record.get("fp16", True)), threads=1,
                      evaluate="metrics" in record, precision=record.get("precision", "fp32"),
                      profile=record.get("profile") or manifest.get("profile") or "cpu-x86",
                      max_drop=float(int8.get("max_drop", 0.01)), qat_steps=int(int8.get("steps", 0))
                      if int8.get("method") == "qat" else 0)
    refs = lin.get("reference_tiles") or {}
    per_tile = int(refs.get("windows_per_tile") or 1)
    budget = max_bytes or (bundle_record.get("params") or {}).get("max_bytes") or DEFAULT_MAX_BYTES
    built = make_bundle(run, f"export/{name}", key, model_id, new, out=str(out or run.run_dir / "bundles" / f"{name}.tar"),
                   max_bytes=budget, policy=manifest["policy"], parent={"model_id": model_id, "version": version},
                   reference_tiles=max(1, int(refs.get("count") or 2) // per_tile),
                   reference_window=refs.get("window"), reference_windows=per_tile,
                   tile_size=int(manifest["input"]["tile_size"]), overlap=int(manifest["input"]["overlap"]),
                   profile=manifest.get("profile"),
                   lineage_extra=_manifest_section(got, source, checkpoint, params, stage))
    return {**built, "parent": {"model_id": model_id, "version": version}, "run_dir": str(run.run_dir),
            "checkpoint": str(ckpt), "export": f"export/{name}", "from": source, **params,
            "samples": {**got.summary(), "held_out_regions": got.regions},
            "agreement": {"before": before, "after": after},
            "seconds": {"train": round(train_s, 1), "total": round(time.perf_counter() - t0, 1)}}
