"""The broker's routing logic, free of sockets so it can be tested message by message.

A request runs as a chain of jobs: one ``encoder`` job (prompt -> embeddings), one
``denoiser`` job (embeddings -> latents for all its images), then one ``decoder`` job per
image (latents -> PNG). Each job stays here, with its input, until its result arrives; when
the node holding it dies the job goes back to the front of its queue for another node.

Jobs are queued per (service, model), users taking turns (:class:`FairQueue`), and handed to the
least-loaded live node of that kind (least recently used among equals). Results are accepted once
per job, so a client receives exactly one image per index however often a job was re-dispatched.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from dataclasses import dataclass, field

import torch

from protocol.fair_queue import FairQueue
from protocol.messages import (
    DECODER,
    DENOISER,
    ENCODER,
    CancelRequest,
    GenerateRequest,
    Heartbeat,
    ImageResult,
    JobAssign,
    JobCancel,
    JobDone,
    JobFailed,
    JobProgress,
    Message,
    ProgressEvent,
    Reconnect,
    RequestAccepted,
    RequestFailed,
    StatusReply,
    StatusRequest,
    WorkerGoodbye,
    WorkerReady,
)
from protocol.metrics import BrokerMetrics, clean_stats
from protocol.sockets import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS
from protocol.validation import request_error

logger = logging.getLogger(__name__)

Outgoing = tuple[bytes, Message]


@dataclass
class WorkerState:
    identity: bytes
    service: str
    model: str
    node: str
    capacity: int
    info: dict
    last_seen: float
    jobs: set[str] = field(default_factory=set)
    last_assigned: float = 0.0
    jobs_done: int = 0
    stats: dict = field(default_factory=dict)  # the node's latest counters (cache hits...)


@dataclass
class Job:
    job_id: str
    request_id: str
    service: str
    model: str
    payload: dict
    worker: bytes | None = None
    dispatches: int = 0
    assigned_at: float = 0.0
    steps_reported: int = 0  # last step the node reported for it
    reported_at: float = 0.0  # when it reported that step


@dataclass
class RequestState:
    request: GenerateRequest
    client: bytes
    deadline: float
    images_left: set[int]
    job_id: str | None = None  # the job of the current stage (encode, denoise)
    decode_jobs: set[str] = field(default_factory=set)
    accepted_at: float = 0.0


class BrokerCore:
    """Feed it messages with :meth:`handle` and time with :meth:`tick`; read :attr:`outbox`."""

    def __init__(
        self, *, max_requests: int = 1_000, max_dispatches: int = 5, metrics: BrokerMetrics | None = None
    ) -> None:
        self.max_requests = max_requests  # requests in flight before new ones are refused as busy
        self.max_dispatches = max_dispatches  # a job whose nodes keep dying fails after this many tries
        self.workers: dict[bytes, WorkerState] = {}
        self.requests: dict[str, RequestState] = {}
        self.jobs: dict[str, Job] = {}
        self.queues: dict[tuple[str, str], FairQueue] = {}
        self.unrouted: list[str] = []  # requests naming no model, waiting for a node to say which
        self.outbox: list[Outgoing] = []
        self.metrics = metrics or BrokerMetrics()  # told what happens; no-op unless metrics are on
        self._last_heartbeat = 0.0

    # --- inbound ----------------------------------------------------------------------------

    def handle(self, sender: bytes, msg: Message, now: float) -> None:
        worker = self.workers.get(sender)
        if worker is not None:
            worker.last_seen = now
        match msg:
            case GenerateRequest():
                self._on_generate(sender, msg, now)
            case CancelRequest():
                req = self.requests.get(msg.request_id)
                if req is not None and req.client == sender:
                    self._fail(msg.request_id, "cancelled by the client", outcome="cancelled")
            case StatusRequest():
                self.outbox.append((sender, self._status(msg.request_id, now)))
            case WorkerReady():
                self._on_ready(sender, msg, now)
            case WorkerGoodbye():
                if worker is not None:
                    self._drop_worker(worker, "said goodbye")
            case Heartbeat():
                if worker is None:
                    self.outbox.append((sender, Reconnect()))
                self._on_stats(worker, msg.stats)
            case JobProgress():
                self._on_progress(sender, msg, now)
            case JobDone():
                self._on_stats(worker, msg.stats)
                self._on_done(sender, msg, now)
            case JobFailed():
                self._on_failed(sender, msg)
            case _:
                logger.warning("dropping unexpected %s message", msg.KIND)
        self._dispatch(now)

    def tick(self, now: float) -> None:
        """Heartbeats out, dead nodes out (their jobs requeued), expired requests failed."""
        if now - self._last_heartbeat >= HEARTBEAT_INTERVAL:
            self._last_heartbeat = now
            self.outbox.extend((identity, Heartbeat()) for identity in self.workers)
        expiry = HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS
        for worker in [w for w in self.workers.values() if now - w.last_seen > expiry]:
            self._drop_worker(worker, f"missed heartbeats for {now - worker.last_seen:.1f}s")
        for request_id in [r for r, req in self.requests.items() if now > req.deadline]:
            self._fail(request_id, self._timeout_reason(request_id))
        self._dispatch(now)
        self.metrics.on_tick(self.workers.values(), self.queues, len(self.requests))

    # --- requests ---------------------------------------------------------------------------

    def _on_generate(self, client: bytes, req: GenerateRequest, now: float) -> None:
        if req.request_id in self.requests:  # a resend: one result per image, not two
            self.outbox.append((client, RequestAccepted(request_id=req.request_id)))
            return
        if (error := request_error(req)) is not None:
            self.metrics.on_request_finished(req.model, "failed")
            self.outbox.append((client, RequestFailed(request_id=req.request_id, error=error)))
            return
        if len(self.requests) >= self.max_requests:
            error = f"broker busy ({len(self.requests)} requests in flight), retry later"
            self.metrics.on_request_finished(req.model, "failed")
            self.outbox.append((client, RequestFailed(request_id=req.request_id, error=error, retryable=True)))
            return
        self.outbox.append((client, RequestAccepted(request_id=req.request_id)))
        self.requests[req.request_id] = RequestState(
            request=req,
            client=client,
            deadline=now + req.timeout,
            images_left=set(range(req.num_images)),
            accepted_at=now,
        )
        if req.model:
            self._start(req.request_id)
        else:
            self.unrouted.append(req.request_id)
            self._route_unnamed()

    def _route_unnamed(self) -> None:
        """Give requests without a model the broker's only model, once a node has named it."""
        models = sorted({w.model for w in self.workers.values()})
        if not self.unrouted or not models:
            return
        waiting, self.unrouted = self.unrouted, []
        for request_id in waiting:
            if request_id not in self.requests:
                continue
            if len(models) > 1:
                self._fail(request_id, f"the broker serves several models ({', '.join(models)}): name one")
            else:
                self.requests[request_id].request.model = models[0]
                self._start(request_id)

    def _start(self, request_id: str) -> None:
        req = self.requests[request_id]
        req.job_id = self._enqueue(request_id, ENCODER, {"request": self._request_fields(req.request)})

    @staticmethod
    def _request_fields(req: GenerateRequest) -> dict:
        """What the nodes get of a request: all but whom it is for."""
        fields = dataclasses.asdict(req)
        del fields["user"]
        return fields

    def _fail(self, request_id: str, error: str, retryable: bool = False, outcome: str = "failed") -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        self.metrics.on_request_finished(req.request.model, outcome)
        for job_id in [req.job_id, *req.decode_jobs]:
            job = self.jobs.pop(job_id, None) if job_id else None
            if job is None:
                continue
            queue = self.queues[(job.service, job.model)]
            if job.worker is not None:
                self.outbox.append((job.worker, JobCancel(job_id=job_id)))
            elif job_id in queue:
                queue.remove(job_id)
        logger.info("request %s failed: %s", request_id, error)
        self.outbox.append((req.client, RequestFailed(request_id=request_id, error=error, retryable=retryable)))

    def _timeout_reason(self, request_id: str) -> str:
        req = self.requests[request_id]
        model = req.request.model
        job = self.jobs.get(req.job_id or "") or next(
            (self.jobs[j] for j in req.decode_jobs if j in self.jobs and self.jobs[j].worker is None), None
        )
        if not model:
            return "no node serves any model yet"
        if job is not None and job.worker is None and not self._workers_for(job.service, model):
            return f"no {job.service} node serves model {model}"
        return f"timed out after {req.request.timeout:g}s"

    # --- jobs -------------------------------------------------------------------------------

    def _enqueue(self, request_id: str, service: str, payload: dict) -> str:
        req = self.requests[request_id]
        model = req.request.model
        job = Job(job_id=uuid.uuid4().hex, request_id=request_id, service=service, model=model, payload=payload)
        self.jobs[job.job_id] = job
        # Turns go to whom the work is for: the user a request names (however many connections a
        # gateway spreads it over), else the client's connection.
        line = ("user", req.request.user) if req.request.user else ("client", req.client)
        self.queues.setdefault((service, model), FairQueue()).append(job.job_id, line)
        return job.job_id

    def _workers_for(self, service: str, model: str) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.service == service and w.model == model]

    def _dispatch(self, now: float) -> None:
        for (service, model), queue in self.queues.items():
            while queue:
                free = [w for w in self._workers_for(service, model) if len(w.jobs) < w.capacity]
                if not free:
                    break
                worker = min(free, key=lambda w: (len(w.jobs), w.last_assigned))
                job = self.jobs[queue.popleft()]
                job.worker = worker.identity
                job.dispatches += 1
                job.assigned_at = job.reported_at = now
                job.steps_reported = 0
                worker.jobs.add(job.job_id)
                worker.last_assigned = now
                self.outbox.append(
                    (worker.identity, JobAssign(job_id=job.job_id, request_id=job.request_id, payload=job.payload))
                )
                req = self.requests[job.request_id]
                event = ProgressEvent(request_id=job.request_id, stage=service, node=worker.node)
                self.outbox.append((req.client, event))

    def _finish_job(self, sender: bytes, job_id: str) -> Job | None:
        """Release the sender's slot and claim the job's result; None if already claimed."""
        worker = self.workers.get(sender)
        if worker is not None:
            worker.jobs.discard(job_id)
        job = self.jobs.pop(job_id, None)
        if job is None:
            return None
        queue = self.queues[(job.service, job.model)]
        if job.worker is None and job_id in queue:  # a late result from a node presumed dead: take it
            queue.remove(job_id)
        elif job.worker != sender and job.worker in self.workers:
            self.workers[job.worker].jobs.discard(job_id)
            self.outbox.append((job.worker, JobCancel(job_id=job_id)))
        if worker is not None:
            worker.jobs_done += 1
        return job

    def _on_progress(self, sender: bytes, msg: JobProgress, now: float) -> None:
        job = self.jobs.get(msg.job_id)
        if job is None or job.worker != sender or job.request_id not in self.requests:
            return
        if msg.step > job.steps_reported:
            if job.steps_reported > 0:  # the first step's time also holds the job's setup: not a step time
                self.metrics.on_steps(job.service, job.model, msg.step - job.steps_reported, now - job.reported_at)
            job.steps_reported, job.reported_at = msg.step, now
        req = self.requests[job.request_id]
        node = self.workers[sender].node if sender in self.workers else "?"
        event = ProgressEvent(request_id=job.request_id, stage=job.service, node=node, step=msg.step, total=msg.total)
        self.outbox.append((req.client, event))

    def _on_failed(self, sender: bytes, msg: JobFailed) -> None:
        job = self._finish_job(sender, msg.job_id)
        if job is None:
            return
        worker = self.workers.get(sender)
        node = worker.node if worker else "a node"
        self._fail(job.request_id, f"{job.service} {node} failed: {msg.error}")

    def _on_done(self, sender: bytes, msg: JobDone, now: float) -> None:
        job = self._finish_job(sender, msg.job_id)
        if job is None or job.request_id not in self.requests:
            return
        self.metrics.on_job_finished(job.service, job.model, now - job.assigned_at)
        req = self.requests[job.request_id]
        try:
            if job.service == ENCODER:
                self._after_encode(req, msg.payload)
            elif job.service == DENOISER:
                self._after_denoise(req, msg.payload)
            else:
                self._after_decode(req, job, msg.payload, now)
        except (KeyError, TypeError, ValueError) as exc:
            self._fail(job.request_id, f"{job.service} returned a malformed result: {exc}")

    def _after_encode(self, req: RequestState, payload: dict) -> None:
        embeds = payload["embeds"]
        if not isinstance(embeds, dict):
            raise TypeError("embeds must be a map")
        request_id = req.request.request_id
        job_payload = {"request": self._request_fields(req.request), "embeds": embeds}
        req.job_id = self._enqueue(request_id, DENOISER, job_payload)

    def _after_denoise(self, req: RequestState, payload: dict) -> None:
        latents, params = payload["latents"], payload["params"]
        count = req.request.num_images
        if not isinstance(latents, torch.Tensor) or latents.ndim < 1 or latents.shape[0] != count:
            raise ValueError(f"expected latents for {count} image(s)")
        if not isinstance(params, dict):
            raise TypeError("params must be a map")
        req.job_id = None
        fields = self._request_fields(req.request)
        for index in range(count):
            job_payload = {"request": fields, "params": params, "index": index, "latents": latents[index : index + 1]}
            req.decode_jobs.add(self._enqueue(req.request.request_id, DECODER, job_payload))

    def _after_decode(self, req: RequestState, job: Job, payload: dict, now: float) -> None:
        png = payload["png"]
        if not isinstance(png, bytes):
            raise TypeError("png must be bytes")
        index = job.payload["index"]
        req.decode_jobs.discard(job.job_id)
        req.images_left.discard(index)
        params = job.payload["params"]
        image = ImageResult(
            request_id=req.request.request_id, index=index, seed=req.request.seed + index, png=png, params=params
        )
        self.outbox.append((req.client, image))
        if not req.images_left:
            del self.requests[req.request.request_id]
            self.metrics.on_request_finished(req.request.model, "completed", now - req.accepted_at)

    # --- workers ----------------------------------------------------------------------------

    def _on_ready(self, sender: bytes, msg: WorkerReady, now: float) -> None:
        if msg.service not in (ENCODER, DENOISER, DECODER) or not msg.model or msg.capacity < 1:
            logger.warning("ignoring a malformed registration from %s", msg.node)
            return
        known = self.workers.get(sender)
        if known is not None and (known.service, known.model) != (msg.service, msg.model):
            self._drop_worker(known, "re-registered as another service")
            known = None
        if known is None:
            logger.info("%s %s registered for model %s", msg.service, msg.node, msg.model)
            self.workers[sender] = WorkerState(
                identity=sender,
                service=msg.service,
                model=msg.model,
                node=msg.node,
                capacity=min(msg.capacity, 64),
                info=msg.info,
                last_seen=now,
            )
        self._route_unnamed()

    def _drop_worker(self, worker: WorkerState, reason: str) -> None:
        level = logging.INFO if reason == "said goodbye" else logging.WARNING
        logger.log(level, "%s %s (%s) removed: %s", worker.service, worker.node, worker.model, reason)
        del self.workers[worker.identity]
        for job_id in worker.jobs:
            job = self.jobs.get(job_id)
            if job is None or job.worker != worker.identity:
                continue
            job.worker = None
            if job.dispatches >= self.max_dispatches:
                self._fail(job.request_id, f"{job.service} job lost {job.dispatches} times: nodes keep dying")
                continue
            self.queues[(job.service, job.model)].appendleft(job_id)
            logger.info("re-dispatching %s job of request %s", job.service, job.request_id)

    def _on_stats(self, worker: WorkerState | None, stats: dict) -> None:
        """A node's cumulative counters, sent with heartbeats and results: kept for status and metrics."""
        if worker is None or not stats:
            return
        worker.stats = clean_stats(stats)
        self.metrics.on_node_stats(worker.service, worker.model, worker.node, worker.stats)

    def _status(self, request_id: str, now: float) -> StatusReply:
        nodes = [
            {
                "service": w.service,
                "model": w.model,
                "node": w.node,
                "state": "busy" if w.jobs else "idle",
                "jobs_in_progress": len(w.jobs),
                "jobs_done": w.jobs_done,
                "last_heartbeat_s": round(now - w.last_seen, 3),
                "info": w.info,
                "stats": w.stats,
            }
            for w in self.workers.values()
        ]
        queues = {f"{service}/{model}": len(q) for (service, model), q in self.queues.items()}
        return StatusReply(request_id=request_id, nodes=nodes, queues=queues, requests_in_flight=len(self.requests))
