"""The broker's socket loop, in this process: peers it cannot reach are logged, not silently dropped."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import zmq

from protocol import messages, sockets
from protocol.broker import Broker
from protocol.messages import GenerateRequest, StatusRequest
from protocol.worker import Worker


@contextmanager
def running(broker: Broker) -> Iterator[Broker]:
    stop = threading.Event()
    thread = threading.Thread(target=broker.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        yield broker
    finally:
        stop.set()
        thread.join(timeout=5)


def _wait_for(caplog, text: str, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(text in record.getMessage() for record in caplog.records):
            return True
        time.sleep(0.05)
    return False


def test_a_peer_that_is_not_reading_is_logged(caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="protocol.broker")
    monkeypatch.setattr(sockets, "HIGH_WATER_MARK", 1)  # a peer's queue fills at once
    ctx = zmq.Context.instance()
    address = f"inproc://broker-{uuid.uuid4().hex}"
    broker = Broker(address, ctx=ctx)
    with running(broker):
        peer = ctx.socket(zmq.DEALER)
        peer.setsockopt(zmq.RCVHWM, 1)
        peer.setsockopt(zmq.LINGER, 0)
        peer.connect(address)
        for i in range(50):  # asks, and never reads the answers
            peer.send_multipart(messages.to_frames(StatusRequest(request_id=f"s{i}")))
        assert _wait_for(caplog, "is not reading")
        peer.close()
    assert broker.undelivered > 0


def test_a_reply_to_a_peer_that_left_is_logged(caplog):
    caplog.set_level(logging.INFO, logger="protocol.broker")
    ctx = zmq.Context.instance()
    broker = Broker("tcp://127.0.0.1:0", ctx=ctx)
    with running(broker):
        client = ctx.socket(zmq.DEALER)
        client.setsockopt(zmq.LINGER, 0)
        client.connect(broker.address)
        request = GenerateRequest(request_id="r1", model="not-yet", prompt="p", seed=1, timeout=0.5)
        client.send_multipart(messages.to_frames(request))
        assert client.poll(5000)  # accepted: the broker only just started, nodes may still come
        client.close()  # gone before its request times out, and the broker says so to nobody
        assert _wait_for(caplog, "is gone")


def test_a_node_announces_its_model_while_loading_so_requests_for_it_wait():
    from protocol.broker_core import BrokerCore
    from protocol.stages import DENOISER, ENCODER
    from tests.fake_nodes import FakeNode, answer
    from triptych.client import Client, GenerationError

    broker = Broker("tcp://127.0.0.1:0", core=BrokerCore(startup_grace=0.0))  # unknown models fail at once
    with running(broker):
        helpers = [FakeNode(broker.address, service, model="m").start() for service in (ENCODER, "decoder")]
        loading = Worker(broker.address, DENOISER, "m")
        loading.announce()  # before its weights are read
        try:
            with Client(broker.address, timeout=30) as client:
                deadline = time.monotonic() + 10
                while sorted(n["state"] for n in client.status().nodes) != ["idle", "idle", "loading"]:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                with pytest.raises(GenerationError) as unknown:  # a model nobody announced: at once
                    client.generate("p", model="other", seed=1)
                assert unknown.value.code == "unknown_model" and "(served: m)" in str(unknown.value)
                outcome: dict = {}
                waiting = threading.Thread(target=lambda: outcome.update(images=_generate(broker.address)))
                waiting.start()
                time.sleep(0.5)  # the request waits for the loading node, and does not fail
                assert "images" not in outcome and waiting.is_alive()
                loading.configure(lambda jobs, progress: [answer(job) for job in jobs], capacity=1)
                serving = threading.Thread(target=loading.run, daemon=True)
                serving.start()  # loaded: it registers as ready
                waiting.join(timeout=20)
                assert len(outcome["images"]) == 1
        finally:
            loading.stop.set()
            for node in helpers:
                node.stop()


def _generate(address: str) -> list:
    from triptych.client import Client

    with Client(address, timeout=30) as client:
        return client.generate("p", model="m", seed=1)
