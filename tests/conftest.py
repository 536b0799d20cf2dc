"""Shared fixtures: tiny checkpoints built once per session and one cluster that serves them.

Helpers that test modules share are in tests/support.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.support import ROOT, ProcessCluster, free_port, serving
from triptych.testing import build_tiny_checkpoint

# Test model name -> (tiny family, text encoder scale). The name is the checkpoint's folder name.
MODELS = {
    "sd-tiny": ("sd", 1),
    "pixart-tiny": ("pixart-alpha", 1),
    "sd-bigtext": ("sd", 4),  # a text encoder far larger than everything else
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        name: build_tiny_checkpoint(family, root / name, text_encoder_scale=scale)
        for name, (family, scale) in MODELS.items()
    }


@pytest.fixture(scope="session")
def cluster(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessCluster]:
    """One broker (with metrics) and an encoder, a denoiser and a decoder for every test model."""
    with serving(tmp_path_factory.mktemp("cluster-logs"), checkpoints.values(), metrics_port=free_port()) as procs:
        yield procs


_PIPELINES: dict[Path, object] = {}


@pytest.fixture(scope="session")
def reference():
    """The diffusers pipeline of a checkpoint, in this process: what triptych must reproduce."""
    from diffusers import DiffusionPipeline

    def run(path: Path, seed: int, **kwargs) -> Image.Image:
        if path not in _PIPELINES:
            pipe = DiffusionPipeline.from_pretrained(path)
            pipe.set_progress_bar_config(disable=True)
            _PIPELINES[path] = pipe
        generator = torch.Generator("cpu").manual_seed(seed)
        return _PIPELINES[path](**kwargs, generator=generator).images[0]

    return run


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The tiny checkpoint of a family (see triptych.testing), built on first use."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_checkpoint(family, tmp_path_factory.mktemp(family) / family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def gateway(cluster, tmp_path_factory) -> Iterator[str]:
    """``triptych http`` in front of the session cluster, shared by the HTTP tests; yields its base URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("gateway") / "http.log"
    command = [sys.executable, "-m", "triptych", "http", "--broker", cluster.address, "--port", str(port)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [*command, "--timeout", "60"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                urllib.request.urlopen(f"{base}/v1/models", timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
