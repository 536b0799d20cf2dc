"""triptych's wire: codec, messages, validation, broker and node runtime. Imports no diffusers."""
