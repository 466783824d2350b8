"""Where smolora keeps what it builds or learns once (the demo model, remembered file hashes)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Where smolora keeps what it builds or learns once: ``$SMOLORA_CACHE`` or ``~/.cache/smolora_mlflow``."""
    env = os.environ.get("SMOLORA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "smolora_mlflow"
