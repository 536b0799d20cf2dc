"""Generation calls admitted in turns per API key, in front of the broker.

The gateway runs at most ``slots`` generation calls at once (each holds a thread and a broker
connection). First come, first served would let one key that sends a hundred requests hold every
slot while another key's first request waits behind all of them; here each key's waiting calls form
a line of their own, and a freed slot goes to the line whose turn it is, in order. The broker's own
queues then take turns per user in the same way (see protocol.fair_queue).
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio

logger = logging.getLogger(__name__)


@dataclass
class _Waiter:
    admitted: anyio.Event = field(default_factory=anyio.Event)


class TakeTurns:
    """At most ``slots`` holders at once; waiting ones are admitted one tenant at a time, in turns.

    Used from one event loop only, so it needs no lock.
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.busy = 0
        self._lines: OrderedDict[str, deque[_Waiter]] = OrderedDict()  # tenant -> its waiting calls; order: turns

    @contextlib.asynccontextmanager
    async def turn(self, tenant: str) -> AsyncIterator[None]:
        """Hold a slot for the body of the ``async with``, waiting for this tenant's turn if all are taken."""
        if self.busy < self.slots and not self._lines:
            self.busy += 1
        else:
            waiter = _Waiter()
            self._lines.setdefault(tenant, deque()).append(waiter)
            try:
                await waiter.admitted.wait()
            except BaseException:  # cancelled while waiting (its client left)
                if waiter.admitted.is_set():
                    self._release()  # a slot was handed over just now: pass it on
                else:
                    self._forget(tenant, waiter)
                raise
        try:
            yield
        finally:
            self._release()

    def waiting(self) -> int:
        return sum(len(line) for line in self._lines.values())

    def _release(self) -> None:
        """Hand the freed slot to the head of the line whose turn it is (its line goes to the back)."""
        if not self._lines:
            self.busy -= 1
            return
        tenant, line = next(iter(self._lines.items()))
        waiter = line.popleft()
        del self._lines[tenant]
        if line:
            self._lines[tenant] = line
        waiter.admitted.set()

    def _forget(self, tenant: str, waiter: _Waiter) -> None:
        line = self._lines.get(tenant)
        if line is None:
            return
        with contextlib.suppress(ValueError):
            line.remove(waiter)
        if not line:
            del self._lines[tenant]
