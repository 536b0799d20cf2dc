"""Where each node kind starts: one table, service -> ``module:main``.

The CLI and the launcher reach a node only through this table; a node package's internals are
its own.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from protocol.stages import DECODER, DENOISER, ENCODER

ENTRY_POINTS: dict[str, str] = {
    ENCODER: "encoder_node.main:main",
    DENOISER: "denoiser_node.main:main",
    DECODER: "decoder_node.main:main",
}

NodeMain = Callable[[Sequence[str] | None, str | None], int]  # (argv, prog) -> exit status


def node_package(service: str) -> str:
    """The package ``python -m`` starts a node of this kind with."""
    return ENTRY_POINTS[service].split(".", 1)[0]


def node_main(service: str) -> NodeMain:
    module, name = ENTRY_POINTS[service].split(":")
    return getattr(importlib.import_module(module), name)
