"""CURVE: an authorized key is served in its role only; an unknown key or no key gets nothing processed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.messages import SERVICES
from protocol.security import Curve, KeyFileError, generate_keys
from tests.support import ROOT, ProcessCluster, free_port
from triptych.client import Client, GenerationError

pytestmark = pytest.mark.e2e

MODEL = "sd-tiny"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """node may register as a node, alice may send requests (both, in authorized/); mallory may do neither."""
    folder = tmp_path_factory.mktemp("keys")
    for name in ("broker", "node", "alice", "mallory"):
        generate_keys(folder, name)
    for subfolder, names in (("authorized", ("node", "alice")), ("nodes", ("node",)), ("clients", ("alice",))):
        (folder / subfolder).mkdir()
        for name in names:
            shutil.copy(folder / f"{name}.key", folder / subfolder / f"{name}.key")
    return folder


@pytest.fixture(scope="module")
def secure(checkpoints, keys, tmp_path_factory) -> Iterator[ProcessCluster]:
    """A broker that admits node's key as a node and alice's as a client, and nodes with node's key."""
    procs = ProcessCluster(tmp_path_factory.mktemp("curve-logs"))
    broker_flags = ["--curve-secret", str(keys / "broker.key_secret")]
    broker_flags += ["--curve-nodes", str(keys / "nodes"), "--curve-clients", str(keys / "clients")]
    procs._spawn("broker", ["triptych", "broker", "--bind", procs.address, *broker_flags])
    node_flags = ["--curve-secret", str(keys / "node.key_secret"), "--curve-broker", str(keys / "broker.key")]
    try:
        for service in SERVICES:
            procs.start_node(service, checkpoints[MODEL], *node_flags)
        deadline = time.monotonic() + 180
        curve = Curve(secret_file=keys / "alice.key_secret", broker_public_file=keys / "broker.key")
        with Client(procs.address, curve=curve) as client:
            while {n["service"] for n in _nodes(client)} != set(SERVICES):
                assert time.monotonic() < deadline, procs.logs()
                procs.check_alive()
                time.sleep(0.3)
        yield procs
    finally:
        procs.stop()


def _nodes(client: Client) -> list[dict]:
    try:
        return client.status(timeout=2).nodes
    except GenerationError:
        return []


def _generate(procs: ProcessCluster, *flags: str, timeout: str = "60") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "triptych", "generate", "a key", "--model", MODEL, "--steps", "2"]
    command += ["--seed", "1", "--broker", procs.address, "--timeout", timeout, "--out", str(procs.log_dir), *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_authorized_key_is_served(secure, keys):
    result = _generate(
        secure, "--curve-secret", str(keys / "alice.key_secret"), "--curve-broker", str(keys / "broker.key")
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).read_bytes().startswith(b"\x89PNG")


def test_unknown_key_is_refused(secure, keys):
    flags = ("--curve-secret", str(keys / "mallory.key_secret"), "--curve-broker", str(keys / "broker.key"))
    started = time.monotonic()
    result = _generate(secure, *flags, timeout="4")
    assert result.returncode != 0 and result.stdout == ""
    assert "authentication failed" in result.stderr
    assert time.monotonic() - started < 30


def test_no_key_is_refused(secure):
    result = _generate(secure, timeout="4")
    assert result.returncode != 0 and result.stdout == ""
    assert "did not answer" in result.stderr


def test_neither_an_unknown_key_nor_a_client_key_can_register_as_a_node(secure, keys, checkpoints):
    """A node with an unauthorized key, or with a key admitted only as a client, never shows up in the broker's list."""
    intruders = {}
    for key, name in (("mallory", "intruder"), ("alice", "client-posing")):
        flags = ["--curve-secret", str(keys / f"{key}.key_secret"), "--curve-broker", str(keys / "broker.key")]
        intruders[name] = secure.start_node("decoder", checkpoints[MODEL], *flags, "--name", name)
    try:
        deadline = time.monotonic() + 120
        for name, intruder in intruders.items():
            while not any(f"serving model {name}" in log.read_text() for log in secure.log_dir.glob("decoder-*.log")):
                assert time.monotonic() < deadline and intruder.poll() is None, secure.logs()
                time.sleep(0.3)
        time.sleep(3)  # several registration attempts and heartbeats
        curve = Curve(secret_file=keys / "alice.key_secret", broker_public_file=keys / "broker.key")
        with Client(secure.address, curve=curve) as client:
            assert not {"intruder", "client-posing"} & {n["model"] for n in client.status().nodes}
        broker_log = next(secure.log_dir.glob("broker-*.log")).read_text()
        assert "refusing ready" in broker_log  # the client key got through CURVE: its roles stopped it
    finally:
        for intruder in intruders.values():
            intruder.terminate()
            intruder.wait(timeout=15)


def test_a_node_key_cannot_send_requests(secure, keys):
    flags = ("--curve-secret", str(keys / "node.key_secret"), "--curve-broker", str(keys / "broker.key"))
    result = _generate(secure, *flags, timeout="4")
    assert result.returncode != 0 and result.stdout == ""
    assert "did not answer" in result.stderr
    assert "refusing generate" in next(secure.log_dir.glob("broker-*.log")).read_text()


def test_a_key_file_is_written_readable_by_its_owner_from_the_start(tmp_path, monkeypatch):
    import os
    import stat

    monkeypatch.setattr(os, "chmod", lambda *args, **kwargs: None)  # nothing may narrow it afterwards
    old = os.umask(0o022)
    try:
        public, secret = generate_keys(tmp_path, "me")
    finally:
        os.umask(old)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    with pytest.raises(KeyFileError, match="already exists"):
        generate_keys(tmp_path, "me")  # a key pair is never replaced


def test_up_with_curve_serves_authorized_clients_only(checkpoints, keys, tmp_path):
    """`triptych up` with the broker's keys: outside clients need an authorized key, its own nodes get one."""
    import os
    import signal

    address = f"tcp://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "triptych", "up", "--model", str(checkpoints[MODEL]), "--bind", address]
    command += ["--curve-secret", str(keys / "broker.key_secret"), "--curve-authorized", str(keys / "authorized")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    up = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = up.stdout.readline()
        assert "ready" in line, up.stderr.read() if up.poll() is not None else line

        def generate(secret: str, timeout: str) -> subprocess.CompletedProcess:
            flags = ["--curve-secret", str(keys / secret), "--curve-broker", str(keys / "broker.key")]
            command = [sys.executable, "-m", "triptych", "generate", "a key", "--steps", "2", "--seed", "1"]
            command += ["--broker", address, "--timeout", timeout, "--out", str(tmp_path), *flags]
            return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)

        served = generate("alice.key_secret", "60")
        assert served.returncode == 0, served.stderr
        assert Path(served.stdout.strip()).read_bytes().startswith(b"\x89PNG")
        refused = generate("mallory.key_secret", "4")
        assert refused.returncode != 0 and "authentication failed" in refused.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=30)
    assert up.returncode == 0


def test_up_curve_flags_come_in_pairs(keys):
    command = [sys.executable, "-m", "triptych", "up", "--model", "unused", "--curve-secret", str(keys / "broker.key")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2 and "both --curve-secret and --curve-authorized" in result.stderr
    command += ["--curve-authorized", str(keys / "authorized")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 1 and "holds no secret key" in result.stderr
