"""The daemon's memory (issue 13): a frame is let go once its outcome is out, products go to
libzmq one at a time while a backlog waits on the on-board store, a spilled product is read back
into one buffer, and glibc's allocator is set by the daemon itself."""
from __future__ import annotations

import gc
import os
import queue
import threading
import time
import weakref

import numpy as np
import pytest
import zmq

from onboard.admission import FrameJob
from onboard.bus import PRODUCT_PART_BYTES, Bus
from onboard.config import config_from_dict
from onboard.memory import release_memory, tune_allocator
from onboard.outcomes import FrameOutcome
from onboard.products import read_spilled, spill_product
from onboard.workers import Workers
from shared.messages import Message, decode
from test_daemon import Payload, bundles, command, connect, frame, make_daemon, products  # noqa: F401

pytestmark = pytest.mark.timeout(180)


def test_the_frame_worker_lets_go_of_a_frame_once_its_outcome_is_handed_back():
    # Held by the worker while it waits for the next frame, a frame's pixels (and products)
    # would stay alive until that next frame had arrived: two frames in memory at once.
    jobs: queue.Queue = queue.Queue()
    woken = threading.Event()
    workers = Workers(jobs, lambda job: FrameOutcome(job, code="x"), lambda msg, cmd: {}, woken.set)
    workers.start()
    try:
        pixels = np.zeros((4, 64, 64), np.uint16)
        alive = weakref.ref(pixels)
        job = FrameJob([b"p"], Message("frame", {"frame_id": "f1", "bands": [], "scale": 1.0},
                                       {"data": pixels}), time.monotonic())
        jobs.put(job)
        assert woken.wait(10)
        (outcome,) = list(workers.results())
        assert outcome.job is job
        del job, outcome, pixels
        gc.collect()
        assert alive() is None, "the idle frame worker still holds the last frame"
    finally:
        workers.stop()
        assert workers.join(5)


def test_a_product_goes_to_libzmq_in_parts_small_enough_for_curve_to_copy(tmp_path):
    # CURVE encrypts a message part by part into copies of its own: a kept frame's 36 MB tile as
    # one part would cost two more copies of it while the next frame is processed.
    bus = Bus(config_from_dict({"security": {"insecure": True}}, base_dir=tmp_path))
    try:
        tile = np.zeros((13, 512, 1024), np.uint16)                    # 13.6 MB
        bus.push_product(Message("product", {"frame_id": "f1", "priority": 1},
                                 {"mask_png": b"png", "tile_0": tile}))
        (pending,) = bus.outboxes["products"].items
        arrays = pending.parts[1:]
        assert len(arrays) == 1 + -(-tile.nbytes // PRODUCT_PART_BYTES)
        assert max(len(p) for p in arrays) <= PRODUCT_PART_BYTES
        assert all(np.shares_memory(np.frombuffer(p, np.uint8), tile) for p in arrays[1:])
        np.testing.assert_array_equal(decode(pending.parts).arrays["tile_0"], tile)
    finally:
        bus.close()


def test_a_spilled_product_is_read_back_as_views_of_one_buffer(tmp_path):
    frame_ = np.arange(3 * 70_000, dtype=np.uint16).reshape(3, 70_000)
    path = spill_product(tmp_path, "kept-1", [b"header", frame_, b"", b"x" * 300])
    parts = read_spilled(path)
    assert parts == [b"header", frame_.tobytes(), b"", b"x" * 300]
    assert all(isinstance(p, memoryview) for p in parts)
    assert len({id(p.obj) for p in parts}) == 1           # one read, no copy per part
    for bad in (path.read_bytes()[:-1], path.read_bytes() + b"\0", b"\x92\xa3abc\xc4\x00", b""):
        path.write_bytes(bad)
        with pytest.raises(ValueError):
            read_spilled(path)


def test_the_simulator_reads_a_process_peak_resident_set():
    from flight_sim.daemon_proc import vm_hwm_mb
    ballast = np.ones(50_000_000, np.uint8)           # touched: resident now
    with open("/proc/self/status") as fh:
        rss_mb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) * 1024 / 1e6
    peak = vm_hwm_mb(os.getpid())
    assert peak is not None and peak >= rss_mb > 50 and ballast[-1] == 1
    assert vm_hwm_mb(2**22 + 12345) is None            # no such process


def test_the_allocator_settings_take_on_glibc():
    # mallopt(M_MMAP_THRESHOLD) and mallopt(M_ARENA_MAX) accepted, malloc_trim callable
    assert tune_allocator() is True
    assert release_memory() in (True, False)


def test_a_product_backlog_waits_on_the_store_with_one_product_in_memory(make_daemon, tmp_path):
    """A downlink that connects but does not read: kept frames' products wait as spilled files
    (pending_products counts them, admission's bound applies), at most one is read back into
    memory, none sits in libzmq's queue beyond the one it is writing; once the downlink reads,
    every product arrives, in order."""
    spill = tmp_path / "spill"
    daemon = make_daemon([1], supervision={"spill_dir": str(spill)},
                         queue={"max_frames": 2, "max_pending_products": 32}).start()
    payload = Payload(daemon.endpoints["frames"])
    downlink = connect(zmq.PULL, daemon.endpoints["products"], "downlink", RCVHWM=1, RCVBUF=65536)
    try:
        data = frame("clear", 1024)[0]                   # 12.6 MB products: more than a socket buffer
        ids = [f"backlog-{i}" for i in range(5)]
        for frame_id in ids:
            decided = payload.outcome(payload.send(frame_id, data))
            assert decided.type == "decision" and decided.body["keep"], decided.body
        status = command(daemon.endpoints["commands"], "status")["result"]
        box = status["outboxes"]["products"]
        assert status["pending_products"] >= 2, status["outboxes"]
        assert box["messages"] <= 1 and box["spilled_waiting"] == status["pending_products"] - box["messages"]
        got = products(downlink, len(ids), timeout=60)
        assert [p.body["frame_id"] for p in got] == ids
        assert all(p.arrays["frame"].shape == data.shape for p in got)
    finally:
        payload.close()
        downlink.close(linger=0)


def test_products_held_in_memory_are_bounded_in_bytes(make_daemon):
    """Without a spill folder kept products wait for the downlink in memory: past
    queue.max_pending_product_bytes of them new frames are refused `queue_full` (however few
    they are), and frames are taken again once the downlink has pulled."""
    daemon = make_daemon([1], queue={"max_frames": 4, "max_pending_products": 32,
                                     "max_pending_product_bytes": 200_000}).start()
    payload = Payload(daemon.endpoints["frames"])
    downlink = None
    try:
        clear = frame("clear", 256)[0]                    # a kept product of ~0.8 MB
        kept = payload.outcome(payload.send("kept-0", clear))
        assert kept.type == "decision" and kept.body["keep"]
        refused = payload.outcome(payload.send("no-room", clear))
        assert refused.type == "error" and refused.body["code"] == "queue_full"
        assert "max_pending_product_bytes" in refused.body["message"]
        downlink = connect(zmq.PULL, daemon.endpoints["products"], "downlink")
        assert [p.body["frame_id"] for p in products(downlink, 1)] == ["kept-0"]
        time.sleep(0.3)
        assert payload.outcome(payload.send("room-again", clear)).type == "decision"
    finally:
        payload.close()
        if downlink is not None:
            downlink.close(linger=0)
