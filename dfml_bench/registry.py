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


_LOCAL: dict[str, dict[str, Entry]] = {g: {} for g in GROUPS}


def register(group: str, name: str, obj: Any) -> None:
    """Register ``obj`` under ``group`` in this process only (notebooks, tests). Installed packages
    should declare an entry point instead, so that every process sees them."""
    if group not in GROUPS:
        raise ValueError(f"unknown registry group {group!r}; groups: {GROUPS}")
    _LOCAL[group][name] = Entry(name=name, value=f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}",
                                package=None, version=None, obj=obj)


def unregister(group: str, name: str) -> None:
    _LOCAL[group].pop(name, None)


def load_group(group: str) -> dict[str, Entry]:
    """All entry points of ``group``, loaded; import failures are recorded, not raised.
    In-process registrations (:func:`register`) take precedence."""
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
    out.update(_LOCAL.get(group, {}))
    return out


def resolve(group: str, name: str, error: type[Exception], kind: str) -> Entry:
    """The loaded entry ``name`` of ``group``; ``error`` (listing the valid names) if it is unknown or
    its plugin failed to import."""
    reg = load_group(group)
    if name not in reg:
        raise error(f"unknown {kind} {name!r}; registered {kind}s: {', '.join(sorted(reg)) or '(none)'}")
    entry = reg[name]
    if entry.error is not None:
        raise error(f"{kind} plugin {name!r} ({entry.value}) failed to import: {entry.error}; fix or uninstall it")
    return entry


def entry_info(group: str, name: str) -> Entry | None:
    """The entry ``name`` of ``group`` WITHOUT importing it (package metadata only; in-process
    registrations as registered). The harness uses this so that a method's code never runs in it."""
    if name in _LOCAL.get(group, {}):
        return _LOCAL[group][name]
    found = None
    for ep in metadata.entry_points(group=group):
        if ep.name == name:
            dist = getattr(ep, "dist", None)
            found = Entry(name=ep.name, value=ep.value, package=dist.metadata["Name"] if dist is not None else None,
                          version=dist.version if dist is not None else None)
            break
    return found


def entry_names(group: str) -> list[str]:
    """Names registered under ``group`` (metadata and in-process registrations), without importing."""
    return sorted({ep.name for ep in metadata.entry_points(group=group)} | set(_LOCAL.get(group, {})))
