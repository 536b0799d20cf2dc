"""The launcher's per-node CPU threads when every node shares one machine."""

from __future__ import annotations

import subprocess

import pytest

from triptych import launcher
from triptych.launcher import Cluster, cpu_threads


def test_the_denoiser_gets_every_core_and_the_others_a_quarter() -> None:
    assert cpu_threads(2) == {"encoder": 1, "denoiser": 2, "decoder": 1}
    assert cpu_threads(16) == {"encoder": 4, "denoiser": 16, "decoder": 4}
    assert cpu_threads(1) == {"encoder": 1, "denoiser": 1, "decoder": 1}


def _cluster(monkeypatch: pytest.MonkeyPatch, omp: str | None, **kwargs) -> Cluster:
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    return Cluster("unused-model", bind="tcp://127.0.0.1:1", **kwargs)


def test_plan_applies_only_to_a_cpu_denoiser_without_a_users_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    cores = len(launcher.os.sched_getaffinity(0))
    assert _cluster(monkeypatch, None, device="cpu").node_threads() == cpu_threads(cores)
    assert _cluster(monkeypatch, None, device="cuda").node_threads() == {}  # torch's default
    assert _cluster(monkeypatch, "3", device="cpu").node_threads() == {}  # the user's OMP_NUM_THREADS wins
    assert _cluster(monkeypatch, None, device="cpu", share_cores=False).node_threads() == {}  # `triptych run`
    explicit = {"encoder": 2, "denoiser": 5, "decoder": 1}
    assert _cluster(monkeypatch, "3", device="cpu", threads=explicit).node_threads() == explicit


def test_each_node_process_is_started_with_its_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    started: dict[str, dict[str, str]] = {}

    class Recorder:
        def __init__(self, command: list[str], env: dict[str, str], **_: object) -> None:
            started[command[2]] = env

    monkeypatch.setattr(subprocess, "Popen", Recorder)
    threads = {"encoder": 2, "denoiser": 5, "decoder": 1}
    _cluster(monkeypatch, None, device="cpu", threads=threads).start()
    assert {key: env.get("OMP_NUM_THREADS") for key, env in started.items()} == {
        "triptych": None,  # the broker runs no model
        "encoder_node": "2",
        "denoiser_node": "5",
        "decoder_node": "1",
    }
