"""Live previews: the latents of a denoising step as a small RGB picture, without the VAE.

A VAE decode of every preview would cost as much as the final decode and need the VAE beside the
denoiser. Instead each latent channel is given a fixed RGB contribution (a 3-column linear map
fitted once per latent space, the approximation ComfyUI's latent previews use), so a preview is one
tiny matrix product on the denoiser's device and a PNG of the latent grid's size (1/8 of the
image's side for most VAEs). Families whose latent space has no known factors get a generic
projection: channels folded onto R, G and B in turn, each picture stretched to its own range.

Latents are read as the pipeline holds them between steps, in the denoiser's model space: scaled
(and shifted) VAE latents, which is the space the factors below were fitted in. Packed families
(FLUX.1, FLUX.2, Qwen-Image hold (B, h/2 * w/2, 4C) sequences of 2x2 patches) are unpacked to
(B, C, h, w) first.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass

import torch
from PIL import Image

logger = logging.getLogger(__name__)

MAX_PREVIEW_SIDE = 256  # a preview's longer side at most, in pixels: larger latent grids are pooled down


@dataclass(frozen=True)
class LatentRGB:
    """A latent space's linear map to RGB in [-1, 1]: ``rgb = latents^T @ factors + bias``."""

    factors: tuple[tuple[float, float, float], ...]  # one (R, G, B) row per latent channel
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)


# The SD 1.x / 2.x VAE (also PixArt-alpha's).
SD15 = LatentRGB(
    factors=(
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    )
)
# The SDXL VAE (also PixArt-Sigma's).
SDXL = LatentRGB(
    factors=(
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ),
    bias=(0.1084, -0.0175, -0.0011),
)
# The SD3 / 3.5 16-channel VAE.
SD3 = LatentRGB(
    factors=(
        (-0.0922, -0.0175, 0.0749),
        (0.0311, 0.0633, 0.0954),
        (0.1994, 0.0927, 0.0458),
        (0.0856, 0.0339, 0.0902),
        (0.0587, 0.0272, -0.0496),
        (-0.0006, 0.1104, 0.0309),
        (0.0978, 0.0306, 0.0427),
        (-0.0042, 0.1038, 0.1358),
        (-0.0194, 0.0020, 0.0669),
        (-0.0488, 0.0130, -0.0268),
        (0.0922, 0.0988, 0.0951),
        (-0.0278, 0.0524, -0.0542),
        (0.0332, 0.0456, 0.0895),
        (-0.0069, -0.0030, -0.0810),
        (-0.0596, -0.0465, -0.0293),
        (-0.1448, -0.1463, -0.1189),
    ),
    bias=(0.2394, 0.2135, 0.1925),
)
# The FLUX.1 16-channel VAE (also Z-Image's).
FLUX = LatentRGB(
    factors=(
        (-0.0346, 0.0244, 0.0681),
        (0.0034, 0.0210, 0.0687),
        (0.0275, -0.0668, -0.0433),
        (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329),
        (0.0004, 0.0383, 0.0115),
        (0.0405, 0.0861, 0.0915),
        (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180),
        (0.1008, 0.0755, -0.0421),
        (-0.0515, 0.0201, 0.0011),
        (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749),
        (-0.1264, -0.0522, -0.1103),
        (-0.0280, -0.0881, -0.0499),
        (-0.1262, -0.0982, -0.0778),
    ),
    bias=(-0.0329, -0.0718, -0.0851),
)
# The Wan 2.1 VAE, which Qwen-Image uses (its latents normalized per channel).
WAN21 = LatentRGB(
    factors=(
        (-0.1299, -0.1692, 0.2932),
        (0.0671, 0.0406, 0.0442),
        (0.3568, 0.2548, 0.1747),
        (0.0372, 0.2344, 0.1420),
        (0.0313, 0.0189, -0.0328),
        (0.0296, -0.0956, -0.0665),
        (-0.3477, -0.4059, -0.2925),
        (0.0166, 0.1902, 0.1975),
        (-0.0412, 0.0267, -0.1364),
        (-0.1293, 0.0740, 0.1636),
        (0.0680, 0.3019, 0.1128),
        (0.0032, 0.0581, 0.0639),
        (-0.1251, 0.0927, 0.1699),
        (0.0060, -0.0633, 0.0005),
        (0.3477, 0.2275, 0.2950),
        (0.1984, 0.0913, 0.1861),
    ),
    bias=(-0.1835, -0.0868, -0.3360),
)

# Family name -> its latent space's factors; a family missing here gets the generic projection.
FACTORS: dict[str, LatentRGB] = {
    "stable-diffusion": SD15,
    "pixart-alpha": SD15,
    "stable-diffusion-xl": SDXL,
    "pixart-sigma": SDXL,
    "stable-diffusion-3": SD3,
    "flux": FLUX,
    "zimage": FLUX,
    "qwenimage": WAN21,
}
# Families whose pipelines hold latents as sequences of 2x2 patches between steps.
PACKED = frozenset({"flux", "flux2", "flux2-klein", "qwenimage"})


def preview_due(every: int | None, step: int, total: int) -> bool:
    """Whether a request wants a preview after ``step`` of ``total``: every ``every`` steps (None: a
    quarter of them, 0: never), and never at the last step, whose image is the result itself."""
    if every == 0 or total <= 1 or not 0 < step < total:
        return False
    every = math.ceil(total / 4) if every is None else every
    return step % every == 0


def unpack(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) 2x2 patches -> (B, C, h, w), the grid's aspect ratio that of the image.

    The packed channel index is ``c * 4 + dy * 2 + dx``, as FLUX.1's and Qwen-Image's ``_pack_latents``
    and FLUX.2's patchify (then flatten) write it.
    """
    batch, length, packed = latents.shape
    rows = round(math.sqrt(length * height / width))
    cols = length // max(rows, 1)
    if rows * cols != length or packed % 4:
        raise ValueError(f"cannot unpack latents {list(latents.shape)} for a {width}x{height} image")
    grid = latents.reshape(batch, rows, cols, packed // 4, 2, 2)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(batch, packed // 4, rows * 2, cols * 2)


def to_rgb(family: str, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, h, w, 3) uint8 on the CPU, by the family's factors or the generic map."""
    latents = latents.float()
    factors = FACTORS.get(family)
    if factors is not None and len(factors.factors) == latents.shape[1]:
        matrix = torch.tensor(factors.factors, device=latents.device)  # (C, 3)
        bias = torch.tensor(factors.bias, device=latents.device)
        rgb = torch.einsum("bchw,ck->bhwk", latents, matrix) + bias  # about [-1, 1]
        unit = ((rgb + 1) / 2).clamp(0, 1)
    else:
        unit = _generic(latents)
    return (unit * 255).round().to(torch.uint8).cpu()


def _generic(latents: torch.Tensor) -> torch.Tensor:
    """Channel c adds to colour c mod 3; each picture's colours are then stretched to [0, 1]."""
    channels = latents.shape[1]
    matrix = torch.zeros(channels, 3, device=latents.device)
    matrix[torch.arange(channels), torch.arange(channels) % 3] = 1.0
    rgb = torch.einsum("bchw,ck->bhwk", latents, matrix / matrix.sum(0).clamp(min=1))
    low = rgb.amin(dim=(1, 2), keepdim=True)
    high = rgb.amax(dim=(1, 2), keepdim=True)
    return (rgb - low) / (high - low).clamp(min=1e-6)


def _pool(latents: torch.Tensor) -> torch.Tensor:
    """Average-pool a grid whose longer side is past MAX_PREVIEW_SIDE: a preview stays small."""
    factor = math.ceil(max(latents.shape[-2:]) / MAX_PREVIEW_SIDE)
    if factor <= 1:
        return latents
    return torch.nn.functional.avg_pool2d(latents.float(), factor, ceil_mode=True)


def preview_pngs(family: str, latents: torch.Tensor, height: int, width: int) -> list[bytes]:
    """One PNG per row of a step's latents (pipeline layout), for an image of ``height`` x ``width``."""
    if family in PACKED and latents.ndim == 3:
        latents = unpack(latents, height, width)
    if latents.ndim == 5:  # (B, C, frames, h, w): the first frame
        latents = latents[:, :, 0]
    pixels = to_rgb(family, _pool(latents))  # (B, h, w, 3)
    pngs = []
    for picture in pixels.numpy():
        buffer = io.BytesIO()
        Image.fromarray(picture, "RGB").save(buffer, format="PNG", compress_level=1)
        pngs.append(buffer.getvalue())
    return pngs
