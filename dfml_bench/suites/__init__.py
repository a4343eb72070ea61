"""The built-in suites, one module per family (``smoke``, ``blackbox``, ``whitebox``, ...). Each module
exports ``SUITES = {name: factory(scale) -> Suite}``; :func:`builtin_suites` is the entry point of the
``dfml_bench.suites`` group that registers them all."""

from __future__ import annotations

import importlib

FAMILIES = ("smoke", "blackbox", "whitebox", "sweeps", "budget")


def builtin_suites() -> dict:
    out: dict = {}
    for fam in FAMILIES:
        try:
            mod = importlib.import_module(f"{__name__}.{fam}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{fam}":
                continue  # family not written yet
            raise
        out.update(mod.SUITES)
    return out
