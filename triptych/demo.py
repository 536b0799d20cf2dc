"""The offline demo model of `triptych run`: a tiny random-weight Stable Diffusion checkpoint.

It is built on first use into the user cache, so `triptych run "..."` works on a fresh machine
with no network. Its images are noise-like: pass --model for real ones.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEMO_NAME = "triptych-demo-sd"


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "triptych"


def demo_model() -> Path:
    """The demo checkpoint's folder, built (atomically) if it is not there yet."""
    target = cache_dir() / DEMO_NAME
    if (target / "model_index.json").exists():
        return target
    from triptych.testing import build_tiny_checkpoint

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        build_tiny_checkpoint("sd", staging / DEMO_NAME)
        os.replace(staging / DEMO_NAME, target)
    except OSError:
        if not (target / "model_index.json").exists():  # another process may have won the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
