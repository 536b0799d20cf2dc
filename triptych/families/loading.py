"""Load one stage of a pipeline: its family's pipeline class with only that stage's components."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from protocol.stages import DENOISER, ENCODER
from triptych.families import Family, family_for_pipeline

logger = logging.getLogger(__name__)

# (model, family, device, dtype) -> the denoiser module, placed where it runs
DenoiserLoader = Callable[[str, Family, str, torch.dtype], torch.nn.Module]


@dataclass
class LoadedStage:
    family: Family
    pipe: Any
    model_index: dict


def read_model_index(model: str) -> dict:
    """model_index.json of a local folder or a hub id (only that file is fetched)."""
    import diffusers

    config = diffusers.DiffusionPipeline.load_config(model)
    if "_class_name" not in config:
        raise ValueError(f"{model}: model_index.json names no pipeline class")
    return dict(config)


def model_name(model: str) -> str:
    """The name a model is routed by: a local folder's name, or the hub id."""
    path = Path(model)
    return path.resolve().name if path.exists() else model


def component_names(model_index: dict) -> list[str]:
    return [key for key, value in model_index.items() if not key.startswith("_") and isinstance(value, list | tuple)]


def load_stage(
    model: str,
    service: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    no_t5: bool = False,
    denoiser: DenoiserLoader | None = None,
) -> LoadedStage:
    """The family's pipeline with only ``service``'s components, on ``device``.

    ``no_t5``: the encoder leaves out the family's optional T5 (:attr:`Family.optional_t5`).
    ``denoiser``: the denoiser node's own loading of its UNet/transformer (quantized, from a GGUF
    file, group-offloaded: ``denoiser_node.fit``), which also puts it where it runs.
    """
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    model_index = read_model_index(model)
    family = family_for_pipeline(model_index["_class_name"])
    keep = family.components[service]
    # Every other stage's components, and any the checkpoint was saved without ([null, null]),
    # which diffusers will not load unless told they are None.
    skipped = {name: None for name in component_names(model_index) if name not in keep or model_index[name][0] is None}
    if no_t5:
        if service != ENCODER or not family.optional_t5:
            raise ValueError(f"--no-t5: the {family.name} {service} cannot leave out a T5 encoder")
        keep = tuple(name for name in keep if name not in family.optional_t5)
        skipped.update(dict.fromkeys(family.optional_t5))
    pipeline_class = getattr(diffusers, model_index["_class_name"])
    loaded = [name for name in keep if name not in skipped]
    logger.info("loading %s %s for the %s (%s)", family.name, model, service, ", ".join(loaded))
    given = {family.denoiser_attr: denoiser(model, family, device, dtype)} if denoiser and service == DENOISER else {}
    pipe = pipeline_class.from_pretrained(model, dtype=dtype, **skipped, **given)
    if not given:  # a given denoiser is already on its device, or group-offloaded (which .to would undo)
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if service == ENCODER:
        family.prepare_encoder(pipe, model)
    elif service == DENOISER:
        _apply_vae_config(pipe, model, family)
    return LoadedStage(family=family, pipe=pipe, model_index=model_index)


def denoiser_config(model: str, family: Family) -> dict:
    """The denoiser's config.json (sample size, input channels), without its weights: for the decoder node."""
    import diffusers

    # Any model class reads a config.json the same way.
    return dict(diffusers.UNet2DConditionModel.load_config(model, subfolder=family.denoiser_attr))


def _apply_vae_config(pipe: Any, model: str, family: Family) -> None:
    """The denoiser has no VAE, but its latent size depends on the VAE's scale factor."""
    import diffusers

    try:
        # Any VAE class reads its config.json the same way; the family knows which keys matter.
        config = diffusers.AutoencoderKL.load_config(model, subfolder="vae")
    except (OSError, ValueError):
        logger.warning("%s: no vae/config.json; assuming the pipeline's default scale factor", model)
        return
    family.apply_vae_config(pipe, dict(config))
    family.keep_vae_config(pipe, dict(config))
