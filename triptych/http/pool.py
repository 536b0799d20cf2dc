"""Broker connections for the gateway's worker threads.

A zmq socket is not thread-safe, so each call holds a client of its own; a few stay open between
calls so that a request does not pay for a fresh connection (and CURVE handshake) every time.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

from triptych.client import Client, GenerationError

logger = logging.getLogger(__name__)

IDLE_CLIENTS = 8  # broker connections kept open between requests


class ClientPool:
    """Broker clients for worker threads: one per call at a time, a few kept open between calls."""

    def __init__(self, factory: Callable[[], Client], keep: int = IDLE_CLIENTS) -> None:
        self.factory = factory
        self.keep = keep
        self._idle: list[Client] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def client(self) -> Iterator[Client]:
        with self._lock:
            client = self._idle.pop() if self._idle else None
        client = client or self.factory()
        try:
            yield client
        except GenerationError:
            self._release(client)  # the broker answered (or was silent): the socket is fine
            raise
        except BaseException:
            client.close()
            raise
        self._release(client)

    def _release(self, client: Client) -> None:
        with self._lock:
            if len(self._idle) < self.keep:
                self._idle.append(client)
                return
        client.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for client in idle:
            client.close()
