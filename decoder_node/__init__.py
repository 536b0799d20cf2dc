"""The decoder node: see handler.py; run with `python -m decoder_node --model M`."""
