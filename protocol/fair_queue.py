"""A job queue that takes turns between clients.

One queue per (service, model) holds the jobs waiting for a node. A plain FIFO lets a client that
submits a thousand requests hold back everyone else's first image behind all of them; here each
client's jobs wait in their own line, in order, and the lines are served in turn. A "client" is
any hashable key (the broker uses the client's connection and the user it names). A job whose
node died goes to the very front: it has waited its turn once already.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator


class FairQueue:
    def __init__(self) -> None:
        self._requeued: deque[str] = deque()  # jobs back from a dead node: served first
        self._lines: dict[Hashable, deque[str]] = {}  # client -> its jobs; dict order is the turn order
        self._client_of: dict[str, Hashable] = {}
        self._size = 0

    def append(self, job_id: str, client: Hashable) -> None:
        """Queue a new job at the back of its client's line."""
        self._lines.setdefault(client, deque()).append(job_id)
        self._client_of[job_id] = client
        self._size += 1

    def appendleft(self, job_id: str) -> None:
        """Put a job that lost its node ahead of every line."""
        self._requeued.appendleft(job_id)
        self._size += 1

    def popleft(self) -> str:
        """The next job: a requeued one, else the head of the line whose turn it is."""
        if self._requeued:
            self._size -= 1
            return self._requeued.popleft()
        if not self._lines:
            raise IndexError("pop from an empty FairQueue")
        client = next(iter(self._lines))
        line = self._lines.pop(client)
        job_id = line.popleft()
        if line:
            self._lines[client] = line  # back of the turn order
        del self._client_of[job_id]
        self._size -= 1
        return job_id

    def remove(self, job_id: str) -> None:
        """Take out a job (its request failed or a late result came in); ValueError if absent."""
        client = self._client_of.pop(job_id, None)
        if client is None:
            self._requeued.remove(job_id)
        else:
            line = self._lines[client]
            line.remove(job_id)
            if not line:
                del self._lines[client]
        self._size -= 1

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._client_of or job_id in self._requeued

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[str]:
        """Jobs in the order they would be served, were nothing added meanwhile."""
        yield from self._requeued
        lines = [deque(line) for line in self._lines.values()]
        while lines:
            for line in lines:
                yield line.popleft()
            lines = [line for line in lines if line]
