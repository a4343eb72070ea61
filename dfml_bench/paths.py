"""Where dfml-bench keeps its caches (datasets, zoos, episodes)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The cache root: ``$DFML_BENCH_HOME`` or ``~/.cache/dfml-bench``."""
    root = os.environ.get("DFML_BENCH_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "dfml-bench")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_root(explicit: str | os.PathLike | None = None) -> Path | None:
    """The user's root of real datasets: ``--data-root`` or ``$DFML_BENCH_DATA`` (None if neither)."""
    value = explicit or os.environ.get("DFML_BENCH_DATA")
    return Path(value).expanduser() if value else None
