"""Hostile input, load, broker restart, cancel and shutdown, against real processes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import torch
import zmq

from protocol import errors, messages
from protocol.messages import (
    PROTOCOL_VERSION,
    SERVICES,
    DenoisedLatents,
    Embeddings,
    GenerateRequest,
    ResolvedParams,
    WorkerReady,
)
from protocol.stages import DECODER, DENOISER, ENCODER
from tests.fake_nodes import MODEL as FAKE
from tests.fake_nodes import PNG as FAKE_PNG
from tests.fake_nodes import FakeNode
from tests.support import ROOT, ProcessCluster, ResettingProxy, free_port, node_pid, serving
from triptych.client import Client, GenerationError

pytestmark = pytest.mark.e2e

MODEL = "sd-tiny"


@pytest.fixture(scope="module")
def rel(checkpoints, tmp_path_factory) -> Iterator[ProcessCluster]:
    """A cluster of our own, so its broker can be killed and restarted on the same address."""
    with serving(tmp_path_factory.mktemp("reliability-logs"), [checkpoints[MODEL]]) as procs:
        yield procs


def _decoy_request() -> GenerateRequest:
    """Valid, but for a model no node serves: mutations that stay valid only wait and expire."""
    return GenerateRequest(request_id=uuid.uuid4().hex, model="fuzz-model", prompt="fuzz", steps=2, seed=1, timeout=0.5)


def _hostile_messages(rng: random.Random, count: int) -> Iterator[list[bytes]]:
    """Garbage, wrong types, unknown kinds and versions, lying tensors, deep nesting, mutations."""
    valid = [bytes(f) for f in messages.to_frames(_decoy_request())]
    tensor = [bytes(f) for f in messages.to_frames(Embeddings(job_id="x", embeds={"t": torch.zeros(2048)}))]
    params = ResolvedParams(
        model="fuzz-model",
        family="sd",
        prompt="fuzz",
        negative_prompt="",
        seed=1,
        steps=2,
        guidance=7.5,
        true_cfg=None,
        height=64,
        width=64,
    )
    latents = [
        bytes(f) for f in messages.to_frames(DenoisedLatents(job_id="x", latents=torch.zeros(3, 300), params=params))
    ]
    v = PROTOCOL_VERSION
    spec = {"model": "fuzz-model", "prompt": "p", "seed": 1}
    fixed: list[list[bytes]] = [
        [b""],
        [b"\xc1"],  # a byte msgpack never uses
        [msgpack.packb([1, 2, 3])],
        [msgpack.packb({"v": 99, "kind": "generate"})],
        [msgpack.packb({"v": v - 1, "kind": "generate", "request_id": "r", "prompt": "p", "seed": 1})],
        [msgpack.packb({"v": v, "kind": "no-such-kind"})],
        [msgpack.packb({"v": v, "kind": "generate", "request_id": 5, "prompt": None, "seed": "x"})],
        [msgpack.packb({"v": v, "kind": "generate", "request_id": "r", "prompt": "p", "seed": 1, "steps": 10**9})],
        [msgpack.packb({"v": v, "kind": "generate", "request_id": "r", "prompt": "p", "seed": -5})],
        [msgpack.packb({"v": v, "kind": "ready", "service": "denoiser", "model": "", "node": "x"})],
        [msgpack.packb({"v": v, "kind": "job_done", "job_id": "nope", "payload": {}})],  # a kind of version 1
        [msgpack.packb({"v": v, "kind": "embeddings", "job_id": "nope", "embeds": {}})],
        [msgpack.packb({"v": v, "kind": "embeddings", "job_id": "nope", "embeds": {"prompt_embeds": "text"}})],
        [msgpack.packb({"v": v, "kind": "decoded", "job_id": "nope", "png": 1})],
        [msgpack.packb({"v": v, "kind": "decoded", "job_id": "nope", "png": b"\x89PNG"})],
        [msgpack.packb({"v": v, "kind": "latents", "job_id": "nope", "latents": b"", "params": {"seed": "1"}})],
        [msgpack.packb({"v": v, "kind": "job_failed", "job_id": "nope", "error": "e", "code": "no-such-code"})],
        [msgpack.packb({"v": v, "kind": "job_failed", "job_id": "nope", "error": "e", "field": 3})],
        [msgpack.packb({"v": v, "kind": "heartbeat", "stats": {"deep": [[[{"x": None}]]]}})],
        # Stage jobs flow broker -> node only: from a client or a node they are refused.
        [msgpack.packb({"v": v, "kind": "encode_job", "job_id": "j", "request_id": "r", "request": spec})],
        [msgpack.packb({"v": v, "kind": "encode_job", "job_id": "j", "request_id": "r", "request": {"x": 1}})],
        [msgpack.packb(msgpack.ExtType(1, msgpack.packb(["float32", [10**6, 10**6], 1])))],
        [msgpack.packb(msgpack.ExtType(1, msgpack.packb(["float32", [0, 2**62, 2**62], b""])))],
        [msgpack.packb(msgpack.ExtType(1, msgpack.packb(["pickle", [1], b"x"])))],
        [msgpack.packb(msgpack.ExtType(42, b"boom"))],
        [b"\x91" * 100_000],  # nesting deeper than any stack
        [valid[0], b"an extra frame nobody refers to"],
        tensor[:1],  # the tensor's frame is missing
        [*tensor, b"x"],
        latents[:1],
    ]
    for i in range(count):
        if i < len(fixed):
            yield fixed[i]
            continue
        frames = [bytearray(f) for f in rng.choice([valid, tensor, latents])]
        frame = frames[rng.randrange(len(frames))]
        for _ in range(rng.randint(1, 4)):
            action = rng.random()
            if action < 0.5 and frame:
                frame[rng.randrange(len(frame))] = rng.randrange(256)
            elif action < 0.75 and frame:
                del frame[rng.randrange(len(frame)) :]
            else:
                frame.insert(rng.randrange(len(frame) + 1), rng.randrange(256))
        yield [bytes(f) for f in frames]


def test_fuzzed_broker_and_nodes_keep_serving(rel):
    """Thousands of malformed messages, from clients and from peers posing as nodes."""
    ctx = zmq.Context.instance()
    rng = random.Random(1234)
    sockets = []
    with rel.client() as client:
        ok = threading.Thread(target=lambda: client.generate("during the storm", model=MODEL, steps=20, seed=3))
        ok.start()
        for n in range(8):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(rel.address)
            sockets.append(sock)
            if n % 2:  # half of them pose as nodes first, so their junk reaches the node paths
                ready = WorkerReady(service=SERVICES[n % 3], model="fuzz-model", node=f"fuzzer:{n}")
                sock.send_multipart(messages.to_frames(ready))
        for i, frames in enumerate(_hostile_messages(rng, 4000)):
            sockets[i % len(sockets)].send_multipart(frames)
        ok.join(timeout=120)
        assert not ok.is_alive()
        for sock in sockets:
            sock.close()
        rel.check_alive()
        # Everything still serves, and the broker answers status.
        images = client.generate("after the storm", model=MODEL, steps=2, seed=4)
        assert len(images) == 1 and images[0].png.startswith(b"\x89PNG")
        assert {n["service"] for n in client.status().nodes if n["model"] == MODEL} == set(SERVICES)


def test_invalid_fields_are_named(rel):
    cases = {
        "steps": {"steps": 0},
        "guidance": {"guidance": float("nan")},
        "height": {"height": 100},
        "width": {"width": 0},
        "num_images": {"num_images": 1000},
        "seed": {"seed": -1},
        "prompt": {"prompt": "x" * 20_000},
        "true_cfg": {"true_cfg": 4.0},  # refused by the nodes: this pipeline has no true_cfg_scale
    }
    with rel.client(timeout=10) as client:
        for field, change in cases.items():
            kwargs = {"model": MODEL, "seed": 1, "prompt": "p", **change}
            with pytest.raises(GenerationError, match=field) as info:
                client.generate(**kwargs)
            assert info.value.code == errors.INVALID_REQUEST, (field, info.value)
            assert info.value.field == field
            assert not info.value.retryable


def test_concurrent_clients_then_broker_kill_9(rel):
    """16 clients x 10 requests; the broker is killed mid-load and restarted: all done once."""
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def one_client(n: int) -> None:
        try:
            with Client(rel.address, timeout=180) as client:
                results[n] = [
                    client.generate(f"client {n}", model=MODEL, steps=2, seed=1000 * n + i) for i in range(10)
                ]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one_client, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    time.sleep(3.0)
    broker = rel.processes[0]
    broker.kill()
    broker.wait()
    time.sleep(1.0)
    rel.processes[0] = rel.start_broker()
    for thread in threads:
        thread.join(timeout=240)
    assert not errors, errors
    assert sorted(results) == list(range(16))
    for n, images_per_request in results.items():
        assert len(images_per_request) == 10
        for i, images in enumerate(images_per_request):
            assert [image.seed for image in images] == [1000 * n + i]
    rel.wait_for({(service, MODEL): 1 for service in SERVICES})  # nodes re-registered by themselves


def _node_pid(rel: ProcessCluster, service: str) -> int:
    return next(node_pid(n["node"]) for n in rel.nodes() if n["service"] == service)


def test_ctrl_c_cancels_and_the_denoiser_stops(rel, tmp_path):
    command = [
        sys.executable,
        "-m",
        "triptych",
        "generate",
        "long",
        "--model",
        MODEL,
        "--steps",
        "200",  # the most a broker allows by default
        "--height",
        "512",
        "--width",
        "512",
    ]
    command += ["--broker", rel.address, "--out", str(tmp_path), "--seed", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait for the denoiser to be busy with it
        if any(n["service"] == "denoiser" and n["state"] == "busy" for n in rel.nodes()):
            break
        time.sleep(0.1)
    else:
        proc.kill()
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"the denoiser never started; the CLI said: {err[-2000:]}")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and out == "" and "cancelled" in err
    deadline = time.monotonic() + 5  # 200 tiny steps at 512 x 512 take far longer than this
    while any(n["service"] == "denoiser" and n["state"] == "busy" for n in rel.nodes()):
        assert time.monotonic() < deadline, "the denoiser kept working on a cancelled request"
        time.sleep(0.1)
    with rel.client() as client:
        assert len(client.generate("after cancel", model=MODEL, steps=2, seed=2)) == 1


def test_busy_broker_refuses_clearly(tmp_path):
    procs = ProcessCluster(tmp_path / "logs")
    procs._spawn("broker", ["triptych", "broker", "--bind", procs.address, "--max-requests", "1"])
    outcome: list[GenerationError] = []

    def occupy() -> None:  # no node serves this model, so it stays in flight until its timeout
        with procs.client(timeout=4) as first:
            try:
                first.generate("a", model=MODEL, seed=1)
            except GenerationError as exc:
                outcome.append(exc)

    try:
        procs.wait_for({})  # the broker answers
        waiting = threading.Thread(target=occupy)
        waiting.start()
        time.sleep(1.5)
        with procs.client(timeout=10) as second, pytest.raises(GenerationError, match="busy") as info:
            second.generate("b", model=MODEL, seed=2)
        assert info.value.retryable and info.value.code == errors.BUSY
        waiting.join(timeout=30)
        assert outcome and f"no node serves model {MODEL}" in str(outcome[0])
        assert outcome[0].code == errors.UNKNOWN_MODEL and not outcome[0].retryable
    finally:
        procs.stop()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_up_leaves_no_orphans(checkpoints, how):
    bind = f"tcp://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "triptych", "up", "--model", str(checkpoints[MODEL]), "--bind", bind]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    up = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    try:
        line = up.stdout.readline()
        assert "ready" in line, line
        children = _children(up.pid)
        assert len(children) == 4  # broker + encoder + denoiser + decoder
        up.send_signal(getattr(signal, how))
        up.wait(timeout=30)
        deadline = time.monotonic() + 15  # after SIGKILL the children notice their parent is gone
        while any(_alive(pid) for pid in children):
            assert time.monotonic() < deadline, f"orphans left: {[p for p in children if _alive(p)]}"
            time.sleep(0.2)
    finally:
        if up.poll() is None:
            up.kill()


def _registrations(procs: ProcessCluster) -> int:
    """Node registrations the broker logged, over all its lives: a node that lost the broker registers again."""
    return sum(log.read_text().count(" registered for model ") for log in procs.log_dir.glob("broker-*.log"))


def test_a_flood_of_nesting_bombs_holds_back_no_heartbeat(rel):
    """4 MB frames of four million nested empty arrays, for longer than nodes wait for a heartbeat."""
    bomb = msgpack.packb([[[] for _ in range(65535)] for _ in range(64)])
    assert len(bomb) > 4_000_000
    rel.wait_for({(service, MODEL): 1 for service in SERVICES})
    before = _registrations(rel)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(rel.address)
    sent = 0
    with rel.client(timeout=60) as client:
        request = threading.Thread(target=lambda: client.generate("under fire", model=MODEL, steps=2, seed=8))
        request.start()
        start = time.monotonic()
        while time.monotonic() - start < 5.0:  # a node deems its broker gone after 3 s without a word
            sock.send(bomb)
            sent += 1
            time.sleep(0.02)
        request.join(timeout=60)
        assert not request.is_alive()
        sock.close()
        assert len(client.generate("after the bombs", model=MODEL, steps=2, seed=9)) == 1
    assert sent > 150
    assert _registrations(rel) == before, rel.logs()


def test_a_client_whose_connection_resets_mid_denoise_gets_its_image_once_without_a_rerun(rel):
    proxy = ResettingProxy(rel.address)

    def denoised() -> int:
        return sum(n["jobs_done"] for n in rel.nodes() if (n["service"], n["model"]) == (DENOISER, MODEL))

    before = denoised()
    reset_at: list[int] = []

    def on_progress(event: messages.ProgressEvent) -> None:
        if event.stage == "denoise" and event.step >= 2 and not reset_at:
            reset_at.append(event.step)
            proxy.reset()  # the client's connection drops; ZeroMQ reconnects under a new identity

    try:
        with Client(proxy.address, timeout=60) as client:
            images = client.generate("across a blip", model=MODEL, steps=40, seed=5, on_progress=on_progress)
    finally:
        proxy.close()
    assert reset_at and proxy.resets == 1
    assert len(images) == 1 and images[0].png.startswith(b"\x89PNG") and images[0].seed == 5
    assert denoised() - before == 1  # denoised once: the resend got the result, not a second run


def test_a_hung_denoisers_job_completes_on_a_second_denoiser(tmp_path):
    procs = ProcessCluster(tmp_path / "logs")
    procs.start_broker(flags=["--stall-timeout", "0.3"])  # its first job: 10 x 0.3 s without progress
    nodes = [FakeNode(procs.address, ENCODER).start(), FakeNode(procs.address, DECODER).start()]
    hung = FakeNode(procs.address, DENOISER, behaviour="hang").start()
    nodes.append(hung)

    def denoisers() -> list[str]:
        return sorted(n["state"] for n in procs.nodes() if n["service"] == DENOISER)

    try:
        procs.wait_for({(service, FAKE): 1 for service in SERVICES})
        outcome: dict = {}

        def first() -> None:
            with procs.client(timeout=60) as client:
                outcome["images"] = client.generate("stuck", model=FAKE, seed=1)

        thread = threading.Thread(target=first)
        thread.start()
        assert hung.started.wait(30)  # it took the job, reported a step, and hangs; its heartbeats go on
        healthy = FakeNode(procs.address, DENOISER).start()
        nodes.append(healthy)
        thread.join(timeout=60)
        (image,) = outcome["images"]
        assert image.png.startswith(FAKE_PNG)
        assert hung.jobs == healthy.jobs and len(hung.jobs) == 1
        assert denoisers() == ["idle", "stalled"]

        with procs.client(timeout=60) as client:  # no new work for the stalled one
            assert len(client.generate("next", model=FAKE, seed=2)) == 1
        assert (len(hung.jobs), len(healthy.jobs)) == (1, 2)

        hung.release.set()  # it comes back: its late answer is dropped (done elsewhere), and it takes work again
        deadline = time.monotonic() + 10
        while denoisers() != ["idle", "idle"]:
            assert time.monotonic() < deadline, denoisers()
            time.sleep(0.1)
    finally:
        for node in nodes:
            node.stop()
        procs.stop()


def test_a_request_that_kills_decoders_stops_after_two_of_them(tmp_path):
    procs = ProcessCluster(tmp_path / "logs")
    procs.start_broker()
    nodes = [FakeNode(procs.address, ENCODER).start(), FakeNode(procs.address, DENOISER).start()]
    fake_decoder = ["tests.fake_nodes", DECODER, "--broker", procs.address, "--behaviour", "exit"]
    decoders = [procs._spawn("fake-decoder", fake_decoder) for _ in range(3)]
    try:
        procs.wait_for({(ENCODER, FAKE): 1, (DENOISER, FAKE): 1, (DECODER, FAKE): 3})
        with procs.client(timeout=60) as client, pytest.raises(GenerationError) as failed:
            client.generate("poison", model=FAKE, seed=1)
        assert str(failed.value) == "this request made two decoder nodes exit"
        assert (failed.value.code, failed.value.retryable) == (errors.MODEL_ERROR, False)
        assert [process.poll() is None for process in decoders].count(True) == 1  # the third never got it
    finally:
        for node in nodes:
            node.stop()
        procs.stop()
