"""Entry-point registries (HELM-style): methods, suites and datasets are all discovered the same way.

A plugin that fails to import is kept with its error, so ``dfml-bench list`` can show it and the
other plugins keep working.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Any

GROUPS = ("dfml_bench.methods", "dfml_bench.suites", "dfml_bench.datasets")


@dataclass
class Entry:
    name: str
    value: str  # "module:attr"
    package: str | None
    version: str | None
    obj: Any = None
    error: str | None = None


def load_group(group: str) -> dict[str, Entry]:
    """All entry points of ``group``, loaded; import failures are recorded, not raised."""
    out: dict[str, Entry] = {}
    for ep in metadata.entry_points(group=group):
        dist = getattr(ep, "dist", None)
        entry = Entry(
            name=ep.name,
            value=ep.value,
            package=dist.metadata["Name"] if dist is not None else None,
            version=dist.version if dist is not None else None,
        )
        try:
            entry.obj = ep.load()
        except Exception as exc:  # a broken plugin must not break the others
            entry.error = f"{type(exc).__name__}: {exc}"
        if ep.name in out and out[ep.name].error is None:
            continue  # first successfully loaded wins; duplicates are rare (editable + installed)
        out[ep.name] = entry
    return out
