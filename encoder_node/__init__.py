"""The encoder node: tokenizers and text encoders on the CPU, prompts in, embeddings out.

``main.py`` has its flags, ``handler.py`` its jobs, ``cache.py`` the embedding cache.
Run with ``triptych encoder --model M`` or ``python -m encoder_node --model M``.
"""
