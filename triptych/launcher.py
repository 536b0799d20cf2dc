"""Run a broker and one node of each kind as separate OS processes on this machine."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from protocol.messages import SERVICES
from triptych.client import Client, GenerationError

logger = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    pass


class Cluster:
    """``with Cluster(model, bind=...) as cluster: ...`` -- started and ready inside, stopped after."""

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
    ) -> None:
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

    def _spawn(self, key: str, args: Sequence[str]) -> None:
        command = [sys.executable, "-m", *args, "--log-level", self.log_level]
        logger.debug("starting %s: %s", key, " ".join(command))
        self.processes[key] = subprocess.Popen(command, env=self.env, stdin=subprocess.DEVNULL)

    def start(self) -> None:
        self._spawn("broker", ["triptych", "broker", "--bind", self.bind])
        named = ["--name", self.name] if self.name else []
        for service in SERVICES:
            args = [f"{service}_node", "--model", self.model, "--broker", self.bind, *named]
            if service == "denoiser":
                args += ["--device", self.device, "--dtype", self.dtype]
            self._spawn(service, args)

    def wait_ready(self, timeout: float = 600.0) -> list[dict]:
        """Block until a node of each kind has registered; raises if a process exits first."""
        deadline = time.monotonic() + timeout
        with Client(self.bind) as client:
            while time.monotonic() < deadline:
                for key, process in self.processes.items():
                    if process.poll() is not None:
                        raise LaunchError(f"the {key} process exited with status {process.returncode}")
                try:
                    nodes = client.status(timeout=1.0).nodes
                except GenerationError:
                    continue
                if {n["service"] for n in nodes} >= set(SERVICES):
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
