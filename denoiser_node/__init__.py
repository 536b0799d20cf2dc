"""The denoiser node: the UNet or transformer and its scheduler, the only process on the GPU.

``main.py`` has its flags and batching, ``speed.py`` its speed options, ``handler.py`` its jobs.
Run with ``triptych denoiser --model M`` or ``python -m denoiser_node --model M``.
"""
