"""The decoder node: the VAE on the CPU, latents in, PNGs with their parameters out.

``main.py`` has its flags and VAE options, ``handler.py`` its jobs, ``png.py`` the PNG metadata.
Run with ``triptych decoder --model M`` or ``python -m decoder_node --model M``.
"""
