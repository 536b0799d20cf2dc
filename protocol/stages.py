"""Names of the node kinds (services) and of the stages a request's plan runs on them, once.

A *service* is a kind of node: what it loads and which queue it takes jobs from. A *stage* is
one step of a request's plan (see :mod:`protocol.plans`); each runs on one service, and one
service may run several stages (the decoder node holds the VAE, so it both decodes latents and,
for requests with images in, encodes images).
"""

from __future__ import annotations

# Services: the kinds of node.
ENCODER = "encoder"  # tokenizers + text encoders, CPU
DENOISER = "denoiser"  # the UNet / transformer + scheduler, the GPU node
DECODER = "decoder"  # the VAE, CPU
SERVICES = (ENCODER, DENOISER, DECODER)

# Stages of a plan, each with the service that runs it.
ENCODE = "encode"  # prompt -> embeddings
DENOISE = "denoise"  # embeddings -> latents of every image of the request
DECODE = "decode"  # one image's latents -> PNG
ENCODE_IMAGE = "encode_image"  # images in (init image, mask) -> their latents, on the node with the VAE
STAGE_SERVICE: dict[str, str] = {ENCODE: ENCODER, DENOISE: DENOISER, DECODE: DECODER, ENCODE_IMAGE: DECODER}
