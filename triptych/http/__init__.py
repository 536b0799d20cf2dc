"""An HTTP gateway that speaks OpenAI's images API in front of a broker.

    triptych http --broker tcp://gpu-box:5555 --port 8000

``POST /v1/images/generations`` takes OpenAI's fields (``model``, ``prompt``, ``n``, ``size``,
``response_format``) and triptych's own (``seed``, ``negative_prompt``, ``num_inference_steps``,
``guidance_scale``, ``true_cfg_scale``, ``scheduler``) in the same JSON body; ``GET /v1/models`` lists the models the
broker serves. Errors come in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``. With
``--api-keys FILE``, requests must carry one of the file's keys as ``Authorization: Bearer <key>``.

Every request runs one blocking :class:`~triptych.client.Client` call on a worker thread, with a
client (one zmq socket) of its own taken from a small pool: zmq sockets are not thread-safe. When
the HTTP client goes away, the call's cancel event is set and the broker drops the work.

Modules: ``params`` (request bodies), ``errors`` (OpenAI's error shape, failure codes to statuses),
``pool`` (broker connections), ``models`` (what the broker serves), ``store`` (PNGs behind URLs),
``auth`` (API keys), ``app`` (routes), ``streaming`` (server-sent events), ``page`` (the page at ``/``,
its files in ``static/``), ``a1111`` (AUTOMATIC1111's ``/sdapi/v1``), ``server`` (the ``triptych http`` command).
"""

from __future__ import annotations

from triptych.http.app import MAX_IN_FLIGHT, Gateway, create_app
from triptych.http.auth import RequireApiKey, read_api_keys
from triptych.http.errors import PARAMS, STATUSES, ApiError, error_from_failure
from triptych.http.models import ModelCatalog
from triptych.http.params import MAX_BODY_BYTES, GenerationParams, parse_generation
from triptych.http.pool import ClientPool
from triptych.http.server import serve
from triptych.http.store import ImageStore

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_IN_FLIGHT",
    "PARAMS",
    "STATUSES",
    "ApiError",
    "ClientPool",
    "Gateway",
    "GenerationParams",
    "ImageStore",
    "ModelCatalog",
    "RequireApiKey",
    "create_app",
    "error_from_failure",
    "parse_generation",
    "read_api_keys",
    "serve",
]
