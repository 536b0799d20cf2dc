"""``--previews DIR``: the denoiser's previews of a request, written as PNG files as they arrive."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from protocol.messages import ProgressEvent

logger = logging.getLogger(__name__)


class PreviewWriter:
    """A progress callback writing ``preview-SEED-stepNNN.png`` per image, then passing the event on.

    ``seed`` is the request's: image i's previews carry ``seed + i``, as its final PNG does.
    """

    def __init__(self, folder: Path, seed: int, then: Callable[[ProgressEvent], None] | None = None) -> None:
        self.folder = folder
        self.seed = seed
        self.then = then
        self.written: list[Path] = []
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, event: ProgressEvent) -> None:
        for index, png in enumerate(event.previews):
            path = self.folder / f"preview-{self.seed + index}-step{event.step:03d}.png"
            path.write_bytes(png)
            self.written.append(path)
            logger.debug("preview written: %s", path)
        if self.then is not None:
            self.then(event)
