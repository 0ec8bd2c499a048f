"""`eoedge ground build`: config -> distil -> search -> FP16 fine-tune -> export -> bundle -> on-board
self-test; refused, naming the closest candidate, when nothing meets both the budget and the tolerance."""
import json
import subprocess
import sys

import pytest

from conftest import REPO
from mini_run import BANDS, host_precision, imagery
from shared.keys import generate_keypair
from ground.models.checkpoints import save_checkpoint
from ground.data.normalization import Normalization
from ground.models.tiny_unet import TinyUNet


def tiny_config(root) -> str:
    """The mini run's config as a TOML file (generated imagery, a tiny torch teacher)."""
    imagery(root)
    teacher = save_checkpoint(root / "teacher.pt", TinyUNet(6, 3, (8, 16)),
                              {"name": "tiny-unet", "in_channels": 6, "num_classes": 3, "options": {"widths": [8, 16]}},
                              Normalization(tuple(BANDS), (0.2,) * 6, (0.15,) * 6))
    bands = ", ".join(f'"{b}"' for b in BANDS)
    path = root / "tiny.toml"
    path.write_text(f"""
[run]
name = "tiny"
out = "{root}"
deliver = "distilled"
[data]
bands = [{bands}]
classes = ["clear", "cloud", "shadow"]
unlabelled = [{{ source = "scene", path = "{root}/scenes/*.npz" }}]
[eval]
data = {{ source = "patches", path = "{root}/eval", band_names = [{bands}] }}
tile = 128
overlap = 32
[teacher]
name = "checkpoint:{teacher}"
[student]
name = "tiny-unet"
widths = [8, 16, 32]
[train]
steps = 2
batch = 2
crop = 64
augment = ["crop"]
[[experiment]]
name = "distilled"
mode = "distill"
loss = "kl"
""")
    return str(path)


def _build(config, key, *args):
    return subprocess.run([sys.executable, "-m", "eoedge", "ground", "build", config, "--key", str(key),
                           "--model-id", "tiny", "--version", "1", "--trials", "2", "--steps", "2",
                           "--population", "2", "--precision", host_precision(), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def test_build_refuses_an_impossible_budget_naming_the_closest_point(tmp_path):
    config = tiny_config(tmp_path)
    key, _ = generate_keypair(tmp_path / "keys")
    out = _build(config, key, "--latency-budget-ms", "0.001")
    assert out.returncode == 1, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: search: nothing meets both 0.001 ms per tile") and line.endswith("[budget_not_met]")
    assert "closest: " in line and "(trial " in line and "ms per tile" in line
    assert "Traceback" not in out.stderr
    assert "[2/6] search" in out.stderr                      # progress, stage by stage
    assert not (tmp_path / "tiny" / "bundles").exists()      # nothing signed


def test_build_delivers_a_self_tested_bundle_within_a_loose_budget(tmp_path):
    config = tiny_config(tmp_path)
    key, _ = generate_keypair(tmp_path / "keys")
    out = _build(config, key, "--latency-budget-ms", "10000", "--accuracy-tolerance", "1.0", "--fp16-steps", "1",
                 "--json")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["self_test"]["ok"] and r["bytes"] > 0 and r["ms_per_tile"] <= 10000
    assert r["miou_heldout"] is not None and r["chosen"] == "search/build/picked.pt" and r["precision"] == host_precision()
    assert (tmp_path / "tiny" / "bundles" / "tiny-v1.tar").exists()


def test_build_via_pruning_the_distilled_student(tmp_path):
    config = tiny_config(tmp_path)
    key, _ = generate_keypair(tmp_path / "keys")
    out = _build(config, key, "--latency-budget-ms", "10000", "--accuracy-tolerance", "1.0", "--via", "prune",
                 "--fp16-steps", "1", "--json")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["via"] == "prune" and r["chosen"] == "pruned/build-lamp-30.pt" and r["self_test"]["ok"]


def test_self_test_refusal_names_the_daemons_reason(tmp_path):
    """`onboard install --json` reports a refusal as {"ok": false, "error": {"code", "message"}}:
    the stage's error carries that message, not None."""
    from ground.stages.build import self_test
    from ground.errors import StageError

    key, _ = generate_keypair(tmp_path / "keys")
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"not a bundle")
    with pytest.raises(StageError, match="install refused: .*broken.tar") as err:
        self_test(broken, key)
    assert "None" not in str(err.value)
