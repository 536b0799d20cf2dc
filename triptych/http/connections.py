"""What one HTTP client may hold of the gateway: a deadline for its request's headers and body, and a
cap on connections, so that clients which connect and then send nothing (or send a byte a minute)
cannot keep the gateway's connections, or the requests behind them, for ever.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but waits without limit for the
headers of a request that has begun, and the app for its body. :class:`HeaderDeadline` closes a
connection whose request headers are not complete ``header_timeout`` seconds after it opened (or
after its previous response); :class:`BodyDeadline` answers 408 to a request whose body has not
arrived ``body_timeout`` seconds after its headers. Past ``MAX_CONNECTIONS`` connections, uvicorn
answers 503 at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import anyio
import h11

from triptych.http.errors import ApiError

logger = logging.getLogger(__name__)

HEADER_TIMEOUT = 10.0  # seconds from a connection (or its last response) to a complete request head
BODY_TIMEOUT = 30.0  # seconds from the head to the end of the body
KEEP_ALIVE_TIMEOUT = 5.0  # seconds an idle keep-alive connection stays open
MAX_CONNECTIONS = 512  # open connections (and running requests); more are answered 503
MAX_HEADER_BYTES = 16 << 10  # a request head larger than this is refused


def header_deadline(timeout: float) -> type:
    """uvicorn's h11 protocol, closing a connection that takes longer than ``timeout`` to send a request head."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
                self.transport.close()  # answered (408) before its body ended: nothing sane can follow
                return
            self._arm()  # the next request's head is due; a pipelined one already here disarms it below
            super().on_response_complete()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # the head is in
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self.conn.their_state is not h11.DONE and not self.transport.is_closing():
                logger.info("closing a connection that sent no complete request in %gs", timeout)
                self.transport.close()

    return HeaderDeadline


class BodyDeadline:
    """ASGI middleware: a request's body must be in within ``timeout`` seconds of its head, else 408."""

    def __init__(self, app: Any, timeout: float = BODY_TIMEOUT) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = anyio.current_time() + self.timeout
        body_done = False

        async def receive_in_time() -> dict:
            nonlocal body_done
            if body_done:  # after the body: waiting for a disconnect has no deadline
                return await receive()
            with anyio.move_on_after(max(deadline - anyio.current_time(), 0)):
                message = await receive()
                body_done = message["type"] != "http.request" or not message.get("more_body", False)
                return message
            raise ApiError(408, f"the request body did not arrive within {self.timeout:g}s", code="body_timeout")

        await self.app(scope, receive_in_time, send)


def server_config(
    app: Any,
    host: str,
    port: int,
    *,
    log_level: str = "info",
    header_timeout: float = HEADER_TIMEOUT,
    **options: Any,
) -> Any:
    """The gateway's uvicorn configuration: its deadlines and connection cap applied."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=header_deadline(header_timeout),
        timeout_keep_alive=int(KEEP_ALIVE_TIMEOUT),
        limit_concurrency=MAX_CONNECTIONS,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        **options,
    )
