"""The broker process: one ROUTER socket that clients and nodes connect to.

All routing decisions live in :class:`protocol.broker_core.BrokerCore`; this module only moves
frames between the socket and the core. Malformed frames are logged and dropped, never raised.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq

from protocol import messages
from protocol.broker_core import BrokerCore
from protocol.codec import CodecError
from protocol.security import Curve, secure_server
from protocol.sockets import router

logger = logging.getLogger(__name__)

POLL_MS = 100  # how often the core gets a tick when the socket is quiet


class Broker:
    def __init__(
        self,
        address: str,
        *,
        core: BrokerCore | None = None,
        curve: Curve | None = None,
        ctx: zmq.Context | None = None,
    ) -> None:
        self.ctx = ctx or zmq.Context.instance()
        self.core = core or BrokerCore()
        self.socket = router(self.ctx)
        self.authenticator = secure_server(self.ctx, self.socket, curve)
        self.socket.bind(address)
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.dropped = 0  # malformed messages seen

    def serve(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        logger.info("broker listening on %s", self.address)
        try:
            while not stop.is_set():
                if poller.poll(POLL_MS):
                    # Drain what is waiting before ticking, so a burst is handled in one pass.
                    for _ in range(1000):
                        try:
                            frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._receive(frames)
                self.core.tick(time.monotonic())
                self._flush()
        finally:
            self.socket.close(linger=0)
            if self.authenticator is not None:
                self.authenticator.stop()

    def _receive(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            self.dropped += 1
            return
        sender = frames[0].bytes
        try:
            msg = messages.from_frames(frames[1:])
        except (CodecError, messages.ProtocolError) as exc:
            self.dropped += 1
            logger.warning("dropping a malformed message from %r: %s", sender[:16], exc)
            if (job := messages.job_of(frames[1:])) is not None and issubclass(job[0], messages.StageResult):
                self.core.malformed_result(sender, job[1], str(exc), time.monotonic())
                self._flush()
            return
        try:
            self.core.handle(sender, msg, time.monotonic())
        except Exception:  # a bug in routing must not take the broker down
            logger.exception("error handling %s from %r", msg.KIND, sender[:16])
        self._flush()

    def _flush(self) -> None:
        outbox, self.core.outbox = self.core.outbox, []
        for identity, msg in outbox:
            try:
                self.socket.send_multipart([identity, *messages.to_frames(msg)], copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                logger.warning("peer %r is not reading; dropped a %s message", identity[:16], msg.KIND)
            except zmq.ZMQError as exc:
                logger.warning("could not send %s to %r: %s", msg.KIND, identity[:16], exc)
