"""What several test modules share: real broker and node processes for end-to-end tests, free
ports, and comparisons of images and Prometheus metrics."""

from __future__ import annotations

import contextlib
import io
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from protocol.messages import LOADING, SERVICES
from triptych.client import Client, GenerationError

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_pid(node: str) -> int:
    """Nodes name themselves host:pid."""
    return int(node.rsplit(":", 1)[1])


class ProcessCluster:
    """A broker plus any nodes, each its own OS process, with logs kept for failures."""

    def __init__(self, log_dir: Path, address: str | None = None, prefix: list[str] | None = None) -> None:
        self.address = address or f"tcp://127.0.0.1:{free_port()}"
        self.log_dir = log_dir
        self.prefix = prefix or []  # e.g. ["ip", "netns", "exec", "ns1"]
        self.processes: list[subprocess.Popen] = []
        self.metrics_port: int | None = None  # the broker's Prometheus port, when it serves one
        log_dir.mkdir(parents=True, exist_ok=True)

    def _spawn(self, name: str, args: list[str], prefix: list[str] | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}-{len(self.processes)}.log", "w")  # noqa: SIM115 - lives with the process
        # Many nodes share few cores here: one torch thread each avoids threads spinning against each other.
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        command = [*(self.prefix if prefix is None else prefix), sys.executable, "-m", *args]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.processes.append(process)
        return process

    def start_broker(
        self,
        bind: str | None = None,
        prefix: list[str] | None = None,
        metrics_port: int | None = None,
        flags: list[str] | None = None,
    ) -> subprocess.Popen:
        extra = [] if metrics_port is None else ["--metrics-port", str(metrics_port)]
        self.metrics_port = metrics_port
        command = ["triptych", "broker", "--bind", bind or self.address, *extra, *(flags or [])]
        return self._spawn("broker", command, prefix)

    def start_node(
        self, service: str, model: Path | str, *extra: str, prefix: list[str] | None = None
    ) -> subprocess.Popen:
        args = [f"{service}_node", "--model", str(model), "--broker", self.address, "--log-level", "INFO", *extra]
        return self._spawn(f"{service}-{Path(model).name}", args, prefix)

    def client(self, timeout: float = 120.0) -> Client:
        return Client(self.address, timeout=timeout)

    def nodes(self) -> list[dict]:
        with self.client() as client:
            return client.status(timeout=5.0).nodes

    def wait_for(self, expected: dict[tuple[str, str], int], timeout: float = 180.0) -> list[dict]:
        """Wait until at least ``expected[(service, model)]`` nodes of each are registered and ready."""
        deadline = time.monotonic() + timeout
        nodes: list[dict] = []
        with self.client() as client:
            while time.monotonic() < deadline:
                self.check_alive()
                try:
                    nodes = client.status(timeout=2.0).nodes
                except GenerationError:
                    continue
                have = Counter((n["service"], n["model"]) for n in nodes if n["state"] != LOADING)
                if all(have[key] >= count for key, count in expected.items()):
                    return nodes
                time.sleep(0.3)
        raise TimeoutError(f"nodes did not register in {timeout}s: have {nodes}\n{self.logs()}")

    def check_alive(self) -> None:
        dead = [p for p in self.processes if p.poll() is not None and p.returncode not in (0, -9)]
        if dead:
            raise RuntimeError(f"process exited: {[p.args for p in dead]}\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-tail:]}" for p in sorted(self.log_dir.glob("*.log")))

    def generate_cli(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "triptych", "generate", *args, "--broker", self.address]
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def serving(log_dir: Path, models: Iterable[Path], per_kind: int = 1, **broker: Any) -> Iterator[ProcessCluster]:
    """A broker with ``per_kind`` nodes of each kind for every model, ready inside, stopped after."""
    models = list(models)
    procs = ProcessCluster(log_dir)
    procs.start_broker(**broker)
    try:
        for path in models:
            for service in SERVICES:
                for _ in range(per_kind):
                    procs.start_node(service, path)
        procs.wait_for({(service, Path(path).name): per_kind for path in models for service in SERVICES})
        yield procs
    finally:
        procs.stop()


class ResettingProxy:
    """A TCP proxy on loopback whose :meth:`reset` drops every connection through it with a reset (RST),
    as a network blip does: ZeroMQ reconnects, and the broker sees the client come back as a new peer."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("tcp://").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.resets = 0
        self._pairs: dict[socket.socket, socket.socket] = {}  # each end -> the other (pump thread only)
        self._reset_wanted = threading.Event()
        self._reset_done = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="proxy", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.listener, selectors.EVENT_READ)
        while not self._closing.is_set():
            if self._reset_wanted.is_set():
                for end in list(self._pairs):
                    self._drop(selector, end)
                self._reset_wanted.clear()
                self._reset_done.set()
            for key, _ in selector.select(timeout=0.02):
                end = key.fileobj
                if end is self.listener:
                    inside, _ = self.listener.accept()
                    outside = socket.create_connection(self.upstream)
                    self._pairs[inside], self._pairs[outside] = outside, inside
                    selector.register(inside, selectors.EVENT_READ)
                    selector.register(outside, selectors.EVENT_READ)
                elif end in self._pairs:
                    try:
                        data = end.recv(1 << 16)
                        if data:
                            self._pairs[end].sendall(data)
                    except OSError:
                        data = b""
                    if not data:
                        self._drop(selector, end)
        for end in list(self._pairs):
            self._drop(selector, end)
        selector.close()

    def _drop(self, selector: selectors.BaseSelector, end: socket.socket) -> None:
        """Close both ends of a connection with a reset."""
        other = self._pairs.pop(end, None)
        if other is not None:
            self._pairs.pop(other, None)
        for sock in (end, other):
            if sock is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(sock)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
            sock.close()

    def reset(self) -> None:
        """Reset every connection now (returns once they are closed)."""
        self._reset_done.clear()
        self._reset_wanted.set()
        self._reset_done.wait(timeout=5)
        self.resets += 1

    def close(self) -> None:
        self._closing.set()
        self._thread.join(timeout=5)
        self.listener.close()


def max_pixel_difference(png: bytes | Path, expected: Image.Image) -> int:
    """The largest difference of one channel of one pixel between a PNG (bytes or file) and diffusers' image."""
    data = png.read_bytes() if isinstance(png, Path) else png
    got = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)
    want = np.asarray(expected.convert("RGB")).astype(np.int16)
    assert got.shape == want.shape, f"image shape {got.shape} != diffusers' {want.shape}"
    return int(np.abs(got - want).max())


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@contextmanager
def serving_app(app: Any) -> Iterator[str]:
    """An ASGI app on uvicorn in this process, on a thread; yields its base URL."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the app did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
