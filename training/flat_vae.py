"""Weights, set by hand, that make a diffusers AutoencoderKL a pixel-art codec for flat-colour scenes.

Trained from random weights, a tiny AutoencoderKL barely learns flat colours in the minutes a CPU
can give it: every GroupNorm takes each image's mean and scale away, and a flat background is
nothing but a mean. So the autoencoder starts from weights that already do the job:

* Encoder: the colour of one pixel near the centre of every 8×8 block goes to latent channels 0-2
  (channel 3 stays 0): three stride-2 convolutions each keep one pixel of four. A sampled pixel is a
  pure palette colour, where a block average would mix a shape with its background.
* Decoder: each latent becomes an 8×8 block of its colour (nearest upsampling), and training then
  sharpens the edges.

Every residual block starts as the identity (its last convolution zero). GroupNorm is made linear
with a large constant channel: the group's mean and spread are then fixed numbers, so normalising
only shifts and scales, and the norm's affine weights put the values where SiLU is the identity.
Copies of the colour with the opposite sign keep the group mean free of the colour itself.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from diffusers.models.resnet import ResnetBlock2D

CONSTANT = 100.0  # the constant channel's value: dominates each GroupNorm's statistics
GAIN, SHIFT = 100.0, 40.0  # GroupNorm weight and bias: colour values land around +10..+18, where SiLU(x) ≈ x
COLOUR, NEGATED, CONSTANT_CHANNEL = (0, 1, 2), (3, 4, 5), 6
LOGVAR = -20.0  # the posterior's log-variance: a sample is the mean
SAMPLE_TAPS = (0, 0, 1)  # per stride-2 convolution, the tap it keeps: pixel 1*0 + 2*0 + 4*1 of each block
PIXEL_IN_BLOCK = 4  # the row and column, within its 8×8 block, of the pixel a latent samples


def _centre_conv(conv: torch.nn.Conv2d, weights: dict[tuple[int, int], float], bias: dict[int, float]) -> None:
    """``conv`` as a per-pixel linear map: output channel o = sum of weights[o, i] * input i, + bias[o]."""
    conv.weight.zero_()
    conv.bias.zero_()
    k = conv.weight.shape[-1] // 2
    for (out, inp), w in weights.items():
        conv.weight[out, inp, k, k] = w
    for out, b in bias.items():
        conv.bias[out] = b


def _signed_colour() -> dict[tuple[int, int], float]:
    """3 colour channels -> the colour and its negation."""
    return {**{(c, c): 1.0 for c in COLOUR}, **{(n, c): -1.0 for n, c in zip(NEGATED, COLOUR, strict=True)}}


def _unnormalise(channels: int, norm: torch.nn.GroupNorm, conv: torch.nn.Conv2d, extra: dict[int, float]) -> None:
    """Set ``norm`` to the linear regime and ``conv`` to undo it, reading the colour back out."""
    mean = CONSTANT / channels
    spread = CONSTANT * (channels - 1) ** 0.5 / channels
    norm.weight.fill_(GAIN)
    norm.bias.fill_(SHIFT)
    scale = spread / GAIN
    _centre_conv(conv, {(c, c): scale for c in COLOUR}, {**{c: mean - SHIFT * scale for c in COLOUR}, **extra})


@torch.no_grad()
def init_pixel_art(vae: AutoencoderKL) -> AutoencoderKL:
    """Overwrite ``vae``'s weights with the pixel-art codec; needs equal block widths and one norm group."""
    widths = set(vae.config.block_out_channels)
    if len(widths) != 1 or vae.config.norm_num_groups != 1 or vae.config.latent_channels != 4:
        raise ValueError("the pixel-art codec needs equal block widths, norm_num_groups=1 and 4 latent channels")
    channels = widths.pop()
    for module in vae.modules():
        if isinstance(module, ResnetBlock2D):
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
    encoder, decoder = vae.encoder, vae.decoder

    _centre_conv(encoder.conv_in, _signed_colour(), {})
    downsamplers = [d for block in encoder.down_blocks for d in block.downsamplers or []]
    for downsampler, tap in zip(downsamplers, SAMPLE_TAPS, strict=True):
        downsampler.conv.weight.zero_()
        downsampler.conv.bias.zero_()
        for c in range(channels):
            downsampler.conv.weight[c, c, tap, tap] = 1.0
    encoder.mid_block.resnets[-1].conv2.bias[CONSTANT_CHANNEL] = CONSTANT
    logvar = {4 + c: LOGVAR for c in range(4)}
    _unnormalise(channels, encoder.conv_norm_out, encoder.conv_out, logvar)
    _centre_conv(vae.quant_conv, {(c, c): 1.0 for c in range(8)}, {})

    _centre_conv(vae.post_quant_conv, {(c, c): 1.0 for c in range(4)}, {})
    _centre_conv(decoder.conv_in, _signed_colour(), {})
    for block in decoder.up_blocks:
        for upsampler in block.upsamplers or []:
            _centre_conv(upsampler.conv, {(c, c): 1.0 for c in range(channels)}, {})
    decoder.up_blocks[-1].resnets[-1].conv2.bias[CONSTANT_CHANNEL] = CONSTANT
    _unnormalise(channels, decoder.conv_norm_out, decoder.conv_out, {})
    return vae
