"""The denoiser node: see handler.py; run with `python -m denoiser_node --model M`."""
