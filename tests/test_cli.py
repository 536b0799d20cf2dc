"""`triptych run` on a fresh machine: the offline demo model, one command, a PNG, a clean exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from decoder_node.png import read_metadata
from tests.support import ROOT

pytestmark = pytest.mark.e2e


def test_run_with_the_demo_model(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "triptych", "run", "a tiny demo", "--steps", "3", "--seed", "5"]
    command += ["--num-images", "2", "--out", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "demo model" in result.stderr and "circle" in result.stderr  # what it can draw
    paths = [Path(line) for line in result.stdout.splitlines()]
    assert [read_metadata(p.read_bytes())["seed"] for p in paths] == ["5", "6"]
    assert all(Image.open(p).size == (128, 128) for p in paths)
    assert not (tmp_path / "cache" / "triptych").exists()  # shipped in the package: nothing is built


@pytest.mark.parametrize("module", ["encoder_node", "denoiser_node", "decoder_node"])
def test_nodes_run_as_modules(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "--model" in result.stdout and "--broker" in result.stdout


def test_unsupported_model_fails_at_node_start(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline", "unet": ["x", "y"]}')
    result = subprocess.run(
        [sys.executable, "-m", "denoiser_node", "--model", str(tmp_path)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode != 0
    assert "KandinskyPipeline" in result.stderr and "stable-diffusion" in result.stderr


def test_no_t5_fails_at_node_start_for_a_family_that_needs_t5(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline", "text_encoder_2": ["x", "y"]}')
    result = subprocess.run(
        [sys.executable, "-m", "encoder_node", "--model", str(tmp_path), "--no-t5"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "--no-t5: flux cannot run without its T5 encoder" in result.stderr


@pytest.mark.parametrize(
    ("service", "own_flag"), [("encoder", "--cache-mb"), ("denoiser", "--max-batch"), ("decoder", "--vae-tiling")]
)
def test_the_cli_starts_each_node_through_its_entry_point(service, own_flag):
    result = subprocess.run(
        [sys.executable, "-m", "triptych", service, "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert f"usage: triptych {service}" in result.stdout
    assert own_flag in result.stdout and "--broker" in result.stdout and "--curve-secret" in result.stdout


def test_a_bad_node_flag_is_named_at_start(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["x", "y"]}')
    result = subprocess.run(
        [sys.executable, "-m", "triptych", "denoiser", "--model", str(tmp_path), "--max-batch", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "--max-batch must be at least 1" in result.stderr


def test_a_request_for_no_images_is_refused_at_once_naming_the_option():
    """Refused by the command itself: no broker is even listening (a broker refuses it too, naming num_images)."""
    command = [sys.executable, "-m", "triptych", "generate", "p", "--num-images", "0", "--broker", "tcp://127.0.0.1:9"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2 and result.stdout == ""
    assert "argument --num-images: must be above 0 (got 0)" in result.stderr


def test_a_broker_reachable_from_elsewhere_without_curve_warns(tmp_path):
    from tests.support import free_port

    def stderr_of(bind: str) -> str:
        command = [sys.executable, "-m", "triptych", "broker", "--bind", bind, "--log-level", "WARNING"]
        broker = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            lines = [broker.stderr.readline()]  # "broker listening on ..."
            if "127.0.0.1" not in bind:
                lines.append(broker.stderr.readline())
        finally:
            broker.terminate()
            lines.append(broker.communicate(timeout=15)[1])
        return "".join(lines)

    exposed = stderr_of(f"tcp://0.0.0.0:{free_port()}")
    assert "warning:" in exposed and "CURVE is off" in exposed
    assert "warning" not in stderr_of(f"tcp://127.0.0.1:{free_port()}")
