"""Requests that ended a short while ago, with the replies their client was sent.

A client whose connection dropped comes back under a new identity and sends its request again. If
the request ended meanwhile, the broker sends the replies the old connection never read (its
images, or its failure) instead of running it a second time. They are kept for ``grace`` seconds,
within a byte and a count budget, oldest dropped first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from protocol.messages import ImageResult, Message

RESULT_GRACE = 60.0  # seconds an ended request's replies stay available
MAX_KEPT_BYTES = 256 << 20  # PNG bytes kept in all
MAX_KEPT = 10_000  # ended requests kept


@dataclass(frozen=True)
class Ended:
    key: str | None  # the client's CURVE key (None without CURVE): only it gets the replies
    replies: tuple[Message, ...]  # the images, or the failure, in the order they were sent
    until: float  # when they are dropped
    nbytes: int


class RecentlyEnded:
    def __init__(self, grace: float = RESULT_GRACE, max_bytes: int = MAX_KEPT_BYTES, max_count: int = MAX_KEPT) -> None:
        self.grace = grace
        self.max_bytes = max_bytes
        self.max_count = max_count
        self._ended: OrderedDict[str, Ended] = OrderedDict()  # oldest first
        self._bytes = 0

    def add(self, request_id: str, key: str | None, replies: list[Message], now: float) -> None:
        nbytes = sum(len(reply.png) for reply in replies if isinstance(reply, ImageResult))
        if nbytes > self.max_bytes or self.grace <= 0:
            return
        self._drop(request_id)
        self._ended[request_id] = Ended(key, tuple(replies), now + self.grace, nbytes)
        self._bytes += nbytes
        while self._bytes > self.max_bytes or len(self._ended) > self.max_count:
            self._drop(next(iter(self._ended)))

    def get(self, request_id: str, now: float) -> Ended | None:
        ended = self._ended.get(request_id)
        return ended if ended is not None and now <= ended.until else None

    def expire(self, now: float) -> None:
        while self._ended:
            request_id, ended = next(iter(self._ended.items()))
            if ended.until >= now:
                break
            self._drop(request_id)

    def _drop(self, request_id: str) -> None:
        ended = self._ended.pop(request_id, None)
        if ended is not None:
            self._bytes -= ended.nbytes

    def __len__(self) -> int:
        return len(self._ended)
