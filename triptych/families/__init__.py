"""Model families: per-family knowledge of what each stage loads, sends and receives."""

from __future__ import annotations

from triptych.families.base import DECODE, DENOISE, ENCODE, Family
from triptych.families.pixart import PixArtAlpha
from triptych.families.sd import StableDiffusion

FAMILIES: tuple[Family, ...] = (StableDiffusion(), PixArtAlpha())
_BY_PIPELINE = {pipeline: family for family in FAMILIES for pipeline in family.pipelines}


class UnsupportedModel(ValueError):
    pass


def family_for_pipeline(class_name: str) -> Family:
    family = _BY_PIPELINE.get(class_name)
    if family is None:
        supported = ", ".join(f"{f.name} ({'/'.join(f.pipelines)})" for f in FAMILIES)
        raise UnsupportedModel(f"pipeline class {class_name!r} is not supported; supported families: {supported}")
    return family


__all__ = ["DECODE", "DENOISE", "ENCODE", "FAMILIES", "Family", "UnsupportedModel", "family_for_pipeline"]
