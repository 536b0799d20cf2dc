"""triptych: run text-to-image diffusion models with only the denoiser on the GPU."""

from triptych.client import Client, GeneratedImage, GenerationError

__all__ = ["Client", "GeneratedImage", "GenerationError"]
__version__ = "0.1.0"
