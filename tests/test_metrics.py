"""Status and metrics: the broker core's hooks message by message, then a real cluster's
``triptych status`` and ``/metrics`` moving as a request is served."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from protocol import messages
from protocol.broker_core import BrokerCore
from protocol.messages import (
    DECODER,
    DENOISER,
    ENCODER,
    CancelRequest,
    DecodedImage,
    DenoisedLatents,
    Embeddings,
    GenerateRequest,
    Heartbeat,
    JobProgress,
    Message,
    ResolvedParams,
    StageJob,
    StatusReply,
    StatusRequest,
    WorkerGoodbye,
    WorkerReady,
)
from protocol.metrics import SERIES_GRACE, BrokerMetrics, PrometheusMetrics, clean_stats
from tests.support import ROOT, metric, scrape
from triptych.client import GenerationCancelled, GenerationError
from triptych.status import format_status

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

MODEL = "sd-tiny"
CLIENT, ENC, DEN, DEC = b"client", b"enc", b"den", b"dec"


class Broker:
    """A core with Prometheus metrics, fed through the codec; returns what it sent."""

    def __init__(self) -> None:
        self.metrics = PrometheusMetrics()
        self.core = BrokerCore(metrics=self.metrics)

    def send(self, sender: bytes, message: Message, now: float) -> list[Message]:
        self.core.handle(sender, messages.from_frames(messages.to_frames(message)), now)
        self.core.tick(now)
        outbox, self.core.outbox = self.core.outbox, []
        return [msg for _, msg in outbox]

    def value(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def job_of(sent: list[Message]) -> StageJob:
    (job,) = [m for m in sent if isinstance(m, StageJob)]
    return job


PARAMS = ResolvedParams(
    model=MODEL,
    family="sd",
    prompt="a fox",
    negative_prompt="",
    seed=1,
    steps=4,
    guidance=7.5,
    true_cfg=None,
    height=64,
    width=64,
)


def request(request_id: str, **changes) -> GenerateRequest:
    return GenerateRequest(**{"request_id": request_id, "model": MODEL, "prompt": "a fox", "seed": 1, **changes})


@pytest.fixture
def broker() -> Broker:
    b = Broker()
    for identity, service in ((ENC, ENCODER), (DEN, DENOISER), (DEC, DECODER)):
        b.send(identity, WorkerReady(service=service, model=MODEL, node=f"{identity.decode()}-node"), now=10.0)
    return b


def test_a_served_request_counts_once_with_stage_and_step_times(broker):
    encode = job_of(broker.send(CLIENT, request("r1", num_images=2, steps=4), now=10.0))
    denoise = job_of(broker.send(ENC, Embeddings(job_id=encode.job_id, embeds={"e": torch.ones(1)}), 10.5))
    for step, at in ((1, 11.0), (2, 11.2), (4, 11.6)):  # step 3 never reported: 2 steps in 0.4 s
        broker.send(DEN, JobProgress(job_id=denoise.job_id, step=step, total=4), now=at)
    done = DenoisedLatents(job_id=denoise.job_id, latents=torch.zeros(2, 4, 8, 8), params=PARAMS)
    sent = broker.send(DEN, done, now=12.0)
    assert broker.value("triptych_queue_depth", service=DECODER, model=MODEL) == 1  # one decoder, two images
    sent = broker.send(DEC, DecodedImage(job_id=job_of(sent).job_id, png=b"png"), now=12.25)
    broker.send(DEC, DecodedImage(job_id=job_of(sent).job_id, png=b"png"), now=12.5)

    assert broker.value("triptych_requests_total", model=MODEL, outcome="completed") == 1
    assert broker.value("triptych_request_seconds_sum", model=MODEL) == pytest.approx(2.5)
    assert broker.value("triptych_stage_seconds_count", stage="encode", model=MODEL) == 1
    assert broker.value("triptych_stage_seconds_sum", stage="encode", model=MODEL) == pytest.approx(0.5)
    assert broker.value("triptych_stage_seconds_sum", stage="denoise", model=MODEL) == pytest.approx(1.5)
    assert broker.value("triptych_stage_seconds_count", stage="decode", model=MODEL) == 2
    # The first step's time holds the job's setup, so only steps 2..4 are timed, 0.2 s each.
    assert broker.value("triptych_step_seconds_count", stage="denoise", model=MODEL) == 3
    assert broker.value("triptych_step_seconds_sum", stage="denoise", model=MODEL) == pytest.approx(0.6)
    assert broker.value("triptych_nodes", service=ENCODER, model=MODEL) == 1
    assert broker.value("triptych_queue_depth", service=DECODER, model=MODEL) == 0
    assert broker.value("triptych_requests_in_flight") == 0


def test_failed_cancelled_and_refused_requests_are_counted_by_outcome(broker):
    broker.send(CLIENT, request("bad", steps=0), now=10.0)  # refused: invalid
    broker.send(CLIENT, request("gone"), now=10.0)
    assert broker.value("triptych_requests_in_flight") == 1
    broker.send(CLIENT, CancelRequest(request_id="gone"), now=11.0)
    broker.send(CLIENT, request("lost", model="no-such-model", timeout=1.0), now=11.0)
    broker.send(CLIENT, StatusRequest(request_id="s"), now=12.5)  # the clock passes its deadline
    assert broker.value("triptych_requests_total", model=MODEL, outcome="failed") == 1
    assert broker.value("triptych_requests_total", model=MODEL, outcome="cancelled") == 1
    # A model no node serves is not a label of its own: clients choose those names.
    assert broker.value("triptych_requests_total", model="other", outcome="failed") == 1
    assert (
        broker.metrics.registry.get_sample_value("triptych_queue_depth", {"service": ENCODER, "model": "no-such-model"})
        is None
    )


def test_node_stats_reach_status_and_metrics_summed_per_model(broker):
    broker.send(b"enc2", WorkerReady(service=ENCODER, model=MODEL, node="enc2-node"), now=10.5)
    broker.send(ENC, Heartbeat(stats={"cache_hits": 3, "cache_misses": 1}), now=11.0)
    broker.send(b"enc2", Heartbeat(stats={"cache_hits": 1, "cache_misses": 3, "bad name": 1, "neg": -1}), now=11.0)
    broker.send(ENC, Heartbeat(stats={"cache_hits": 5, "cache_misses": 1}), now=12.0)  # cumulative: replaces

    assert broker.value("triptych_node_stat_total", service=ENCODER, model=MODEL, stat="cache_hits") == 6
    assert broker.value("triptych_node_stat_total", service=ENCODER, model=MODEL, stat="cache_misses") == 4
    assert broker.value("triptych_cache_hit_ratio", service=ENCODER, model=MODEL) == pytest.approx(0.6)
    status = [m for m in broker.send(CLIENT, StatusRequest(request_id="s"), now=12.0) if isinstance(m, StatusReply)]
    stats = {node["node"]: node["stats"] for node in status[0].nodes}
    assert stats["enc2-node"] == {"cache_hits": 1, "cache_misses": 3}
    assert stats["den-node"] == {}

    # Results carry stats too.
    encode = job_of(broker.send(CLIENT, request("r"), now=12.5))
    broker.send(ENC, Embeddings(job_id=encode.job_id, embeds={}, stats={"cache_hits": 9}), now=12.6)
    assert broker.value("triptych_node_stat_total", service=ENCODER, model=MODEL, stat="cache_hits") == 10


class Recorder(BrokerMetrics):
    """Keeps every hook call, by hook name."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_request_finished(self, model: str, outcome: str, seconds: float | None = None) -> None:
        self.calls.append(("request", model, outcome))

    def on_job_finished(self, stage: str, model: str, seconds: float) -> None:
        self.calls.append(("job", stage, model))

    def on_steps(self, stage: str, model: str, steps: int, seconds: float) -> None:
        self.calls.append(("steps", stage, model, steps))


def test_the_hooks_name_stages_not_node_kinds():
    recorder = Recorder()
    core = BrokerCore(metrics=recorder)
    for identity, service in ((ENC, ENCODER), (DEN, DENOISER), (DEC, DECODER)):
        core.handle(identity, WorkerReady(service=service, model=MODEL, node=identity.decode()), 10.0)
    core.handle(CLIENT, request("r1"), 10.0)

    def job_sent_to(identity: bytes) -> StageJob:
        sent, core.outbox = core.outbox, []
        (job,) = [m for to, m in sent if to == identity and isinstance(m, StageJob)]
        return job

    core.handle(ENC, Embeddings(job_id=job_sent_to(ENC).job_id, embeds={}), 11.0)
    denoise = job_sent_to(DEN)
    for step in (1, 3):
        core.handle(DEN, JobProgress(job_id=denoise.job_id, step=step, total=3), 11.0 + step)
    core.handle(DEN, DenoisedLatents(job_id=denoise.job_id, latents=torch.zeros(1, 4, 8, 8), params=PARAMS), 15.0)
    core.handle(DEC, DecodedImage(job_id=job_sent_to(DEC).job_id, png=b"png"), 16.0)
    assert recorder.calls == [
        ("job", "encode", MODEL),
        ("steps", "denoise", MODEL, 2),
        ("job", "denoise", MODEL),
        ("job", "decode", MODEL),
        ("request", MODEL, "completed"),
    ]


def test_clean_stats_keeps_named_finite_counters():
    assert clean_stats({"a": 1, "b_2": 2.5, "c": True, "d": float("nan"), "e": "x", "f g": 1, 3: 1}) == {
        "a": 1,
        "b_2": 2.5,
    }
    assert clean_stats(["not", "a", "map"]) == {}


def test_metrics_are_served_on_loopback_unless_told():
    from triptych.cli import build_parser

    assert build_parser().parse_args(["broker", "--bind", "tcp://0.0.0.0:5555"]).metrics_host == "127.0.0.1"
    assert build_parser().parse_args(["broker", "--metrics-host", "0.0.0.0"]).metrics_host == "0.0.0.0"


def test_series_are_kept_only_for_models_a_node_serves():
    clock = [100.0]
    metrics = PrometheusMetrics(clock=lambda: clock[0])
    core = BrokerCore(metrics=metrics)

    def tick() -> None:
        core.tick(clock[0])
        core.outbox.clear()

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    for identity, service in ((ENC, ENCODER), (DEN, DENOISER)):
        core.handle(identity, WorkerReady(service=service, model="fleeting", node=identity.decode()), clock[0])
    tick()
    core.handle(ENC, Heartbeat(stats={"cache_hits": 2}), clock[0])
    core.handle(CLIENT, request("r1", model="fleeting"), clock[0])
    (encode,) = [m for _, m in core.outbox if isinstance(m, StageJob)]
    core.handle(ENC, Embeddings(job_id=encode.job_id, embeds={}), clock[0])
    core.handle(CLIENT, CancelRequest(request_id="r1"), clock[0])
    tick()
    assert value("triptych_requests_total", model="fleeting", outcome="cancelled") == 1
    assert value("triptych_stage_seconds_count", stage="encode", model="fleeting") == 1
    assert value("triptych_node_stat_total", service=ENCODER, model="fleeting", stat="cache_hits") == 2

    for identity in (ENC, DEN):  # the model's nodes leave; a restart within the grace period keeps its series
        core.handle(identity, WorkerGoodbye(), clock[0])
    tick()
    clock[0] += SERIES_GRACE - 1
    tick()
    assert value("triptych_requests_total", model="fleeting", outcome="cancelled") == 1
    clock[0] += 2
    tick()
    assert value("triptych_requests_total", model="fleeting", outcome="cancelled") is None
    assert value("triptych_stage_seconds_count", stage="encode", model="fleeting") is None
    assert value("triptych_node_stat_total", service=ENCODER, model="fleeting", stat="cache_hits") is None
    assert value("triptych_queue_depth", service=ENCODER, model="fleeting") is None


def test_status_table_lists_nodes_and_queues():
    decoder = {"service": "decoder", "model": "m", "node": "box:12", "state": "idle", "jobs_done": 7}
    encoder = {"service": "encoder", "model": "m", "node": "box:11", "state": "busy", "jobs_done": 3}
    reply = StatusReply(
        request_id="s",
        nodes=[{**decoder, "last_heartbeat_s": 0.4}, {**encoder, "jobs_in_progress": 1, "last_heartbeat_s": 1.25}],
        queues={"encoder/m": 2, "encoder/unserved": 0},
        requests_in_flight=2,
    )
    lines = format_status(reply).splitlines()
    header = ["SERVICE", "MODEL", "HOST", "PID", "STATE", "JOBS", "DONE", "LAST", "HEARTBEAT", "S/IMAGE"]
    assert lines[0].split() == header
    assert lines[1].split() == ["encoder", "m", "box", "11", "busy", "1", "3", "1.2s", "ago", "-"]  # encoders first
    assert lines[2].split() == ["decoder", "m", "box", "12", "idle", "0", "7", "0.4s", "ago", "-"]
    assert ["encoder", "m", "2"] in [line.split() for line in lines]
    assert not any("unserved" in line for line in lines)
    assert lines[-1] == "requests in flight: 2"


# --- a real cluster ---------------------------------------------------------------------------


def status_cli(cluster, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "triptych", "status", "--broker", cluster.address, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)


@pytest.mark.e2e
def test_status_and_metrics_follow_a_served_request(cluster):
    before_status = json.loads(status_cli(cluster, "--json").stdout)
    before = scrape(cluster.metrics_port)

    with cluster.client() as client:
        client.generate("a red fox", model=MODEL, steps=3, seed=1, num_images=2)
        with pytest.raises(GenerationError, match="steps must be") as refused:
            client.generate("a red fox", model=MODEL, steps=0, seed=1)
        assert (refused.value.code, refused.value.field) == ("invalid_request", "steps")
        cancel = threading.Event()
        with pytest.raises(GenerationCancelled):
            client.generate(
                "a red fox", model=MODEL, steps=200, seed=1, cancel=cancel, on_progress=lambda e: cancel.set()
            )

    result = status_cli(cluster, "--json")
    assert result.returncode == 0, result.stderr
    after_status = json.loads(result.stdout)
    done = {(n["service"], n["model"]): n["jobs_done"] for n in before_status["nodes"]}
    nodes = {(n["service"], n["model"]): n for n in after_status["nodes"]}
    assert {model for _, model in nodes} >= {"sd-tiny", "pixart-tiny"}
    assert nodes[(DENOISER, MODEL)]["jobs_done"] - done[(DENOISER, MODEL)] == 1  # the cancelled one did not finish
    assert nodes[(DECODER, MODEL)]["jobs_done"] - done[(DECODER, MODEL)] == 2
    assert all(n["state"] in ("idle", "busy") and n["last_heartbeat_s"] < 3 for n in after_status["nodes"])
    assert after_status["queues"][f"denoiser/{MODEL}"] == 0
    assert after_status["requests_in_flight"] == 0

    after = scrape(cluster.metrics_port)
    moved = {
        outcome: metric(after, "triptych_requests_total", model=MODEL, outcome=outcome)
        - metric(before, "triptych_requests_total", model=MODEL, outcome=outcome)
        for outcome in ("completed", "failed", "cancelled")
    }
    assert moved == {"completed": 1, "failed": 1, "cancelled": 1}
    for stage, jobs in (("encode", 1), ("denoise", 1), ("decode", 2)):
        count = "triptych_stage_seconds_count"
        assert metric(after, count, stage=stage, model=MODEL) - metric(before, count, stage=stage, model=MODEL) >= jobs
    steps = "triptych_step_seconds_count"
    assert metric(after, steps, stage="denoise", model=MODEL) - metric(before, steps, stage="denoise", model=MODEL) >= 2
    for service in (ENCODER, DENOISER, DECODER):
        assert metric(after, "triptych_nodes", service=service, model="pixart-tiny") == 1
        assert ("triptych_queue_depth", frozenset({"service": service, "model": MODEL}.items())) in after
    assert metric(after, "triptych_requests_in_flight") == 0


@pytest.mark.e2e
def test_status_prints_a_table_and_fails_cleanly_without_a_broker(cluster):
    result = status_cli(cluster)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split()[:3] == ["SERVICE", "MODEL", "HOST"]
    assert "pixart-tiny" in result.stdout and "requests in flight:" in result.stdout

    command = [sys.executable, "-m", "triptych", "status", "--broker", "tcp://127.0.0.1:9", "--timeout", "0.5"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 1 and "did not answer" in result.stderr and result.stdout == ""
