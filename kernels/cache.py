"""graphopt's folder on disk for what it measures and generates: generated kernels
(``kernels/codegen.py``, under ``kernels/``) and measured choices (``graphopt/ops/autotune.py``,
``choices.json``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$GRAPHOPT_CACHE_DIR``, else ``~/.cache/graphopt``; read at every call, so a test or a
    user can point it elsewhere at any time. The folder may not exist yet."""
    return Path(os.environ.get("GRAPHOPT_CACHE_DIR") or Path.home() / ".cache" / "graphopt")
