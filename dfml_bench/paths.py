"""Where dfml-bench keeps its caches (datasets, zoos, episodes)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The cache root: ``$DFML_BENCH_HOME`` or ``~/.cache/dfml-bench``."""
    root = os.environ.get("DFML_BENCH_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "dfml-bench")
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NotADirectoryError(f"the cache folder {root} (DFML_BENCH_HOME) cannot be used: {exc.strerror or exc}; "
                                 "set DFML_BENCH_HOME to a folder you can write to") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"the cache folder {root} (DFML_BENCH_HOME) is not writable; "
                              "set DFML_BENCH_HOME to a folder you can write to")
    return path


def data_root(explicit: str | os.PathLike | None = None) -> Path | None:
    """The user's root of real datasets: ``--data-root`` or ``$DFML_BENCH_DATA`` (None if neither)."""
    value = explicit or os.environ.get("DFML_BENCH_DATA")
    return Path(value).expanduser() if value else None
