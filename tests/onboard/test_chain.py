"""Model chains on board (onboard.chain, the store's chain path): a cloud gate and a ship target,
real signed bundles holding real OpenVINO IRs (tests/onboard_models.py), installed, self-tested
step by step, refused naming the step and file, rolled back, and flown by a real daemon process.

The frame (128 x 128, cells of 32 x 32: 16 cells) has a cloud over the top-left 2 x 2 cells and
one "ship" (bright in B08 only: the gate sees clear sea, the ship model sees a ship) in a clear
cell, and may have another ship under the cloud, where the ship model must not run.
"""
from __future__ import annotations

import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

sys.path.insert(0, str(Path(__file__).parents[1]))

from onboard_models import BANDS_6, CLASSES_3, make_test_manifest, make_test_model_files, synthetic_frame  # noqa: E402
from onboard.chain import NOT_RUN, ChainPipeline, passing_boxes, passing_runs  # noqa: E402
from onboard.pipeline import FramePipeline  # noqa: E402
from onboard.products import decode_mask_png  # noqa: E402
from onboard.store import ModelStore  # noqa: E402
from shared.bundle import build_bundle, extract_bundle  # noqa: E402
from shared.chain import build_chain_bundle, chain_manifest  # noqa: E402
from shared.keys import generate_keypair  # noqa: E402
from shared.messages import decode  # noqa: E402
from test_daemon import KEY_DIR, DaemonProcess, Payload, cli, command, connect, offline_install, products  # noqa: E402

pytestmark = pytest.mark.timeout(180)

TILE = 32
SIZE = 128
CELLS = (SIZE // TILE) ** 2
SHIP_CLASSES = ("sea", "ship")
B08 = BANDS_6.index("B08")
RUN_IF = {"class": "cloud", "fraction_below": 0.5}
CLOUD = (0, 64, 0, 64)                  # the top-left 2 x 2 cells
SHIP = (80, 86, 90, 96)                 # in the clear cell (row 2, col 2)
SHIP_UNDER_CLOUD = (10, 16, 10, 16)
POLICY = {"rules": [{"if": {"class": "cloud", "fraction_above": 0.6}, "then": "discard"},
                    {"if": {"class": "ship", "largest_component_at_least": 16}, "then": "keep",
                     "priority": 1}],
          "default": {"then": "discard"}}


def chain_frame(ships=(SHIP,)) -> np.ndarray:
    data, _ = synthetic_frame(BANDS_6, SIZE, SIZE, clouds=[CLOUD], noise=0.005)
    for r0, r1, c0, c1 in ships:
        data[B08, r0:r1, c0:c1] = 6000             # reflectance 0.6 in B08 alone
    return data


class ChainFactory:
    """Signed step bundles (cloud gate, ship target) and chains of them, good and damaged."""

    def __init__(self, root: Path):
        self.root = root
        self.private, self.public = generate_keypair(root / "keys")
        self.other_private, self.other_public = generate_keypair(root / "other")
        self.cloud = self.step("cloud", CLASSES_3)
        self.ship = self.step("ship", SHIP_CLASSES, band_weights=[1.0 if i == B08 else 0.0 for i in range(6)])
        self.ship_other_key = self.step("ship-other", SHIP_CLASSES, key=self.other_private,
                                        band_weights=[1.0 if i == B08 else 0.0 for i in range(6)])

    def step(self, name: str, classes, key=None, band_weights=None, version: int = 1) -> Path:
        files = make_test_model_files(self.root / name, bands=BANDS_6, classes=classes, tile=TILE,
                                      n_reference=2, band_weights=band_weights)
        manifest = make_test_manifest(files, model_id=name, version=version, classes=classes, tile=TILE,
                                      overlap=8, threshold={}, policy={"rules": []})
        return build_bundle(self.root / f"{name}.tar", files, manifest, key or self.private)

    def single(self, version: int) -> Path:
        """An ordinary single-model bundle (the cloud model alone)."""
        files = make_test_model_files(self.root / f"single-{version}", bands=BANDS_6, tile=TILE, n_reference=2)
        return build_bundle(self.root / f"single-v{version}.tar", files,
                            make_test_manifest(files, model_id="cloud-test", version=version, tile=TILE), self.private)

    def chain(self, version: int, policy=POLICY, ship: Path | None = None) -> Path:
        return build_chain_bundle(self.root / f"chain-v{version}.tar",
                                  [("cloud", self.cloud, None), ("ship", ship or self.ship, RUN_IF)],
                                  policy, self.private, "harbour-chain", version)

    def signed_over(self, version: int, ship: Path, ship_key, damage=None) -> Path:
        """A chain whose outer manifest our key signs over whatever the ship folder holds: a step
        signed by `ship_key`, or (`damage`) a step file changed before the outer signature."""
        work = self.root / f"raw-{version}"
        files = {}
        for name, bundle, key in (("cloud", self.cloud, self.public), ("ship", ship, ship_key)):
            verified = extract_bundle(bundle, work / name, key)
            for arc in ("manifest.json", "manifest.sig", *verified.files):
                files[f"steps/{name}/{arc}"] = work / name / arc
        if damage:
            damage(work / "ship")
        manifest = chain_manifest([("cloud", None, None), ("ship", None, RUN_IF)], POLICY, "harbour-chain", version)
        return build_bundle(self.root / f"raw-v{version}.tar", files, manifest, self.private)


@pytest.fixture(scope="module")
def factory(tmp_path_factory) -> ChainFactory:
    return ChainFactory(tmp_path_factory.mktemp("chains"))


@pytest.fixture
def store(tmp_path, factory):
    s = ModelStore(tmp_path / "store", factory.public)
    yield s
    s.close()


# ------------------------------------------------------------------------------ install, refuse
def test_a_chain_installs_self_testing_each_step(store, factory):
    result = store.install(factory.chain(2))
    assert result.ok, result.reason
    assert set(result.self_test["steps"]) == {"cloud", "ship"}
    assert all(step["ok"] and step["max_abs_diff"] < 1e-2 for step in result.self_test["steps"].values())
    pipeline = result.pipeline
    assert isinstance(pipeline, ChainPipeline)
    assert pipeline.classes == ("clear", "cloud", "shadow", "sea", "ship")
    assert [type(p) for _, p, _ in pipeline.steps] == [FramePipeline, FramePipeline]
    assert store.active().model_id == "harbour-chain"
    # a restart brings the chain back, its files and steps checked again
    again = ModelStore(store.root, factory.public)
    info, reloaded = again.load_active()
    assert info.model_id == "harbour-chain" and isinstance(reloaded, ChainPipeline)


def test_a_tampered_step_file_is_refused_naming_the_step_and_file(store, factory):
    assert store.install(factory.single(1)).ok
    # a byte of the ship's weights flipped in the archive: the outer checksum names the file
    path = factory.chain(3)
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tf:
        member = tf.getmember("steps/ship/reference.npz")
    data[member.offset_data + member.size // 2] ^= 0xFF
    tampered = path.with_name("tampered.tar")
    tampered.write_bytes(bytes(data))
    result = store.install(tampered)
    assert not result.ok and result.code == "checksum_mismatch"
    assert "steps/ship/reference.npz" in result.reason
    # the ship's model.bin changed before the outer signature: its own manifest refuses it
    def flip(folder: Path) -> None:
        weights = bytearray((folder / "model.bin").read_bytes())
        weights[0] ^= 0xFF
        (folder / "model.bin").write_bytes(bytes(weights))
    result = store.install(factory.signed_over(4, factory.ship, factory.public, damage=flip))
    assert not result.ok and result.code == "checksum_mismatch", result.reason
    assert "chain step 'ship'" in result.reason and "'model.bin'" in result.reason
    assert store.active().model_id == "cloud-test" and store.active().version == 1


def test_a_step_signed_by_another_key_is_refused_and_the_active_model_keeps_serving(store, factory):
    assert store.install(factory.single(1)).ok
    result = store.install(factory.signed_over(5, factory.ship_other_key, factory.other_public))
    assert not result.ok and result.code == "wrong_key", result.reason
    assert "chain step 'ship'" in result.reason and "steps/ship" in result.reason
    assert result.active["model_id"] == "cloud-test"
    info, pipeline = store.load_active()
    assert info.version == 1 and isinstance(pipeline, FramePipeline)


def test_rollback_from_a_chain_to_the_previous_single_model_and_back(store, factory):
    assert store.install(factory.single(1)).ok
    assert store.install(factory.chain(2)).ok
    back = store.rollback()
    assert back.ok and back.model_id == "cloud-test" and isinstance(back.pipeline, FramePipeline)
    again = store.rollback()
    assert again.ok and again.model_id == "harbour-chain" and isinstance(again.pipeline, ChainPipeline)
    assert set(again.self_test["steps"]) == {"cloud", "ship"}


# ------------------------------------------------------------------------------ running a chain
@pytest.fixture(scope="module")
def chain_pipeline(tmp_path_factory, factory) -> ChainPipeline:
    s = ModelStore(tmp_path_factory.mktemp("run-store"), factory.public)
    result = s.install(factory.chain(2))
    assert result.ok, result.reason
    yield result.pipeline
    s.close()


def test_passing_cells_make_horizontal_runs_stacked_into_boxes():
    passing = np.array([[1, 1, 0, 1], [0, 0, 0, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]], bool)
    assert passing_runs(passing) == [(0, 0, 2), (0, 3, 4), (1, 3, 4), (2, 0, 4), (3, 0, 4), (4, 0, 2)]
    assert passing_boxes(passing) == [(0, 1, 0, 2), (0, 2, 3, 4), (2, 4, 0, 4), (4, 5, 0, 2)]
    assert passing_boxes(np.ones((3, 3), bool)) == [(0, 3, 0, 3)]        # all: the whole frame
    boxes = passing_boxes(passing)
    covered = np.zeros_like(passing)
    for i0, i1, j0, j1 in boxes:
        assert not covered[i0:i1, j0:j1].any()
        covered[i0:i1, j0:j1] = True
    assert np.array_equal(covered, passing)


def test_the_target_runs_only_on_the_cells_the_gate_passes(chain_pipeline):
    result = chain_pipeline.process(chain_frame(), BANDS_6, 1e-4)
    gate, ship = result.chain
    assert (gate["name"], gate["cells_run"], gate["cells_total"]) == ("cloud", CELLS, CELLS)
    assert (ship["name"], ship["cells_run"], ship["cells_total"]) == ("ship", CELLS - 4, CELLS)
    mask = result.step_masks["ship"]
    cloudy = np.zeros((SIZE, SIZE), bool)
    cloudy[CLOUD[0]:CLOUD[1], CLOUD[2]:CLOUD[3]] = True
    assert (mask[cloudy] == NOT_RUN).all() and (mask[~cloudy] != NOT_RUN).all()
    ran = [t["steps_run"] for t in result.tile_decisions]
    assert sum(names == ["cloud", "ship"] for names in ran) == CELLS - 4
    assert sum(names == ["cloud"] for names in ran) == 4
    # the ship is found where it is (its corners opened away by disk(2)), and nowhere else
    r0, r1, c0, c1 = SHIP
    ship = mask == 1
    assert ship[r0 + 2:r1 - 2, c0:c1].all() and ship[r0:r1, c0:c1].sum() >= 24
    assert ship.sum() == ship[r0:r1, c0:c1].sum()
    # a class of a step that did not run on a cell has fraction 0.0
    under = next(t for t in result.tile_decisions if (t["row"], t["col"]) == (0, 0))
    assert under["fractions"]["ship"] == 0.0 and under["fractions"]["sea"] == 0.0
    assert under["fractions"]["cloud"] == 1.0
    assert result.timings_ms["step_ship"] > 0 and result.timings_ms["step_cloud"] > 0


def test_the_policy_keeps_a_ship_under_clear_sky_and_never_looks_under_the_cloud(chain_pipeline):
    result = chain_pipeline.process(chain_frame(ships=(SHIP, SHIP_UNDER_CLOUD)), BANDS_6, 1e-4)
    assert result.keep and result.priority == 1 and "rule 1" in result.reason
    kept = [(t["row"], t["col"]) for t in result.tile_decisions if t["keep"]]
    assert kept == [(64, 64)]                               # the ship's cell alone
    assert result.step_masks["ship"][SHIP_UNDER_CLOUD[0], SHIP_UNDER_CLOUD[2]] == NOT_RUN
    assert set(result.products) >= {"mask_png", "mask_ship", "tiles", "tile_boxes"}
    assert np.array_equal(decode_mask_png(result.products["mask_ship"]), result.step_masks["ship"])
    # the same chain with the ship moved under the cloud only: nothing to keep
    hidden = chain_pipeline.process(chain_frame(ships=(SHIP_UNDER_CLOUD,)), BANDS_6, 1e-4)
    assert not hidden.keep and hidden.products == {}


def test_a_chain_takes_a_learning_block_and_sends_no_samples(chain_pipeline):
    """Learning samples are a single model's (docs/onboard.md): a chain's policy may carry the
    block (validated), its steps run without the scores output and its result has none."""
    policy = {**chain_pipeline.policy, "learning": {"tiles": 2}}
    result = chain_pipeline.process(chain_frame(), BANDS_6, 1e-4, policy=policy, frame_id="c-1")
    assert result.learning is None and "uncertainty" not in result.summary()
    for _, pipeline, _ in chain_pipeline.steps:
        assert all(key[-1] is False for key in pipeline.model._mask_variants)
    with pytest.raises(ValueError, match="policy.learning.tiles"):
        chain_pipeline.process(chain_frame(), BANDS_6, 1e-4, policy={**policy, "learning": {"tiles": 0}})


def test_a_ship_cut_by_the_edge_of_the_cells_run_keeps_its_part_undiminished(chain_pipeline):
    """Half a ship under the cloud's cell, half in the clear cell beside it: the ship model runs
    on the clear half alone, and the opening does not erode it at the cut (the box's edge is
    treated as the frame's: no erosion from beyond it), only at its free sides."""
    straddling = (40, 46, 58, 70)                       # cols 58..63 cloudy cell, 64..69 clear cell
    result = chain_pipeline.process(chain_frame(ships=(straddling,)), BANDS_6, 1e-4)
    mask = result.step_masks["ship"]
    assert (mask[:64, :64] == NOT_RUN).all()
    assert (mask[41:45, 64] == 1).all()                 # the cut column: kept
    assert (mask[41:45, 64:67] == 1).all()
    assert mask[40, 69] != 1                            # a free corner: opened away as usual


def test_a_frame_without_a_later_steps_band_is_refused_naming_it(chain_pipeline):
    from onboard.errors import FrameError
    with pytest.raises(FrameError) as exc:
        chain_pipeline.process(chain_frame()[:5], BANDS_6[:5], 1e-4)
    assert exc.value.code == "missing_bands" and "B12" in str(exc.value)


# ------------------------------------------------------------------------------ the daemon
def test_a_daemon_flies_the_chain_decision_product_and_telemetry(tmp_path, factory):
    offline_install(tmp_path / "store", factory.public, factory.chain(2))
    daemon = DaemonProcess(tmp_path, factory.public)
    payload = downlink = telemetry = None
    try:
        daemon.start()
        assert daemon.ready["model"]["id"] == "harbour-chain"
        payload = Payload(daemon.endpoints["frames"])
        downlink = connect(zmq.PULL, daemon.endpoints["products"], "downlink")
        telemetry = connect(zmq.SUB, daemon.endpoints["telemetry"], "telemetry", SUBSCRIBE=b"")
        msg_id = payload.send("harbour-1", chain_frame())
        decision = payload.outcome(msg_id)
        assert decision.type == "decision" and decision.body["keep"] is True, decision.body
        steps = decision.body["chain"]["steps"]
        assert [(s["name"], s["cells_run"], s["cells_total"]) for s in steps] == \
            [("cloud", CELLS, CELLS), ("ship", CELLS - 4, CELLS)]
        assert {s["model_id"] for s in steps} == {"cloud", "ship"}
        [product] = products(downlink, 1)
        assert product.body["chain"]["steps"][1]["mask"] == "mask_ship"
        assert product.body["classes"] == list(CLASSES_3)
        ship_mask = decode_mask_png(bytes(product.arrays["mask_ship"]))
        assert ship_mask.shape == (SIZE, SIZE) and (ship_mask[:64, :64] == NOT_RUN).all()
        body = _telemetry_with_frames(telemetry)
        assert "step_ship" in body["latency_ms"] and "step_cloud" in body["latency_ms"]
        counts = {s["name"]: s for s in body["model"]["chain"]}
        assert counts["ship"]["cells_run"] == CELLS - 4 and counts["ship"]["cells_total"] == CELLS
        assert set(body["model"]["precision"]) == {"cloud", "ship"}
        # the operator's status names the chain, each step's precision and cells run
        status = cli("status", "--config", str(daemon.config_path), "--keys", str(KEY_DIR))
        assert status.returncode == 0, status.stderr
        assert "model chain harbour-chain v2: cloud at fp32 on 16/16 cells, ship at fp32 on 12/16 cells" in status.stdout
        # a policy set by command may name any step's class; an unknown one is refused naming it
        ep = daemon.endpoints["commands"]
        keep_ships = {"rules": [{"if": {"class": "ship", "fraction_above": 0.5}, "then": "keep"}]}
        assert command(ep, "set_policy", {"policy": keep_ships})["ok"]
        refused = command(ep, "set_policy", {"policy": {"rules": [{"if": {"class": "boat", "fraction_above": 0.5},
                                                                   "then": "keep"}]}})
        assert refused["ok"] is False and "boat" in refused["error"] and refused["code"] == "bad_args"
    finally:
        for sock in (payload, downlink, telemetry):
            if sock is not None:
                sock.close()
        daemon.cleanup()


def _telemetry_with_frames(sub, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sub.poll(200):
            body = decode(sub.recv_multipart()).body
            if body["frames"]["decided"] >= 1:
                return body
    raise AssertionError("no telemetry after the frame within the timeout")

