"""Learning samples (issue 17): the frame graph's per-tile uncertainty scores, the pipeline's
choice and cut of sample tiles, and the daemon (a real process) sending them as SAMPLE messages
on the products socket, decoded as the ground decodes them (shared.samples)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

sys.path.insert(0, str(Path(__file__).parents[1]))
from onboard_models import BANDS_6, CLASSES_3, default_scaling, synthetic_frame  # noqa: E402
from test_daemon import Payload, command, connect, products, serving  # noqa: E402
from test_pipeline import TILE, manifest, model_dir  # noqa: E402,F401  (fixtures)
from test_store import BundleFactory  # noqa: E402

from onboard.pipeline import FramePipeline  # noqa: E402
from onboard.runtime import OpenVinoModel  # noqa: E402
from shared.messages import Message, decode, encode  # noqa: E402
from shared.samples import AMBIGUOUS_MARGIN, samples_from_message, window_georef  # noqa: E402

pytestmark = pytest.mark.timeout(180)

LEARNING = {"tiles": 3, "select": "uncertainty", "score": "entropy", "priority": 9}
GEOREF = {"crs": "EPSG:32633", "transform": [10.0, 0.0, 500000.0, 0.0, -10.0, 4600000.0]}


def numpy_scores(probs: np.ndarray, activation: str, thresholds: np.ndarray) -> np.ndarray:
    """shared.samples' two scores per tile, written plainly from the probabilities."""
    if activation == "sigmoid":
        p = probs.astype(np.float64)
        q = 1 - p
        h = -(p * np.log(np.maximum(p, 1e-12)) + q * np.log(np.maximum(q, 1e-12))) / np.log(2)
        centre = np.where(np.isnan(thresholds), 0.5, thresholds)[None, :, None, None]
        ambiguous = (np.abs(p - centre) < AMBIGUOUS_MARGIN / 2).any(axis=1)
        return np.stack([h.mean(axis=(1, 2, 3)), ambiguous.mean(axis=(1, 2))], 1)
    k = probs.shape[1]
    p = probs.astype(np.float64)
    h = -(p * np.log(np.maximum(p, 1e-12))).sum(axis=1) / np.log(k)
    top = np.sort(p, axis=1)
    ambiguous = (top[:, -1] - top[:, -2]) < AMBIGUOUS_MARGIN
    return np.stack([h.mean(axis=(1, 2)), ambiguous.mean(axis=(1, 2))], 1)


def gradient_frame(h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint16 frame whose brightness runs from clear to cloud across the columns: the model is
    sure at both sides and unsure in between (its cloud decision point is 0.30)."""
    rng = np.random.default_rng(seed)
    refl = np.linspace(0.15, 0.45, w, dtype=np.float32)[None, None, :] + \
        rng.normal(0, 0.01, (len(BANDS_6), h, w)).astype(np.float32)
    return np.rint(np.clip(refl, 0, None) / 1e-4).astype(np.uint16)


# --------------------------------------------------------------------------------------------
# the graph's scores

@pytest.mark.parametrize("activation,thresholds", [("softmax", [np.nan] * 3),
                                                   ("softmax", [np.nan, 0.5, np.nan]),
                                                   ("sigmoid", [np.nan, 0.7, np.nan])])
def test_graph_scores_match_numpy_from_the_probabilities(model_dir, activation, thresholds):
    model = OpenVinoModel(model_dir / "model.xml", batch_size=2, activation=activation)
    rng = np.random.default_rng(1)
    # reflectance around the cloud decision point: sure, unsure and ambiguous pixels mixed
    tiles = rng.uniform(0.2, 0.4, (5, 6, TILE, TILE)).astype(np.float32)
    tiles[1] = 0.15                                          # a flat, clear tile: sure
    mean, std = (np.asarray(v, np.float32) for v in default_scaling(6))
    gain, offset = 1 / std, -mean / std
    thresholds = np.asarray(thresholds, np.float32)
    probs = model.infer(tiles, gain=gain, offset=offset)
    masks, scores = model.infer_masks(tiles, gain, offset, thresholds, scores=True)
    want = numpy_scores(probs, activation, thresholds)
    assert scores.shape == (5, 2) and scores.dtype == np.float32
    np.testing.assert_allclose(scores[:, 0], want[:, 0], atol=1e-4)
    # a pixel exactly at the margin may fall either side in float32: a few pixels of 4096
    np.testing.assert_allclose(scores[:, 1], want[:, 1], atol=2e-3)
    assert want[1, 0] < want[0, 0]                           # the flat clear tile is surer
    if activation == "softmax":     # (the test model's class 0 is a constant logit: p = 0.5 with sigmoid)
        assert 0.0 < want[0, 1] < 1.0 and want[1, 1] == 0.0
    # the masks are those of the graph without the scores output
    assert np.array_equal(masks, model.infer_masks(tiles, gain, offset, thresholds))


# --------------------------------------------------------------------------------------------
# the pipeline

def test_pipeline_samples_are_the_frames_pixels_at_their_windows(manifest, model_dir):
    pipeline = FramePipeline(manifest, model_dir, batch_size=2)
    data = gradient_frame(150, 200)
    # the frame's bands in another order than the model's: samples come in the model's order
    order = [5, 3, 0, 1, 4, 2]
    frame, bands = data[order], [BANDS_6[i] for i in order]
    policy = {**manifest["policy"], "learning": {"tiles": 64}}         # every tile of the frame
    result = pipeline.process(frame, bands, 1e-4, policy=policy, frame_id="f-1")
    learning = result.learning
    n_tiles = len(learning.tile_scores)
    assert len(learning.samples) == n_tiles == learning.summary["tiles"] == learning.summary["samples"]
    assert learning.tiles.dtype == np.uint16 and learning.tiles.shape == (n_tiles, 6, TILE, TILE)
    padded = np.pad(data, ((0, 0), (0, TILE * 4 - 150), (0, TILE * 4 - 200)), mode="reflect")
    edges = 0
    for sample, tile in zip(learning.samples, learning.tiles):
        r, c, size = sample["row"], sample["col"], sample["size"]
        assert size == TILE
        assert np.array_equal(tile, padded[:, r:r + size, c:c + size])
        edges += r + size > 150 or c + size > 200
    assert edges > 0                                   # edge tiles are reflect-padded as inferred
    entropies = [s["entropy"] for s in learning.samples]
    assert entropies == sorted(entropies, reverse=True)
    # the same masks and decision as without the learning block
    plain = pipeline.process(frame, bands, 1e-4)
    assert plain.learning is None and "uncertainty" not in plain.summary()
    assert np.array_equal(plain.class_mask, result.class_mask) and plain.keep == result.keep
    assert result.summary()["uncertainty"] == learning.summary


def test_uncertainty_picks_the_unsure_middle_and_random_does_not(manifest, model_dir):
    pipeline = FramePipeline(manifest, model_dir, batch_size=2)
    data = gradient_frame(64, 64 * 8)          # one row of 9 tiles, clear -> cloud
    policy = {**manifest["policy"], "learning": {"tiles": 2}}
    sure = pipeline.process(data, BANDS_6, 1e-4, policy=policy, frame_id="g")
    cols = [s["col"] for s in sure.learning.samples]
    # brightness 0.30 (the model's cloud decision point) lies at the middle of the frame
    assert all(150 <= c + TILE // 2 <= 360 for c in cols), cols
    random = {**manifest["policy"], "learning": {"tiles": 2, "select": "random", "seed": 3}}
    picks = {tuple(s["col"] for s in pipeline.process(data, BANDS_6, 1e-4, policy=random,
                                                      frame_id=f"g-{i}").learning.samples)
             for i in range(6)}
    again = pipeline.process(data, BANDS_6, 1e-4, policy=random, frame_id="g-0").learning
    assert len(picks) > 1 and tuple(s["col"] for s in again.samples) in picks
    assert again.selection == "random" and sure.learning.selection == "uncertainty"
    high = {**manifest["policy"], "learning": {"tiles": 5, "min_score": 0.99}}
    none = pipeline.process(data, BANDS_6, 1e-4, policy=high, frame_id="g").learning
    assert none.samples == [] and none.tiles.shape[0] == 0 and none.summary["samples"] == 0


def test_a_policy_without_learning_compiles_no_scores_output(manifest, model_dir):
    pipeline = FramePipeline(manifest, model_dir, batch_size=2)
    pipeline.process(gradient_frame(100, 100), BANDS_6, 1e-4)
    variants = pipeline.model._mask_variants
    assert variants and all(key[-1] is False for key in variants)
    assert all(len(compiled.outputs) == 1 for by_batch in variants.values() for compiled, _, _ in by_batch.values())
    pipeline.process(gradient_frame(100, 100), BANDS_6, 1e-4,
                     policy={**manifest["policy"], "learning": {"tiles": 1}})
    scored = [by_batch for key, by_batch in variants.items() if key[-1] is True]
    assert len(scored) == 1 and all(len(compiled.outputs) == 2 for compiled, _, _ in scored[0].values())


# --------------------------------------------------------------------------------------------
# the daemon, a real process

@pytest.fixture(scope="module")
def learning_daemon(tmp_path_factory):
    """A daemon serving v3 of the test model with a learning policy, a payload and a downlink."""
    bundles = BundleFactory(tmp_path_factory.mktemp("bundles"))
    policy = {"rules": [{"if": {"class": "cloud", "fraction_above": 0.6}, "then": "discard"}],
              "default": {"then": "keep", "priority": 5}, "learning": LEARNING}
    bundle = bundles.build(3, policy=policy)
    with serving(tmp_path_factory.mktemp("learning"), bundles.public, bundle) as (daemon, payload, downlink):
        yield daemon, payload, downlink, policy


def send_frame(payload: Payload, frame_id: str, data: np.ndarray, bands=BANDS_6) -> Message:
    msg = Message("frame", {"frame_id": frame_id, "bands": list(bands), "scale": 1e-4, "scene": "grad",
                            "index": 7, "acquired": 1.5e9, "georef": GEOREF}, {"data": data})
    payload.sock.send_multipart(encode(msg), copy=False)
    return payload.outcome(msg.id)


def test_daemon_sends_samples_of_the_frames_pixels_with_the_model_that_chose_them(learning_daemon):
    daemon, payload, downlink, _ = learning_daemon
    data = gradient_frame(150, 200)
    order = [2, 0, 1, 5, 4, 3]
    decision = send_frame(payload, "grad-1", data[order], [BANDS_6[i] for i in order])
    assert decision.type == "decision" and decision.body["keep"] is True
    unc = decision.body["uncertainty"]
    assert unc["samples"] == 3 and unc["tiles"] >= 9
    assert 0 <= unc["entropy"]["p50"] <= unc["entropy"]["p90"] <= unc["entropy"]["max"] <= 1
    got = products(downlink, 2)
    assert [m.type for m in got] == ["product", "sample"]        # after the frame's PRODUCT
    sample = decode(encode(got[1]))                                # as the ground reads it
    body = sample.body
    assert body["model"] == {"model_id": "cloud-test", "version": 3}
    assert body["bands"] == list(BANDS_6) and body["selection"] == "uncertainty"
    assert body["priority"] == 9 and body["georef"] == GEOREF and body["index"] == 7
    samples = samples_from_message(body, sample.arrays["tiles"])
    assert len(samples) == 3
    padded = np.pad(data, ((0, 0), (0, 256 - 150), (0, 256 - 200)), mode="reflect")
    for s in samples:
        assert s.model_version == 3 and s.model_id == "cloud-test" and s.frame_id == "grad-1"
        assert s.data.dtype == np.uint16 and s.scale == 1e-4 and s.scene == "grad"
        assert np.array_equal(s.data, padded[:, s.row:s.row + s.size, s.col:s.col + s.size])
        assert s.georef == window_georef(GEOREF, s.row, s.col)
        assert 0 < s.entropy <= 1
    assert [s.entropy for s in samples] == sorted((s.entropy for s in samples), reverse=True)


def test_daemon_sends_samples_of_a_discarded_frame_too(learning_daemon):
    daemon, payload, downlink, _ = learning_daemon
    cloudy, _ = synthetic_frame(BANDS_6, 96, 96, clouds=[(0, 96, 0, 96)])
    decision = send_frame(payload, "cloudy-1", cloudy)
    assert decision.body["keep"] is False
    got = products(downlink, 1)
    assert [m.type for m in got] == ["sample"] and got[0].body["frame_id"] == "cloudy-1"
    assert got[0].arrays["tiles"].shape == (3, 6, TILE, TILE)


def test_daemon_telemetry_reports_the_uncertainty_and_samples_sent(learning_daemon):
    daemon, payload, downlink, _ = learning_daemon
    send_frame(payload, "tele-1", gradient_frame(100, 100))
    products(downlink, 2)
    sub = connect(zmq.SUB, daemon.endpoints["telemetry"], "telemetry", SUBSCRIBE=b"")
    body = None
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            if sub.poll(200):
                beat = decode(sub.recv_multipart())
                if beat.body.get("learning", {}).get("samples", {}).get("sent", 0) >= 1:
                    body = beat.body["learning"]
                    break
    finally:
        sub.close()
    assert body is not None
    hist = body["entropy"]["histogram"]
    assert len(hist) == 10 and sum(hist) == body["tiles_scored"] >= 4
    assert 0 <= body["entropy"]["mean"] <= body["entropy"]["p90"] <= 1
    assert body["samples"]["tiles_sent"] >= 3 and body["samples"]["bytes_sent"] > 3 * 6 * TILE * TILE * 2
    assert body["samples"]["dropped"] == 0


def test_daemon_without_a_learning_block_sends_no_samples(learning_daemon):
    daemon, payload, downlink, policy = learning_daemon
    plain = {k: v for k, v in policy.items() if k != "learning"}
    ep = daemon.endpoints["commands"]
    bad = command(ep, "set_policy", {"policy": {**policy, "learning": {"tiles": 65}}})
    assert bad["ok"] is False and "learning.tiles" in bad["error"]
    assert command(ep, "set_policy", {"policy": plain})["ok"]
    try:
        decision = send_frame(payload, "plain-1", gradient_frame(100, 100))
        assert decision.body["keep"] is True and "uncertainty" not in decision.body
        got = products(downlink, 2, timeout=2.0)
        assert [m.type for m in got] == ["product"]
    finally:
        assert command(ep, "set_policy", {"policy": None})["ok"]     # the bundle's own again


def test_waiting_samples_are_bounded_and_never_count_as_products():
    """Bus.push_sample: best effort. Past MAX_SAMPLES_WAITING a new SAMPLE is dropped and counted,
    and waiting SAMPLEs count neither in pending("products") nor in product_bytes (admission's
    bounds), so they never make the daemon refuse a frame."""
    import collections

    from onboard import bus as bus_mod

    bus = object.__new__(bus_mod.Bus)          # the outboxes alone: no sockets, no keys
    bus.outboxes = {"products": bus_mod.Outbox("products")}
    bus.spilled = collections.deque()
    bus.samples = dict.fromkeys(("queued", "sent", "tiles_sent", "bytes_sent", "dropped", "waiting",
                                 "waiting_bytes"), 0)
    bus.push_product(Message("product", {"frame_id": "p", "priority": 1}, {"mask_png": np.zeros(10, np.uint8)}))
    product_bytes = bus.product_bytes()
    tiles = np.zeros((1, 6, 8, 8), np.uint16)
    body = {"frame_id": "s", "priority": 9, "model": {"model_id": "m", "version": 1}, "selection": "random",
            "bands": list(BANDS_6), "scale": 1e-4,
            "samples": [{"row": 0, "col": 0, "size": 8, "entropy": 0.5, "ambiguous": 0.1}]}
    queued = [bus.push_sample(Message("sample", body, {"tiles": tiles}))
              for _ in range(bus_mod.MAX_SAMPLES_WAITING + 3)]
    assert queued == [True] * bus_mod.MAX_SAMPLES_WAITING + [False] * 3
    status = bus.sample_status()
    assert status["waiting"] == bus_mod.MAX_SAMPLES_WAITING and status["dropped"] == 3
    assert bus.pending("products") == 1 and bus.product_bytes() == product_bytes
    assert len(bus.outboxes["products"]) == 1 + bus_mod.MAX_SAMPLES_WAITING
