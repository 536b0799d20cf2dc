"""Several hosts: broker, denoiser, encoder+decoder and client each in their own network namespace.

The namespaces are the test's own hosts, joined by a bridge on a private subnet that exists only
inside them; nothing leaves this machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, ProcessCluster, max_pixel_difference

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

SUBNET = "10.231.77"
HOSTS = {"broker": 1, "gpu": 2, "cpu": 3, "laptop": 4}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def hosts() -> Iterator[dict[str, str]]:
    """Namespace name per host, all on one bridge; removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    tag = uuid.uuid4().hex[:6]
    switch = f"tt-sw-{tag}"
    names = {host: f"tt-{host}-{tag}" for host in HOSTS}
    try:
        _ip("netns", "add", switch)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create network namespaces here: {exc.stderr.strip()}")
    try:
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        for host, number in HOSTS.items():
            ns = names[host]
            _ip("netns", "add", ns)
            _ip("link", "add", f"v{number}-{tag}", "netns", switch, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", switch, "link", "set", f"v{number}-{tag}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{number}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield names
    finally:
        for ns in [*names.values(), switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_four_hosts(hosts, checkpoints, reference, tmp_path):
    model = checkpoints["sd-tiny"]
    address = f"tcp://{SUBNET}.{HOSTS['broker']}:5555"
    on = {host: ["ip", "netns", "exec", ns] for host, ns in hosts.items()}
    procs = ProcessCluster(tmp_path / "logs", address=address)
    try:
        procs.start_broker(bind=address, prefix=on["broker"])
        procs.start_node("denoiser", model, prefix=on["gpu"])
        procs.start_node("encoder", model, prefix=on["cpu"])
        procs.start_node("decoder", model, prefix=on["cpu"])
        command = [*on["laptop"], sys.executable, "-m", "triptych", "generate", "a boat on a lake"]
        command += ["--broker", address, "--steps", "4", "--seed", "9", "--out", str(tmp_path), "--timeout", "180"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
        assert result.returncode == 0, f"{result.stderr}\n{procs.logs()}"
        (path,) = result.stdout.split()
        expected = reference(model, 9, prompt="a boat on a lake", num_inference_steps=4)
        assert max_pixel_difference(Path(path), expected) <= 1
    finally:
        procs.stop()
