"""The broker process: one ROUTER socket that clients and nodes connect to.

All routing decisions live in :class:`protocol.broker_core.BrokerCore`; this module only moves
frames between the socket and the core. Malformed frames are logged and dropped, never raised.
Under CURVE it tells the core who sent each message (its key and roles, :mod:`protocol.peers`).
Received messages are handled for at most ``DRAIN_SECONDS`` at a time before the core's tick, so a
flood of frames never holds back the broker's heartbeats; a message that cannot be delivered (the
peer is gone, or its queue is full because it is not reading) is logged.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq

from protocol import messages
from protocol.broker_core import BrokerCore
from protocol.codec import CodecError
from protocol.peers import Peer, peer_of
from protocol.security import Curve, secure_server
from protocol.sockets import router

logger = logging.getLogger(__name__)

POLL_MS = 100  # how often the core gets a tick when the socket is quiet
DRAIN_SECONDS = 0.05  # longest run of received messages handled before the core's tick
COMPLAINT_INTERVAL = 10.0  # seconds between log lines about one peer that cannot be reached


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
        self.curve = curve is not None
        self.dropped = 0  # malformed messages seen
        self.undelivered = 0  # messages a peer could not be sent
        self._complained: dict[bytes, float] = {}  # peer -> when its delivery trouble was last logged

    def serve(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        logger.info("broker listening on %s", self.address)
        try:
            while not stop.is_set():
                if poller.poll(POLL_MS):
                    # Drain what is waiting before ticking, so a burst is handled in one pass, but
                    # never for so long that heartbeats and timeouts wait.
                    until = time.monotonic() + DRAIN_SECONDS
                    while time.monotonic() < until:
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
        peer = self._peer(frames[1])
        try:
            msg = messages.from_frames(frames[1:])
        except (CodecError, messages.ProtocolError) as exc:
            self.dropped += 1
            logger.warning("dropping a malformed message from %r: %s", sender[:16], exc)
            if (job := messages.job_of(frames[1:])) is not None and issubclass(job[0], messages.StageResult):
                self.core.malformed_result(sender, job[1], str(exc), time.monotonic(), peer=peer)
                self._flush()
            return
        try:
            self.core.handle(sender, msg, time.monotonic(), peer=peer)
        except Exception:  # a bug in routing must not take the broker down
            logger.exception("error handling %s from %r", msg.KIND, sender[:16])
        self._flush()

    def _peer(self, frame: zmq.Frame) -> Peer | None:
        """The sender's key and roles under CURVE (its ZAP User-Id); None without CURVE."""
        if not self.curve:
            return None
        try:
            return peer_of(frame.get("User-Id"))
        except zmq.ZMQError:  # no User-Id: a connection ZAP did not stamp may send nothing
            return peer_of("")

    def _flush(self) -> None:
        outbox, self.core.outbox = self.core.outbox, []
        for identity, msg in outbox:
            try:
                self.socket.send_multipart([identity, *messages.to_frames(msg)], copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:  # its queue is full
                self._complain(identity, msg, logging.WARNING, "is not reading")
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:  # disconnected (a client that left, a node that died)
                    self._complain(identity, msg, logging.INFO, "is gone")
                else:
                    self._complain(identity, msg, logging.WARNING, f"could not be sent to: {exc}")

    def _complain(self, identity: bytes, msg: messages.Message, level: int, trouble: str) -> None:
        """Log a peer's delivery trouble, once per COMPLAINT_INTERVAL per peer."""
        self.undelivered += 1
        now = time.monotonic()
        if now - self._complained.get(identity, -COMPLAINT_INTERVAL) < COMPLAINT_INTERVAL:
            return
        if len(self._complained) > 4096:  # peers come and go: forget the old ones
            self._complained = {k: t for k, t in self._complained.items() if now - t < COMPLAINT_INTERVAL}
        self._complained[identity] = now
        logger.log(
            level,
            "peer %r %s: dropped a %s message (%d undelivered in all)",
            identity[:16],
            trouble,
            msg.KIND,
            self.undelivered,
        )
