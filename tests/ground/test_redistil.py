"""Issue 17 on the ground: the `learning` data source (downlinked samples with their georeference
and the model version that chose them, held-out regions dropped) and `eoedge ground redistil`
(the flying student, bundle v, fine-tuned from its checkpoint on those samples plus replay of its
run's imagery, exported and bundled as v+1 with parent v, which the on-board store installs over
v). On the small generated run of tests/ground/mini_run.py: no ../shared/data, except the check
that replay never yields the ukis chip's held-out rows."""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import shared.policy
from shared.bundle import verify_bundle
from shared.keys import generate_keypair
from shared.samples import LearningSample, window_georef, write_sample
from ground.cli import main
from ground.config import parse_config
from ground.data.dataset import load_data
from ground.data.sources import load_source
from ground.errors import ConfigError, DataError
from ground.lineage import RunFolder
from ground.models.checkpoints import load_model
from ground.stages.bundle import bundle
from ground.stages.export import export
from ground.stages.redistil import learning_samples, redistil
from ground.stages.run import Run
from mini_run import BANDS, make_run  # noqa: E402  (tests/ground/mini_run.py)

warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FRAME_GEOREF = {"crs": "EPSG:32633", "transform": [10.0, 0.0, 500_000.0, 0.0, -10.0, 5_000_000.0]}
MODEL_ID = "cloud-mini"
# the policy that flies, with the learning block (the onboard side's; the default policy before it lands)
POLICY = {"rules": [], "default": {"then": "keep", "priority": 5}}
if hasattr(shared.policy, "validate_learning"):
    POLICY["learning"] = {"tiles": 2, "select": "uncertainty", "score": "entropy", "min_score": 0.0,
                          "priority": 9, "seed": 0}


def _sample(frame: str, row: int, col: int, version: int = 1, size: int = 64, bands=BANDS, seed: int = 0,
            georef=FRAME_GEOREF, selection: str = "uncertainty", entropy: float = 0.6) -> LearningSample:
    """A downlinked tile of a generated frame: uint16 digital numbers (reflectance = value * 1e-4)."""
    rng = np.random.default_rng([seed, row, col])
    data = rng.integers(200, 6000, (len(bands), size, size)).astype(np.uint16)
    data[:, size // 4:size // 2] += 3000                   # some structure for the teacher
    return LearningSample(data=data, bands=list(bands), scale=1e-4, frame_id=frame, row=row, col=col, size=size,
                          model_id=MODEL_ID, model_version=version, entropy=entropy, ambiguous=0.2,
                          selection=selection, georef=window_georef(georef, row, col), scene="second-kind")


def _write(folder: Path, n: int = 6, **kw) -> list[Path]:
    return [write_sample(folder, _sample(f"f{i // 3}", 64 * (i % 3), 32 * i, seed=i, **kw)) for i in range(n)]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def flying(tmp_path_factory, keys):
    """Run folder, its exported student and bundle v1 (what flies), and a folder of samples."""
    root = tmp_path_factory.mktemp("redistil")
    run = make_run(root)
    export(Run.open(run, progress=False), "student.pt", name="student")
    v1 = bundle(Run.open(run, progress=False), "export/student", keys[0], MODEL_ID, 1, reference_tiles=1,
                policy=POLICY)["bundle"]
    samples = root / "downlink"
    _write(samples)
    return {"root": root, "run": run, "v1": v1, "samples": samples}


@pytest.fixture(scope="module")
def redistilled(flying, keys):
    return redistil(flying["v1"], [flying["samples"]], keys[0], steps=3, replay=0.5, seed=0, progress=False)


# ---- the learning data source -------------------------------------------------------------------------

def test_learning_samples_carry_their_georeference_and_model_version(tmp_path):
    written = [write_sample(tmp_path / "s", _sample("frame-a", 128, 64, version=3)),
               write_sample(tmp_path / "s" / "pass2", _sample("frame-b", 0, 0, version=4, selection="random"))]
    bands = BANDS[::-1]                                    # the run's order, not the sample's
    got = load_source({"source": "learning", "path": str(tmp_path / "s")}, bands, labelled=False)
    assert [s.origin["file"] for s in got] == [str(p) for p in written]
    a, b = got
    assert a.labels is None and a.image.dtype == np.float32 and a.image.shape == (6, 64, 64)
    raw = _sample("frame-a", 128, 64, version=3)
    np.testing.assert_allclose(a.image, raw.data[::-1].astype(np.float32) * np.float32(1e-4))
    # the tile's own georeference: the frame's, moved to the window's top-left pixel
    assert a.origin["georef"] == {"crs": "EPSG:32633", "transform": [10.0, 0.0, 500_640.0, 0.0, -10.0, 4_998_720.0]}
    assert (a.origin["model_id"], a.origin["model_version"], a.origin["selection"]) == (MODEL_ID, 3, "uncertainty")
    assert (b.origin["model_version"], b.origin["selection"]) == (4, "random")
    assert (a.origin["frame_id"], a.origin["row"], a.origin["col"], a.origin["size"]) == ("frame-a", 128, 64, 64)
    assert len(a.origin["sha256"]) == 64 and a.origin["sha256"] != b.origin["sha256"]
    # filters: by score and by how the satellite chose them
    assert len(load_source({"source": "learning", "path": str(tmp_path / "s"), "selection": "random"}, bands)) == 1
    with pytest.raises(DataError, match="no samples left"):
        load_source({"source": "learning", "path": str(tmp_path / "s"), "min_entropy": 0.9}, bands)


def test_a_band_the_run_needs_and_the_sample_lacks_is_named(tmp_path):
    write_sample(tmp_path, _sample("f", 0, 0, bands=BANDS[:5]))        # no B12
    with pytest.raises(ConfigError, match="B12"):
        load_source({"source": "learning", "path": str(tmp_path)}, BANDS)


def _window(row: int, col: int, size: int = 64) -> list[float]:
    """[xmin, ymin, xmax, ymax] of a frame window in FRAME_GEOREF's CRS."""
    return [500_000.0 + 10 * col, 5_000_000.0 - 10 * (row + size), 500_000.0 + 10 * (col + size),
            5_000_000.0 - 10 * row]


def test_samples_inside_a_held_out_region_are_dropped_and_counted(tmp_path, caplog):
    from ground.data.learning import read_learning
    _write(tmp_path / "s")                           # windows (0,0) (64,32) (128,64) (0,96) (64,128) (128,160)
    write_sample(tmp_path / "s", _sample("nogeo", 0, 0, georef=None))
    spec = {"source": "learning", "path": str(tmp_path / "s")}
    x0, y0, x1, y1 = _window(0, 0)
    region = {"crs": "EPSG:32633", "bounds": [x0 + 5, y0 + 5, x1 - 5, y1 - 5]}     # inside sample (0, 0) only
    got = read_learning(spec, BANDS, [region])
    names = {s.name for s in got.samples}
    assert got.read == 7 and len(got.samples) == 5 and "f0@0,0" not in names
    assert got.dropped["held_out"] == 1 and got.dropped["no_georef"] == 1
    assert "dropped 1 inside held-out regions and 1 without a georeference" in caplog.text
    # a region touching no window drops nothing but the one that cannot be placed
    far = {"crs": "EPSG:32633", "bounds": [0.0, 0.0, 10.0, 10.0]}
    assert read_learning(spec, BANDS, [far]).dropped == {"held_out": 0, "no_georef": 1, "min_entropy": 0,
                                                          "selection": 0}
    # a region given in another CRS is reprojected before the test (EPSG:4326 degrees around the frame)
    pytest.importorskip("rasterio")
    from rasterio.warp import transform_bounds
    lonlat = list(transform_bounds("EPSG:32633", "EPSG:4326", x0 + 5, y0 + 5, x1 - 5, y1 - 5))
    assert read_learning(spec, BANDS, [{"crs": "EPSG:4326", "bounds": lonlat}]).dropped["held_out"] >= 1
    # through a run config: data.held_out, the learning source among the unlabelled imagery
    raw = {"run": {"name": "r", "out": str(tmp_path)}, "teacher": {"name": "x"}, "student": {},
           "data": {"bands": BANDS, "classes": ["clear", "cloud", "shadow"], "unlabelled": [spec],
                    "held_out": [region]}, "experiment": [{"name": "d"}]}
    data = load_data(parse_config(raw))
    assert len(data.unlabelled) == 5 and "f0@0,0" not in {s.name for s in data.unlabelled}
    bad = copy.deepcopy(raw)
    bad["data"]["held_out"] = [{"crs": "EPSG:32633", "bounds": [1, 2, 0, 3]}]
    with pytest.raises(ConfigError, match=r"data\.held_out\[0\]\.bounds"):
        parse_config(bad)


# ---- redistil: v+1, parent v, installs over v ---------------------------------------------------------

def test_redistil_builds_v_plus_1_with_parent_v_signed_with_the_key(flying, redistilled, keys):
    r = redistilled
    assert (r["model_id"], r["version"], r["parent"]) == (MODEL_ID, 2, {"model_id": MODEL_ID, "version": 1})
    m2 = verify_bundle(r["bundle"], keys[1]).manifest
    m1 = verify_bundle(flying["v1"], keys[1]).manifest
    assert m2["version"] == 2 and m2["parent"] == {"model_id": MODEL_ID, "version": 1}
    # what flies stays as it flew: the policy (its learning block too), tiling, bands, precision, profile
    assert m2["policy"] == m1["policy"] == POLICY
    for key in ("input", "output"):
        assert {k: v for k, v in m2[key].items() if k != "scaling"} == {k: v for k, v in m1[key].items()
                                                                      if k != "scaling"}
    assert (m2["precision"], m2["profile"]) == (m1["precision"], m1["profile"])
    # the lineage: the samples used (count, hashes, the models that chose them), from v's checkpoint
    red = m2["lineage"]["redistil"]
    assert red["from"]["version"] == 1 and red["checkpoint"] == "student.pt" and red["steps"] == 3
    assert red["samples"]["kept"] == 6 and len(red["samples"]["sha256"]) == 6
    assert red["samples"]["models"] == {f"{MODEL_ID} v1": 6}
    assert m2["lineage"]["checkpoint"] == r["checkpoint"] == "redistil/cloud-mini-v2.pt"
    stage = next(s for s in RunFolder(flying["run"]).stages() if s["stage"] == "redistil:cloud-mini-v2")
    assert sorted(s["sha256"] for s in stage["inputs"]["samples"]) == red["samples"]["sha256"]
    assert all(s["georef"]["crs"] == "EPSG:32633" and s["model_version"] == 1 for s in stage["inputs"]["samples"])
    assert stage["label_free"] is True and stage["inputs"]["checkpoint"] == "student.pt"


def test_redistil_trains_from_the_checkpoint_not_from_scratch(flying, redistilled):
    before, _, _ = load_model(flying["run"] / "student.pt")
    after, _, _ = load_model(flying["run"] / redistilled["checkpoint"])
    torch.manual_seed(123)
    fresh = type(before)(6, 3, (8, 16, 32))
    with torch.no_grad():
        moved = sum(float((a - b).abs().sum()) for a, b in zip(after.parameters(), before.parameters()))
        apart = sum(float((a - b).abs().sum()) for a, b in zip(fresh.parameters(), before.parameters()))
    assert 0 < moved < 0.2 * apart


def test_the_onboard_store_installs_v_plus_1_over_v(flying, redistilled, keys, tmp_path):
    from onboard.store import ModelStore
    store = ModelStore(tmp_path / "store", keys[1])
    try:
        first = store.install(flying["v1"])
        assert first.ok, first.reason
        second = store.install(redistilled["bundle"])
        assert second.ok, second.reason
        assert store.active().version == 2 and store.previous().version == 1
        assert not store.install(flying["v1"]).ok            # v is older than what now flies
    finally:
        store.close()


def test_v_plus_1_re_distils_in_turn(flying, redistilled, keys):
    """The loop goes on: v2 flies, its samples come down, v3 names v2 as parent and starts from v2's
    checkpoint."""
    res = redistil(redistilled["bundle"], [flying["samples"]], keys[0], steps=1, progress=False)
    m3 = verify_bundle(res["bundle"], keys[1]).manifest
    assert (m3["version"], m3["parent"]) == (3, {"model_id": MODEL_ID, "version": 2})
    assert m3["lineage"]["redistil"]["checkpoint"] == redistilled["checkpoint"]


def test_redistil_is_deterministic(flying):
    """Two fine-tunings with the same seed from the same checkpoint give the same weights."""
    def once():
        run = Run.open(flying["run"], progress=False)
        model, norm, _ = run.load("student.pt")
        got = learning_samples(run, [flying["samples"]])
        run.finetune(model, 2, "teacher", norm=norm, seed=7, mix=(got.samples, 0.5))
        return model.state_dict()
    a, b = once(), once()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- the held-out rows of the real chip ---------------------------------------------------------------

def test_replay_never_yields_the_held_out_rows(data_root, flying, tmp_path):
    """A run whose imagery is the ukis chip's rows 0..256: every replay crop comes from them; a
    config asking for rows into 256..511 is refused before any training."""
    from shared.datasets import UKIS_HELD_OUT_ROWS, load_ukis_chip
    folder = RunFolder(flying["run"])
    raw = copy.deepcopy(folder.record["config"])
    raw["run"]["name"] = "ukis"
    raw["run"]["out"] = str(tmp_path)
    raw["data"]["unlabelled"] = [{"source": "ukis", "rows": [0, 256]}]
    cfg = parse_config(raw)
    run = Run.create(cfg, progress=False)
    model, norm, _ = load_model(flying["run"] / "student.pt")
    got = learning_samples(run, [flying["samples"]])
    from dataclasses import replace
    train = replace(cfg.train, steps=1, batch=4)
    sampler, _ = run.batches("teacher", train, norm=norm, mix=(got.samples, 0.5))
    replay = sampler.parts[0].samples
    chip, _ = load_ukis_chip()
    chip = chip.select(tuple(BANDS)).data.astype(np.float32)
    assert [s.image.shape[1] for s in replay] == [256]
    np.testing.assert_array_equal(replay[0].image, chip[:, :256])
    held = chip[:, UKIS_HELD_OUT_ROWS]
    for _ in range(5):                     # the crops drawn: none holds a held-out row
        x, _, _ = sampler()
        for crop in x[:2].numpy():
            assert not any(np.array_equal(crop[:, 0, :32], held[:, r, c:c + 32])
                           for r in range(0, held.shape[1], 16) for c in range(0, held.shape[2] - 32, 64))
    raw["data"]["unlabelled"] = [{"source": "ukis", "rows": [0, 300]}]
    with pytest.raises(DataError, match="held-out"):
        Run.create(parse_config(raw), progress=False).data


# ---- the command line ---------------------------------------------------------------------------------

def test_cli_config_file_form_reports_json(flying, keys, tmp_path, capsys):
    cfg = tmp_path / "redistil.toml"
    cfg.write_text(f'[redistil]\nbundle = "{flying["v1"]}"\nsamples = ["{flying["samples"]}"]\n'
                   f'key = "{keys[0]}"\nsteps = 2\nreplay = 0.5\nout = "elsewhere/v2.tar"\nname = "cli-v2"\n'
                   f'held_out = [{{crs = "EPSG:32633", bounds = {_window(0, 0)} }}]\n')
    assert main(["redistil", str(cfg), "--steps", "1", "--json"]) == 0        # a flag over the file
    res = json.loads(capsys.readouterr().out)
    assert res["version"] == 2 and res["steps"] == 1 and res["replay"] == 0.5
    assert res["bundle"] == str(tmp_path / "elsewhere" / "v2.tar")        # relative to the config's folder
    # a second v+1 of the same v beside the first: its own name for the run's files
    assert res["checkpoint"] == "redistil/cli-v2.pt" and res["export"] == "export/cli-v2"
    assert res["samples"]["dropped"]["held_out"] == 1 and res["samples"]["kept"] == 5
    assert verify_bundle(res["bundle"], keys[1]).manifest["parent"]["version"] == 1


@pytest.mark.parametrize("case", ["missing-folder", "corrupt-sample", "not-the-runs-bundle", "wrong-key"])
def test_bad_input_is_named_without_a_traceback(case, flying, keys, tmp_path, capsys):
    samples, bundle_path, key, extra = flying["samples"], flying["v1"], keys[0], []
    named = None
    if case == "missing-folder":
        samples = named = tmp_path / "nowhere"
    elif case == "corrupt-sample":
        samples = tmp_path / "s"
        _write(samples, n=2)
        named = samples / "broken.npz"
        named.write_bytes(b"not an npz at all")
    elif case == "not-the-runs-bundle":
        other = make_run(tmp_path / "other")        # another run folder: its lineage never wrote v1
        extra, named = ["--run", str(other)], "is not a bundle of run"
    else:
        key, named = generate_keypair(tmp_path / "k")[0], bundle_path
    code = main(["redistil", "--bundle", str(bundle_path), "--samples", str(samples), "--key", str(key),
                 "--steps", "1", *extra])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and err.startswith("error: ")
    assert str(named) in err, err
