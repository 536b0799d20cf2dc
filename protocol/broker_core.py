"""The broker's routing logic, free of sockets so it can be tested message by message.

A request runs as its *plan* (:mod:`protocol.plans`): stages whose jobs are made once the
stages they need have answered -- today an ``encode`` job (prompt -> embeddings), a ``denoise``
job (embeddings -> latents for all its images), then one ``decode`` job per image (latents ->
PNG). Each job stays here, with its input, until its result arrives; when the node holding it
dies the job goes back to the front of its queue for another node.

Jobs are queued per (service, model), users taking turns (:class:`FairQueue`), and handed to the
least-loaded live node of that kind (least recently used among equals). Results are accepted once
per job, and only from a node the job was handed to, so a client receives exactly one image per
index however often a job was re-dispatched. Nothing here reads what a job carries: that is the
plan's business.

What a request sends back goes to the connection that last sent its id (a client that reconnected
comes back under a new identity); an ended request's replies are kept a short while for a client
that resends it (:mod:`protocol.recent`). A busy node that stops making progress loses its jobs
and gets no new work until it reports again (:mod:`protocol.watchdog`); a job whose nodes exit while
running it twice fails its request. Under CURVE every message comes with its sender's key and roles
(:mod:`protocol.peers`): node messages from a client key and requests from a node key are refused.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass, field

from protocol import errors
from protocol.fair_queue import FairQueue
from protocol.limits import RequestLimits
from protocol.messages import (
    LOADING,
    READY,
    CancelRequest,
    GenerateRequest,
    Heartbeat,
    ImageResult,
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
from protocol.peers import Peer
from protocol.plans import Plan, PlanContext, PlanError, plan_for
from protocol.recent import RESULT_GRACE, RecentlyEnded
from protocol.registration import MAX_CAPACITY, MAX_NODES, registration_error
from protocol.sockets import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS
from protocol.validation import MAX_PREVIEW_BYTES, request_error
from protocol.watchdog import Pace, StallPolicy

logger = logging.getLogger(__name__)

Outgoing = tuple[bytes, Message]

# Seconds after the broker starts (or after a model's last node leaves) during which a request for a
# model no node has announced waits instead of failing: nodes re-register within a few heartbeats.
# While no node at all is registered the cluster may still be starting (a node loading torch on a
# busy machine takes longer than this), so requests then wait for their own deadline.
STARTUP_GRACE = 2 * HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS
MAX_NODE_LOSSES = 2  # nodes a job may take down (they exit while running it) before its request fails
MAX_STATUS_NODES = 64  # nodes listed in one status reply
MAX_STATUS_QUEUES = 64  # queues listed in one status reply
_COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}


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
    state: str = READY  # LOADING until it has read its weights: it takes no jobs before
    healthy: bool = True  # False once it stalled holding jobs: no new work until it reports progress
    pace: Pace = field(default_factory=Pace)  # its measured step and setup times, and its last sign of progress

    def takes_work(self) -> bool:
        return self.state == READY and self.healthy and len(self.jobs) < self.capacity


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
    holders: set[bytes] = field(default_factory=set)  # every node it was handed to: only they may answer it
    losses: int = 0  # nodes that exited while running it

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
    key: str | None = None  # the client's CURVE key: only it may resend or cancel the request
    line: Hashable = ()  # whom it is for: its jobs take turns, and it counts against the share, of this line
    images: list[ImageResult] = field(default_factory=list)  # sent so far: again to a client that reconnects

    def context(self) -> PlanContext:
        return PlanContext(request=self.request, results=self.results)  # type: ignore[arg-type]

    def finished(self) -> bool:
        return len(self.results) == len(self.plan.stages) and not self.outstanding


class BrokerCore:
    """Feed it messages with :meth:`handle` and time with :meth:`tick`; read :attr:`outbox`."""

    def __init__(
        self,
        *,
        max_requests: int = 1_000,
        max_dispatches: int = 5,
        metrics: BrokerMetrics | None = None,
        limits: RequestLimits | None = None,
        stall: StallPolicy | None = None,
        result_grace: float = RESULT_GRACE,
        startup_grace: float = STARTUP_GRACE,
    ) -> None:
        self.max_requests = max_requests  # requests in flight before new ones are refused as busy
        self.max_dispatches = max_dispatches  # a job whose nodes keep dying fails after this many tries
        self.limits = limits or RequestLimits()  # the operator's bounds on requests and on one user's share
        self.stall = stall or StallPolicy()  # when a busy node without progress loses its jobs
        self.startup_grace = startup_grace
        self.ended = RecentlyEnded(result_grace)  # ended requests' replies, for clients that reconnect
        self.workers: dict[bytes, WorkerState] = {}
        self.requests: dict[str, RequestState] = {}
        self.jobs: dict[str, Job] = {}
        self.queues: dict[tuple[str, str], FairQueue] = {}
        self.unrouted: list[str] = []  # requests naming no model, waiting for a node to say which
        self.outbox: list[Outgoing] = []
        self.metrics = metrics or BrokerMetrics()  # told what happens; no-op unless metrics are on
        self._last_heartbeat = 0.0
        self._started: float | None = None  # the first time the core was fed
        self._now = 0.0  # the latest time the core was fed
        self._in_flight: dict[Hashable, int] = {}  # requests in flight per line (user or connection)
        self._unannounced: set[str] = set()  # requests for a model no node had announced when they came
        self._models_left: dict[str, float] = {}  # model -> when its last node left
        self._refused: dict[bytes, float] = {}  # sender -> when a message its key may not send was last logged

    # --- inbound ----------------------------------------------------------------------------

    def handle(self, sender: bytes, msg: Message, now: float, peer: Peer | None = None) -> None:
        """One message from ``sender``; ``peer`` is its CURVE key and roles (None without CURVE)."""
        self._clock(now)
        if peer is not None and not peer.may_send(msg):
            self._refuse_role(sender, msg, peer, now)
            return
        worker = self.workers.get(sender)
        if worker is not None:
            worker.last_seen = now
        match msg:
            case GenerateRequest():
                self._on_generate(sender, msg, now, peer)
            case CancelRequest():
                self._on_cancel(sender, msg, peer)
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
                self._on_failed(sender, msg, now)
            case _:
                logger.warning("dropping unexpected %s message", msg.KIND)
        self._dispatch(now)

    def tick(self, now: float) -> None:
        """Heartbeats out, dead and stalled nodes out of work (their jobs requeued), expired requests failed."""
        self._clock(now)
        if now - self._last_heartbeat >= HEARTBEAT_INTERVAL:
            self._last_heartbeat = now
            self.outbox.extend((identity, Heartbeat()) for identity in self.workers)
        expiry = HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS
        for worker in [w for w in self.workers.values() if now - w.last_seen > expiry]:
            self._drop_worker(worker, f"missed heartbeats for {now - worker.last_seen:.1f}s", died=True)
        self._check_stalls(now)
        for request_id in [r for r, req in self.requests.items() if now > req.deadline]:
            self._fail(request_id, *self._timeout_reason(request_id))
        self._fail_unannounced(now)
        self.ended.expire(now)
        self._dispatch(now)
        self.metrics.on_tick(self.workers.values(), self.queues, len(self.requests))

    def _refuse_role(self, sender: bytes, msg: Message, peer: Peer, now: float) -> None:
        """A message its sender's key may not send: nothing changes; logged once per sender every 10 s."""
        if now - self._refused.get(sender, -10.0) < 10.0:
            return
        if len(self._refused) > MAX_NODES:
            self._refused = {who: at for who, at in self._refused.items() if now - at < 10.0}
        self._refused[sender] = now
        roles = "+".join(sorted(peer.roles)) or "none"
        logger.warning(
            "refusing %s from %r: key %s (roles: %s) may not send it", msg.KIND, sender[:16], peer.key[:8], roles
        )

    def _clock(self, now: float) -> None:
        if self._started is None:
            self._started = now
        self._now = now

    # --- requests ---------------------------------------------------------------------------

    def _on_generate(self, client: bytes, req: GenerateRequest, now: float, peer: Peer | None) -> None:
        key = peer.key if peer is not None else None
        if (known := self.requests.get(req.request_id)) is not None:  # a resend: one result per image, not two
            if known.key == key:
                self._attach(known, client)
            return
        if (ended := self.ended.get(req.request_id, now)) is not None and ended.key == key:
            # It ended while its client was away: what it was sent, again, instead of a second run.
            self.outbox.append((client, RequestAccepted(request_id=req.request_id)))
            self.outbox.extend((client, reply) for reply in ended.replies)
            return
        if (problem := request_error(req) or self.limits.problem(req)) is not None:
            bad_field, error = problem
            self._refuse(client, req, error, errors.INVALID_REQUEST, bad_field=bad_field)
            return
        line: Hashable = ("user", req.user) if req.user else ("client", client)
        if len(self.requests) >= self.max_requests:
            self._refuse(
                client, req, f"broker busy ({len(self.requests)} requests in flight), retry later", errors.BUSY
            )
            return
        if (count := self._in_flight.get(line, 0)) >= self.limits.max_user_requests:
            whom = f"user {req.user!r}" if req.user else "this client"
            error = (
                f"{whom} has {count} requests in flight, the most one user may have (--max-user-requests); retry later"
            )
            self._refuse(client, req, error, errors.BUSY)
            return
        if self._past_grace(now) and self.workers and not self._announced(req.model):
            self._refuse(client, req, *self._unknown_model(req.model))
            return
        self.outbox.append((client, RequestAccepted(request_id=req.request_id)))
        self.requests[req.request_id] = RequestState(
            request=req,
            client=client,
            deadline=now + self.limits.timeout(req),
            plan=plan_for(req),
            accepted_at=now,
            key=key,
            line=line,
        )
        self._in_flight[line] = self._in_flight.get(line, 0) + 1
        if not self._announced(req.model):
            self._unannounced.add(req.request_id)
        if req.model:
            self._advance(req.request_id)
        else:
            self.unrouted.append(req.request_id)
            self._route_unnamed()

    def _refuse(self, client: bytes, req: GenerateRequest, error: str, code: str, bad_field: str | None = None) -> None:
        """Answer a request that is not taken on at all: nothing of it is kept."""
        self.metrics.on_request_finished(req.model, "failed")
        failed = RequestFailed(
            request_id=req.request_id, error=error, code=code, field=bad_field, retryable=code in errors.RETRYABLE
        )
        self.outbox.append((client, failed))

    def _attach(self, req: RequestState, client: bytes) -> None:
        """A resend, or a cancel, of a request: its replies go to the connection it came from from now on."""
        self.outbox.append((client, RequestAccepted(request_id=req.request.request_id)))
        if client == req.client:
            return
        logger.info("request %s now answered on another connection (its client reconnected)", req.request.request_id)
        req.client = client
        self.outbox.extend((client, image) for image in req.images)  # the old connection may never have read them

    def _on_cancel(self, client: bytes, msg: CancelRequest, peer: Peer | None) -> None:
        req = self.requests.get(msg.request_id)
        if req is None:
            return
        if req.key != (peer.key if peer is not None else None):
            logger.warning("ignoring a cancel of request %s from another key", msg.request_id)
            return
        req.client = client
        self._fail(msg.request_id, "cancelled by the client", errors.CANCELLED, outcome="cancelled")

    def _models(self) -> list[str]:
        """The models of the registered nodes, ready or loading."""
        return sorted({w.model for w in self.workers.values()})

    def _past_grace(self, now: float) -> bool:
        return self._started is not None and now - self._started >= self.startup_grace

    def _announced(self, model: str) -> bool:
        """Whether a node serves ``model`` (ready or loading), or its last one left only just now; "" any model."""
        if any(not model or w.model == model for w in self.workers.values()):
            return True
        left = self._models_left.get(model)
        return left is not None and self._now - left < self.startup_grace

    def _fail_unannounced(self, now: float) -> None:
        """Requests taken while nodes might still come back: once they had time to, fail those whose model none named."""
        if not self._unannounced or not self._past_grace(now) or not self.workers:
            return  # with no node at all, the cluster may still be starting: requests wait for their deadline
        for request_id in list(self._unannounced):
            req = self.requests.get(request_id)
            if req is None or self._announced(req.request.model):
                self._unannounced.discard(request_id)
            else:
                self._fail(request_id, *self._unknown_model(req.request.model))

    def _unknown_model(self, model: str) -> tuple[str, str]:
        """Why a request for ``model`` cannot be served, and the code: the served models listed."""
        if not model:
            return "no node serves any model yet", errors.NO_NODE
        return f"no node serves model {model} (served: {', '.join(self._models()) or 'none'})", errors.UNKNOWN_MODEL

    def _route_unnamed(self) -> None:
        """Give requests without a model the broker's only model, once a node has named it."""
        models = self._models()
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
            if job.worker is None:
                self._unqueue(job)
            # Every node it was handed to may still be running it (one presumed dead, one that stalled).
            for holder in sorted(job.holders):
                if holder in self.workers:
                    self.outbox.append((holder, JobCancel(job_id=job_id)))
        logger.info("request %s failed (%s): %s", request_id, code, error)
        failed = RequestFailed(
            request_id=request_id, error=error, code=code, field=bad_field, retryable=code in errors.RETRYABLE
        )
        self.outbox.append((req.client, failed))
        self._release(request_id, req, [*req.images, failed])

    def _release(self, request_id: str, req: RequestState, replies: list[Message]) -> None:
        """A request ended: its user's share freed, what it sent kept a while for a client that reconnects."""
        count = self._in_flight.get(req.line, 0) - 1
        if count > 0:
            self._in_flight[req.line] = count
        else:
            self._in_flight.pop(req.line, None)
        self._unannounced.discard(request_id)
        self.ended.add(request_id, req.key, replies, self._now)

    def _timeout_reason(self, request_id: str) -> tuple[str, str]:
        req = self.requests[request_id]
        model = req.request.model
        if not self._announced(model):
            return self._unknown_model(model)
        if not model:
            return "no node serves any model yet", errors.NO_NODE
        for job_id in req.outstanding:
            job = self.jobs.get(job_id)
            if job is not None and job.worker is None and not self._workers_for(job.service, model):
                return f"no {job.service} node serves model {model}", errors.NO_NODE
        return f"timed out after {req.deadline - req.accepted_at:g}s", errors.TIMEOUT

    # --- jobs -------------------------------------------------------------------------------

    def _enqueue(self, req: RequestState, message: StageJob, position: int) -> None:
        model = req.request.model
        job = Job(message=message, model=model, position=position)
        self.jobs[job.job_id] = job
        req.outstanding.add(job.job_id)
        # Turns go to whom the work is for: the user a request names (however many connections a
        # gateway spreads it over), else the client's connection.
        self.queues.setdefault((job.service, model), FairQueue()).append(job.job_id, req.line)

    def _unqueue(self, job: Job) -> None:
        """Take a waiting job off its queue, and the queue away once empty: names come from peers."""
        key = (job.service, job.model)
        queue = self.queues.get(key)
        if queue is None or job.job_id not in queue:
            return
        queue.remove(job.job_id)
        if not queue:
            del self.queues[key]

    def _requeue(self, job: Job) -> None:
        """A job that lost its node goes back to the front of its queue."""
        self.queues.setdefault((job.service, job.model), FairQueue()).appendleft(job.job_id)

    def _workers_for(self, service: str, model: str) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.service == service and w.model == model]

    def _dispatch(self, now: float) -> None:
        emptied = []
        for (service, model), queue in self.queues.items():
            while queue:
                free = [w for w in self._workers_for(service, model) if w.takes_work()]
                if not free:
                    break
                worker = min(free, key=lambda w: (len(w.jobs), w.last_assigned))
                job = self.jobs[queue.popleft()]
                if not worker.jobs:
                    worker.pace.took_up(now)
                job.worker = worker.identity
                job.holders.add(worker.identity)
                job.dispatches += 1
                job.assigned_at = job.reported_at = now
                job.steps_reported = 0
                worker.jobs.add(job.job_id)
                worker.last_assigned = now
                self.outbox.append((worker.identity, job.message))
                req = self.requests[job.request_id]
                event = ProgressEvent(request_id=job.request_id, stage=job.stage, service=service, node=worker.node)
                self.outbox.append((req.client, event))
            if not queue:
                emptied.append((service, model))
        for key in emptied:
            del self.queues[key]

    def _finish_job(self, sender: bytes, job_id: str, now: float) -> Job | None:
        """Release the sender's slot and claim the job's result; None if already claimed, or if the
        sender was never handed the job (a late answer from a node that held it before is taken)."""
        worker = self.workers.get(sender)
        job = self.jobs.get(job_id)
        if worker is not None and job_id in worker.jobs:
            worker.jobs.discard(job_id)
            if job is not None and job.worker == sender and job.steps_reported == 0:
                worker.pace.first_sign(job.stage, job.assigned_at, now)
            worker.pace.finished(now)
        if job is None:
            return None
        if sender not in job.holders:
            logger.warning(
                "ignoring an answer to %s job %s from %r: it was never handed that job", job.stage, job_id, sender[:16]
            )
            return None
        del self.jobs[job_id]
        if job.worker is None:  # a late result from a node presumed dead: take it
            self._unqueue(job)
        elif job.worker != sender and job.worker in self.workers:
            self.workers[job.worker].jobs.discard(job_id)
            self.outbox.append((job.worker, JobCancel(job_id=job_id)))
        if worker is not None:
            worker.jobs_done += 1
        if (req := self.requests.get(job.request_id)) is not None:
            req.outstanding.discard(job_id)
        return job

    def _on_progress(self, sender: bytes, msg: JobProgress, now: float) -> None:
        worker = self.workers.get(sender)
        if worker is not None:
            worker.healthy = True  # it reports progress again
        job = self.jobs.get(msg.job_id)
        if job is None or job.worker != sender or job.request_id not in self.requests or worker is None:
            return
        if msg.step > job.steps_reported:
            if job.steps_reported > 0:  # the first step's time also holds the job's setup: not a step time
                self.metrics.on_steps(job.stage, job.model, msg.step - job.steps_reported, now - job.reported_at)
                worker.pace.stepped(job.stage, msg.step - job.steps_reported, now - job.reported_at, now)
            else:
                worker.pace.first_sign(job.stage, job.assigned_at, now)
                worker.pace.stepped(job.stage, 0, 0.0, now)
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

    def malformed_result(self, sender: bytes, job_id: str, error: str, now: float, peer: Peer | None = None) -> None:
        """The node holding ``job_id`` answered with a result that failed its checks: fail its request."""
        self._clock(now)
        job = self.jobs.get(job_id)
        if job is None or job.worker != sender:
            return
        if (worker := self.workers.get(sender)) is not None:
            worker.last_seen = now
        failed = JobFailed(job_id=job_id, error=f"answered with a malformed result: {error}")
        if peer is None or peer.may_send(failed):
            self._on_failed(sender, failed, now)

    def _on_failed(self, sender: bytes, msg: JobFailed, now: float) -> None:
        held = self.jobs.get(msg.job_id)
        if (worker := self.workers.get(sender)) is not None:
            worker.healthy = True  # it reports again
        if held is not None and held.worker != sender:
            # A node presumed dead (or stalled) failing a job that was handed on: the job runs elsewhere.
            logger.info("ignoring a failure of %s job %s from a node that no longer holds it", held.stage, msg.job_id)
            if worker is not None and msg.job_id in worker.jobs:
                worker.jobs.discard(msg.job_id)
                worker.pace.finished(now)
            return
        job = self._finish_job(sender, msg.job_id, now)
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
        if (worker := self.workers.get(sender)) is not None:
            worker.healthy = True  # it reports again
        job = self._finish_job(sender, msg.job_id, now)
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
            req.images.append(image)
            self.outbox.append((req.client, image))
        self._advance(job.request_id)
        if job.request_id in self.requests and req.finished():
            del self.requests[job.request_id]
            self.metrics.on_request_finished(req.request.model, "completed", now - req.accepted_at)
            self._release(job.request_id, req, list(req.images))

    # --- workers ----------------------------------------------------------------------------

    def _on_ready(self, sender: bytes, msg: WorkerReady, now: float) -> None:
        if (problem := registration_error(msg)) is not None:
            logger.warning("ignoring a registration from %r (%s): %s", sender[:16], msg.node[:64], problem)
            return
        known = self.workers.get(sender)
        if known is not None and (known.service, known.model) != (msg.service, msg.model):
            self._drop_worker(known, "re-registered as another service")
            known = None
        if known is None:
            if len(self.workers) >= MAX_NODES:
                logger.warning("ignoring a registration from %s: %d nodes are registered already", msg.node, MAX_NODES)
                return
            logger.info("%s %s registered for model %s (%s)", msg.service, msg.node, msg.model, msg.state)
            known = self.workers[sender] = WorkerState(
                identity=sender,
                service=msg.service,
                model=msg.model,
                node=msg.node,
                capacity=min(msg.capacity, MAX_CAPACITY),
                info=msg.info,
                last_seen=now,
                state=msg.state,
            )
        elif known.state != msg.state:
            logger.info("%s %s is %s for model %s", msg.service, msg.node, msg.state, msg.model)
        known.state, known.node, known.info = msg.state, msg.node, msg.info
        known.capacity = min(msg.capacity, MAX_CAPACITY)
        self._models_left.pop(msg.model, None)
        self._route_unnamed()

    def _drop_worker(self, worker: WorkerState, reason: str, *, died: bool = False) -> None:
        """Forget a node; its jobs go back to their queues. ``died``: it left without a goodbye."""
        level = logging.WARNING if died else logging.INFO
        logger.log(level, "%s %s (%s) removed: %s", worker.service, worker.node, worker.model, reason)
        del self.workers[worker.identity]
        if not any(w.model == worker.model for w in self.workers.values()):
            self._models_left[worker.model] = self._now
            if len(self._models_left) > MAX_NODES:  # names come from peers: keep the recent ones only
                self._models_left = {m: t for m, t in self._models_left.items() if self._now - t < self.startup_grace}
        blamed = self._running(worker) if died else set()
        for job_id in sorted(worker.jobs):
            job = self.jobs.get(job_id)
            if job is not None and job.worker == worker.identity:
                self._lost(job, killed_its_node=job_id in blamed)

    def _running(self, worker: WorkerState) -> set[str]:
        """The jobs a node was most likely running (those that reported steps, else its oldest): the ones to
        blame when it exits, not those waiting behind them."""
        held = [
            job
            for job_id in worker.jobs
            if (job := self.jobs.get(job_id)) is not None and job.worker == worker.identity
        ]
        stepped = {job.job_id for job in held if job.steps_reported > 0}
        if stepped or not held:
            return stepped
        first = min(job.assigned_at for job in held)
        return {job.job_id for job in held if job.assigned_at == first}

    def _lost(self, job: Job, *, killed_its_node: bool = False) -> None:
        """A job's node exited, stalled or left: run it elsewhere, unless it keeps taking nodes down."""
        job.worker = None
        if killed_its_node:
            job.losses += 1
        if job.dispatches >= self.max_dispatches:
            error = f"{job.stage} job lost {job.dispatches} times: nodes keep dying"
            self._fail(job.request_id, error, errors.MODEL_ERROR)
            return
        if job.losses >= MAX_NODE_LOSSES:
            count = _COUNT_WORDS.get(job.losses, str(job.losses))
            self._fail(job.request_id, f"this request made {count} {job.service} nodes exit", errors.MODEL_ERROR)
            return
        self._requeue(job)
        logger.info("re-dispatching %s job of request %s", job.stage, job.request_id)

    def _check_stalls(self, now: float) -> None:
        """A busy node silent past what its own pace allows has hung: its jobs go to other nodes."""
        for worker in list(self.workers.values()):
            if not worker.jobs or not worker.healthy:
                continue
            held = [self.jobs[job_id] for job_id in worker.jobs if job_id in self.jobs]
            stage = min(held, key=lambda job: job.assigned_at).stage if held else None
            quiet = now - worker.pace.last_sign
            limit = self.stall.limit(worker.pace, stage)
            if quiet > limit:
                self._stall(worker, quiet, limit)

    def _stall(self, worker: WorkerState, quiet: float, limit: float) -> None:
        """Its jobs go to other nodes. It is not told to cancel them: should it only have been slow, its
        result still counts when it comes (from a node that held the job), and the other copy is cancelled."""
        logger.warning(
            "%s %s (%s) made no progress for %.1fs (allowed %.1fs): its jobs go to other nodes, and it gets no "
            "new work until it reports progress",
            worker.service,
            worker.node,
            worker.model,
            quiet,
            limit,
        )
        worker.healthy = False
        held, worker.jobs = sorted(worker.jobs), set()
        for job_id in held:
            job = self.jobs.get(job_id)
            if job is not None and job.worker == worker.identity:
                self._lost(job)

    def _on_stats(self, worker: WorkerState | None, stats: dict) -> None:
        """A node's cumulative counters, sent with heartbeats and results: kept for status and metrics."""
        if worker is None or not stats:
            return
        worker.stats = clean_stats(stats)
        self.metrics.on_node_stats(worker.service, worker.model, worker.node, worker.stats)

    def _status(self, request_id: str, now: float) -> StatusReply:
        listed = list(self.workers.values())[:MAX_STATUS_NODES]
        nodes = [
            {
                "service": w.service,
                "model": w.model,
                "node": w.node,
                "state": _state_of(w),
                "jobs_in_progress": len(w.jobs),
                "jobs_done": w.jobs_done,
                "mean_job_s": round(w.job_seconds / w.jobs_timed, 3) if w.jobs_timed else None,
                "last_heartbeat_s": round(now - w.last_seen, 3),
                "info": w.info,
                "stats": w.stats,
            }
            for w in listed
        ]
        # The queues of served models (empty ones too), then any others holding jobs, within bounds.
        served = {(w.service, w.model): 0 for w in self.workers.values()}
        depths = served | {key: len(queue) for key, queue in self.queues.items()}
        queues = {f"{service}/{model}": depth for (service, model), depth in list(depths.items())[:MAX_STATUS_QUEUES]}
        return StatusReply(
            request_id=request_id,
            nodes=nodes,
            queues=queues,
            requests_in_flight=len(self.requests),
            nodes_left_out=len(self.workers) - len(listed),
        )


def _state_of(worker: WorkerState) -> str:
    """What status shows: loading, stalled (no new work until it reports progress), busy or idle."""
    if worker.state == LOADING:
        return LOADING
    if not worker.healthy:
        return "stalled"
    return "busy" if worker.jobs else "idle"
