"""Errors in OpenAI's shape, and the HTTP status of each failure code the broker and client report.

OpenAI's SDKs act on the status (they retry 429 and 5xx) and show ``message``; ``param`` names the
body field to fix. Failures arrive with a code and the request field at fault, so no message text
is ever matched here.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from protocol import errors
from triptych.client import BROKER_UNAVAILABLE

logger = logging.getLogger(__name__)

# The HTTP status of each failure code; a code missing here is the gateway's 500.
STATUSES: dict[str, int] = {
    errors.INVALID_REQUEST: 400,
    errors.UNKNOWN_MODEL: 404,
    errors.CANCELLED: 499,  # nginx's "client closed request": nobody is left to read it
    errors.MODEL_ERROR: 500,
    errors.NO_NODE: 503,
    errors.BUSY: 503,
    errors.OUT_OF_MEMORY: 503,
    BROKER_UNAVAILABLE: 503,
    errors.TIMEOUT: 504,
}

# GenerateRequest's field names, and the body fields they come from here.
PARAMS: dict[str, str] = {
    "height": "size",
    "width": "size",
    "num_images": "n",
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
    "true_cfg": "true_cfg_scale",
}


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def invalid(param: str | None, message: str, code: str = "invalid_value") -> ApiError:
    """A 400 naming the body field to fix."""
    return ApiError(400, message, param=param, code=code)


def param_of(field: str | None) -> str | None:
    """The body field behind a GenerateRequest field (None stays None)."""
    return PARAMS.get(field, field) if field is not None else None


def error_from_failure(exc: Exception) -> ApiError:
    """The answer to a request the broker or client failed, by its failure code and field.

    Takes the code and field of :class:`~triptych.client.GenerationError`; anything without a code
    counts as the model's failure.
    """
    code = getattr(exc, "code", None) or errors.MODEL_ERROR
    status = STATUSES.get(code, 500)
    if code == errors.CANCELLED:
        return ApiError(status, "the client closed the request", code=code)
    if code == errors.UNKNOWN_MODEL:
        return ApiError(status, str(exc), param="model", code="model_not_found")  # OpenAI's code
    param = param_of(getattr(exc, "field", None)) if code == errors.INVALID_REQUEST else None
    return ApiError(status, str(exc), param=param, code=code)


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def on_http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no such route, wrong method) in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    return ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None).response()


async def on_unexpected(request: Request, exc: Exception) -> Response:
    """A bug in the gateway: logged in full, answered without details."""
    logger.error("error serving %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError(500, "internal error in the gateway", code="internal_error").response()


HANDLERS = {ApiError: on_api_error, HTTPException: on_http_error, Exception: on_unexpected}
