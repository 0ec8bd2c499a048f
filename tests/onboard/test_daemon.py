"""The daemon as a real process on real sockets, driven as the payload, the downlink and the
operator would drive it. Every daemon is killed in teardown; every wait has a timeout."""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from onboard_models import BANDS_6
from shared.curve import ROLES, client_keys, generate_key_set
from shared.messages import Message, decode, encode
from test_store import BundleFactory, frame

# A hung OpenVINO call or socket wait fails its test instead of stalling the suite.
pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60
REPLY_TIMEOUT_S = 20

# One CURVE key set for every daemon of the session: the daemon's pair and one per peer role.
KEY_DIR = generate_key_set(tempfile.mkdtemp(prefix="eod-keys-"))
atexit.register(shutil.rmtree, KEY_DIR, True)


def keys(role: str):
    """A peer's client keys (shared.curve.ClientKeys) for the daemons the harness starts."""
    return client_keys(KEY_DIR, role)


def connect(kind: int, endpoint: str, role: str | None, **options) -> zmq.Socket:
    """A socket of `kind` connected to `endpoint` as `role` (None: no CURVE, as a stranger)."""
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name), value)
    if role is not None:
        keys(role).apply(sock)
    sock.connect(endpoint)
    return sock


def command_message(name: str, args: dict | None = None) -> Message:
    """A COMMAND built by hand, with the anti-replay counter a client must send."""
    return Message("command", {"name": name, "args": args or {}, "counter": time.time_ns()})


# ------------------------------------------------------------------------------------ harness
class DaemonProcess:
    """`python -m onboard run --config ... --json` in a subprocess; endpoints from its stdout."""

    def __init__(self, root: Path, public_key: Path, secure: bool = True, **sections):
        self.root = Path(root)
        self.sock_dir = Path(tempfile.mkdtemp(prefix="eod-", dir="/tmp"))   # ipc paths stay short
        self.config_path = self.root / "daemon.toml"
        self.public_key = Path(public_key)
        config = {
            "daemon": {"name": "onboard-test", "log_level": "INFO"},
            "endpoints": {n: f"ipc://{self.sock_dir}/{n}" for n in ("frames", "products", "commands",
                                                                      "telemetry")},
            "store": {"root": str(self.root / "store"), "public_key": str(public_key),
                      "uploads": str(self.root / "uploads")},
            "telemetry": {"interval_s": 0.2},
            "shutdown": {"drain_timeout_s": 20.0},
            "security": ({"secret_key": str(KEY_DIR / "daemon.key_secret"),
                          **{role: str(KEY_DIR / f"{role}.key") for role in ROLES}}
                         if secure else {"insecure": True}),
        }
        for section, values in sections.items():
            config.setdefault(section, {}).update(values)
        lines = []
        for section, values in config.items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        self.config_path.write_text("\n".join(lines) + "\n")
        self.endpoints = config["endpoints"]
        self.proc: subprocess.Popen | None = None
        self.ready: dict = {}

    def start(self) -> "DaemonProcess":
        self.stderr = open(self.root / "daemon.stderr", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "onboard", "run", "--config",
                                      str(self.config_path), "--json"], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=self.stderr)
        line = self._read_line(START_TIMEOUT_S)
        self.ready = json.loads(line)
        assert set(self.ready["endpoints"]) == {"frames", "products", "commands", "telemetry"}
        return self

    def _read_line(self, timeout: float) -> str:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        buf = b""
        deadline = time.monotonic() + timeout
        while not buf.endswith(b"\n"):
            if self.proc.poll() is not None and not sel.select(0):
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon not ready within {timeout} s:\n{self.log()}")
            if sel.select(0.1):
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    continue
                buf += chunk
        sel.close()
        return buf.decode()

    def log(self) -> str:
        self.stderr.flush()
        return (self.root / "daemon.stderr").read_text(errors="replace")[-4000:]

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc:
            self.proc.stdout.close()
            self.stderr.close()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.sock_dir, ignore_errors=True)


class Payload:
    """The payload side of the frames socket: a DEALER with a fixed routing id."""

    def __init__(self, endpoint: str, routing_id: bytes = b"payload-1", role: str | None = "payload"):
        self.sock = connect(zmq.DEALER, endpoint, role, ROUTING_ID=routing_id)
        self.inbox: list[Message] = []

    def close(self) -> None:
        self.sock.close(linger=0)

    def send(self, frame_id: str, data: np.ndarray, bands=BANDS_6, scale: float = 1e-4) -> str:
        msg = Message("frame", {"frame_id": frame_id, "bands": list(bands), "scale": scale,
                                "scene": "test", "index": 0, "acquired": time.time()},
                      {"data": data})
        self.sock.send_multipart(encode(msg), copy=False)
        return msg.id

    def send_raw(self, parts: list) -> None:
        self.sock.send_multipart(parts)

    def send_unchecked(self, frame_id: str, data: np.ndarray, bands) -> str:
        """A frame built by hand, as a buggy payload would: `encode` refuses bad arrays itself."""
        msg_id = uuid.uuid4().hex
        header = {"type": "frame", "schema": 1, "id": msg_id, "ref": None, "ts": time.time(),
                  "source": "payload", "body": {"frame_id": frame_id, "bands": list(bands), "scale": 1e-4},
                  "arrays": [{"name": "data", "dtype": data.dtype.name, "shape": list(data.shape)}]}
        self.sock.send_multipart([msgpack.packb(header), np.ascontiguousarray(data).tobytes()])
        return msg_id

    def _pump(self, timeout: float) -> bool:
        if not self.sock.poll(int(timeout * 1000)):
            return False
        while self.sock.poll(0):
            self.inbox.append(decode(self.sock.recv_multipart()))
        return True

    def replies(self, ref: str | None) -> list[Message]:
        return [m for m in self.inbox if m.ref == ref]

    def outcomes(self, ids: list[str], timeout: float = REPLY_TIMEOUT_S) -> dict[str, list[Message]]:
        """Every message about each frame, once each has its outcome: a refusal (ERROR with no
        ACK) or, after an ACK, a DECISION or an ERROR. A grace period catches duplicates."""
        deadline = time.monotonic() + timeout
        while not all(self._has_outcome(i) for i in ids):
            if time.monotonic() > deadline:
                missing = [i for i in ids if not self._has_outcome(i)]
                raise AssertionError(f"no outcome within {timeout} s for {len(missing)} frames")
            self._pump(0.1)
        self._pump(0.3)
        return {i: self.replies(i) for i in ids}

    def _has_outcome(self, msg_id: str) -> bool:
        return any(m.type in ("decision", "error") for m in self.replies(msg_id))

    def outcome(self, msg_id: str, timeout: float = REPLY_TIMEOUT_S) -> Message:
        msgs = self.outcomes([msg_id], timeout)[msg_id]
        return assert_one_outcome(msgs)

    def next_unreferenced(self, timeout: float = REPLY_TIMEOUT_S) -> Message:
        """The reply to a message so broken that it has no id (garbage bytes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.inbox:
                if m.ref is None:
                    self.inbox.remove(m)
                    return m
            self._pump(0.1)
        raise AssertionError("no reply to the garbage message")


def assert_one_outcome(msgs: list[Message]) -> Message:
    """Exactly one outcome, and an ACK before it only if it was accepted."""
    outcomes = [m for m in msgs if m.type in ("decision", "error")]
    acks = [m for m in msgs if m.type == "ack"]
    assert len(outcomes) == 1, [(m.type, m.body) for m in msgs]
    assert len(acks) <= 1
    if outcomes[0].type == "decision":
        assert len(acks) == 1 and acks[0].body["accepted"] is True and acks[0].body["code"] == "ok"
    return outcomes[0]


def command(endpoint: str, name: str, args: dict | None = None, timeout: float = 60) -> dict:
    from shared.client import CommandClient
    with CommandClient(endpoint, timeout_s=timeout, keys=keys("operator")) as client:
        return client.request(name, args)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onboard", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def offline_install(store: Path, key: Path, bundle: Path) -> dict:
    result = cli("install", str(bundle), "--store", str(store), "--key", str(key), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> BundleFactory:
    return BundleFactory(tmp_path_factory.mktemp("bundles"))


@contextlib.contextmanager
def serving(root: Path, public_key: Path, bundle: Path):
    """A daemon serving `bundle` (installed offline first), a payload and a downlink on it."""
    offline_install(root / "store", public_key, bundle)
    daemon = DaemonProcess(root, public_key, limits={"max_message_bytes": 4 << 20})
    payload = downlink = None
    try:
        daemon.start()
        payload = Payload(daemon.endpoints["frames"])
        downlink = connect(zmq.PULL, daemon.endpoints["products"], "downlink")
        yield daemon, payload, downlink
    finally:
        for sock in (payload, downlink):
            if sock is not None:
                sock.close()
        daemon.cleanup()


@pytest.fixture(scope="module")
def served(tmp_path_factory, bundles):
    """One daemon serving v1, a payload and a downlink on it."""
    with serving(tmp_path_factory.mktemp("served"), bundles.public, bundles.build(1)) as peers:
        yield peers


@pytest.fixture
def make_daemon(tmp_path, bundles):
    started = []

    def make(store_versions=(), **sections) -> DaemonProcess:
        root = tmp_path / f"d{len(started)}"
        root.mkdir()
        for version in store_versions:
            offline_install(root / "store", bundles.public, bundles.build(version))
        daemon = DaemonProcess(root, bundles.public, **sections)
        started.append(daemon)
        return daemon
    yield make
    for daemon in started:
        daemon.cleanup()


def products(downlink, n: int, timeout: float = REPLY_TIMEOUT_S) -> list[Message]:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        if downlink.poll(100):
            out.append(decode(downlink.recv_multipart()))
    return out


# ------------------------------------------------------------------------------------ serving
def test_frames_with_known_truth_get_the_right_decisions(served):
    daemon, payload, downlink = served
    assert daemon.ready["model"]["id"] == "cloud-test" and daemon.ready["model"]["version"] == 1
    cloudy = payload.send("cloudy-1", frame("cloudy")[0])
    clear = payload.send("clear-1", frame("clear")[0])
    outcomes = payload.outcomes([cloudy, clear])
    d_cloudy, d_clear = (assert_one_outcome(outcomes[i]) for i in (cloudy, clear))
    assert d_cloudy.type == "decision" and d_cloudy.body["keep"] is False
    assert d_cloudy.body["frame_id"] == "cloudy-1" and "cloud" in d_cloudy.body["reason"]
    assert d_cloudy.body["stats"]["fractions"]["cloud"] > 0.9
    assert d_clear.type == "decision" and d_clear.body["keep"] is True
    assert d_clear.body["priority"] == 1                 # over 5% shadow: the policy's rule 1
    assert d_clear.body["model"] == {"id": "cloud-test", "version": 1}
    timings = d_clear.body["timings_ms"]
    assert timings["queue"] + timings["process"] <= timings["total"]      # accepted -> outcome
    # Only the kept frame reaches the downlink, with its products.
    got = products(downlink, 1)
    assert [p.body["frame_id"] for p in got] == ["clear-1"]
    assert got[0].body["priority"] == 1 and got[0].arrays
    assert products(downlink, 1, timeout=0.5) == []


def _bad_frames():
    good, _ = frame("clear", 64)
    header = lambda frame_id, shape, dtype="uint16": encode(Message(       # noqa: E731
        "frame", {"frame_id": frame_id, "bands": list(BANDS_6), "scale": 1e-4},
        {"data": np.zeros(shape, dtype)}))[0]
    nan = good.astype(np.float32)
    nan[0, 5, 5] = np.nan
    return {
        # name: (parts or (data, bands), expected code, words the message must contain)
        "wrong_dtype": ((good.astype(np.uint8), BANDS_6), "invalid_frame", "uint8"),
        "wrong_ndim": ((good[0], BANDS_6), "invalid_frame", "dimensions"),
        "band_count": ((good[:4], BANDS_6), "invalid_frame", "6"),
        "missing_band": ((good[:5], BANDS_6[:5]), "invalid_frame", "B12"),
        "unknown_band": ((good, (*BANDS_6[:5], "B99")), "invalid_frame", "B99"),
        "empty": ((good[:, :0], BANDS_6), "invalid_frame", "empty"),
        "nan": ((nan, BANDS_6), None, "NaN"),                          # accepted, then refused
        "oversize": ((np.zeros((6, 1024, 512), np.uint16), BANDS_6), "too_large", "limit"),   # 6 MB > 4 MB
        "lying_shape": ([header("lie", (6, 64, 64)), b"\0" * 100], "invalid_frame", "bytes"),
        "garbage": ([b"\x93garbage\xff"], "bad_message", "header"),
        "wrong_type": (encode(Message("command", {"name": "status"})), "bad_message", "command"),
    }


@pytest.mark.parametrize("case", list(_bad_frames()))
def test_bad_input_yields_an_error_naming_it_then_daemon_still_serves(served, case):
    daemon, payload, downlink = served
    what, code, words = _bad_frames()[case]
    if isinstance(what, tuple):
        msg_id = payload.send_unchecked(f"bad-{case}", what[0], what[1])
        msgs = payload.outcomes([msg_id])[msg_id]
        error = assert_one_outcome(msgs)
        assert error.body["frame_id"] == f"bad-{case}"
    else:
        payload.send_raw(what)
        error = payload.next_unreferenced() if case == "garbage" else None
        if error is None:
            ref = msgpack.unpackb(what[0])["id"]
            error = assert_one_outcome(payload.outcomes([ref])[ref])
    assert error.type == "error"
    if code is None:      # NaN: accepted at the door (values are checked by the pipeline)
        assert [m.type for m in payload.replies(error.ref)] == ["ack", "error"]
    else:
        assert error.body["code"] == code, error.body
    assert words.lower() in error.body["message"].lower(), error.body
    # ... and the daemon goes on serving.
    good = payload.send(f"after-{case}", frame("cloudy", 64)[0])
    decision = payload.outcome(good)
    assert decision.type == "decision" and decision.body["keep"] is False


def test_commands_answer_with_acks_and_errors(served):
    daemon, payload, downlink = served
    ep = daemon.endpoints["commands"]
    status = command(ep, "status")
    assert status["ok"] and status["code"] == "ok" and status["result"]["model"]["version"] == 1
    assert status["result"]["store"]["active"]["model_id"] == "cloud-test"
    unknown = command(ep, "self_destruct")
    assert unknown["ok"] is False and "self_destruct" in unknown["error"] and "status" in unknown["error"]
    assert unknown["code"] == "unknown_command"
    missing = command(ep, "upload_begin", {"name": "b.tar"})
    assert missing["ok"] is False and "args.size" in missing["error"] and missing["code"] == "bad_args"
    wrong = command(ep, "upload_begin", {"name": "b.tar", "size": "big", "sha256": "0" * 64,
                                         "chunk_size": 10})
    assert wrong["ok"] is False and "args.size" in wrong["error"] and wrong["code"] == "bad_args"
    # Garbage on the commands socket: an ACK {ok: false} naming it, and service goes on.
    sock = connect(zmq.DEALER, ep, "operator")
    try:
        sock.send_multipart([b"\x00\x01not msgpack"])
        assert sock.poll(REPLY_TIMEOUT_S * 1000)
        reply = decode(sock.recv_multipart())
        assert reply.type == "ack" and reply.body["ok"] is False and "bad_message" in reply.body["error"]
        assert reply.body["code"] == "bad_message"
    finally:
        sock.close()
    assert command(ep, "status")["ok"]
    # A REQ client (empty delimiter frame) is answered too.
    req = connect(zmq.REQ, ep, "operator")
    try:
        req.send_multipart(encode(command_message("help")))
        assert req.poll(REPLY_TIMEOUT_S * 1000)
        reply = decode(req.recv_multipart())
        assert reply.body["ok"] and "upload_chunk" in reply.body["result"]["commands"]
    finally:
        req.close()


def test_cli_status_and_generic_command(served):
    daemon, _, _ = served
    result = cli("status", "--config", str(daemon.config_path), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"]["id"] == "cloud-test"
    human = cli("status", "--config", str(daemon.config_path))
    assert "cloud-test v1" in human.stdout
    bad = cli("command", "nonsense", "--config", str(daemon.config_path))
    assert bad.returncode == 1 and "unknown command 'nonsense'" in bad.stdout
    # An offline install into the store the daemon owns is refused, naming the daemon's pid.
    offline = cli("install", str(daemon.root / "none.tar"), "--store", str(daemon.root / "store"),
                  "--key", str(daemon.public_key))
    assert offline.returncode == 1 and f"in use by process {daemon.ready['pid']}" in offline.stderr


def test_telemetry_heartbeats(served):
    daemon, payload, _ = served
    decision = payload.outcome(payload.send("for-telemetry", frame("clear", 64)[0]))
    assert decision.type == "decision"
    sub = connect(zmq.SUB, daemon.endpoints["telemetry"], "telemetry", SUBSCRIBE=b"")
    beats = []
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    try:
        while len(beats) < 3 and time.monotonic() < deadline:
            if sub.poll(200):
                beats.append(decode(sub.recv_multipart()))
    finally:
        sub.close()
    assert len(beats) == 3 and all(b.type == "telemetry" for b in beats)
    seqs = [b.body["seq"] for b in beats]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    body = beats[-1].body
    assert body["model"]["id"] == "cloud-test" and body["model"]["version"] == 1
    assert body["frames"]["decided"] >= 1 and body["queue_depth"] == 0
    assert body["rss_mb"] > 10
    assert {"total", "queue", "process"} <= set(body["latency_ms"])
    assert {"last", "p50", "p95"} <= set(body["latency_ms"]["total"])


def test_set_policy_changes_decisions_and_is_validated(served):
    daemon, payload, downlink = served
    ep = daemon.endpoints["commands"]
    bad = command(ep, "set_policy", {"policy": {"rules": [{"if": {"class": "shipp", "fraction_above": 0.1},
                                                           "then": "keep"}]}})
    assert bad["ok"] is False and "shipp" in bad["error"] and "rules[0]" in bad["error"]
    discard_all = {"rules": [], "default": {"then": "discard"}}
    assert command(ep, "set_policy", {"policy": discard_all})["ok"]
    try:
        assert payload.outcome(payload.send("policy-1", frame("clear", 64)[0])).body["keep"] is False
    finally:
        assert command(ep, "set_policy", {"policy": None})["ok"]      # the bundle's own again
    assert payload.outcome(payload.send("policy-2", frame("clear", 64)[0])).body["keep"] is True
    products(downlink, 1)
