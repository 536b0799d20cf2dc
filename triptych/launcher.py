"""Run a broker and one node of each kind as separate OS processes on this machine."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from protocol.messages import LOADING
from protocol.stages import DECODER, DENOISER, ENCODER, SERVICES
from triptych.client import Client, GenerationError
from triptych.nodes import node_package

logger = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    pass


@dataclass(frozen=True)
class ClusterCurve:
    """CURVE for a launched cluster: the broker's key pair, the folders of keys it admits by role, and
    the keys the cluster's own nodes and its own client use (each admitted in its role only)."""

    broker_secret: Path
    broker_public: Path
    nodes_dir: Path  # public keys that may register as nodes
    clients_dir: Path  # public keys that may send requests
    node_secret: Path  # the cluster's nodes' key
    client_secret: Path  # the launcher's own client's key (readiness checks; `run`'s request)

    @classmethod
    def create(cls, folder: Path, member_secret: Path, broker_public: Path | None = None) -> ClusterCurve:
        """One key for the nodes and the client (``triptych run``): ``member_secret``'s public key is
        admitted in both roles; ``broker_public`` (its .key_secret beside it) is the broker's key pair,
        or a throwaway one is made in ``folder``."""
        import zmq.auth

        from protocol.security import generate_keys

        if broker_public is None:
            broker_public, broker_secret = generate_keys(folder / "broker", "broker")
        else:
            broker_secret = broker_public.with_suffix(".key_secret")
            if not broker_secret.exists():
                raise LaunchError(f"the broker's secret key {broker_secret} is needed to start a broker")
        try:
            member_public, _ = zmq.auth.load_certificate(member_secret)
        except (OSError, ValueError) as exc:
            raise LaunchError(f"cannot read {member_secret}: {exc}") from exc
        nodes, clients = _key_folders(folder)
        for admitted in (nodes, clients):
            _write_public_key(admitted / "member.key", member_public)
        return cls(broker_secret, broker_public, nodes, clients, member_secret, member_secret)

    @classmethod
    def with_broker_keys(
        cls,
        folder: Path,
        broker_secret: Path,
        authorized_dir: Path | None = None,
        nodes_dir: Path | None = None,
        clients_dir: Path | None = None,
    ) -> ClusterCurve:
        """The broker's own key pair and key folders (``triptych up``): its nodes get a throwaway node
        key and the launcher a throwaway client key, admitted in ``folder`` beside copies of the keys
        of the given folders (``authorized_dir``'s in both roles)."""
        from protocol.security import KeyFileError, generate_keys, load_key

        try:
            broker_public, _ = load_key(broker_secret, need_secret=True)
        except KeyFileError as exc:
            raise LaunchError(str(exc)) from exc
        given = (("--curve-authorized", authorized_dir), ("--curve-nodes", nodes_dir), ("--curve-clients", clients_dir))
        for flag, given_dir in given:
            if given_dir is not None and not given_dir.is_dir():
                raise LaunchError(f"{flag} must be a folder of public keys (got {given_dir})")
        public_file = folder / "broker.key"
        _write_public_key(public_file, broker_public)
        node_public, node_secret = generate_keys(folder / "own", "node")
        client_public, client_secret = generate_keys(folder / "own", "client")
        nodes, clients = _key_folders(folder)
        for admitted, own, extra in ((nodes, node_public, nodes_dir), (clients, client_public, clients_dir)):
            keys = [
                own,
                *(key for given_dir in (authorized_dir, extra) if given_dir for key in given_dir.glob("*.key")),
            ]
            for key in keys:
                shutil.copy(key, admitted / f"{key.parent.name}-{key.name}")
        return cls(broker_secret, public_file, nodes, clients, node_secret, client_secret)

    def client(self):
        from protocol.security import Curve

        return Curve(secret_file=self.client_secret, broker_public_file=self.broker_public)

    def broker_args(self) -> list[str]:
        secret = ["--curve-secret", str(self.broker_secret)]
        return [*secret, "--curve-nodes", str(self.nodes_dir), "--curve-clients", str(self.clients_dir)]

    def node_args(self) -> list[str]:
        return ["--curve-secret", str(self.node_secret), "--curve-broker", str(self.broker_public)]


def _key_folders(folder: Path) -> tuple[Path, Path]:
    """Fresh folders for the keys a launched broker admits as nodes, and as clients."""
    nodes, clients = folder / "nodes", folder / "clients"
    for admitted in (nodes, clients):
        admitted.mkdir(parents=True, exist_ok=True)
    return nodes, clients


def cpu_threads(cores: int) -> dict[str, int]:
    """OpenMP threads per node when the denoiser runs on the CPU that all three nodes share.

    The denoiser does nearly all the work and gets every core. The encoder and the decoder run
    between its steps on the same cores; with torch's default (a thread per core each) their
    spinning OpenMP threads fight the denoiser's, and every parallel op waits for a thread that
    lost its core. A quarter of the cores each (at least one) keeps them out of its way.
    """
    side = max(1, cores // 4)
    return {ENCODER: side, DENOISER: cores, DECODER: side}


def _denoiser_on_cpu(device: str) -> bool:
    if device == "auto":
        import torch

        return not torch.cuda.is_available()
    return device == "cpu"


def _write_public_key(path: Path, public: bytes) -> None:
    """A public key file in zmq.auth's format."""
    path.write_text(f'curve\n    public-key = "{public.decode()}"\n')


class Cluster:
    """``with Cluster(model, bind=...) as cluster: ...`` -- started and ready inside, stopped after.

    With the denoiser on the CPU, each node's OpenMP threads follow :func:`cpu_threads` (a serving
    layout: stages overlap) unless ``threads`` names them (service -> count), ``OMP_NUM_THREADS``
    is set in the environment, or ``share_cores`` is False (one request at a time never overlaps
    stages, so every node keeps torch's default of a thread per core).
    """

    def __init__(
        self,
        model: str,
        *,
        bind: str,
        name: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        log_level: str = "INFO",
        extra_env: dict[str, str] | None = None,
        curve: ClusterCurve | None = None,
        threads: dict[str, int] | None = None,
        share_cores: bool = True,
        lora_dir: str | None = None,
    ) -> None:
        self.curve = curve
        self.lora_dir = lora_dir  # --lora-dir of the encoder and the denoiser
        self.threads = threads
        self.share_cores = share_cores
        self.model = model
        self.bind = bind
        self.name = name
        self.device = device
        self.dtype = dtype
        self.log_level = log_level
        self.env = {**os.environ, **(extra_env or {}), "TRIPTYCH_PARENT_PID": str(os.getpid())}
        self.processes: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> Cluster:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, key: str, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-m", *args, "--log-level", self.log_level]
        logger.debug("starting %s: %s", key, " ".join(command))
        self.processes[key] = subprocess.Popen(command, env={**self.env, **(env or {})}, stdin=subprocess.DEVNULL)

    def node_threads(self) -> dict[str, int]:
        """OMP_NUM_THREADS for each node process; empty where torch's own default applies."""
        if self.threads is not None:
            return dict(self.threads)
        if not self.share_cores or "OMP_NUM_THREADS" in self.env or not _denoiser_on_cpu(self.device):
            return {}
        return cpu_threads(len(os.sched_getaffinity(0)))

    def start(self) -> None:
        broker_args, node_args = [], []
        if self.curve is not None:
            broker_args, node_args = self.curve.broker_args(), self.curve.node_args()
        self._spawn("broker", ["triptych", "broker", "--bind", self.bind, *broker_args])
        named = ["--name", self.name, *node_args] if self.name else node_args
        threads = self.node_threads()
        for service in SERVICES:
            args = [node_package(service), "--model", self.model, "--broker", self.bind, *named]
            if service == DENOISER:
                args += ["--device", self.device, "--dtype", self.dtype]
            if self.lora_dir is not None and service in (ENCODER, DENOISER):
                args += ["--lora-dir", self.lora_dir]
            env = {"OMP_NUM_THREADS": str(threads[service])} if service in threads else None
            self._spawn(service, args, env)

    def wait_ready(self, timeout: float = 600.0) -> list[dict]:
        """Block until a node of each kind is ready (its weights read); raises if a process exits first."""
        deadline = time.monotonic() + timeout
        with Client(self.bind, curve=self.curve.client() if self.curve else None) as client:
            while time.monotonic() < deadline:
                for key, process in self.processes.items():
                    if process.poll() is not None:
                        raise LaunchError(f"the {key} process exited with status {process.returncode}")
                try:
                    nodes = client.status(timeout=1.0).nodes
                except GenerationError:
                    continue
                if {n["service"] for n in nodes if n["state"] != LOADING} >= set(SERVICES):
                    return nodes
                time.sleep(0.2)
        raise LaunchError(f"nodes did not register within {timeout:g}s")

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM every process (nodes first, broker last), SIGKILL what outlives the grace period."""
        order = [key for key in self.processes if key != "broker"] + ["broker"]
        for key in order:
            process = self.processes.get(key)
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for key in order:
            process = self.processes.get(key)
            if process is None:
                continue
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0fs: killing it", key, grace)
                process.kill()
                process.wait()
