"""`eoedge ground ...`: help and JSON on every command, bad configs named, a tiny real run end to end."""
import json
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from shared.cliutil import build_parser
from ground.cli import COMMANDS, main
from ground.models.checkpoints import load_model


def _eoedge(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "eoedge", "ground", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help_and_json(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "--json" in capsys.readouterr().out


def test_size_picks_widths_for_a_budget(capsys):
    assert main(["size", "--params", "100k", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] <= 100_000 and len(out["widths"]) == 4 and out["macs"] > 1e8
    assert main(["size", "--params", "300"]) == 1
    assert "no TinyUNet" in capsys.readouterr().err


def test_list_shows_the_registries(capsys):
    assert main(["list", "--json"]) == 0
    reg = json.loads(capsys.readouterr().out)
    assert "ukis-csmask-6b-l1c" in reg["teachers"] and "kl" in reg["losses"] and "marida" in reg["patch_layouts"]


def test_bad_config_is_named_in_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(textwrap.dedent(CONFIG).replace('loss = "kl"', 'loss = "l1"'))
    out = _eoedge("run", str(bad))
    assert out.returncode == 1
    assert "experiment[1].loss: unknown 'l1'" in out.stderr and "Traceback" not in out.stderr
    # one line, by the policy of every CLI: error: <message naming the file and key> [<code>]
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("error: ") and str(bad) in line and line.endswith("[config_error]")
    missing = _eoedge("run", str(tmp_path / "nope.toml"))
    assert missing.returncode == 1 and "nope.toml not found" in missing.stderr


def test_ambiguous_bundle_budget_is_a_usage_error(tmp_path, capsys):
    """One byte-size grammar (shared.units) for every command: 5M could be 5,000,000 or
    5,242,880, so it is refused before anything runs; 2MB is 2,000,000 and 2MiB 2,097,152."""
    args = ["bundle", str(tmp_path), "--export", "export/x", "--key", "k.pem", "--model-id", "m", "--version", "1"]
    assert main(args + ["--max-bytes", "5M"]) == 2
    captured = capsys.readouterr()
    [line] = captured.err.strip().splitlines()
    assert "--max-bytes" in line and "'5M'" in line and "ambiguous" in line and line.endswith("[usage]")
    assert captured.out == ""
    parser = build_parser("eoedge ground", "", COMMANDS)
    assert parser.parse_args(args + ["--max-bytes", "2MB"]).max_bytes == 2_000_000
    assert parser.parse_args(args + ["--max-bytes", "2MiB"]).max_bytes == 2 * 1024 * 1024
    assert parser.parse_args(args).max_bytes == 5_000_000          # the default budget, 5MB


CONFIG = """
    [run]
    name = "tiny"
    out = "runs"
    deliver = "distilled"

    [data]
    bands = ["Blue", "Green", "Red", "NIR", "SWIR16", "SWIR22"]
    classes = ["clear", "cloud", "shadow"]
    unlabelled = [{ source = "ukis", rows = [0, 64] }]
    labelled = [{ source = "ukis", rows = [0, 64] }]

    [eval]
    data = { source = "ukis", rows = [256, 512] }
    overlap = 64

    [teacher]
    name = "ukis-csmask-6b-l1c"

    [student]
    params = "20k"

    [train]
    steps = 3
    batch = 2
    crop = 64
    augment = ["crop"]

    [[experiment]]
    name = "scratch"
    mode = "labels"

    [[experiment]]
    name = "distilled"
    loss = "kl"
    temperature = 2.0
    ce_weight = 0.3
"""


def test_tiny_config_runs_end_to_end(data_root, tmp_path):
    (tmp_path / "tiny.toml").write_text(textwrap.dedent(CONFIG))
    out = _eoedge("run", "tiny.toml", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    run = tmp_path / "runs" / "tiny"
    assert result["deliver"] == "distilled"
    assert [r["name"] for r in result["rows"]] == ["teacher", "scratch", "distilled"]
    teacher, scratch, distilled = result["rows"]
    assert teacher["miou"] > 0.7 and scratch["params"] <= 20_000 and scratch["params"] == distilled["params"]
    assert 0 <= distilled["agreement"] <= 1
    for name in ("student.pt", "normalization.json", "report.md", "report.json", "curves.png", "masks.png",
                 "config.toml", "students/scratch.pt"):
        assert (run / name).exists(), name
    lineage = json.loads((run / "lineage.json").read_text())
    assert lineage["config"]["run"]["name"] == "tiny"
    assert any(k.startswith("image:ukis") for k in lineage["inputs"])
    assert any(k.startswith("teacher:ukis-csmask") for k in lineage["inputs"])
    scratch_stage = next(s for s in lineage["stages"] if s["stage"] == "student:scratch")
    assert len(scratch_stage["outputs"]["students/scratch.pt"]) == 64
    stage = lineage["stages"][-1]
    assert stage["stage"] == "distill" and len(stage["outputs"]["student.pt"]) == 64
    assert "distilled" in lineage["metrics"]["distill"]
    # the next stage rebuilds the student from the file alone, normalisation included
    model, norm, meta = load_model(run / "student.pt")
    assert norm.bands == ("B02", "B03", "B04", "B08", "B11", "B12") and meta["step"] == 3
    assert json.loads((run / "normalization.json").read_text())["mean"] == list(norm.mean)


def test_train_teacher_command_checkpoints_and_resumes(data_root, tmp_path, capsys):
    cfg = textwrap.dedent(CONFIG).replace('name = "ukis-csmask-6b-l1c"', textwrap.dedent('''\
        name = "smp:Unet/resnet18"
        options = { encoder_depth = 3, decoder_channels = [32, 16, 8] }'''))
    (tmp_path / "t.toml").write_text(cfg.replace('out = "runs"', f'out = "{tmp_path / "runs"}"'))
    assert main(["train-teacher", str(tmp_path / "t.toml"), "--steps", "2", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["steps"] == 2 and first["checkpoint"].endswith("teacher.pt")
    assert main(["train-teacher", str(tmp_path / "t.toml"), "--steps", "2"]) == 1
    assert "pass --resume" in capsys.readouterr().err
    assert main(["train-teacher", str(tmp_path / "t.toml"), "--steps", "4", "--resume", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 4
    lineage = json.loads((tmp_path / "runs" / "tiny" / "lineage.json").read_text())
    assert [s["stage"] for s in lineage["stages"]] == ["train-teacher", "train-teacher"]
    assert main(["train-teacher", str(REPO / "configs" / "ukis_distill.toml")]) == 1
    assert "not trained here" in capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [
    (["prune", "RUN", "--steps", "0"], "--steps: 0 is below 1"),
    (["fp16-finetune", "RUN", "--steps", "-1"], "--steps: -1 is below 0"),
    (["gap", "RUN", "--rounds", "0"], "--rounds: 0 is below 1"),
    (["export", "RUN", "--threads", "two"], "--threads: 'two' is not a whole number"),
    (["export", "RUN", "--precision", "fp64"], "--precision: invalid choice"),
])
def test_bad_numbers_are_usage_errors_before_any_work(argv, named, tmp_path, capsys):
    argv = [str(tmp_path / "missing-run") if a == "RUN" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1 and "Traceback" not in err
