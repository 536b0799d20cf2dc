"""The node runtime: register with the broker, heartbeat, run jobs, send results.

An IO thread owns the DEALER socket: it receives jobs into an in-memory queue, forwards results
and progress from the compute thread (through an inproc PAIR socket), sends heartbeats and
re-registers when the broker restarts or forgets the node. The compute thread -- the caller of
:meth:`Worker.run` -- only ever sees typed stage jobs (:class:`~protocol.messages.StageJob`,
tensors rebuilt as torch tensors) and a progress callback, and returns typed stage results; it
knows nothing of sockets, so a long denoise never delays a heartbeat (torch and zmq both
release the GIL).

A node that takes long to load calls :meth:`Worker.announce` before it reads its weights: the
broker then knows the model is on its way (it holds requests for it instead of failing them) and
sees the node heartbeat while it loads; :meth:`Worker.configure` then sets what it runs, and
:meth:`Worker.run` registers it as ready.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

import zmq

from protocol import errors, messages
from protocol.codec import CodecError
from protocol.messages import (
    LOADING,
    READY,
    Heartbeat,
    JobCancel,
    JobFailed,
    JobProgress,
    Reconnect,
    StageJob,
    StageResult,
    WorkerGoodbye,
    WorkerReady,
)
from protocol.security import Curve
from protocol.sockets import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS, connect_dealer

logger = logging.getLogger(__name__)


_GOODBYE = bytes(messages.to_frames(WorkerGoodbye())[0])


class JobCancelled(Exception):
    """Raised from a progress callback when the broker cancelled the running job."""


@dataclass
class Job:
    message: StageJob
    cancelled: threading.Event
    batch_key: Hashable | None = None  # computed once, the first time the job is batched

    @property
    def job_id(self) -> str:
        return self.message.job_id


class ProgressFn(Protocol):
    """(step, total[, previews]); raises JobCancelled when all the batch's jobs are cancelled.

    ``previews``, where given, holds one list per job of the batch, in order: a PNG per image of
    that job's request, or none.
    """

    def __call__(self, step: int, total: int, previews: Sequence[list[bytes]] | None = None) -> None: ...


# A batch of jobs -> one result each, in order (their job ids set; the worker adds the node's stats).
Handler = Callable[[list[StageJob], ProgressFn], list[StageResult]]
BatchKey = Callable[[StageJob], Hashable]  # jobs with equal keys may run as one batch


def node_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Worker:
    def __init__(
        self,
        broker: str,
        service: str,
        model: str,
        handler: Handler | None = None,
        *,
        capacity: int = 2,
        max_batch: int = 1,
        batch_window: float = 0.0,
        batch_key: BatchKey | None = None,
        info: dict | None = None,
        stats: Callable[[], dict] | None = None,
        curve: Curve | None = None,
        ctx: zmq.Context | None = None,
    ) -> None:
        self.broker = broker
        self.curve = curve
        self.ready = WorkerReady(service=service, model=model, node=node_name())
        self.configure(
            handler,
            capacity=capacity,
            max_batch=max_batch,
            batch_window=batch_window,
            batch_key=batch_key,
            info=info,
            stats=stats,
        )
        self.ctx = ctx or zmq.Context.instance()
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.stop = threading.Event()
        self._active: dict[str, Job] = {}  # received and not yet answered
        self._pipe = f"inproc://worker-{uuid.uuid4().hex}"
        self._io_ready = threading.Event()
        self._io = threading.Thread(target=self._io_loop, name="worker-io", daemon=True)
        self._send_to_io: zmq.Socket | None = None

    def configure(
        self,
        handler: Handler | None,
        *,
        capacity: int = 2,
        max_batch: int = 1,
        batch_window: float = 0.0,
        batch_key: BatchKey | None = None,
        info: dict | None = None,
        stats: Callable[[], dict] | None = None,
    ) -> None:
        """What the node runs and how it is fed; set before :meth:`run` (by a node that announced
        itself, once its weights are read)."""
        self.handler = handler
        self.max_batch = max_batch  # jobs run together in one handler call, at most
        self.batch_window = batch_window  # seconds to wait for compatible jobs to fill a batch
        self.batch_key = batch_key or (lambda job: job.job_id)  # jobs with equal keys may share a batch
        self.stats = stats  # the node's cumulative counters, reported with heartbeats and results; any thread
        self.ready = dataclasses.replace(self.ready, capacity=capacity, info=info or {})

    # --- compute thread ---------------------------------------------------------------------

    def announce(self) -> None:
        """Connect now and register as loading, before the weights are read: requests for this model
        wait for it at the broker instead of failing, and heartbeats flow while it loads."""
        if self._send_to_io is None:
            self.ready = dataclasses.replace(self.ready, state=LOADING)
            self._start_io()

    def close(self) -> None:
        """Leave without serving (loading failed after :meth:`announce`): the broker is told goodbye."""
        if self._send_to_io is not None:
            self._leave()

    def _start_io(self) -> None:
        self._io.start()
        self._io_ready.wait()
        self._send_to_io = self.ctx.socket(zmq.PAIR)
        self._send_to_io.connect(self._pipe)

    def _leave(self) -> None:
        self._send(WorkerGoodbye())
        assert self._send_to_io is not None
        self._send_to_io.close(linger=100)
        self._io.join(timeout=2)

    def run(self) -> None:
        """Register as ready and serve jobs until :attr:`stop` is set; the current job is finished first."""
        if self.handler is None:
            raise RuntimeError("configure() the worker's handler before run()")
        if self._send_to_io is None:
            self.ready = dataclasses.replace(self.ready, state=READY)
            self._start_io()
        else:  # announced while loading: now it is ready
            self.ready = dataclasses.replace(self.ready, state=READY)
            self._send(self.ready)
        try:
            backlog: list[Job] = []  # received, not yet run
            while not self.stop.is_set():
                if not backlog:
                    try:
                        backlog.append(self.jobs.get(timeout=0.1))
                    except queue.Empty:
                        continue
                batch = self._next_batch(backlog)
                self._run_batch(batch)
        finally:
            self._leave()

    def _next_batch(self, backlog: list[Job]) -> list[Job]:
        """The oldest job and up to max_batch - 1 compatible ones, waiting batch_window for more."""
        key = self._key(backlog[0])
        deadline = time.monotonic() + self.batch_window
        while True:
            while True:  # take in whatever has arrived
                try:
                    backlog.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            batch = [job for job in backlog if self._key(job) == key][: self.max_batch]
            left = deadline - time.monotonic()
            if len(batch) >= self.max_batch or left <= 0:
                break
            with contextlib.suppress(queue.Empty):
                backlog.append(self.jobs.get(timeout=left))
        for job in batch:
            backlog.remove(job)
        return batch

    def _key(self, job: Job) -> Hashable:
        if job.batch_key is None:
            try:
                job.batch_key = job.job_id if self.max_batch <= 1 else self.batch_key(job.message)
            except Exception:  # a malformed job runs alone and fails on its own
                job.batch_key = job.job_id
        return job.batch_key

    def _run_batch(self, batch: list[Job]) -> None:
        live = [job for job in batch if not job.cancelled.is_set()]
        for job in batch:
            if job.cancelled.is_set():
                self._send(JobFailed(job_id=job.job_id, error="cancelled", code=errors.CANCELLED))
        if not live:
            return

        def progress(step: int, total: int, previews: Sequence[list[bytes]] | None = None) -> None:
            if all(job.cancelled.is_set() for job in live):
                raise JobCancelled(live[0].job_id)
            for index, job in enumerate(live):
                shown = list(previews[index]) if previews is not None and index < len(previews) else []
                self._send(JobProgress(job_id=job.job_id, step=step, total=total, previews=shown))

        try:
            results = self.handler([job.message for job in live], progress)
            if len(results) != len(live):
                raise RuntimeError(f"handler returned {len(results)} results for {len(live)} jobs")
        except JobCancelled:
            logger.info("batch of %d cancelled", len(live))
            for job in live:
                self._send(JobFailed(job_id=job.job_id, error="cancelled", code=errors.CANCELLED))
            return
        except Exception as exc:
            if isinstance(exc, errors.RequestError):
                logger.info("refused %d job(s): %s", len(live), exc)
            else:
                requests = [job.message.request_id for job in live]
                logger.exception("batch of %d job(s) failed (requests %s)", len(live), requests)
            for job in live:
                self._send(failure(job.job_id, exc))
            return
        stats = self._stats()
        for job, result in zip(live, results, strict=True):
            if job.cancelled.is_set():
                self._send(JobFailed(job_id=job.job_id, error="cancelled", code=errors.CANCELLED))
            else:
                try:
                    self._send(dataclasses.replace(result, job_id=job.job_id, stats=stats))
                except CodecError as exc:  # a result that cannot travel fails its job, not the node
                    self._send(JobFailed(job_id=job.job_id, error=f"result could not be encoded: {exc}"))

    def _stats(self) -> dict:
        if self.stats is None:
            return {}
        try:
            return dict(self.stats())
        except Exception:  # figures are a nicety: never let them break a job or a heartbeat
            logger.exception("reading the node's stats failed")
            return {}

    def _send(self, msg: messages.Message) -> None:
        assert self._send_to_io is not None
        self._send_to_io.send_multipart(messages.to_frames(msg), copy=False)
        if isinstance(msg, StageResult | JobFailed):
            self._active.pop(msg.job_id, None)  # answered: a cancel for it no longer applies

    # --- IO thread --------------------------------------------------------------------------

    def _io_loop(self) -> None:
        from_compute = self.ctx.socket(zmq.PAIR)
        from_compute.bind(self._pipe)
        self._io_ready.set()
        dealer = self._connect()
        last_heard = last_sent = time.monotonic()
        poller = zmq.Poller()
        poller.register(from_compute, zmq.POLLIN)
        poller.register(dealer, zmq.POLLIN)
        goodbye = False
        broker_was_up = True
        while not goodbye:
            events = dict(poller.poll(int(HEARTBEAT_INTERVAL * 250)))
            now = time.monotonic()
            if from_compute in events:
                frames = from_compute.recv_multipart(copy=False)
                goodbye = len(frames) == 1 and frames[0].bytes == _GOODBYE  # always the last message
                dealer.send_multipart(frames, copy=False)
                last_sent = now
            if dealer in events:
                last_heard = now
                broker_was_up = True
                self._on_broker(dealer, dealer.recv_multipart(copy=False))
            if now - last_sent >= HEARTBEAT_INTERVAL:
                dealer.send_multipart(messages.to_frames(Heartbeat(stats=self._stats())))
                last_sent = now
            if now - last_heard > HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS:
                level = logging.WARNING if broker_was_up else logging.DEBUG  # say it once per outage
                logger.log(level, "broker %s silent for %.1fs: reconnecting", self.broker, now - last_heard)
                broker_was_up = False
                poller.unregister(dealer)
                dealer.close(linger=0)
                dealer = self._connect()
                poller.register(dealer, zmq.POLLIN)
                last_heard = now
        dealer.close(linger=500)
        from_compute.close(linger=0)

    @staticmethod
    def _send_io(dealer: zmq.Socket, msg: messages.Message) -> None:
        """Send from the IO thread itself (the compute thread sends through the pipe)."""
        dealer.send_multipart(messages.to_frames(msg))

    def _connect(self) -> zmq.Socket:
        dealer = connect_dealer(self.ctx, self.broker, curve=self.curve)
        dealer.send_multipart(messages.to_frames(self.ready))
        return dealer

    def _on_broker(self, dealer: zmq.Socket, frames: list[zmq.Frame]) -> None:
        try:
            msg = messages.from_frames(frames, torch_tensors=True)
        except (CodecError, messages.ProtocolError) as exc:
            logger.warning("dropping a malformed message from the broker: %s", exc)
            if (job := messages.job_of(frames)) is not None:  # a job we cannot run fails, not hangs
                self._send_io(dealer, JobFailed(job_id=job[1], error=f"malformed job: {exc}"))
            return
        match msg:
            case StageJob():
                if msg.job_id in self._active:
                    return
                if self.ready.service != msg.SERVICE:
                    self._send_io(
                        dealer, JobFailed(job_id=msg.job_id, error=f"a {self.ready.service} runs no {msg.KIND}")
                    )
                    return
                job = Job(message=msg, cancelled=threading.Event())
                self._active[job.job_id] = job
                self.jobs.put(job)
            case JobCancel():
                if (job := self._active.get(msg.job_id)) is not None:
                    job.cancelled.set()
            case Reconnect():
                logger.info("broker asked to re-register")
                dealer.send_multipart(messages.to_frames(self.ready))
            case Heartbeat():
                pass
            case _:
                logger.warning("dropping unexpected %s from the broker", msg.KIND)


def failure(job_id: str, exc: BaseException) -> JobFailed:
    """The JobFailed a handler's exception becomes: invalid requests and out-of-memory named as such."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, errors.RequestError):
        return JobFailed(job_id=job_id, error=text[:500], code=errors.INVALID_REQUEST, field=exc.field)
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text.lower():
        return JobFailed(job_id=job_id, error=f"out of memory: {text}"[:500], code=errors.OUT_OF_MEMORY)
    return JobFailed(job_id=job_id, error=f"{type(exc).__name__}: {text}"[:500], code=errors.MODEL_ERROR)
