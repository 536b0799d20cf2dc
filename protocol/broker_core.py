"""The broker's routing logic, free of sockets so it can be tested message by message.

A request runs as its *plan* (:mod:`protocol.plans`): stages whose jobs are made once the
stages they need have answered -- today an ``encode`` job (prompt -> embeddings), a ``denoise``
job (embeddings -> latents for all its images), then one ``decode`` job per image (latents ->
PNG). Each job stays here, with its input, until its result arrives; when the node holding it
dies the job goes back to the front of its queue for another node.

Jobs are queued per (service, model), users taking turns (:class:`FairQueue`), and handed to the
least-loaded live node of that kind (least recently used among equals). Results are accepted once
per job, so a client receives exactly one image per index however often a job was re-dispatched.
Nothing here reads what a job carries: that is the plan's business.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from protocol import errors
from protocol.fair_queue import FairQueue
from protocol.messages import (
    SERVICES,
    CancelRequest,
    GenerateRequest,
    Heartbeat,
    JobCancel,
    JobFailed,
    JobProgress,
    Message,
    ProgressEvent,
    Reconnect,
    RequestAccepted,
    RequestFailed,
    StageJob,
    StageResult,
    StatusReply,
    StatusRequest,
    WorkerGoodbye,
    WorkerReady,
)
from protocol.metrics import BrokerMetrics, clean_stats
from protocol.plans import Plan, PlanContext, PlanError, plan_for
from protocol.sockets import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS
from protocol.validation import MAX_PREVIEW_BYTES, request_error

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
    job_seconds: float = 0.0  # dispatch to result, summed over the results it sent
    jobs_timed: int = 0  # the results summed there


@dataclass
class Job:
    message: StageJob  # what the node gets, kept until its result arrives
    model: str
    position: int  # its place among its stage's jobs
    worker: bytes | None = None
    dispatches: int = 0
    assigned_at: float = 0.0
    steps_reported: int = 0  # last step the node reported for it
    reported_at: float = 0.0  # when it reported that step

    @property
    def job_id(self) -> str:
        return self.message.job_id

    @property
    def request_id(self) -> str:
        return self.message.request_id

    @property
    def stage(self) -> str:
        return self.message.STAGE

    @property
    def service(self) -> str:
        return self.message.SERVICE


@dataclass
class RequestState:
    request: GenerateRequest
    client: bytes
    deadline: float
    plan: Plan
    accepted_at: float = 0.0
    results: dict[str, list[StageResult | None]] = field(default_factory=dict)  # stage -> per job, once started
    outstanding: set[str] = field(default_factory=set)  # job ids sent or queued, not yet answered

    def context(self) -> PlanContext:
        return PlanContext(request=self.request, results=self.results)  # type: ignore[arg-type]

    def finished(self) -> bool:
        return len(self.results) == len(self.plan.stages) and not self.outstanding


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
                    self._fail(msg.request_id, "cancelled by the client", errors.CANCELLED, outcome="cancelled")
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
            case StageResult():
                self._on_stats(worker, msg.stats)
                self._on_result(sender, msg, now)
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
            self._fail(request_id, *self._timeout_reason(request_id))
        self._dispatch(now)
        self.metrics.on_tick(self.workers.values(), self.queues, len(self.requests))

    # --- requests ---------------------------------------------------------------------------

    def _on_generate(self, client: bytes, req: GenerateRequest, now: float) -> None:
        if req.request_id in self.requests:  # a resend: one result per image, not two
            self.outbox.append((client, RequestAccepted(request_id=req.request_id)))
            return
        if (problem := request_error(req)) is not None:
            self.metrics.on_request_finished(req.model, "failed")
            bad_field, error = problem
            failed = RequestFailed(request_id=req.request_id, error=error, code=errors.INVALID_REQUEST, field=bad_field)
            self.outbox.append((client, failed))
            return
        if len(self.requests) >= self.max_requests:
            error = f"broker busy ({len(self.requests)} requests in flight), retry later"
            self.metrics.on_request_finished(req.model, "failed")
            failed = RequestFailed(request_id=req.request_id, error=error, code=errors.BUSY, retryable=True)
            self.outbox.append((client, failed))
            return
        self.outbox.append((client, RequestAccepted(request_id=req.request_id)))
        self.requests[req.request_id] = RequestState(
            request=req, client=client, deadline=now + req.timeout, plan=plan_for(req), accepted_at=now
        )
        if req.model:
            self._advance(req.request_id)
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
                error = f"the broker serves several models ({', '.join(models)}): name one"
                self._fail(request_id, error, errors.INVALID_REQUEST, bad_field="model")
            else:
                self.requests[request_id].request.model = models[0]
                self._advance(request_id)

    def _advance(self, request_id: str) -> None:
        """Start every stage of the plan whose needs have all answered; finish the request when all have."""
        req = self.requests[request_id]
        for stage in req.plan.stages:
            ready = all(need in req.results and None not in req.results[need] for need in stage.needs)
            if stage.name in req.results or not ready:
                continue
            try:
                jobs = stage.jobs(req.context())
            except (PlanError, KeyError, TypeError, ValueError, IndexError) as exc:
                needs = "/".join(stage.needs)
                self._fail(request_id, f"{needs} returned a malformed result: {exc}", errors.MODEL_ERROR)
                return
            req.results[stage.name] = [None] * len(jobs)
            for position, message in enumerate(jobs):
                self._enqueue(req, message, position)

    def _fail(
        self,
        request_id: str,
        error: str,
        code: str,
        *,
        bad_field: str | None = None,
        outcome: str = "failed",
    ) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        self.metrics.on_request_finished(req.request.model, outcome)
        for job_id in req.outstanding:
            job = self.jobs.pop(job_id, None)
            if job is None:
                continue
            queue = self.queues[(job.service, job.model)]
            if job.worker is not None:
                self.outbox.append((job.worker, JobCancel(job_id=job_id)))
            elif job_id in queue:
                queue.remove(job_id)
        logger.info("request %s failed (%s): %s", request_id, code, error)
        failed = RequestFailed(
            request_id=request_id, error=error, code=code, field=bad_field, retryable=code in errors.RETRYABLE
        )
        self.outbox.append((req.client, failed))

    def _timeout_reason(self, request_id: str) -> tuple[str, str]:
        req = self.requests[request_id]
        model = req.request.model
        if not model:
            return "no node serves any model yet", errors.NO_NODE
        if not any(w.model == model for w in self.workers.values()):
            return f"no node serves model {model}", errors.UNKNOWN_MODEL
        for job_id in req.outstanding:
            job = self.jobs.get(job_id)
            if job is not None and job.worker is None and not self._workers_for(job.service, model):
                return f"no {job.service} node serves model {model}", errors.NO_NODE
        return f"timed out after {req.request.timeout:g}s", errors.TIMEOUT

    # --- jobs -------------------------------------------------------------------------------

    def _enqueue(self, req: RequestState, message: StageJob, position: int) -> None:
        model = req.request.model
        job = Job(message=message, model=model, position=position)
        self.jobs[job.job_id] = job
        req.outstanding.add(job.job_id)
        # Turns go to whom the work is for: the user a request names (however many connections a
        # gateway spreads it over), else the client's connection.
        line = ("user", req.request.user) if req.request.user else ("client", req.client)
        self.queues.setdefault((job.service, model), FairQueue()).append(job.job_id, line)

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
                self.outbox.append((worker.identity, job.message))
                req = self.requests[job.request_id]
                event = ProgressEvent(request_id=job.request_id, stage=job.stage, service=service, node=worker.node)
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
        if (req := self.requests.get(job.request_id)) is not None:
            req.outstanding.discard(job_id)
        return job

    def _on_progress(self, sender: bytes, msg: JobProgress, now: float) -> None:
        job = self.jobs.get(msg.job_id)
        if job is None or job.worker != sender or job.request_id not in self.requests:
            return
        if msg.step > job.steps_reported:
            if job.steps_reported > 0:  # the first step's time also holds the job's setup: not a step time
                self.metrics.on_steps(job.stage, job.model, msg.step - job.steps_reported, now - job.reported_at)
            job.steps_reported, job.reported_at = msg.step, now
        req = self.requests[job.request_id]
        node = self.workers[sender].node if sender in self.workers else "?"
        # Previews are passed on only within bounds: one small PNG per image of the request.
        previews = msg.previews
        if len(previews) > req.request.num_images or any(len(png) > MAX_PREVIEW_BYTES for png in previews):
            previews = []
        event = ProgressEvent(
            request_id=job.request_id,
            stage=job.stage,
            service=job.service,
            node=node,
            step=msg.step,
            total=msg.total,
            previews=previews,
        )
        self.outbox.append((req.client, event))

    def malformed_result(self, sender: bytes, job_id: str, error: str, now: float) -> None:
        """The node holding ``job_id`` answered with a result that failed its checks: fail its request."""
        job = self.jobs.get(job_id)
        if job is None or job.worker != sender:
            return
        if (worker := self.workers.get(sender)) is not None:
            worker.last_seen = now
        self._on_failed(sender, JobFailed(job_id=job_id, error=f"answered with a malformed result: {error}"))

    def _on_failed(self, sender: bytes, msg: JobFailed) -> None:
        held = self.jobs.get(msg.job_id)
        if held is not None and held.worker != sender:
            # A node presumed dead failing a job that was handed on: the job runs elsewhere.
            logger.info("ignoring a failure of %s job %s from a node that no longer holds it", held.stage, msg.job_id)
            if (worker := self.workers.get(sender)) is not None:
                worker.jobs.discard(msg.job_id)
            return
        job = self._finish_job(sender, msg.job_id)
        if job is None:
            return
        worker = self.workers.get(sender)
        node = worker.node if worker else "a node"
        code = msg.code if msg.code in errors.CODES else errors.MODEL_ERROR
        if code == errors.INVALID_REQUEST:  # the request's fault, not the node's: say what to change
            self._fail(job.request_id, msg.error, code, bad_field=msg.field)
        else:
            self._fail(job.request_id, f"{job.stage} on {node} failed: {msg.error}", code, bad_field=msg.field)

    def _on_result(self, sender: bytes, msg: StageResult, now: float) -> None:
        job = self._finish_job(sender, msg.job_id)
        if job is None or (req := self.requests.get(job.request_id)) is None:
            return
        self.metrics.on_job_finished(job.stage, job.model, now - job.assigned_at)
        if (worker := self.workers.get(sender)) is not None:  # stage times for status
            worker.job_seconds += now - job.assigned_at
            worker.jobs_timed += 1
        if not isinstance(msg, job.message.RESULT):
            error = f"{job.stage} returned a malformed result: {msg.KIND}, not {job.message.RESULT.KIND}"
            self._fail(job.request_id, error, errors.MODEL_ERROR)
            return
        req.results[job.stage][job.position] = msg
        if job.stage == req.plan.images:
            try:
                image = req.plan.image(req.context(), job.message, msg)
            except (PlanError, KeyError, TypeError, ValueError) as exc:
                self._fail(job.request_id, f"{job.stage} returned a malformed result: {exc}", errors.MODEL_ERROR)
                return
            self.outbox.append((req.client, image))
        self._advance(job.request_id)
        if job.request_id in self.requests and req.finished():
            del self.requests[job.request_id]
            self.metrics.on_request_finished(req.request.model, "completed", now - req.accepted_at)

    # --- workers ----------------------------------------------------------------------------

    def _on_ready(self, sender: bytes, msg: WorkerReady, now: float) -> None:
        if msg.service not in SERVICES or not msg.model or msg.capacity < 1:
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
                error = f"{job.stage} job lost {job.dispatches} times: nodes keep dying"
                self._fail(job.request_id, error, errors.MODEL_ERROR)
                continue
            self.queues[(job.service, job.model)].appendleft(job_id)
            logger.info("re-dispatching %s job of request %s", job.stage, job.request_id)

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
                "mean_job_s": round(w.job_seconds / w.jobs_timed, 3) if w.jobs_timed else None,
                "last_heartbeat_s": round(now - w.last_seen, 3),
                "info": w.info,
                "stats": w.stats,
            }
            for w in self.workers.values()
        ]
        queues = {f"{service}/{model}": len(q) for (service, model), q in self.queues.items()}
        return StatusReply(request_id=request_id, nodes=nodes, queues=queues, requests_in_flight=len(self.requests))
