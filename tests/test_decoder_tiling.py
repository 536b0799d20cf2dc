"""The decoder node decodes a large image tile by tile by itself; a small one whole, as diffusers does."""

from __future__ import annotations

import torch

from decoder_node.main import AUTO_TILING_PIXELS, tile_large_images
from triptych.testing import build_tiny_checkpoint


class RecordingVae:
    """Records whether each decode ran tiled."""

    class config:
        block_out_channels = (32, 64, 64, 64)  # three downsamplings: 8 pixels per latent

    def __init__(self) -> None:
        self.use_tiling = False
        self.tiled: list[bool] = []

    def decode(self, latents, return_dict: bool = False):
        self.tiled.append(self.use_tiling)
        return (latents,)


def test_only_images_above_the_pixel_count_are_decoded_in_tiles():
    vae = RecordingVae()
    tile_large_images(vae)
    side = int((AUTO_TILING_PIXELS // 64) ** 0.5)  # latents whose image is just under the bound
    vae.decode(torch.zeros(1, 4, side, side))
    vae.decode(torch.zeros(1, 4, 256, 256))  # 2048 x 2048
    vae.decode(torch.zeros(1, 4, 8, 8))
    assert vae.tiled == [False, True, False]
    assert vae.use_tiling is False  # an encode after a large decode is not tiled either


def test_asked_for_tiling_applies_to_every_image():
    vae = RecordingVae()
    vae.use_tiling = True  # --vae-tiling
    tile_large_images(vae)
    vae.decode(torch.zeros(1, 4, 8, 8))
    assert vae.tiled == [True]


def test_a_real_vae_takes_its_tiled_path_above_the_bound(tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(build_tiny_checkpoint("sd", tmp_path / "sd") / "vae")
    tiled_decode, calls = vae.tiled_decode, []
    vae.tiled_decode = lambda *args, **kwargs: calls.append(1) or tiled_decode(*args, **kwargs)
    tile_large_images(vae, pixels=64 * 64)
    small = vae.decode(torch.randn(1, 4, 8, 8), return_dict=False)[0]  # 64 x 64: whole
    assert calls == [] and small.shape == (1, 3, 64, 64)
    large = vae.decode(torch.randn(1, 4, 16, 16), return_dict=False)[0]  # 128 x 128: in tiles
    assert calls == [1] and large.shape == (1, 3, 128, 128) and torch.isfinite(large).all()
