"""The PNGs of ``response_format: "url"``, held in memory until fetched from ``/v1/files/{id}.png``.

OpenAI's URLs expire too; a bounded, expiring store keeps a gateway that is never asked for its
files from growing without limit.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict

logger = logging.getLogger(__name__)

STORE_BYTES = 256 << 20  # PNGs kept for response_format=url, newest first
STORE_TTL = 3600.0  # seconds a PNG stays fetchable by its URL


class ImageStore:
    """PNGs fetchable by URL: the newest up to ``max_bytes``, each for at most ``ttl`` seconds.

    Used from the event loop only, so it needs no lock. Ids are unguessable: the URLs are the only key.
    """

    def __init__(self, max_bytes: int = STORE_BYTES, ttl: float = STORE_TTL) -> None:
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0

    def put(self, png: bytes) -> str:
        file_id = secrets.token_urlsafe(18)
        self._items[file_id] = (time.monotonic() + self.ttl, png)
        self._bytes += len(png)
        self._evict()
        return file_id

    def get(self, file_id: str) -> bytes | None:
        self._evict()
        item = self._items.get(file_id)
        return item[1] if item is not None else None

    def _evict(self) -> None:
        now = time.monotonic()
        while self._items:
            file_id, (expires, png) = next(iter(self._items.items()))
            if self._bytes <= self.max_bytes and expires > now:
                break
            del self._items[file_id]
            self._bytes -= len(png)
