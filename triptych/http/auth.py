"""API keys: ``--api-keys FILE`` makes every route but the page and the image files want a key.

The key comes as ``Authorization: Bearer <key>`` (OpenAI's SDKs), or as the password of HTTP basic
auth (``user:key``, what AUTOMATIC1111 front ends send for its ``--api-auth``).

The broker's queues take turns per key, so requests are tagged with which key they carried (its
position in the file), never with the key itself.
"""

from __future__ import annotations

import base64
import hmac
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from triptych.http.errors import ApiError

logger = logging.getLogger(__name__)

OPEN_PREFIXES = ("/v1/files/", "/static/")  # paths served without a key (besides the page at /)


def read_api_keys(path: str | Path) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped. Raises ValueError if none."""
    lines = Path(path).read_text().splitlines()
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ValueError(f"{path} holds no API key")
    return keys


class RequireApiKey:
    """ASGI middleware: every route but the page and the image files wants a key (Bearer or basic auth).

    Image URLs stay open, as OpenAI's do: their ids are unguessable and expire, so a URL can be
    handed to a browser. Keys are compared in constant time.
    """

    def __init__(self, app: Any, keys: Sequence[str]) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]

    @staticmethod
    def _open(path: str) -> bool:
        """The image files, and the page (its files hold no data: it asks for the key itself)."""
        return path == "/" or path.startswith(OPEN_PREFIXES)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and not self._open(scope["path"]):
            found = self._key_index(dict(scope["headers"]).get(b"authorization", b""))
            if isinstance(found, ApiError):
                await found.response()(scope, receive, send)
                return
            scope.setdefault("state", {})["api_key"] = f"key{found + 1}"  # which key, never the key
        await self.app(scope, receive, send)

    def _key_index(self, header: bytes) -> int | ApiError:
        scheme, _, key = header.partition(b" ")
        if scheme.lower() == b"basic":  # user:key, base64
            try:
                key = base64.b64decode(key.strip(), validate=True).partition(b":")[2]
            except ValueError:
                key = b""
        elif scheme.lower() != b"bearer":
            key = b""
        if not key.strip():
            message = "no API key: send it as 'Authorization: Bearer <key>'"
            return ApiError(401, message, code="invalid_api_key", kind="invalid_request_error")
        matches = [hmac.compare_digest(key.strip(), known) for known in self.keys]  # every key compared
        if not any(matches):
            return ApiError(401, "incorrect API key", code="invalid_api_key", kind="invalid_request_error")
        return matches.index(True)
