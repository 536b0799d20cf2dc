"""The page at ``/``: plain HTML, CSS and JavaScript shipped in the package, no build step, no CDN.

The page talks to the gateway's own API (``/v1/models``, ``/v1/status``, the progress stream of
``/v1/images/generations/events``), so it needs nothing the API does not offer, and with
``--api-keys`` it asks for a key and sends it like any client. Its files hold no data, so they are
served without a key; a strict content security policy keeps the page to its own files.
"""

from __future__ import annotations

import logging
from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from triptych.http.errors import ApiError

logger = logging.getLogger(__name__)

FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def _read(name: str) -> bytes:
    return resources.files("triptych.http").joinpath("static", name).read_bytes()


def _file(name: str) -> Response:
    if name not in FILES:
        raise ApiError(404, f"no such file: {name}", code="not_found")
    return Response(_read(name), media_type=FILES[name], headers=HEADERS)


async def index(request: Request) -> Response:
    return _file("index.html")


async def static(request: Request) -> Response:
    return _file(request.path_params["name"])


def routes() -> list[Route]:
    return [Route("/", index, methods=["GET"]), Route("/static/{name}", static, methods=["GET"])]
