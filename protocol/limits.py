"""Limits the operator of a broker sets with its flags: how big a request may be, one user's share
of the broker, how long a request may take.

:mod:`protocol.validation` holds the bounds every model shares (a request past them is malformed);
these are tighter, per broker, and guard the nodes: a request that would take a node's memory or
hold its GPU for an hour is refused before any node sees it, with an error naming the limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.messages import GenerateRequest

MAX_PIXELS = 2048 * 2048  # height x width of a request that names its size (--max-pixels)
MAX_IMAGES = 16  # images of one request (--max-images)
MAX_STEPS = 200  # denoising steps of one request (--max-steps)
MAX_TIMEOUT = 3600.0  # seconds: a request asking for longer gets this (--max-timeout)
MAX_USER_REQUESTS = 100  # requests in flight for one user (--max-user-requests)


@dataclass(frozen=True)
class RequestLimits:
    max_pixels: int = MAX_PIXELS
    max_images: int = MAX_IMAGES
    max_steps: int = MAX_STEPS
    max_timeout: float = MAX_TIMEOUT
    max_user_requests: int = MAX_USER_REQUESTS

    def problem(self, req: GenerateRequest) -> tuple[str, str] | None:
        """The field of ``req`` past one of these limits, and a sentence naming the limit; None if within."""
        if req.steps is not None and req.steps > self.max_steps:
            return "steps", f"steps must be at most {self.max_steps} on this broker (--max-steps; got {req.steps})"
        if req.num_images > self.max_images:
            return (
                "num_images",
                f"num_images must be at most {self.max_images} on this broker (--max-images; got {req.num_images})",
            )
        if req.height is not None and req.width is not None and req.height * req.width > self.max_pixels:
            return (
                "height",
                f"height x width must be at most {self.max_pixels} pixels on this broker "
                f"(--max-pixels; got {req.height} x {req.width})",
            )
        return None

    def timeout(self, req: GenerateRequest) -> float:
        """The seconds ``req`` may take: what it asked for, up to ``max_timeout``."""
        return min(req.timeout, self.max_timeout)
