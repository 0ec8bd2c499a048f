"""Who may speak to the daemon (issue 15): a real daemon process on real sockets with CURVE and ZAP,
attacked as a stranger, a plain client and a peer of the wrong role would; after each attack it
still serves a good frame and `status`. Plus the anti-replay counter and key generation."""
from __future__ import annotations

import json
import os
import stat
import time

import pytest
import zmq
import zmq.auth

from shared.curve import client_keys, generate_keypair
from shared.messages import Message, decode, encode
from test_daemon import (KEY_DIR, REPLY_TIMEOUT_S, DaemonProcess, Payload, bundles, cli,  # noqa: F401
                         command, command_message, connect, frame, offline_install, products)

pytestmark = pytest.mark.timeout(180)

SILENCE_S = 1.5          # what "gets nothing" waits: several telemetry intervals (0.2 s)
SOCKET_KIND = {"frames": zmq.DEALER, "commands": zmq.DEALER, "products": zmq.PULL, "telemetry": zmq.SUB}


@pytest.fixture(scope="module")
def stranger(tmp_path_factory):
    """A well-formed CURVE pair the daemon was never told about, with the daemon's public key."""
    folder = tmp_path_factory.mktemp("stranger")
    generate_keypair(folder, "operator")
    (folder / "daemon.key").write_bytes((KEY_DIR / "daemon.key").read_bytes())
    return client_keys(folder, "operator")


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, bundles):
    """One daemon with CURVE on (the harness's key set), serving v1, a payload and a downlink."""
    root = tmp_path_factory.mktemp("guarded")
    offline_install(root / "store", bundles.public, bundles.build(1))
    daemon = DaemonProcess(root, bundles.public).start()
    payload = Payload(daemon.endpoints["frames"])
    downlink = connect(zmq.PULL, daemon.endpoints["products"], "downlink")
    try:
        yield daemon, payload, downlink
    finally:
        payload.close()
        downlink.close()
        daemon.cleanup()


def _still_serves(daemon, payload, downlink) -> dict:
    """A good frame is decided and kept, its product reaches the real downlink, status answers."""
    sent = payload.send(f"good-{time.monotonic_ns()}", frame("clear", 64)[0])
    decision = payload.outcome(sent)
    assert decision.type == "decision" and decision.body["keep"] is True
    assert [p.body["frame_id"] for p in products(downlink, 1)] == [decision.body["frame_id"]]
    status = command(daemon.endpoints["commands"], "status")
    assert status["ok"], status
    return status["result"]


def _attacker(kind: int, endpoint: str, who, **options) -> zmq.Socket:
    """A socket connected as `who`: a role name (that role's real keys), a ClientKeys, or None."""
    if who is None or isinstance(who, str):
        return connect(kind, endpoint, who, **options)
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name), value)
    who.apply(sock)
    sock.connect(endpoint)
    return sock


def _attack(guarded, socket_name: str, who) -> list:
    """Whatever reaches a peer `who` on `socket_name` within SILENCE_S while it does what that
    socket is for (send a frame or a command; wait for products or telemetry)."""
    daemon, payload, downlink = guarded
    endpoint = daemon.endpoints[socket_name]
    options = {"SUBSCRIBE": b""} if socket_name == "telemetry" else {}
    if socket_name == "frames":
        options["ROUTING_ID"] = b"payload-1"           # the real payload's id, to steal its replies
    sock = _attacker(SOCKET_KIND[socket_name], endpoint, who, **options)
    got = []
    try:
        if socket_name == "frames":
            data = frame("clear", 64)[0]
            sock.send_multipart(encode(Message("frame", {"frame_id": "rogue", "bands": frame("clear", 64)[1],
                                                         "scale": 1e-4}, {"data": data})), zmq.NOBLOCK)
        elif socket_name == "commands":
            sock.send_multipart(encode(command_message("shutdown")), zmq.NOBLOCK)
        elif socket_name == "products":      # a kept frame's product goes to the real downlink only
            bait = payload.outcome(payload.send(f"bait-{time.monotonic_ns()}", frame("clear", 64)[0]))
            assert [p.body["frame_id"] for p in products(downlink, 1)] == [bait.body["frame_id"]]
        deadline = time.monotonic() + SILENCE_S
        while time.monotonic() < deadline:
            if sock.poll(100):
                got.append(sock.recv_multipart())
    except zmq.Again:
        pass                                  # no connection took the message: nothing sent
    finally:
        sock.close(linger=0)
    return got


@pytest.mark.parametrize("socket_name", ["frames", "commands", "products", "telemetry"])
def test_an_unknown_key_and_a_plain_client_get_nothing(guarded, stranger, socket_name):
    daemon, payload, downlink = guarded
    before = _still_serves(*guarded)["security"]
    assert before["mode"] == "curve" and before["keys"]["operator"] == 1
    assert _attack(guarded, socket_name, stranger) == []
    assert _attack(guarded, socket_name, None) == []          # no CURVE at all
    after = _still_serves(*guarded)["security"]
    # ZAP refused the stranger; libzmq refused the plain client before ZAP (a monitor counts it).
    assert after["refused"][socket_name] > before["refused"][socket_name]
    assert after["handshake_failed"][socket_name] > before["handshake_failed"][socket_name]
    assert daemon.proc.poll() is None


@pytest.mark.parametrize("socket_name,role", [
    ("commands", "payload"),       # a payload key cannot command (here: shutdown)
    ("commands", "telemetry"),
    ("products", "telemetry"),     # a telemetry key cannot take products
    ("products", "payload"),
    ("frames", "downlink"),        # a downlink key cannot send frames nor take the payload's replies
    ("telemetry", "operator"),     # each role is its own: an operator key does not read telemetry
])
def test_a_key_of_another_role_gets_nothing(guarded, socket_name, role):
    daemon, payload, downlink = guarded
    assert _attack(guarded, socket_name, role) == []
    status = _still_serves(*guarded)
    assert status["state"] == "serving" and daemon.proc.poll() is None


def test_a_rogue_pull_without_the_downlink_key_gets_no_product(guarded, stranger):
    daemon, payload, downlink = guarded
    rogue = _attacker(zmq.PULL, daemon.endpoints["products"], stranger)
    try:
        for i in range(6):                      # one at a time: the queue holds 4
            assert payload.outcome(payload.send(f"share-{i}", frame("clear", 64)[0])).body["keep"]
        got = products(downlink, 6)
        assert sorted(p.body["frame_id"] for p in got) == [f"share-{i}" for i in range(6)]
        assert not rogue.poll(300)              # a connected rogue would have taken half
    finally:
        rogue.close(linger=0)


def test_the_right_keys_get_telemetry_with_the_refusal_counts(guarded):
    daemon, _, _ = guarded
    sub = connect(zmq.SUB, daemon.endpoints["telemetry"], "telemetry", SUBSCRIBE=b"")
    try:
        assert sub.poll(REPLY_TIMEOUT_S * 1000)
        beat = decode(sub.recv_multipart())
    finally:
        sub.close()
    assert beat.type == "telemetry" and beat.body["security"]["mode"] == "curve"
    assert set(beat.body["security"]["refused"]) == {"frames", "commands", "products", "telemetry"}


def _send(sock: zmq.Socket, msg: Message) -> dict:
    sock.send_multipart(encode(msg))
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while time.monotonic() < deadline:
        if sock.poll(200):
            reply = decode(sock.recv_multipart())
            if reply.ref == msg.id:
                return reply.body
    raise AssertionError(f"no reply to {msg.body['name']}")


def test_a_replayed_command_is_refused_even_after_a_restart(tmp_path, bundles):
    offline_install(tmp_path / "store", bundles.public, bundles.build(1))
    daemon = DaemonProcess(tmp_path, bundles.public).start()
    try:
        sock = connect(zmq.DEALER, daemon.endpoints["commands"], "operator")
        recorded = command_message("set_policy", {"policy": {"rules": [], "default": {"keep": False}}})
        first = _send(sock, recorded)
        assert first["code"] != "replayed"
        again = _send(sock, recorded)                        # the same message, sent once more
        assert again["ok"] is False and again["code"] == "replayed" and "not above" in again["error"]
        older = command_message("status")
        older.body["counter"] = recorded.body["counter"] - 1
        assert _send(sock, older)["code"] == "replayed"
        missing = Message("command", {"name": "status"})
        refused = _send(sock, missing)
        assert refused["code"] == "bad_message" and "body.counter" in refused["error"]
        status = command(daemon.endpoints["commands"], "status")       # a fresh counter: served
        assert status["ok"] and status["result"]["security"]["replayed"] == 2
        sock.close()
        daemon.stop()
        # The last counter survived the restart: the recording is still refused.
        daemon.start()
        sock = connect(zmq.DEALER, daemon.endpoints["commands"], "operator")
        assert _send(sock, recorded)["code"] == "replayed"
        sock.close()
        payload = Payload(daemon.endpoints["frames"])
        try:
            assert payload.outcome(payload.send("after-replay", frame("clear", 64)[0])).type == "decision"
        finally:
            payload.close()
    finally:
        daemon.cleanup()


# ------------------------------------------------------------------------------------ keys and config
def test_keys_generate_writes_a_pair_with_a_private_secret(tmp_path):
    out = cli("keys", "generate", str(tmp_path / "k"), "--role", "operator", "--json")
    assert out.returncode == 0, out.stderr
    written = json.loads(out.stdout)["keys"][0]
    public, secret = tmp_path / "k" / "operator.key", tmp_path / "k" / "operator.key_secret"
    assert (written["public_key_file"], written["secret_key_file"]) == (str(public), str(secret))
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(public).st_mode) == 0o644 and "secret-key" not in public.read_text()
    pair = zmq.auth.load_certificate(secret)                  # ZeroMQ's own loader reads it
    assert pair[0] == written["public_key"].encode() and len(pair[1]) == 40
    again = cli("keys", "generate", str(tmp_path / "k"), "--role", "operator")
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    everyone = cli("keys", "generate", str(tmp_path / "all"), "--role", "all", "--json")
    assert [k["name"] for k in json.loads(everyone.stdout)["keys"]] == [
        "daemon", "payload", "downlink", "operator", "telemetry"]
    usage = cli("keys", "generate", str(tmp_path / "x"), "--role", "admin")
    assert usage.returncode == 2 and "admin" in usage.stderr


def test_a_bad_key_file_is_named_and_stops_the_daemon_and_the_cli(tmp_path, bundles):
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    (keys_dir / "operator.key_secret").write_text("curve\n    public-key = \"short\"\n")
    (keys_dir / "daemon.key").write_bytes((KEY_DIR / "daemon.key").read_bytes())
    bad = cli("status", "--endpoint", "ipc:///nowhere", "--keys", str(keys_dir), "--timeout", "1")
    assert bad.returncode == 1 and "operator.key_secret" in bad.stderr and "Traceback" not in bad.stderr
    missing = cli("status", "--endpoint", "ipc:///nowhere", "--keys", str(tmp_path / "none"))
    assert missing.returncode == 1 and "operator.key_secret" in missing.stderr
    # The daemon: a malformed allowed key and a missing secret key, each named with its field.
    for field, value, named in [("operator", str(keys_dir / "operator.key_secret"), "security.operator"),
                                ("secret_key", str(tmp_path / "gone.key_secret"), "security.secret_key")]:
        (tmp_path / field).mkdir()
        config = DaemonProcess(tmp_path / field, bundles.public, security={field: value}).config_path
        run = cli("run", "--config", str(config))
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        assert named in run.stderr and value in run.stderr


def test_insecure_must_be_said_and_is_reported(tmp_path, bundles):
    daemon = DaemonProcess(tmp_path, bundles.public, secure=False).start()      # [security] insecure = true
    try:
        plain = connect(zmq.DEALER, daemon.endpoints["commands"], None)          # no keys at all
        status = _send(plain, Message("command", {"name": "status"}))            # nor a counter
        plain.close()
        assert status["ok"] and status["result"]["security"]["mode"] == "insecure"
        assert "WARNING" in daemon.log() and "insecure = true" in daemon.log()
    finally:
        daemon.cleanup()


def test_the_cli_without_or_with_a_wrong_key_says_why_it_got_no_answer(guarded, tmp_path):
    daemon, _, _ = guarded
    ep = daemon.endpoints["commands"]
    plain = cli("status", "--endpoint", ep, "--timeout", "1", "--retries", "0")
    assert plain.returncode == 4 and "--keys" in plain.stderr
    generate_keypair(tmp_path, "operator")                        # a stranger's operator pair
    (tmp_path / "daemon.key").write_bytes((KEY_DIR / "daemon.key").read_bytes())
    wrong = cli("status", "--endpoint", ep, "--keys", str(tmp_path), "--timeout", "1", "--retries", "0")
    assert wrong.returncode == 4 and "is this operator key allowed" in wrong.stderr
    right = cli("status", "--endpoint", ep, "--keys", str(KEY_DIR), "--json")
    assert right.returncode == 0 and json.loads(right.stdout)["security"]["mode"] == "curve"
