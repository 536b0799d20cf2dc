"""A Qwen2.5-VL processor for the tiny Qwen-Image-Edit checkpoints, built in code.

transformers builds ``Qwen2VLProcessor``'s video half only with torchvision installed, which
images never use. The tiny checkpoints' processor is that class without its video processor:
the same tokenizer and image processor, the same prompt expansion (one ``<|image_pad|>`` per
merged image patch), so a pipeline runs exactly as with the released processor.
"""

from __future__ import annotations

from transformers import ProcessorMixin, Qwen2VLImageProcessor, Qwen2VLProcessor
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

# diffusers loads a component of a library it does not know by the base classes that library
# exposes: this module exposes ProcessorMixin, so it is loaded with ``from_pretrained``.
__all__ = ["ProcessorMixin", "TinyQwen2VLProcessor", "qwen2_vl_processor"]


class TinyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for images and text only (no video processor, so no torchvision)."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]


def qwen2_vl_processor(tokenizer: PreTrainedTokenizerBase, max_image_tokens: int = 16) -> TinyQwen2VLProcessor:
    """Qwen2.5-VL's image processing (14 px patches, 2x2 merged), capped at ``max_image_tokens`` merged patches."""
    patch = 28  # 14 px patches, merged 2 x 2: one image token per 28 x 28 pixels
    images = Qwen2VLImageProcessor(
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=4 * patch**2,
        max_pixels=max_image_tokens * patch**2,
    )
    return TinyQwen2VLProcessor(image_processor=images, tokenizer=tokenizer)
