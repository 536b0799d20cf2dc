"""Model families: per-family knowledge of what each stage loads, sends and receives."""

from __future__ import annotations

from triptych.families.base import Family
from triptych.families.flux import Flux
from triptych.families.flux2 import Flux2, Flux2Klein
from triptych.families.flux_kontext import FluxKontext
from triptych.families.pixart import PixArtAlpha, PixArtSigma
from triptych.families.qwenimage import QwenImage
from triptych.families.qwenimage_edit import QwenImageEdit, QwenImageEditPlus
from triptych.families.sana import Sana
from triptych.families.sd import StableDiffusion
from triptych.families.sd3 import StableDiffusion3
from triptych.families.sdxl import StableDiffusionXL
from triptych.families.zimage import ZImage

FAMILIES: tuple[Family, ...] = (
    StableDiffusion(),
    PixArtAlpha(),
    StableDiffusionXL(),
    StableDiffusion3(),
    Flux(),
    FluxKontext(),
    PixArtSigma(),
    Sana(),
    Flux2(),
    Flux2Klein(),
    QwenImage(),
    QwenImageEdit(),
    QwenImageEditPlus(),
    ZImage(),
)
_BY_PIPELINE = {pipeline: family for family in FAMILIES for pipeline in family.pipelines}


class UnsupportedModel(ValueError):
    pass


def family_for_pipeline(class_name: str) -> Family:
    family = _BY_PIPELINE.get(class_name)
    if family is None:
        supported = ", ".join(f"{f.name} ({'/'.join(f.pipelines)})" for f in FAMILIES)
        raise UnsupportedModel(f"pipeline class {class_name!r} is not supported; supported families: {supported}")
    return family


__all__ = ["FAMILIES", "Family", "UnsupportedModel", "family_for_pipeline"]
