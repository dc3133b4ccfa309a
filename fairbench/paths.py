"""Where fairbench keeps per-user files; import-free, so ``fairbench list`` stays fast."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path


def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def default_data_dir() -> Path:
    """Prepared datasets live in ``$FAIRBENCH_DATA``, else the per-user cache folder."""
    if os.environ.get("FAIRBENCH_DATA"):
        return Path(os.environ["FAIRBENCH_DATA"])
    return _user_cache() / "fairbench"


def catalog_file() -> Path:
    """The plugin catalog that ``fairbench list`` reads: ``$FAIRBENCH_CATALOG``, else a file in
    the per-user cache folder (beside, not inside, the prepared datasets), one per Python
    environment so that several virtual environments do not keep rebuilding each other's."""
    if os.environ.get("FAIRBENCH_CATALOG"):
        return Path(os.environ["FAIRBENCH_CATALOG"])
    env = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    return _user_cache() / f"fairbench-catalog-{env}.json"
