"""Nodes that stand in for real ones: the real node runtime (protocol.worker.Worker) with no model.

Their answers are well-formed and worthless (an empty embedding, zero latents, a PNG signature),
which is all the broker looks at. A fake node serves, hangs in its compute thread while its IO
thread keeps heartbeating, or exits at its first job, as a node killed by its work would.

In a thread of the test process: ``FakeNode(address, "denoiser", behaviour="hang").start()``; as a
process of its own: ``python -m tests.fake_nodes decoder --broker ADDR --model M --behaviour exit``.
"""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Sequence

from protocol.messages import (
    DecodedImage,
    DecodeJob,
    DenoisedLatents,
    DenoiseJob,
    Embeddings,
    ResolvedParams,
    StageJob,
    StageResult,
)
from protocol.stages import DECODER, DENOISER, ENCODER
from protocol.tensors import WireTensor
from protocol.worker import ProgressFn, Worker

MODEL = "fake"
PNG = b"\x89PNG\r\n\x1a\n fake"


def answer(job: StageJob) -> StageResult:
    """A well-formed result for any stage job (the worker sets its job id)."""
    if isinstance(job, DenoiseJob):
        spec = job.request
        params = ResolvedParams(
            model=spec.model,
            family="fake",
            prompt=spec.prompt,
            negative_prompt=spec.negative_prompt or "",
            seed=spec.seed,
            steps=spec.steps or 2,
            guidance=None,
            true_cfg=None,
            height=spec.height or 64,
            width=spec.width or 64,
        )
        shape = (spec.num_images, 4, 8, 8)  # (num_images, C, h, w)
        latents = WireTensor("float32", shape, memoryview(bytes(4 * 4 * 8 * 8 * spec.num_images)))
        return DenoisedLatents(job_id="", latents=latents, params=params)
    if isinstance(job, DecodeJob):
        return DecodedImage(job_id="", png=PNG + bytes([job.index]))
    return Embeddings(job_id="", embeds={})


class FakeNode:
    """A fake node on a thread: ``behaviour`` is serve, hang (after its first step) or exit (at its first job)."""

    def __init__(self, broker: str, service: str, model: str = MODEL, behaviour: str = "serve") -> None:
        self.behaviour = behaviour
        self.jobs: list[str] = []  # request ids of the jobs it was handed, in order
        self.started = threading.Event()  # set when it is handed its first job
        self.release = threading.Event()  # a hanging node carries on once set
        self.worker = Worker(broker, service, model, self._handle, capacity=1)
        self._thread = threading.Thread(target=self.worker.run, name=f"fake-{service}", daemon=True)

    def _handle(self, jobs: list[StageJob], progress: ProgressFn) -> list[StageResult]:
        self.jobs += [job.request_id for job in jobs]
        self.started.set()
        if self.behaviour == "exit":
            os._exit(3)
        if isinstance(jobs[0], DenoiseJob):
            progress(1, 2)
            if self.behaviour == "hang":  # the compute thread is stuck; the IO thread heartbeats on
                self.release.wait(timeout=120)
            progress(2, 2)
        return [answer(job) for job in jobs]

    def start(self) -> FakeNode:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.worker.stop.set()
        self._thread.join(timeout=10)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fake_nodes")
    parser.add_argument("service", choices=(ENCODER, DENOISER, DECODER))
    parser.add_argument("--broker", required=True)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--behaviour", choices=("serve", "hang", "exit"), default="serve")
    args = parser.parse_args(argv)
    if args.service == DECODER:
        import torch  # noqa: F401 -- decode jobs carry tensors, rebuilt as torch ones: load it before any job

    node = FakeNode(args.broker, args.service, args.model, args.behaviour)
    node.worker.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
