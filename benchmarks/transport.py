"""Transport: a bfloat16 tensor through the broker between two nodes, against a plain memory copy.

A real broker (``triptych broker``) and three node processes built on the real node runtime
(``protocol.worker.Worker``) run on loopback; only the handlers are fakes, so no model is
loaded. Each request carries one tensor the way a model's embeddings and latents travel:

    encoder  --Embeddings-->       broker  --DenoiseJob-->  denoiser      trip 1: "embeddings"
    denoiser --DenoisedLatents-->  broker  --DecodeJob-->   decoder       trip 2: "latents" (the same tensor)

The encoder handler stamps the time (CLOCK_MONOTONIC, shared by all processes) as its last act;
the denoiser handler reads the clock as its first act. The difference is one trip: the node
runtime's outbound path (codec, inproc pipe, IO thread), TCP into the broker, the broker's
decode, routing and re-encode, TCP out, the receiving node's decode and job queue. The
denoiser hands the same tensor on to the decoder, timed the same way. Requests run one at a
time, so a trip has the machine to itself. GB/s = tensor bytes / trip time.

The reference is a memory copy of the same bytes in one thread (``clone`` and ``copy_``, from
a cache-warm source and from a cold one); the ratio printed is warm ``copy_`` over the broker
trip. A trip has two TCP legs, and each moves the bytes into and out of the kernel, so a
trip can never come near a memcpy. The raw socket, one zero-copy ZeroMQ message over loopback
with no codec and no broker, is timed too: two of those are the floor for a trip.

    python benchmarks/transport.py                    # 8 MiB, 40 requests
    python benchmarks/transport.py --tiny --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib import describe, machine, median, now, table, timed, verdict, write_json

from protocol.messages import (
    DecodedImage,
    DecodeJob,
    DenoisedLatents,
    DenoiseJob,
    Embeddings,
    EncodeJob,
    ResolvedParams,
)

MODEL = "transport-bench"
SMALL_BYTES = 4096  # a tensor this small shows the fixed cost of a trip
TARGET_GB_PER_S = 1.0  # tensor bytes over the time of one node -> broker -> node trip
ROOT = Path(__file__).resolve().parents[1]


# --- the fake nodes (each its own process) --------------------------------------------------


def _pattern(numel: int) -> torch.Tensor:
    # Integers below 256 are exact in bfloat16, so the receiver can check what arrived.
    return (torch.arange(numel, dtype=torch.int32) % 251).to(torch.bfloat16)


def _check(tensor: torch.Tensor, nbytes: int) -> None:
    if tensor.dtype != torch.bfloat16 or tensor.numel() * 2 != nbytes:
        raise ValueError(f"received {tensor.dtype} {list(tensor.shape)}, expected {nbytes} bytes of bfloat16")
    flat = tensor.reshape(-1)
    index = torch.arange(0, flat.numel(), 4099)  # a sample: a full pattern would churn 24 MiB per check
    if not torch.equal(flat[index], (index % 251).to(torch.bfloat16)):
        raise ValueError("the tensor's contents changed on the way")


class FakeEncoder:
    """Returns a bfloat16 tensor of the size named in the prompt ("bytes=N") as embeddings."""

    def __init__(self) -> None:
        self.tensors: dict[int, torch.Tensor] = {}

    def __call__(self, jobs: list[EncodeJob], progress) -> list[Embeddings]:
        results = []
        for job in jobs:
            nbytes = int(job.request.prompt.removeprefix("bytes="))
            if nbytes not in self.tensors:
                self.tensors[nbytes] = _pattern(nbytes // 2).reshape(1, -1)  # (1, N) bfloat16
            embeds = {"prompt_embeds": self.tensors[nbytes]}
            embeds["sent_at"] = torch.tensor([now()], dtype=torch.float64)  # the last thing done
            results.append(Embeddings(job_id=job.job_id, embeds=embeds))
        return results


def fake_denoiser(jobs: list[DenoiseJob], progress) -> list[DenoisedLatents]:
    """Times trip 1, checks the tensor, sends the same tensor on as the request's latents.

    Its timings ride to the decoder in the params' prompt, their one free-text field.
    """
    received = now()
    results = []
    for job in jobs:
        trip = received - float(job.embeds["sent_at"][0])
        tensor = job.embeds["prompt_embeds"]
        _check(tensor, int(job.request.prompt.removeprefix("bytes=")))
        timings = json.dumps({"embeddings_trip_s": trip, "sent_at": now()})
        params = ResolvedParams(
            model=MODEL, family="fake", prompt=timings, negative_prompt="", seed=job.request.seed, steps=1,
            guidance=None, true_cfg=None, height=1, width=1,
        )  # fmt: skip
        results.append(DenoisedLatents(job_id=job.job_id, latents=tensor, params=params))
    return results


def fake_decoder(jobs: list[DecodeJob], progress) -> list[DecodedImage]:
    """Times trip 2 and answers with both trip times in place of a PNG."""
    received = now()
    results = []
    for job in jobs:
        sent = json.loads(job.params.prompt)
        timings = {
            "embeddings_trip_s": sent["embeddings_trip_s"],
            "latents_trip_s": received - sent["sent_at"],
            "bytes": job.latents.numel() * job.latents.element_size(),
        }
        results.append(DecodedImage(job_id=job.job_id, png=json.dumps(timings).encode()))
    return results


def run_node(service: str, broker: str) -> int:
    from protocol.allocator import keep_freed_buffers
    from protocol.worker import Worker
    from triptych.node_runner import exit_with_parent

    keep_freed_buffers()  # as a real node does

    handler = {"encoder": FakeEncoder(), "denoiser": fake_denoiser, "decoder": fake_decoder}[service]
    worker = Worker(broker, service, MODEL, handler)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop.set())
    exit_with_parent(worker.stop)
    worker.run()
    return 0


# --- the measurement ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """The broker and the three fake nodes, stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, address: str, logs: Path) -> None:
        self.address = address
        self.logs = logs
        self.procs: list[subprocess.Popen] = []

    def _spawn(self, name: str, command: list[str]) -> None:
        env = {**os.environ, "TRIPTYCH_PARENT_PID": str(os.getpid())}
        with open(self.logs / f"{name}.log", "w") as log:
            self.procs.append(
                subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=ROOT)
            )

    def __enter__(self) -> Processes:
        self._spawn("broker", [sys.executable, "-m", "triptych", "broker", "--bind", self.address])
        for service in ("encoder", "denoiser", "decoder"):
            self._spawn(
                service, [sys.executable, str(Path(__file__).resolve()), "--node", service, "--broker", self.address]
            )
        return self

    def _fail(self, reason: str) -> RuntimeError:
        tails = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.logs.glob("*.log")))
        return RuntimeError(f"{reason}\n{tails}")

    def wait_ready(self, timeout: float = 120.0) -> None:
        from triptych.client import Client, GenerationError

        deadline = time.monotonic() + timeout
        with Client(self.address) as client:
            while time.monotonic() < deadline:
                if any(p.poll() is not None for p in self.procs):
                    raise self._fail("a broker or node process exited during start-up")
                try:
                    if len(client.status(timeout=1.0).nodes) >= 3:
                        return
                except GenerationError:
                    pass
                time.sleep(0.1)
        raise self._fail(f"the fake nodes did not register within {timeout:g}s")

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs[1:] + self.procs[:1]:  # nodes first, broker last
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def measure_trips(address: str, nbytes: int, requests: int, warmup: int) -> dict:
    """``requests`` requests one after another; trip times from the nodes, round trips here."""
    from triptych.client import Client

    trips: dict[str, list[float]] = {"embeddings_trip_s": [], "latents_trip_s": []}
    round_trips = []
    with Client(address, timeout=60.0) as client:
        for i in range(warmup + requests):
            start = time.perf_counter()
            (image,) = client.generate(f"bytes={nbytes}", model=MODEL, seed=i, steps=1)
            elapsed = time.perf_counter() - start
            timings = json.loads(image.png)
            if timings["bytes"] != nbytes:
                raise RuntimeError(f"the decoder received {timings['bytes']} bytes, not {nbytes}")
            if i >= warmup:
                round_trips.append(elapsed)
                for key in trips:
                    trips[key].append(timings[key])
    result: dict = {"bytes": nbytes, "requests": requests}
    for key, values in trips.items():
        name = key.removesuffix("_trip_s")
        result[name] = {
            "median_s": median(values),
            "min_s": min(values),
            "gb_per_s": nbytes / median(values) / 1e9,
        }
    result["round_trip_s"] = median(round_trips)
    return result


def measure_memcpy(nbytes: int, repeat: int) -> dict:
    """One thread copying the same bytes: from a cache-warm source, and from a cold one.

    Single-threaded like memcpy: torch's parallel copy of a few MiB mostly measures how soon
    its second thread gets a core on a busy machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure_memcpy(nbytes, repeat)
    finally:
        torch.set_num_threads(threads)


def _measure_memcpy(nbytes: int, repeat: int) -> dict:
    source = _pattern(nbytes // 2)
    target = torch.empty_like(source)
    clone_s = timed(source.clone, repeat, warmup=3)
    copy_s = timed(lambda: target.copy_(source), repeat, warmup=3)
    # Cold: each copy reads a different buffer of a 256 MiB ring, larger than the CPU's caches.
    ring = [source.clone() for _ in range(max(256 * 2**20 // nbytes, 2))]
    turn = iter(range(10**9))
    cold_s = timed(lambda: target.copy_(ring[next(turn) % len(ring)]), repeat, warmup=len(ring))
    return {name: _rate(nbytes, times) for name, times in (("clone", clone_s), ("copy", copy_s), ("copy_cold", cold_s))}


def measure_raw_zmq(nbytes: int, repeat: int) -> dict:
    """The socket alone: one zero-copy PUSH -> PULL message over TCP loopback, no codec, no broker."""
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    data = memoryview(_pattern(nbytes // 2).view(torch.uint8).numpy())

    def hop() -> None:
        push.send(data, copy=False)
        pull.recv(copy=False)

    try:
        return _rate(nbytes, timed(hop, repeat, warmup=5))
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()


def _rate(nbytes: int, times: list[float]) -> dict:
    return {"median_s": median(times), "min_s": min(times), "gb_per_s": nbytes / median(times) / 1e9}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=float, default=8.0, help="tensor size in MiB (default 8)")
    parser.add_argument("--requests", type=int, default=40, help="timed requests per tensor size (default 40)")
    parser.add_argument("--tiny", "--smoke", action="store_true", help="a few requests only: a check that it runs")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--node", choices=("encoder", "denoiser", "decoder"), help=argparse.SUPPRESS)
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.node:
        return run_node(args.node, args.broker)

    nbytes = int(args.mib * 2**20) // 2 * 2
    requests, warmup, repeat = (5, 2, 20) if args.tiny else (args.requests, 5, 200)
    info = machine()
    print(f"transport benchmark | {describe(info)}")
    address = f"tcp://127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="triptych-transport-") as logs, Processes(address, Path(logs)) as procs:
        procs.wait_ready()
        big = measure_trips(address, nbytes, requests, warmup)
        small = measure_trips(address, SMALL_BYTES, requests, warmup)
    memcpy = measure_memcpy(nbytes, repeat)
    raw = measure_raw_zmq(nbytes, repeat=max(requests, 20))

    trip_s = (big["embeddings"]["median_s"] + big["latents"]["median_s"]) / 2  # the two trips' medians
    trip_gbps = nbytes / trip_s / 1e9
    ratio = memcpy["copy"]["gb_per_s"] / trip_gbps
    size = f"{nbytes / 2**20:g} MiB"
    rows = [
        [f"node -> broker -> node: embeddings, {size}", 2, big["embeddings"]],
        [f"node -> broker -> node: latents, {size}", 2, big["latents"]],
        [f"node -> broker -> node: {SMALL_BYTES} B (fixed cost)", 2, {**small["embeddings"], "gb_per_s": None}],
        [f"raw zmq PUSH -> PULL, one message, {size}", 1, raw],
        [f"memcpy: torch clone, {size}", 0, memcpy["clone"]],
        [f"memcpy: copy_, warm source, {size}", 0, memcpy["copy"]],
        [f"memcpy: copy_, cold source, {size}", 0, memcpy["copy_cold"]],
    ]
    print(f"{requests} requests per size, one at a time, loopback TCP")
    print(
        table(
            ["path", "TCP legs", "median ms", "best ms", "GB/s (median)"],
            [[name, legs, r["median_s"] * 1e3, r["min_s"] * 1e3, r["gb_per_s"]] for name, legs, r in rows],
        )
    )
    print(
        f"result: through the broker {trip_gbps:.2f} GB/s (target >= {TARGET_GB_PER_S:g} GB/s: "
        f"{verdict(trip_gbps >= TARGET_GB_PER_S)}); memcpy {memcpy['copy']['gb_per_s']:.1f} GB/s"
    )
    print(f"result: memcpy / broker trip = {ratio:.0f}x (informational, no target)")
    print(
        f"result: one whole request, client to client (the tensor rides 4 of its 8 legs): {big['round_trip_s'] * 1e3:.1f} ms"
    )
    write_json(
        args.json,
        {
            "benchmark": "transport",
            "mode": "tiny" if args.tiny else "full",
            "machine": info,
            "bytes": nbytes,
            "trips": big,
            "small_trips": small,
            "raw_zmq_hop": raw,
            "memcpy": memcpy,
            "broker_gb_per_s": trip_gbps,
            "ratio_memcpy_over_broker": ratio,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
