"""Step caches: diffusers' cache hooks on the denoiser, chosen per request, reset between batches.

A step cache skips work on denoising steps where the denoiser's output changes little, reusing
(or extrapolating) what earlier steps computed. diffusers has them as hooks a model installs with
``model.enable_cache(config)`` (``CacheMixin``); triptych offers three, written ``KIND[:VALUE]``:

- ``first_block[:THRESHOLD]``: ``FirstBlockCacheConfig(threshold=THRESHOLD)`` (default 0.05, in [0, 1]):
  the rest of the blocks are skipped, their last residual reused, while the first block's output
  stays within THRESHOLD (relative mean absolute change) of the step that last ran them all.
- ``taylorseer[:INTERVAL]``: ``TaylorSeerCacheConfig(cache_interval=INTERVAL)`` (default 5, an integer
  from 1 to 100): attention outputs are predicted by a Taylor series for INTERVAL - 1 steps of every
  INTERVAL, after diffusers' three warm-up steps.
- ``mag[:THRESHOLD]``: ``MagCacheConfig(threshold=THRESHOLD, num_inference_steps=steps,
  mag_ratios=FLUX_MAG_RATIOS)`` (default 0.06, in [0, 1]): blocks are skipped while the accumulated
  magnitude-ratio error stays below THRESHOLD. The ratios are checkpoint-specific and diffusers
  ships FLUX.1's only, so it is offered for FLUX.1 alone.

``off`` is none. A hook applies where the denoiser is a ``CacheMixin`` model *and* the pipeline runs
it inside ``cache_context`` (the hooks keep their state per context and refuse to run without one):
FLUX.1 text-to-image, FLUX.2 klein and Qwen-Image here. UNets (SD, SDXL) and the PixArt, SD3, Sana
and Z-Image transformers have no ``enable_cache``; FLUX.2 dev's and FLUX.1 img2img's pipelines set no
cache context. diffusers' FasterCache and Pyramid Attention Broadcast are not offered: they hook
attention layers named ``attn1`` (video and PixArt-style blocks) and need per-model timestep ranges.

Every batch installs its request's hooks, runs, then resets their state and removes them (also on
failure or cancellation), so no batch sees another's cached tensors; the hooks are a few per block,
installed in milliseconds. Not with ``--compile``: installing hooks changes the compiled graph.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from protocol.errors import RequestError
from protocol.messages import TEXT_TO_IMAGE, RequestSpec
from triptych.families.loading import LoadedStage

logger = logging.getLogger(__name__)

FIELD = "step_cache"  # the request field (and, on the node, --step-cache)
OFF = "off"
_SHOWN = 80  # characters of a bad value quoted back


@dataclass(frozen=True)
class CacheKind:
    config: str  # the diffusers config class
    parameter: str  # its argument VALUE sets
    default: float
    low: float
    high: float
    integer: bool = False
    families: tuple[str, ...] | None = None  # the families it is calibrated for; None: any that takes hooks


KINDS: dict[str, CacheKind] = {
    "first_block": CacheKind("FirstBlockCacheConfig", "threshold", 0.05, 0.0, 1.0),
    "taylorseer": CacheKind("TaylorSeerCacheConfig", "cache_interval", 5, 1, 100, integer=True),
    "mag": CacheKind("MagCacheConfig", "threshold", 0.06, 0.0, 1.0, families=("flux",)),
}


@dataclass(frozen=True)
class StepCache:
    """One step cache: a kind of :data:`KINDS` and its value."""

    kind: str
    value: float

    def __str__(self) -> str:
        return f"{self.kind}:{self.value:g}"

    def config(self, steps: int) -> Any:
        """The diffusers config this cache is, for a run of ``steps`` steps."""
        import diffusers

        kind = KINDS[self.kind]
        value = int(self.value) if kind.integer else float(self.value)
        options: dict[str, Any] = {kind.parameter: value}
        if self.kind == "mag":
            from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

            options |= {"num_inference_steps": steps, "mag_ratios": FLUX_MAG_RATIOS}
        return getattr(diffusers, kind.config)(**options)


def parse_step_cache(text: str, field: str = FIELD) -> StepCache | None:
    """``off`` -> None, ``KIND[:VALUE]`` -> a StepCache; RequestError naming ``field`` otherwise."""
    shown = repr(text[:_SHOWN]) + ("..." if len(text) > _SHOWN else "")
    if text == OFF:
        return None
    name, colon, value_text = text.partition(":")
    kind = KINDS.get(name)
    if kind is None:
        raise RequestError(field, f"unknown step cache {shown}; it is off or one of {', '.join(KINDS)}")
    if not colon:
        return StepCache(name, kind.default)
    try:
        value = float(value_text)
    except ValueError:
        value = math.nan
    what = "an integer" if kind.integer else "a number"
    if not (math.isfinite(value) and kind.low <= value <= kind.high) or (kind.integer and value != int(value)):
        raise RequestError(
            field,
            f"the {kind.parameter} of {name} must be {what} from {kind.low:g} to {kind.high:g} (got {shown})",
        )
    return StepCache(name, value)


def add_step_cache_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--step-cache",
        metavar="KIND[:VALUE]",
        default=OFF,
        help=f"the step cache of requests that name none: off (default), {', '.join(f'{k}[:VALUE]' for k in KINDS)}",
    )


@functools.cache
def _sets_cache_context(pipeline_class: type) -> bool:
    """Whether a pipeline runs its denoiser inside ``cache_context``, which the hooks' state needs."""
    try:
        return ".cache_context(" in inspect.getsource(pipeline_class.__call__)
    except (OSError, TypeError):  # no source to read: not known to set one
        return False


class StepCaches:
    """The step caches a denoiser applies: ``default`` for requests that name none (``--step-cache``)."""

    def __init__(self, stage: LoadedStage, default: StepCache | None = None, compiled: bool = False) -> None:
        self.stage = stage
        self.default = default
        self.compiled = compiled
        if default is not None:
            self._check(default, TEXT_TO_IMAGE, field="--step-cache")

    def _denoiser(self) -> Any:
        return getattr(self.stage.pipe, self.stage.family.denoiser_attr)

    def _problem(self, cache: StepCache, workflow: str) -> str | None:
        family, pipe = self.stage.family, self.stage.pipe
        kind = KINDS[cache.kind]
        if self.compiled:
            return "step caches are not applied to a compiled denoiser (--compile)"
        if kind.families is not None and family.name not in kind.families:
            return f"{cache.kind} is calibrated for {', '.join(kind.families)} only, not {family.name}"
        denoiser = self._denoiser()
        if not hasattr(denoiser, "enable_cache"):
            return f"{family.name}'s {type(denoiser).__name__} takes no diffusers cache hooks"
        try:
            runner = family.pipeline_for(pipe, workflow)
        except RequestError as exc:  # a workflow this checkpoint does not serve (an inpainting-only one)
            return str(exc)
        if not _sets_cache_context(type(runner)):
            return f"{type(runner).__name__} runs its denoiser outside a cache context, which the hooks need"
        return None

    def _check(self, cache: StepCache, workflow: str, field: str = FIELD) -> None:
        if (problem := self._problem(cache, workflow)) is not None:
            raise RequestError(field, f"{cache} is not available: {problem}")

    def kinds(self) -> list[str]:
        """The kinds this denoiser applies to text-to-image requests (its node ``info``)."""
        return [name for name in KINDS if self._problem(StepCache(name, KINDS[name].default), TEXT_TO_IMAGE) is None]

    def resolve(self, request: RequestSpec) -> StepCache | None:
        """The request's cache (its own, else the node's default); RequestError naming step_cache if it cannot run."""
        cache = self.default if request.step_cache is None else parse_step_cache(request.step_cache)
        if cache is not None and request.step_cache is not None:
            self._check(cache, request.workflow)
        elif cache is not None and request.workflow != TEXT_TO_IMAGE and self._problem(cache, request.workflow):
            return None  # the node's default, where it cannot run: the request runs without it
        return cache

    def key(self, request: RequestSpec) -> str:
        """What a batch key holds of the cache: requests share a batch only with the same one."""
        cache = self.resolve(request)
        return "" if cache is None else str(cache)

    @contextlib.contextmanager
    def applied(self, cache: StepCache | None, steps: int) -> Iterator[None]:
        """Run with ``cache``'s hooks on the denoiser, then reset and remove them."""
        if cache is None:
            yield
            return
        denoiser = self._denoiser()
        if denoiser.is_cache_enabled:  # left by a run that did not get to remove it
            denoiser.disable_cache()
        denoiser.enable_cache(cache.config(steps))
        try:
            yield
        finally:
            denoiser._reset_stateful_cache()
            denoiser.disable_cache()
