"""The encoder node: see handler.py; run with `python -m encoder_node --model M`."""
