"""The stages on a run folder, end to end on a small one (a tiny torch teacher, real imagery):
prune -> FP16-aware fine-tune -> export -> bundle; the bundle verifies, fits its budget, a
too-small budget is refused naming the sizes, and a tampered copy is rejected. Plus the sweep
and the CLI rows."""
from __future__ import annotations

import json
import shutil
import tarfile
import warnings

import numpy as np
import pytest
import torch

warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)

BANDS = ["B02", "B03", "B04", "B08", "B11", "B12"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _make_run(root):
    """A run folder as `eoedge ground run` leaves it: lineage.json with the config, student.pt."""
    from ground.checkpoints import save_checkpoint
    from ground.data import Normalization
    from ground.lineage import RunFolder
    from ground.students import TinyUNet
    norm = Normalization(tuple(BANDS), (0.2,) * 6, (0.15,) * 6)
    torch.manual_seed(0)
    teacher = save_checkpoint(root / "teacher.pt", TinyUNet(6, 3, (8, 16)),
                              {"name": "tiny-unet", "in_channels": 6, "num_classes": 3, "options": {"widths": [8, 16]}},
                              norm)
    raw = {"run": {"name": "mini", "out": str(root), "seed": 0, "deliver": "distilled"},
           "data": {"bands": BANDS, "classes": ["clear", "cloud", "shadow"],
                    "unlabelled": [{"source": "ukis", "rows": [0, 128]}]},
           # small images keep the test fast: the held-out rows' first half, one tile row of imagery
           "eval": {"data": {"source": "ukis", "rows": [256, 384]}, "tile": 128, "overlap": 32},
           "teacher": {"name": f"checkpoint:{teacher}"},
           "student": {"name": "tiny-unet", "widths": [8, 16, 32]},
           "train": {"steps": 2, "batch": 2, "crop": 64, "augment": ["crop"]},
           "experiment": [{"name": "distilled", "mode": "distill", "loss": "kl", "temperature": 2.0}]}
    run = root / "mini"
    folder = RunFolder(run)
    folder.set_config(raw)
    torch.manual_seed(1)
    arch = {"name": "tiny-unet", "in_channels": 6, "num_classes": 3, "options": {"widths": [8, 16, 32]}}
    save_checkpoint(run / "student.pt", TinyUNet(6, 3, (8, 16, 32)), arch, norm)
    folder.add_stage("distill", ["student.pt"], deliver="distilled")
    return run


@pytest.fixture(scope="module")
def chain(tmp_path_factory, data_root):
    """prune -> fp16-finetune -> export, once for the module."""
    from ground.export import export_stage
    from ground.fp16 import fp16_finetune_stage
    from ground.prune import prune_stage
    root = tmp_path_factory.mktemp("runs")
    run = _make_run(root)
    pruned = prune_stage(run, "taylor", 0.4, finetune_steps=2, progress=False)
    fp16 = fp16_finetune_stage(run, pruned["checkpoint"], steps=2, progress=False)
    exported = export_stage(run, fp16["out"], name="small", progress=False)
    return {"run": run, "root": root, "pruned": pruned, "fp16": fp16, "export": exported}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from shared.keys import generate_keypair
    return generate_keypair(tmp_path_factory.mktemp("keys"))


def test_prune_stage_writes_a_smaller_checkpoint_with_lineage(chain):
    from ground.prune import load_model
    run, res = chain["run"], chain["pruned"]
    assert res["params_reduction"] >= 0.4 and res["criterion"] == "taylor"
    model, norm, meta = load_model(run / res["checkpoint"])
    assert sum(p.numel() for p in model.parameters()) == res["after"]["params"]
    assert meta["prune"]["source"] == "student.pt"
    assert set(res["metrics"]) == {"unpruned", "pruned", "fine_tuned"}
    assert all(0 <= v["miou"] <= 1 for v in res["metrics"].values())
    stages = json.loads((run / "lineage.json").read_text())["stages"]
    rec = next(s for s in stages if s["stage"] == "prune:taylor-40")
    assert rec["label_free"] is True and res["checkpoint"] in rec["outputs"]


def test_fp16_stage_reports_the_deployment_gap(chain):
    rep = chain["fp16"]
    assert set(rep["rows"]) == {"fp32", "fp16_naive", "fp16_aware", "fp32_after"}
    assert 0 < rep["max_prob_diff_fp16_vs_fp32"]["fp16_naive"] < 0.05
    assert 0 < rep["max_prob_diff_fp16_vs_fp32"]["fp16_aware"] < 0.05
    assert (chain["run"] / rep["out"]).exists()
    assert (chain["run"] / "fp16" / "taylor-40-fp16-gap.md").read_text().count("|") > 10


def test_export_stage_records_parity_scores_and_latency(chain):
    rec = chain["export"]
    out = chain["run"] / "export" / "small"
    assert json.loads((out / "export.json").read_text())["parity"] == rec["parity"]
    assert rec["parity"]["max_abs_diff"] < 1e-2 and rec["parity"]["mask_agreement"] > 0.99
    assert rec["fp16"] and rec["files"]["model.bin"] < 2.5 * rec["params"]
    assert 0 <= rec["metrics"]["openvino"]["miou"] <= 1 and rec["latency"]["ms_per_tile"] > 0
    assert rec["label_free"] is True
    stages = json.loads((chain["run"] / "lineage.json").read_text())["stages"]
    assert any(s["stage"] == "export:small" and s["parity"] == rec["parity"] for s in stages)


def test_bundle_verifies_is_under_budget_and_a_tampered_copy_is_rejected(chain, keys, tmp_path):
    from shared.bundle import BadSignature, ChecksumMismatch, load_reference, verify_bundle
    from ground.package import bundle_stage
    sk, pk = keys
    res = bundle_stage(chain["run"], "export/small", sk, "cloudmask-mini", 1, max_bytes="2MB",
                       reference_tiles=1, progress=False)
    path = res["bundle"]
    assert res["bytes"] <= 2_000_000
    v = verify_bundle(path, pk)
    m = v.manifest
    assert m["input"]["bands"] == BANDS and m["input"]["tile_size"] == 128
    assert m["output"]["classes"] == ["clear", "cloud", "shadow"] and m["postprocess"]["opening_radius"] == 2
    assert m["metrics"]["openvino"]["miou"] == pytest.approx(chain["export"]["metrics"]["openvino"]["miou"])
    assert m["lineage"]["checkpoint"] == chain["fp16"]["out"] and m["lineage"]["label_free"] is True
    # the reference the daemon self-tests with: the IR reproduces it within the tolerance
    from shared.bundle import extract_bundle
    root = extract_bundle(path, tmp_path / "slot", pk).root
    tiles, probs = load_reference(root / "reference.npz", m)
    from ground.export import _softmax, compile_ir
    mean = np.array(m["input"]["scaling"]["mean"], np.float32)[None, :, None, None]
    std = np.array(m["input"]["scaling"]["std"], np.float32)[None, :, None, None]
    got = _softmax(np.asarray(compile_ir(root / "model.xml")((tiles - mean) / std)[0]))
    assert np.abs(got - probs).max() <= m["reference"]["max_abs_diff"]
    # tamper: one byte of the weights
    bad = tmp_path / "tampered.tar"
    with tarfile.open(path) as src, tarfile.open(bad, "w", format=tarfile.PAX_FORMAT) as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name == "model.bin":
                data = bytes([data[0] ^ 1]) + data[1:]
            member.size = len(data)
            import io
            dst.addfile(member, io.BytesIO(data))
    with pytest.raises(ChecksumMismatch, match="model.bin"):
        verify_bundle(bad, pk)
    # and a manifest edited after signing
    bad2 = tmp_path / "tampered2.tar"
    with tarfile.open(path) as src, tarfile.open(bad2, "w", format=tarfile.PAX_FORMAT) as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name == "manifest.json":
                data = data.replace(b'"version": 1', b'"version": 9')
            member.size = len(data)
            import io
            dst.addfile(member, io.BytesIO(data))
    with pytest.raises(BadSignature):
        verify_bundle(bad2, pk)


def test_a_too_small_budget_is_refused_naming_the_sizes(chain, keys):
    from shared.bundle import TooLarge
    from ground.package import bundle_stage
    sk, _ = keys
    with pytest.raises(TooLarge, match=r"over max_bytes 40000.*model\.bin.*reference-window") as info:
        bundle_stage(chain["run"], "export/small", sk, "cloudmask-mini", 2, max_bytes="40KB", progress=False)
    assert "reference.npz" in str(info.value) and "model.xml" in str(info.value)
    assert not (chain["run"] / "bundles" / "cloudmask-mini-v2.tar").exists()


def test_a_reference_window_makes_the_bundle_smaller(chain, keys):
    from ground.package import bundle_stage
    sk, _ = keys
    full = bundle_stage(chain["run"], "export/small", sk, "cloudmask-mini", 3, reference_tiles=1, progress=False)
    small = bundle_stage(chain["run"], "export/small", sk, "cloudmask-mini", 4, reference_tiles=1,
                         reference_window=32, progress=False)
    assert small["files"]["reference.npz"] < full["files"]["reference.npz"] / 4


def test_missing_export_and_run_are_named(chain, keys, tmp_path):
    from ground.package import bundle_stage, parse_bytes
    from ground.sweep import RunContext
    sk, _ = keys
    with pytest.raises(FileNotFoundError, match="export/nothing"):
        bundle_stage(chain["run"], "export/nothing", sk, "x", 1, progress=False)
    with pytest.raises(FileNotFoundError, match="no lineage.json"):
        RunContext.open(tmp_path)
    assert parse_bytes("5MB") == 5_000_000 and parse_bytes("300KiB") == 307200 and parse_bytes(1234) == 1234
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")


def test_sweep_writes_table_json_and_plot(chain):
    from ground.sweep import RunContext, sweep
    ctx = RunContext.open(chain["run"], progress=False)
    rep = sweep(ctx, criteria=["magnitude-l1", "fpgm"], ratios=[0.5], finetune_steps=0, out="sweep-test",
                latency_repeats=3, latency_rounds=1)
    rows = rep["rows"]
    assert [r["criterion"] for r in rows] == ["none", "magnitude-l1", "fpgm"]
    assert all(r["params_reduction"] >= 0.5 for r in rows[1:])
    assert all(r["ms_per_tile"] > 0 and r["gmacs_per_s"] > 0 and 0 <= r["miou"] <= 1 for r in rows)
    out = chain["run"] / "sweep-test"
    assert json.loads((out / "sweep.json").read_text())["rows"] == rows
    assert (out / "sweep.md").read_text().count("\n| ") == 4       # header + 3 rows
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_rows_help_json_and_errors(chain, keys, capsys):
    from ground.cli import main
    for cmd in ("prune", "sweep", "fp16-finetune", "export", "bundle", "inspect", "verify"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "--json" in capsys.readouterr().out
    sk, pk = keys
    assert main(["bundle", str(chain["run"]), "--export", "export/small", "--key", str(sk), "--model-id",
                 "cli-mini", "--version", "1", "--reference-tiles", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert main(["verify", res["bundle"], "--key", str(pk), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is True
    assert main(["inspect", res["bundle"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["manifest"]["model_id"] == "cli-mini"
    assert main(["bundle", str(chain["run"]), "--export", "export/small", "--key", str(sk), "--model-id",
                 "cli-mini", "--version", "2", "--max-bytes", "10KB"]) == 1
    assert "too_large" in capsys.readouterr().err
    from shared.keys import generate_keypair
    _, other = generate_keypair(chain["root"] / "other-keys")
    assert main(["verify", res["bundle"], "--key", str(other)]) == 1
    assert "wrong_key" in capsys.readouterr().err
    assert main(["prune", str(chain["run"]), "--criterion", "l7", "--finetune-steps", "0"]) == 1
    assert "unknown pruning criterion 'l7'" in capsys.readouterr().err


def test_fine_tuning_reuses_the_runs_distillation_objective(tmp_path, data_root):
    """A run that weighted its distillation classes on the teacher's masks fine-tunes the same way."""
    from ground.lineage import RunFolder
    from ground.sweep import RunContext
    run = _make_run(tmp_path)
    folder = RunFolder(run)
    folder.record["config"]["train"]["distill_class_weights"] = "log"
    folder.save()
    ctx = RunContext.open(run, progress=False)
    _, objective = ctx.batches("teacher", ctx.cfg.train)
    assert type(objective).__name__ == "KL" and objective.temperature == 2.0
    weights = getattr(objective, "distill_weights", None)
    assert weights is not None and len(weights) == 3 and float(weights.min()) > 0
    with pytest.raises(ValueError, match="needs data.labelled"):
        ctx.batches("labels", ctx.cfg.train)
