"""Full disks and damaged state: each write path on a real, small filesystem that fills up
(a size-limited tmpfs mounted for the test, unmounted after: skipped, saying why, where
mounting is not permitted), and start-up from a corrupt or truncated state.json.

Every path ends in a refusal or an error event naming the file, never a crash and never a
half-written state: install (extraction, activation), set_policy (a state write), an upload
(begin, chunk record), a kept frame's product spill."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from flight_sim.errors import ScenarioFailed
from flight_sim.soak import SmallDisk
from onboard.errors import CommandFailed
from test_daemon import DaemonProcess, Payload, command, offline_install
from test_store import BundleFactory, frame, open_store, slot_names

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def disk(tmp_path):
    """A 4 MB tmpfs (the soak's SmallDisk: `fill()` takes every free byte, `free()` gives it back)."""
    d = SmallDisk(tmp_path / "disk", 4)
    try:
        d.mount()
    except ScenarioFailed as exc:
        pytest.skip(f"the disk-full tests need a size-limited tmpfs: {exc}")
    yield d
    d.unmount()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> BundleFactory:
    return BundleFactory(tmp_path_factory.mktemp("bundles"))


def no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*.tmp")]


# ------------------------------------------------------------------------------------ store
def test_install_on_a_full_disk_is_refused_and_the_active_model_stays(disk, bundles):
    store = open_store(disk.path / "store", bundles)
    assert store.install(bundles.build(1)).ok
    before = (disk.path / "store" / "state.json").read_bytes()
    slots = slot_names(disk.path / "store")
    disk.fill()
    result = store.install(bundles.build(2))
    assert not result.ok and result.code == "extract_failed", result
    assert "No space left" in result.reason and str(disk.path / "store") in result.reason
    assert (disk.path / "store" / "state.json").read_bytes() == before
    assert slot_names(disk.path / "store") == slots and no_temp_files(disk.path / "store")
    assert store.active().version == 1


def test_a_state_write_on_a_full_disk_keeps_the_old_state_whole(disk, bundles):
    """Activation: the disk fills while the new model is self-tested, so the state write is
    the step that finds no room; and a set_policy's write."""
    from onboard.store import ModelStore, default_pipeline_factory
    real = default_pipeline_factory()
    fills = [True]                                # once: the first install of v2

    def filling_factory(manifest, model_dir):
        if manifest["version"] == 2 and fills:
            fills.pop()
            disk.fill()
        return real(manifest, model_dir)
    store = ModelStore(disk.path / "store", bundles.public, pipeline_factory=filling_factory)
    assert store.install(bundles.build(1)).ok
    state_before = (disk.path / "store" / "state.json").read_bytes()
    result = store.install(bundles.build(2))
    assert not result.ok and result.code == "activation_failed", result
    assert "state.json" in result.reason and "No space left" in result.reason
    assert (disk.path / "store" / "state.json").read_bytes() == state_before
    assert no_temp_files(disk.path / "store") and store.active().version == 1
    disk.fill()                                   # the refused slot's room, taken too
    with pytest.raises(OSError):
        store.set_policy_override({"rules": [], "default": "keep"})
    assert (disk.path / "store" / "state.json").read_bytes() == state_before
    assert no_temp_files(disk.path / "store")
    disk.free()                                   # room again: the same install goes through
    assert store.install(bundles.build(2)).ok


# ------------------------------------------------------------------------------------ uploads
def test_uploads_on_a_full_disk_are_refused_naming_the_file_and_stay_resumable(disk):
    from onboard.uploads import Uploads
    uploads = Uploads(disk.path / "uploads", 64 << 20, 1 << 20)
    big = 8 << 20                                 # more than the 4 MiB disk: refused at begin
    with pytest.raises(CommandFailed) as info:
        uploads.begin("big.tar", big, "0" * 64, 1 << 20)
    assert info.value.code == "disk_full" and "data.part" in str(info.value)
    assert list((disk.path / "uploads").iterdir()) == []          # nothing half-begun left

    data = os.urandom(300_000)
    sha = hashlib.sha256(data).hexdigest()
    up = uploads.begin("b.tar", len(data), sha, 100_000)          # room reserved for all of it
    chunk = lambda i: memoryview(data[i * 100_000:(i + 1) * 100_000])
    digest = lambda i: hashlib.sha256(chunk(i)).hexdigest()
    uploads.chunk(up["upload_id"], 0, digest(0), chunk(0))
    disk.fill()                                   # now even the chunk's record cannot be written
    with pytest.raises(CommandFailed) as info:
        uploads.chunk(up["upload_id"], 1, digest(1), chunk(1))
    assert info.value.code == "disk_full" and "meta.json" in str(info.value)
    assert uploads.status(up["upload_id"])["received"] == [0]     # the record is still whole
    assert no_temp_files(disk.path / "uploads")
    disk.free()
    for i in (1, 2):
        uploads.chunk(up["upload_id"], i, digest(i), chunk(i))
    assert Path(uploads.end(up["upload_id"])["path"]).read_bytes() == data


# ------------------------------------------------------------------------------------ products
def test_a_product_spill_on_a_full_disk_is_an_error_event_naming_it(disk, tmp_path, bundles):
    offline_install(tmp_path / "store", bundles.public, bundles.build(1))
    spill = disk.path / "spill"
    daemon = DaemonProcess(tmp_path, bundles.public, supervision={"spill_dir": str(spill)})
    payload = None
    try:
        daemon.start()
        payload = Payload(daemon.endpoints["frames"])
        clear, bands = frame("clear", 64)              # kept: its product is spilled
        ok = payload.outcome(payload.send("kept-1", clear, bands))
        assert ok.type == "decision" and ok.body["keep"]
        assert (spill / "kept-1.product").is_file()
        disk.fill()
        err = payload.outcome(payload.send("kept-2", clear, bands))
        assert err.type == "error" and err.body["code"] == "disk_full", err.body
        assert str(spill) in err.body["message"] and err.body["frame_id"] == "kept-2"
        cloudy, _ = frame("cloudy", 64)                # discarded: nothing to write, still decided
        assert payload.outcome(payload.send("cloudy-1", cloudy, bands)).type == "decision"
        disk.free()
        again = payload.outcome(payload.send("kept-2", clear, bands))
        assert again.type == "decision" and (spill / "kept-2.product").is_file()
        assert daemon.proc.poll() is None and no_temp_files(spill)
        from onboard.products import read_spilled
        from shared.messages import decode
        product = decode(read_spilled(spill / "kept-2.product"))
        assert product.type == "product" and product.body["frame_id"] == "kept-2"
    finally:
        if payload is not None:
            payload.close()
        daemon.cleanup()


# ------------------------------------------------------------------------------------ state.json
def _two_versions(root: Path, bundles: BundleFactory):
    store = open_store(root, bundles)
    store.install(bundles.build(1))
    store.install(bundles.build(2))
    state = json.loads((root / "state.json").read_text())
    store.close()
    return state


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "deleted"])
def test_a_damaged_state_json_falls_back_to_the_last_good_state(tmp_path, bundles, damage):
    root = tmp_path / "store"
    state = _two_versions(root, bundles)
    path = root / "state.json"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    elif damage == "garbage":
        path.write_bytes(os.urandom(200))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    store = open_store(root, bundles)
    assert (store.active().version, store.previous().version) == (2, 1)
    assert "state.last-good.json" in store.recovered and "state.json" in store.recovered
    assert store.status()["recovered"] == store.recovered
    assert json.loads(path.read_text())["active"] == state["active"]     # the repair is on disk
    assert open_store(root, bundles).recovered is None                   # ... so next time: clean


def test_with_no_good_state_left_the_slots_on_disk_decide(tmp_path, bundles):
    root = tmp_path / "store"
    state = _two_versions(root, bundles)
    (root / "state.json").write_text('{"schema": 1, "active": ')
    (root / "state.last-good.json").write_text("not json")
    store = open_store(root, bundles)
    assert store.active().slot == state["active"] and store.previous().slot == state["previous"]
    assert "slots on disk" in store.recovered


def test_a_missing_active_slot_falls_back_to_the_previous_slot(tmp_path, bundles):
    import shutil
    root = tmp_path / "store"
    state = _two_versions(root, bundles)
    shutil.rmtree(root / "slots" / state["active"])
    store = open_store(root, bundles)
    assert store.active().slot == state["previous"] and store.previous() is None
    assert state["active"] in store.recovered and "missing" in store.recovered


def test_the_daemon_starts_from_a_corrupt_state_json_and_says_so(tmp_path, bundles):
    offline_install(tmp_path / "store", bundles.public, bundles.build(1))
    offline_install(tmp_path / "store", bundles.public, bundles.build(2))
    state_file = tmp_path / "store" / "state.json"
    state_file.write_bytes(state_file.read_bytes()[:25])      # truncated mid-write by a flash fault
    daemon = DaemonProcess(tmp_path, bundles.public)
    try:
        daemon.start()
        assert daemon.ready["model"]["version"] == 2
        status = command(daemon.endpoints["commands"], "status")["result"]
        assert "last good state" in status["store"]["recovered"]
        assert "store state recovered" in daemon.log()
    finally:
        daemon.cleanup()


# ------------------------------------------------------------------------------------ command counters
def test_a_command_counter_that_cannot_be_stored_refuses_the_command(disk):
    """The anti-replay counter ([security]) lives in the store: on a full disk the command is
    refused `disk_full` naming the file (not accepted unprotected, not a crash), and the counter
    is not advanced, so the same command goes through once there is room."""
    from onboard.security import ReplayGuard
    guard = ReplayGuard(disk.path / "store" / "command_counters.json")
    assert guard.admit("operator-key", 1) is None
    disk.fill()
    refused = guard.admit("operator-key", 2)
    assert refused.startswith("disk_full") and "command_counters.json" in refused
    assert no_temp_files(disk.path / "store") and not list((disk.path / "store").glob("*.tmp"))
    disk.free()
    assert guard.admit("operator-key", 2) is None
    assert json.loads((disk.path / "store" / "command_counters.json").read_text()) == {"operator-key": 2}
