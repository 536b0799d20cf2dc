"""Every benchmark script runs in its tiny mode, exits 0 and prints its result lines.

Nothing here asserts a timing: machines are noisy, and the tiny models measure nothing real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.e2e  # the transport and CPU benchmarks start a broker and nodes

# script -> (result lines it prints, the words one of them must hold)
SCRIPTS = {
    "transport.py": (3, "memcpy / broker trip"),
    "cpu_pipeline.py": (3, "throughput, triptych / diffusers"),
    "gpu_memory.py": (9, "(a) s/image / (b) s/image"),  # three per model, three models
    "speed_options.py": (2, "the plain denoiser's speed"),
    "vae_encode.py": (4, "VAE encode sd 64x64 float32"),
    "cpu_stages.py": (9, "sdxl-vae bfloat16: "),  # each setting against fp32 eager, compile left out
    "step_cache.py": (6, "PSNR"),  # each default setting against the uncached run
}
EXTRA_ARGS = {"speed_options.py": ["--skip-compile"], "cpu_stages.py": ["--skip-compile"]}  # compiling takes minutes


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_runs_in_tiny_mode(script: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / script),
        "--tiny",
        "--json",
        str(out),
        *EXTRA_ARGS.get(script, []),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"

    count, words = SCRIPTS[script]
    results = [line for line in proc.stdout.splitlines() if line.startswith("result: ")]
    assert len(results) >= count, proc.stdout
    assert any(words in line for line in results), proc.stdout
    data = json.loads(out.read_text())
    assert data["benchmark"] == script.removesuffix(".py")
    assert data["mode"] == "tiny"
    assert data["machine"]["cores"] >= 1
