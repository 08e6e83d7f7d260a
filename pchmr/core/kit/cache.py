"""Where pchmr keeps what it prepares once: prepared data, mesh pyramids, pretrained encoders."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_cache_dir"]


def default_cache_dir() -> Path:
    """``$PCHMR_CACHE_DIR`` or ``~/.cache/pchmr``: prepared data and mesh pyramids."""
    return Path(os.environ.get("PCHMR_CACHE_DIR", Path.home() / ".cache" / "pchmr"))
